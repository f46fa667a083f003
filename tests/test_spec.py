"""Spec models, YAML/Python loading, located errors, JSON Schema, `tilegen validate`."""
import json
import re
import textwrap

import pytest

from tilegen import cli
from tilegen.collective.spec import CollectiveSpec
from tilegen.core.spec import KernelSpec, json_schema, op_kinds, parse_spec, spec_fields
from tilegen.core.spec_files import SpecError, load_spec, load_specs, parse_yaml_spec

GOOD = textwrap.dedent("""\
    name: ag
    op: allgather
    dtype: bf16
    world_sizes: [2, 4]
    shape:
      - {name: m, max: 128}
      - 64
    """)


def errors_of(text: str, path="s.yaml") -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_yaml_spec(text, path)
    return [f"{loc}: {msg}" for loc, msg in e.value.problems]


def test_good_spec_defaults_and_derived_sizes():
    s = parse_yaml_spec(GOOD, "g.yaml").spec
    assert (s.name, s.op, s.dtype, s.world_sizes) == ("ag", "allgather", "bf16", [2, 4])
    assert s.dynamic_dim.name == "m" and s.max_shape == (128, 64)
    assert s.max_shard_bytes == 128 * 64 * 2
    assert (s.transport, s.sync, s.schedule) == ("auto", "per_tile", "auto")
    with pytest.raises(Exception):
        s.name = "other"  # frozen


def test_spec_hash_is_stable_and_sensitive():
    a = parse_yaml_spec(GOOD).spec
    b = parse_yaml_spec(GOOD.replace("# nothing", "")).spec
    c = parse_yaml_spec(GOOD.replace("64", "65")).spec
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()


@pytest.mark.parametrize("line_text, replacement, expected", [
    ("dtype: bf16", "dtype: bf17", r"s\.yaml:3:8: dtype: Input should be 'bf16'"),
    ("name: ag", "name: 9x;rm -rf", r"s\.yaml:1:7: name: expected an identifier"),
    ("name: ag", "name: class", r"s\.yaml:1:7: name: 'class' is a reserved word"),
    ("name: ag", "name: \"über\"", r"s\.yaml:1:7: name: expected an identifier"),
    ("world_sizes: [2, 4]", "world_sizes: [2, 1]", r"s\.yaml:4:18: world_sizes\[1\]: .*greater than or equal to 2"),
    ("world_sizes: [2, 4]", "world_sizes: [2, 2]", r"s\.yaml:4:14: world_sizes: world sizes must be distinct"),
    ("  - 64", "  - -64", r"s\.yaml:7:5: shape\[1\]"),
    ("  - 64", "  - \"64\"", r"s\.yaml:7:5: shape\[1\]"),
    ("  - {name: m, max: 128}", "  - {name: m, max: 0}", r"s\.yaml:6:20: shape\[0\]\.max: .*greater than 0"),
    ("op: allgather", "op: allscatter", r"s\.yaml:2:5: op: expected one of allgather, .*, moe, got 'allscatter'"),
])
def test_bad_values_are_located_at_their_line_and_column(line_text, replacement, expected):
    errs = errors_of(GOOD.replace(line_text, replacement))
    assert any(re.match(expected, e) for e in errs), errs


@pytest.mark.parametrize("extra, expected", [
    ("ctas: many", "s.yaml:8:7: ctas: Input should be a valid integer, or 'auto' (got 'many')"),
    ("ctas: -3", "s.yaml:8:7: ctas: Input should be greater than or equal to 1, or 'auto' (got -3)"),
    ("ctas: [1, 2]", "s.yaml:8:7: ctas: Input should be a valid integer, or 'auto' (got a list)"),
    ("tile_bytes: x", "s.yaml:8:13: tile_bytes: Input should be a valid integer, or 'auto' (got 'x')"),
])
def test_a_field_of_several_forms_gets_one_message_in_a_users_words(extra, expected):
    """pydantic reports a union per member under tags of its own (ctas.constrained-int,
    ctas."literal['auto']"): one message names every accepted form instead."""
    assert GOOD.count("\n") == 7
    errs = errors_of(GOOD + extra + "\n")
    assert errs == [expected]


def test_unknown_key_points_at_the_key():
    errs = errors_of(GOOD + "colour: red\n")
    assert errs == [f"s.yaml:8:1: colour: unknown key (allowed: {', '.join(CollectiveSpec.model_fields)})"]


def test_missing_field_points_at_the_mapping():
    errs = errors_of(GOOD.replace("dtype: bf16\n", ""))
    assert errs == ["s.yaml:1:1: dtype: required field is missing"]


def test_several_errors_are_all_reported_in_order():
    errs = errors_of(GOOD.replace("bf16", "int4").replace("[2, 4]", "[0]") + "tile_bytes: 1000\n")
    assert [e.split(":")[3].strip() for e in errs] == ["dtype", "world_sizes[0]", "tile_bytes"]


@pytest.mark.parametrize("text, expected", [
    ("name: [unclosed\n", r"s\.yaml:2:1: <yaml>: "),
    ("name: a\nname: b\n", r"s\.yaml:2:1: <yaml>: found duplicate key"),
    ("- just\n- a list\n", r"s\.yaml:1:1: <spec>: expected a mapping of fields, got a list"),
    ("", r"s\.yaml:1:1: <spec>: expected a mapping of fields, got an empty document"),
    ("\tname: x\n", r"s\.yaml:1:1: <yaml>: "),
])
def test_malformed_yaml_is_located(text, expected):
    errs = errors_of(text)
    assert re.match(expected, errs[0]), errs


@pytest.mark.parametrize("field, value, msg", [
    ("tile_bytes", 1000, "between 1024 and"),
    ("tile_bytes", 1032, "multiple of 16"),
    ("threads", 100, "multiple of 32"),
    ("arch", "sm_60", "architecture"),
    ("arch", "sm_90; system('x')", "architecture"),
    ("shape", [{"name": "m", "max": 64}, {"name": "m", "max": 4}], "dynamic dims need distinct names"),
    ("ctas", 0, "greater than or equal to 1"),
    ("world_sizes", [], "at least 1 item"),
])
def test_field_rules(field, value, msg):
    base = dict(name="x", op="allgather", dtype="f32", world_sizes=[2], shape=[4, 4])
    base[field] = value
    with pytest.raises(Exception, match=msg):
        parse_spec(base)


def test_huge_outputs_are_refused():
    with pytest.raises(Exception, match="over 1 TiB"):
        KernelSpec(name="x", op="allgather", dtype="f32", world_sizes=[8], shape=[1 << 31, 1 << 31])


def test_python_config_spec(tmp_path):
    p = tmp_path / "cfg.py"
    p.write_text("from tilegen.spec import KernelSpec\nSPEC = KernelSpec(name='pyop', op='allgather', dtype='f16',\n"
                 "    world_sizes=[2], shape=[8, 8])\n")
    ls = load_spec(p)
    assert ls.spec.name == "pyop" and ls.loc.line == 2


def test_python_config_errors_are_located(tmp_path):
    p = tmp_path / "cfg.py"
    p.write_text(
        "SPEC = dict(\n    name='ok',\n    op='allgather',\n    dtype='f64',\n    world_sizes=[2],\n    shape=[8],\n)\n"
    )
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert str(e.value).startswith(f"{p}:4:11: dtype: Input should be")
    p.write_text("x = 1\nraise RuntimeError('boom')\n")
    with pytest.raises(SpecError, match=r":2:1: <python>: RuntimeError: boom"):
        load_spec(p)
    p.write_text("x = 1\n")
    with pytest.raises(SpecError, match="must define SPEC"):
        load_spec(p)


def test_duplicate_names_across_files(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD)
    good, problems = load_specs([tmp_path])
    assert len(good) == 1 and "name: 'ag' is already used by" in problems[0][1]


def test_cli_validate_reports_each_bad_spec_and_exits_nonzero(tmp_path, capsys):
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad1.yaml").write_text(GOOD.replace("ag", "bad_one").replace("bf16", "bf17"))
    (tmp_path / "bad2.yaml").write_text(GOOD.replace("ag", "bad_two") + "extra: 1\n")
    assert cli.main(["validate", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{tmp_path}/bad1.yaml:3:8: dtype:")
    assert err[1].startswith(f"{tmp_path}/bad2.yaml:8:1: extra: unknown key")
    assert cli.main(["validate", str(tmp_path / "good.yaml")]) == 0


def test_repo_specs_are_valid(root, capsys):
    assert cli.main(["validate", str(root / "specs")]) == 0
    out = capsys.readouterr().out
    assert "allgather_bf16" in out and "allgather_f16_nvshmem" in out


def test_committed_json_schema_is_current(root):
    committed = json.loads((root / "specs" / "tilegen-spec.schema.json").read_text())
    assert committed == json_schema(), "run: tilegen schema -o specs/tilegen-spec.schema.json"
    members = [committed["$defs"][ref["$ref"].rsplit("/", 1)[1]] for ref in committed["oneOf"]]
    assert set().union(*(m["properties"] for m in members)) == set(spec_fields())
    assert committed["discriminator"]["propertyName"] == "op" and set(committed["discriminator"]["mapping"]) == \
        set(op_kinds())
    for m in members:  # the fields every op needs (an element type: dtype, or dtypes where the family has it)
        assert {"name", "op", "world_sizes", "shape"} <= set(m["required"])
        assert "dtype" in m["required"] or m["anyOf"] == [{"required": ["dtype"]}, {"required": ["dtypes"]}]


def test_gemm_rs_without_n_is_a_located_error_not_a_crash():
    # found by the fuzz test: sizes were computed from n before the rule requiring n ran
    text = "name: a\nop: gemm_rs\ndtype: bf16\nworld_sizes: [2]\nshape: [1, 1]\n"
    assert errors_of(text, "fuzz.yaml") == ["fuzz.yaml:1:1: n: op gemm_rs needs n"]


# ---------------------------------------------------------------- sharded GEMM dims: one spec for every TP degree
GEMM_RS = """name: down
op: gemm_rs
dtype: bf16
world_sizes: [2, 4, 8]
shape:
  - {name: m, max: 8192}
  - {full: 14336}
n: 4096
b_layout: nk
"""


def test_a_sharded_dim_gives_each_world_size_its_share():
    s = parse_yaml_spec(GEMM_RS, "s.yaml").spec
    assert [s.gemm_nk(w) for w in (2, 4, 8)] == [(4096, 7168), (4096, 3584), (4096, 1792)]
    assert s.comm_inner == (4096,) and s.max_shape == (8192, 7168)
    up = parse_yaml_spec(
        GEMM_RS.replace("op: gemm_rs", "op: ag_gemm")
        .replace("{full: 14336}", "4096")
        .replace("n: 4096", "n: {full: 28672}"),
        "s.yaml",
    ).spec
    assert [up.gemm_nk(w) for w in (2, 4)] == [(14336, 4096), (7168, 4096)]


@pytest.mark.parametrize(
    "old, new, expected",
    [
        (
            "{full: 14336}",
            "{full: 14338}",
            r"s\.yaml:6:3: shape: \{full: 14338\} does not split evenly over world sizes \[4, 8\]",
        ),
        ("{full: 14336}", "{full: 0}", r"s\.yaml:7:12: shape\[1\]\.full: Input should be greater than 0"),
        ("{full: 14336}", "{fill: 14336}", r"s\.yaml:7:12: shape\[1\]\.fill: unknown key \(allowed: name, max\)"),
        ("n: 4096", "n: {full: 8192}", r"s\.yaml:8:1: n: only ag_gemm's n may be sharded"),
        ("n: 4096", "n: {full: 8192, x: 1}", r"s\.yaml:8:20: n\.x: unknown key \(allowed: full\)"),
        ("  - {name: m, max: 8192}", "  - {full: 8192}", r"s\.yaml:6:3: shape: dim 0 \(rows\) cannot be sharded"),
        ("op: gemm_rs", "op: ag_gemm", r"s\.yaml:6:3: shape: only gemm_rs's k \(shape\[1\]\) may be sharded"),
        ("op: gemm_rs", "op: allgather", r"s\.yaml:\d+:\d+: shape: only a GEMM op's k \(gemm_rs\) may be sharded"),
        ("b_layout: nk", "b_layout: nk\nctas: 100", r"s\.yaml:10:7: ctas: a gemm_rs communication kernel runs beside"),
    ],
)
def test_sharding_and_gemm_cta_errors_are_located(old, new, expected):
    text = GEMM_RS.replace(old, new)
    if "allgather" in new:
        text = text.replace("n: 4096\nb_layout: nk\n", "")
    errs = errors_of(text)
    assert any(re.match(expected, e) for e in errs), errs


def test_fused_needs_every_share_a_multiple_of_8():
    with pytest.raises(Exception, match="n and k multiples of 8 .* at world 8"):
        parse_yaml_spec(GEMM_RS.replace("{full: 14336}", "{full: 14368}") + "overlap: fused\n", "s.yaml")


def test_overlap_auto_is_the_copy_engine_unless_the_kernel_is_configured():
    """auto runs the copy engines (the fastest measured style); a spec that sets the communication
    kernel's CTAs, tiles, schedule or NVSHMEM transport keeps the kernel (decomposed)."""
    assert parse_yaml_spec(GEMM_RS, "s.yaml").spec.overlap_style == "copy_engine"
    assert parse_yaml_spec(GEMM_RS + "ctas: 8\n", "s.yaml").spec.overlap_style == "decomposed"
    assert parse_yaml_spec(GEMM_RS + "transport: nvshmem\n", "s.yaml").spec.overlap_style == "decomposed"
    assert parse_yaml_spec(GEMM_RS + "overlap: fused\n", "s.yaml").spec.overlap_style == "fused"
    assert parse_yaml_spec(GEMM_RS.replace("op: gemm_rs", "op: allgather").replace("n: 4096\nb_layout: nk\n", "")
                           .replace("{full: 14336}", "14336"), "s.yaml").spec.op == "allgather"


@pytest.mark.parametrize("extra, expected", [
    ("overlap: copy_engine\ntransport: nvshmem\n", r"s\.yaml:\d+:\d+: transport: the copy-engine overlap copies"),
    ("overlap: copy_engine\nctas: 8\n", r"s\.yaml:\d+:\d+: ctas: the copy-engine overlap runs no communication kernel"),
    ("overlap: copy_engine\ntile_bytes: 65536\n", r"s\.yaml:\d+:\d+: tile_bytes: the copy-engine overlap runs no"),
    ("overlap: dma\n", r"s\.yaml:\d+:\d+: overlap: .*copy_engine"),
])
def test_copy_engine_spec_errors_are_located(extra, expected):
    errs = errors_of(GEMM_RS + extra)
    assert any(re.match(expected, e) for e in errs), errs


MULTI = """\
name: ar_any
op: allreduce
dtypes: [bf16, f16, f32]
world_sizes: [2, 4]
shape: [{name: m, max: 64}, 512]
"""


def test_one_library_may_serve_several_element_types():
    s = parse_yaml_spec(MULTI, "m.yaml").spec
    assert s.dtype == "bf16" and s.all_dtypes == ("bf16", "f16", "f32")
    assert s.elem_bytes == 4 and s.max_shard_bytes == 64 * 512 * 4  # sized for the widest
    assert parse_yaml_spec(MULTI.replace("op: allreduce", "op: allreduce\ndtype: f16"), "m.yaml").spec.dtype == "f16"
    one = parse_yaml_spec(GOOD, "g.yaml").spec
    assert one.dtypes is None and one.all_dtypes == ("bf16",)


@pytest.mark.parametrize("edit, needle", [
    (("[bf16, f16, f32]", "[bf16, u8]"), "m.yaml:3:9: dtypes: allreduce reduces; use bf16, f16, f32 or i32"),
    (("[bf16, f16, f32]", "[bf16, bf16]"), "element types must be distinct"),
    (("op: allreduce", "op: allreduce\ndtype: i32"), "dtype: i32 is not among dtypes ['bf16', 'f16', 'f32']"),
    (("[bf16, f16, f32]", "[bf16, f64]"), "m.yaml:3:16"),
])
def test_bad_element_type_lists_are_located(edit, needle):
    errs = errors_of(MULTI.replace(*edit), "m.yaml")
    assert any(needle in e for e in errs), errs


def test_gemm_ops_serve_one_element_type():
    text = ("name: agm\nop: ag_gemm\ndtypes: [bf16, f16]\nworld_sizes: [2]\nshape: [{name: m, max: 64}, 512]\n"
            "n: 256\n")
    errs = errors_of(text, "g.yaml")
    assert any("dtypes: ag_gemm serves one element type" in e for e in errs), errs


def test_collectives_may_leave_inner_dims_free_other_families_may_not():
    s = parse_yaml_spec(MULTI.replace("512]", "{name: hidden, max: 512}]"), "m.yaml").spec
    assert s.free_inner and s.max_shape == (64, 512) and s.max_shard_bytes == 64 * 512 * 4
    gemm = ("name: agm\nop: ag_gemm\ndtype: bf16\nworld_sizes: [2]\nshape: [{name: m, max: 64}, {name: k, max: 512}]\n"
            "n: 256\n")
    assert any("only dim 0 of ag_gemm may be dynamic" in e for e in errors_of(gemm, "g.yaml"))
    twice = MULTI.replace("512]", "{name: m, max: 512}]")
    assert any("dynamic dims need distinct names" in e for e in errors_of(twice, "m.yaml"))


def test_every_example_yaml_spec_validates_against_the_exported_schema(root):
    """What editors check through the schema: every committed YAML spec passes it (allreduce_multi gives
    dtypes and no dtype), and a spec with neither, or with a field of another family, does not."""
    jsonschema = pytest.importorskip("jsonschema")
    from ruamel.yaml import YAML
    schema = json.loads((root / "specs" / "tilegen-spec.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted((root / "specs").glob("*.yaml")):
        data = json.loads(json.dumps(YAML(typ="safe").load(path.read_text())))
        errors = [e.message for e in validator.iter_errors(data)]
        assert not errors, (path.name, errors[:3])
    bare = {"name": "x", "op": "allreduce", "world_sizes": [2], "shape": [8, 8]}
    assert not validator.is_valid(bare)
    assert validator.is_valid({**bare, "dtypes": ["bf16"]})
    assert not validator.is_valid({**bare, "dtype": "bf16", "experts": 8})
