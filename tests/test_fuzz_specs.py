"""Property-based: random and mutated specs through loader, planner and renderer.

Each example either loads into a valid op that plans and renders, or fails with clean
`path:LINE:COL: field: message` problems; never another exception. Rendered sources depend only on
validated fields: changing a spec's free text changes no byte of the .cu/.cc/.py files, and every
character of them is ASCII.
"""
import io
import json
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from tilegen.core.pipeline import generate_op
from tilegen.collective.spec import SCHEDULES
from tilegen.core.spec import OpSpec, parse_spec, spec_fields
from tilegen.core.spec_files import SpecError, parse_yaml_spec

EXAMPLES = int(__import__('os').environ.get('TILEGEN_FUZZ_EXAMPLES', 10_000))
PROBLEM = re.compile(r"^fuzz\.yaml:(\d+):(\d+): \S.*$", re.S)

EVIL_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "'; rm -rf / #",
            '"); system("id"); //',
            "*/ #include <x> /*",
            "{{ 7*7 }}",
            "$(reboot)",
            "name\n  injected: 1",
            "ünïcödé_ñame",
            "a" * 300,
            "",
            " ",
            "\t",
            "NULL",
            "class",
            "int",
            "__init__",
            "x\x00y",
            "../../etc/passwd",
            "%s%n%x",
            "\u202eevil",
        ]
    ),
)
ANY_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), EVIL_TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(EVIL_TEXT, inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def valid_fields(draw):
    op = draw(st.sampled_from(list(SCHEDULES)))
    dtype = draw(
        st.sampled_from(["bf16", "f16", "f32", "i32"] + ([] if op in ("reduce_scatter", "allreduce") else ["u8"]))
    )
    dims = draw(st.lists(st.integers(1, 4096), min_size=0, max_size=2))
    first = draw(st.one_of(st.integers(1, 512), st.builds(lambda m: {"name": "m", "max": m}, st.integers(1, 4096))))
    spec = {
        "name": draw(st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)),  # keywords are refused cleanly
        "op": op,
        "dtype": dtype,
        "world_sizes": draw(st.lists(st.integers(2, 8), min_size=1, max_size=3, unique=True)),
        "shape": [first] + dims,
        "schedule": draw(st.sampled_from(("auto",) + SCHEDULES[op])),
        "sync": draw(st.sampled_from(["per_tile", "barrier"])),
        "transport": draw(st.sampled_from(["auto", "nvlink", "nvshmem"])),
        "ctas": draw(st.integers(1, 600)) if draw(st.integers(0, 9)) else "auto",  # auto plans 18x slower
        "tile_bytes": draw(st.sampled_from([1024, 4096, 65536, 262144, "auto"])),
        "threads": draw(st.sampled_from([32, 128, 256, 512, 1024])),
        "description": draw(EVIL_TEXT),
    }
    if op in ("reduce_scatter", "allreduce"):
        spec["reduce"] = draw(st.sampled_from(["sum", "max", "min"]))
    if op in ("ag_gemm", "gemm_rs"):
        spec.update(
            n=draw(st.integers(1, 4096)),
            b_layout=draw(st.sampled_from(["kn", "nk"])),
            shape=[first, draw(st.integers(1, 4096))],
            dtype=draw(st.sampled_from(["bf16", "f16", "f32"])),
        )
    return spec


@st.composite
def mutated(draw):
    fields = draw(valid_fields())
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["set", "drop", "add", "name", "shape"]))
        if kind == "set":
            fields[draw(st.sampled_from(sorted(spec_fields())))] = draw(ANY_VALUE)
        elif kind == "drop" and fields:
            fields.pop(draw(st.sampled_from(sorted(fields))))
        elif kind == "add":
            fields[draw(EVIL_TEXT)] = draw(ANY_VALUE)
        elif kind == "name":
            fields["name"] = draw(EVIL_TEXT)
        else:
            fields["shape"] = draw(
                st.lists(
                    st.one_of(
                        st.integers(-5, 2**40),
                        st.dictionaries(st.sampled_from(["name", "max", "min", "x"]), ANY_VALUE, max_size=3),
                        ANY_VALUE,
                    ),
                    max_size=6,
                )
            )
    out = io.StringIO()
    y = YAML(typ="safe", pure=True)
    y.default_flow_style = draw(st.booleans())
    y.dump(fields, out)
    text = out.getvalue()
    if draw(st.integers(0, 4)) == 0:  # raw text damage: syntax errors, tabs, truncation
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.text(alphabet=string.printable + "\t:[]{}&*!|>'\"%@`", max_size=5)) + text[pos:]
    return text


def _render(spec: OpSpec) -> tuple[dict[str, str], dict]:
    """Generated sources (provenance hash masked: it is hex of the whole spec) and the manifest."""
    files = generate_op(spec, "3.4.5", check=False)
    sources = {
        k: re.sub(r"spec sha256 [0-9a-f]{16}", "spec sha256 <hash>", v)
        for k, v in files.items()
        if not k.endswith(".json")
    }
    return sources, json.loads(files["manifest.json"])


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mutated())
def test_any_spec_text_loads_cleanly_or_fails_with_located_problems(text):
    try:
        loaded = parse_yaml_spec(text, "fuzz.yaml")
    except SpecError as e:
        assert e.problems
        nlines = text.count("\n") + 2
        for loc, msg in e.problems:
            line = f"{loc}: {msg}"
            m = PROBLEM.match(line)
            assert m, line
            assert 1 <= int(m.group(1)) <= nlines and int(m.group(2)) >= 1, line
        return
    spec = loaded.spec
    assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.name)
    files, manifest = _render(spec)  # plans every world size on the way
    for w in spec.world_sizes:
        variants = manifest["plans"][str(w)]
        assert variants and variants[-1]["max_in_bytes"] == spec.max_in_bytes(w)
    for name, text_out in files.items():
        assert text_out.isascii(), name
    other = parse_spec({**spec.model_dump(), "description": "completely different text ~!@#"})
    assert _render(other)[0] == files, "free text reached the generated sources"
