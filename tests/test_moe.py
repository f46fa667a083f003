"""MoE dispatch/combine (issue 15), the plan and check stages: the layout every sender computes from
the all-gathered counts, the references, the protocol across calls; each checker catches broken
arithmetic or a missing synchronisation (tests that can fail)."""
import numpy as np
import pytest

from tilegen.moe import check as moe
from tilegen.moe.check import MODES, MoeShape, MoeStep, check_moe, check_moe_protocol, check_routing, moe_program

SHAPES = [MoeShape(2, 4, 2, 5), MoeShape(4, 16, 4, 6), MoeShape(4, 256, 8, 4), MoeShape(8, 64, 8, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode, push", [("normal", "item"), ("normal", "token"), ("low_latency", "item")])
def test_layouts_match_the_reference(shape, mode, push):
    assert check_moe(shape, mode, push=push) == []


def test_deduplicated_push_moves_fewer_rows():
    """Top-8 of 256 experts over 4 ranks: a token has items on ~2.7 other ranks but ~6 items there,
    so pushing each token once per destination (then expanding locally) moves ~2.2x fewer rows."""
    import random
    shape = MoeShape(4, 256, 8, 512)
    rng = random.Random(0)
    per_item, per_token = moe.nvlink_rows(shape, [moe.random_routing(shape, 512, rng) for _ in range(4)])
    assert 5.8 < per_item / 2048 < 6.2 and 2.5 < per_token / 2048 < 2.9


def test_checker_catches_broken_staging_arithmetic():
    """Staging rows without the earlier sources' tokens: two sources' tokens collide."""
    def broken(shape, me, idx, ntok):
        return moe.staging_rows(shape, 0, idx, ntok * 0) if me else moe.staging_rows(shape, me, idx, ntok)
    problems = check_moe(MoeShape(4, 16, 4, 6), "normal", rows_fn=broken, push="token")
    assert problems and any("written twice" in p or "never written" in p for p in problems), problems[:3]


def test_checker_catches_a_staging_row_past_the_rows_the_receiver_reads():
    """A sender that skips its segment's first row: the receiver reads rows 0..n-1 of each segment."""
    def shifted(shape, me, idx, ntok):
        rows = moe.staging_rows(shape, me, idx, ntok)
        return np.where(rows >= 0, rows + 1, rows)
    problems = check_moe(MoeShape(2, 8, 2, 6), "normal", rows_fn=shifted, push="token")
    assert problems and any("never written" in p or "outside" in p for p in problems), problems[:3]


def test_checker_catches_a_wrong_item_index(monkeypatch):
    """The sender's item index (its earlier items for the expert) off by one for every item after the
    first: the receiver's final rows collide or leave gaps."""
    real = moe.item_index
    monkeypatch.setattr(moe, "item_index", lambda shape, idx: np.where(real(shape, idx) > 0, real(shape, idx) - 1, -1))
    problems = check_moe(MoeShape(2, 8, 2, 6), "normal", push="token")
    assert problems and any("final rows written" in p or "outside" in p for p in problems), problems[:3]


def test_checks_pass_with_tokens_whose_slots_are_all_dropped():
    """Seed 9's "dropped" routing at 4 ranks, top-4, has a token with every slot dropped (its combine
    is zeros): the checks once crashed on it instead of checking."""
    shape = MoeShape(4, 16, 4, 9)
    for mode in MODES:
        assert check_moe(shape, mode, seeds=16) == []


def test_low_latency_checker_catches_a_line_row_naming_another_ranks_rows(monkeypatch):
    """A token's line row to rank d names its slot rows there (the destination copies the token into
    each): one that named the slots' rows at every rank would have d write rows of other ranks' experts."""
    monkeypatch.setattr(moe, "line_row_slots", lambda slot_rows, d: slot_rows.max(axis=0))
    problems = check_moe(MoeShape(4, 16, 4, 6), "low_latency")
    assert problems and any("written twice" in p or "different layout" in p for p in problems), problems[:3]


def test_low_latency_checker_catches_a_broken_state_row(monkeypatch):
    """Combine's state per (source, token) at its rank's segment: one row per token collides."""
    monkeypatch.setattr(moe, "staging_rows", lambda shape, me, idx, ntok=None: np.where(
        np.stack([[any(int(e) // shape.local_experts == d for e in row if e >= 0) for d in range(shape.world)]
                  for row in idx]).reshape(len(idx), shape.world), me * shape.max_tokens, -1))
    problems = check_moe(MoeShape(4, 16, 4, 6), "low_latency")
    assert any("written twice" in p for p in problems), problems[:3]


def test_low_latency_combine_through_the_state_is_checked(monkeypatch):
    """Combine runs from the state the sources wrote: weights stored against the wrong slots leave the
    layout right and are caught by the combine check."""
    monkeypatch.setattr(moe, "state_weights", lambda w, slot_rows: np.where(slot_rows >= 0, w[::-1], 0.0))
    problems = check_moe(MoeShape(4, 16, 4, 6), "low_latency")
    assert problems and all("combine through the sources' state" in p for p in problems), problems[:3]


def test_reference_layout_small_example():
    """2 ranks, 4 experts (2 per rank), top-2: rank 1 receives experts 2, 3's items ordered by
    (local expert, source, token, slot); combine sums each token's slots with its weights."""
    shape = MoeShape(2, 4, 2, 3)
    idxs = [np.array([[2, 0], [3, 2]]), np.array([[2, -1]])]
    xs = [np.array([[10.0], [11.0]]), np.array([[20.0]])]
    got = moe.reference_dispatch(shape, xs, idxs)
    assert got[1].counts.tolist() == [3, 1]
    assert got[1].handle.tolist() == [[0, 0, 0], [0, 1, 1], [1, 0, 0], [0, 1, 0]]
    assert got[1].x[:, 0].tolist() == [10.0, 11.0, 20.0, 11.0]
    assert got[0].handle.tolist() == [[0, 0, 1]]
    ws = [np.array([[0.5, 0.25], [1.0, 2.0]]), np.array([[3.0, 9.0]])]
    outs = moe.reference_combine(shape, [g.x * 2 for g in got], [g.handle for g in got], idxs, ws)
    assert outs[0][:, 0].tolist() == [0.5 * 20 + 0.25 * 20, 1.0 * 22 + 2.0 * 22]
    assert outs[1][:, 0].tolist() == [3.0 * 40]  # the dropped slot's weight counts for nothing


def test_sender_rows_are_the_destination_rows():
    """What one sender computes from the all-gathered counts is where the reference puts its items."""
    shape = MoeShape(4, 16, 4, 6)
    rng = __import__("random").Random(3)
    idxs = [moe.random_routing(shape, 6, rng, "dropped") for _ in range(4)]
    counts = np.stack([moe.expert_counts(shape, i) for i in idxs])
    ref = moe.reference_dispatch(shape, [np.zeros((6, 1))] * 4, idxs)
    for s in range(4):
        rows = moe.sender_rows(shape, s, idxs[s], counts)
        for t in range(6):
            for j in range(4):
                e = int(idxs[s][t, j])
                if e >= 0:
                    assert ref[e // 4].handle[rows[t, j]].tolist() == [s, t, j]


@pytest.mark.parametrize("mode, broken", [
    # without the earlier source ranks' items: two senders write the same rows
    ("normal", lambda sh, me, idx, counts: moe.sender_rows(sh, me, idx, counts) - counts[:me].sum(axis=0)[
        np.maximum(idx, 0)] * (idx >= 0)),
    # without the destination's earlier experts: rows of different experts collide
    ("normal", lambda sh, me, idx, counts: moe.sender_rows(sh, 0, idx, counts * 0) + counts[:me].sum(axis=0)[
        np.maximum(idx, 0)] * (idx >= 0) - (idx < 0)),
    # counting a token's rows from 1: the last row of a segment runs past it, row 0 never written
    ("low_latency", lambda sh, idx: moe.ll_rows(sh, idx) + (idx >= 0)),
])
def test_checker_catches_broken_row_arithmetic(mode, broken):
    problems = check_moe(MoeShape(4, 16, 4, 6), mode, rows_fn=broken)
    assert problems and any(w in " ".join(problems) for w in ("twice", "never", "outside", "different", "not 0..n-1"))


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("mode", MODES)
def test_protocol_has_no_race_or_deadlock(world, mode):
    assert check_moe_protocol(world, mode) == []


@pytest.mark.parametrize("drop", ["counts", "recv", "back"])
def test_protocol_checker_catches_a_missing_wait(drop):
    prog = tuple(s for s in moe_program("normal") if not (s.kind == "wait" and s.flag == drop))
    problems = check_moe_protocol(4, program=prog)
    assert problems and any("of call" in p or "write-after-read" in p for p in problems), problems[:3]


def test_protocol_checker_catches_an_expansion_that_does_not_wait_for_the_lines():
    """Low-latency dispatch has no flag: the expansion reads each line row once its lines carry the
    call's epoch (tagged_read). Read plainly, it reads rows not yet sent (or the last call's); with the
    epoch not in the data (an untagged put), it waits forever, which the check reports as a deadlock."""
    ll = moe_program("low_latency")
    assert [s.kind for s in ll[:2]] == ["put", "tagged_read"] and ll[0].tagged
    plain = tuple(MoeStep("read", s.buf) if s.kind == "tagged_read" else s for s in ll)
    problems = check_moe_protocol(4, "low_latency", program=plain)
    assert problems and "read recv from rank" in problems[0], problems[:2]
    untagged = tuple(MoeStep("put", s.buf, s.flag) if s.tagged else s for s in ll)
    stuck = check_moe_protocol(2, "low_latency", program=untagged)
    assert stuck and "deadlock" in stuck[0] and "wait for recv's epoch 1" in stuck[0], stuck[:2]


def test_protocol_checker_catches_reading_after_handing_back():
    """The experts reading recv after combine pushed back (a caller using dispatch's output late):
    a fast peer's next dispatch overwrites it."""
    prog = list(moe_program("low_latency"))
    read_recv = prog.pop(prog.index(MoeStep("read", "recv")))
    prog.append(read_recv)
    problems = check_moe_protocol(4, "low_latency", program=tuple(prog))
    assert any("write-after-read" in p or "of call" in p for p in problems), problems[:3]


def test_protocol_checker_catches_combine_state_read_after_its_flag():
    """Low-latency sources write combine's state (slot rows, weights) at the destination: a combine that
    signalled before reading it would let a fast peer's next dispatch overwrite it."""
    prog = list(moe_program("low_latency"))
    put_back = prog.index(MoeStep("put", "back", "back"))
    assert prog[put_back - 1] == MoeStep("read", "recv")  # the state is read before the flag goes out
    prog.insert(put_back, prog.pop(put_back - 1))
    problems = check_moe_protocol(4, "low_latency", program=tuple(prog))
    assert any("write-after-read" in p or "of call" in p for p in problems), problems[:3]


def test_protocol_checker_reports_a_deadlock():
    """A rank waiting for a flag no step sets."""
    prog = moe_program("normal") + (MoeStep("wait", flag="never"),)
    problems = check_moe_protocol(2, program=prog, seeds=2)
    assert problems and "deadlock" in problems[0] and "wait for never" in problems[0]


@pytest.mark.parametrize("idx, weights, message", [
    (np.array([[0, 16]]), None, r"topk_idx\[0, 1\] = 16: expert ids must be in \[0, 16\) or -1"),
    (np.array([[0, -2]]), None, r"topk_idx\[0, 1\] = -2"),
    (np.array([[0, 1, 2]]), None, r"topk_idx must be \[m, 2\] \(topk 2\), got shape \[1, 3\]"),
    (np.array([[0.0, 1.0]]), None, "must hold integers"),
    (np.zeros((9, 2), dtype=np.int64), None, "9 tokens, more than max_tokens 8"),
    (np.array([[0, 1]]), np.zeros((1, 3)), r"topk_weights must have topk_idx's shape \[1, 2\]"),
])
def test_bad_routings_are_value_errors(idx, weights, message):
    with pytest.raises(ValueError, match=message):
        check_routing(MoeShape(4, 16, 2, 8), idx, weights)


def test_bad_shapes_and_modes():
    with pytest.raises(ValueError, match="must split evenly over 4 ranks"):
        MoeShape(4, 10, 2, 8)
    with pytest.raises(ValueError, match="topk .9. exceeds the 8 experts"):
        MoeShape(2, 8, 9, 8)
    with pytest.raises(ValueError, match="mode must be one of normal, low_latency"):
        check_moe(MoeShape(2, 4, 2, 2), "fast")
    with pytest.raises(ValueError, match="push must be one of item, token"):
        check_moe(MoeShape(2, 4, 2, 2), push="expert")


# ------------------------------------------------------------------ op: moe through the pipeline
import textwrap  # noqa: E402

import pytest  # noqa: E402

from tilegen.core import pipeline  # noqa: E402
from tilegen.core.render import CodegenError, render_op  # noqa: E402
from tilegen.core.spec_files import SpecError, parse_yaml_spec  # noqa: E402

MOE_SPEC = textwrap.dedent("""\
    name: moe_t
    op: moe
    dtype: bf16
    world_sizes: [2, 4]
    shape: [{name: tokens, max: 128}, 256]
    experts: 16
    topk: 4
    """)


def moe_errors(text: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_yaml_spec(text, "m.yaml")
    return [f"{loc}: {msg}" for loc, msg in e.value.problems]


def test_moe_spec_loads_with_defaults():
    s = parse_yaml_spec(MOE_SPEC, "m.yaml").spec
    assert (s.op, s.experts, s.topk, s.mode, s.max_shape) == ("moe", 16, 4, "normal", (128, 256))
    # two halves of: staging rows, meta rows (1 + 3k ints), counts rows, combine rows; then the flags
    a = lambda b: -(-b // 256) * 256  # noqa: E731
    half = a(4 * 128 * 256 * 2) + a(4 * 128 * 13 * 4) + a(4 * 17 * 4) + a(4 * 128 * 256 * 2)
    assert s.symmetric_bytes(4) == 2 * half + 2 * 4 * 8


@pytest.mark.parametrize("old, new, expected", [
    ("experts: 16\n", "", "experts: op moe needs experts"),
    ("experts: 16", "experts: 15", "experts: 15 experts do not split evenly over world sizes [2, 4]"),
    ("topk: 4", "topk: 17", "topk: 17 exceeds the 16 experts"),
    ("topk: 4", "topk: 4\nmode: fast", "mode"),
    ("256]", "252]", "must be a multiple of 16"),
    ("dtype: bf16", "dtype: i32", "dtype: op moe moves bf16, f16 or f32"),
    ("dtype: bf16", "dtype: bf16\nn: 64", "n: op moe takes no n"),
    ("dtype: bf16", "dtype: bf16\narch: sm_75", "arch: op moe needs sm_80 or newer"),
    ("dtype: bf16", "dtype: bf16\ntransport: nvshmem", "transport: op moe stores through NVLink peer pointers"),
])
def test_moe_spec_errors_name_the_field(old, new, expected):
    assert old in MOE_SPEC
    errs = moe_errors(MOE_SPEC.replace(old, new))
    assert any(expected in e and e.startswith("m.yaml:") for e in errs), errs


def test_moe_fields_belong_to_moe_ops_only():
    text = MOE_SPEC.replace("op: moe", "op: allgather").replace("shape: [{name: tokens, max: 128}, 256]",
                                                                 "shape: [128, 256]")
    assert any("experts: op allgather takes no experts (only moe take it)" in e for e in moe_errors(text))


def test_moe_op_renders_traits_binding_wrapper_and_manifest():
    s = parse_yaml_spec(MOE_SPEC, "m.yaml").spec
    files = pipeline.generate_op(s, "3.4.5")
    assert sorted(files) == ["manifest.json", "moe_t.cu", "moe_t_binding.cc", "op.py"]
    cu = files["moe_t.cu"]
    for line in ("static constexpr int kExperts = 16;", "static constexpr int kTopk = 4;",
                 "static constexpr int64_t kMaxTokens = 128LL;", "static constexpr int64_t kHidden = 256LL;",
                 "static constexpr int kWorlds[] = { 2, 4 };", "TILEGEN_EXPORT_MOE(tilegen_op::Op)"):
        assert line in cu, line
    assert "kHidden = 256, kMaxTokens = 128" in files["moe_t_binding.cc"]
    assert "MoeOp(" in files["op.py"] and "experts=16" in files["op.py"] and 'mode="normal"' in files["op.py"]
    man = __import__("json").loads(files["manifest.json"])
    assert man["moe"]["mode"] == "normal" and man["moe"]["symmetric_bytes"]["4"] == s.symmetric_bytes(4)
    assert files == pipeline.generate_op(s, "3.4.5")  # deterministic
    assert render_op(s, pipeline.checked_lowering(s), "3.4.5") == files


def test_moe_op_is_not_generated_when_its_check_fails(monkeypatch):
    s = parse_yaml_spec(MOE_SPEC, "m.yaml").spec
    monkeypatch.setattr(moe, "moe_problems", lambda w, e, k, mode: ("seed 3: rank 1: rows written twice [4]",))
    with pytest.raises(CodegenError, match="world 2: the MoE check failed:\nseed 3: rank 1: rows written twice"):
        pipeline.generate_op(s, "3.4.5")


def test_moe_checks_pass_at_every_world_the_specs_use():
    for w, e, k in ((2, 256, 8), (4, 256, 8), (8, 256, 8), (2, 12, 3), (4, 12, 3)):
        assert moe.moe_problems(w, e, k) == ()
        assert moe.moe_problems(w, e, k, "low_latency") == ()


def test_protocol_check_catches_values_a_cuda_graph_would_replay_from_the_capture():
    """Low-latency calls are replayed from a CUDA graph: a flag value or an arrival count the host
    passed at capture would be the same on every replay. The check sees the stale reads a captured
    epoch allows, and those a captured arrival count causes: the dispatch's last CTA then never sets
    this rank's own dispatch flag again, where combine takes its epoch (the kernels keep both on the
    device: the epoch advanced by the call's first kernel, counters reset by their last block)."""
    from tilegen.moe.check import check_moe_protocol
    assert check_moe_protocol(4, "low_latency") == []
    stale = check_moe_protocol(4, "low_latency", captured=("epoch",))
    assert stale and "call 1 read recv from rank 1 of call 0" in stale[0], stale[:2]
    stuck = check_moe_protocol(2, "low_latency", captured=("arrivals",))
    assert stuck and "call 1 read back from rank 1 of call 0" in stuck[0], stuck[:2]
    with pytest.raises(ValueError, match="captured must name values of epoch, arrivals"):
        check_moe_protocol(2, captured=("stream",))


def test_moe_fp8_dispatch_fields():
    s = parse_yaml_spec(MOE_SPEC + "dispatch_dtype: fp8_e4m3\n", "m.yaml").spec
    assert (s.fp8_group, s.dtype) == (128, "bf16")
    a = lambda b: -(-b // 256) * 256  # noqa: E731
    # staging rows: 256 e4m3 bytes + 2 fp32 scales padded to 16 bytes; combine rows stay bf16
    half = a(4 * 128 * (256 + 16)) + a(4 * 128 * 256 * 2) + a(4 * 128 * 13 * 4) + a(4 * 17 * 4)
    assert s.symmetric_bytes(4) == 2 * half + 2 * 4 * 8
    tok = parse_yaml_spec(MOE_SPEC + "dispatch_dtype: fp8_e4m3\nfp8_scales: per_token\n", "m.yaml").spec
    assert tok.fp8_group == 256
    files = pipeline.generate_op(s, "3.4.5")
    assert "static constexpr int64_t kFp8Group = 128LL;" in files["moe_t.cu"]
    assert "kFp8Groups = 2;" in files["moe_t_binding.cc"] and "fp8_group=128" in files["op.py"]
    plain = pipeline.generate_op(parse_yaml_spec(MOE_SPEC, "m.yaml").spec, "3.4.5")
    assert "kFp8Group = 0LL;" in plain["moe_t.cu"] and "kFp8Groups = 0;" in plain["moe_t_binding.cc"]


@pytest.mark.parametrize("extra, expected", [
    ("fp8_scales: per_token\n", "fp8_scales: only an fp8 dispatch (dispatch_dtype: fp8_e4m3) has scales"),
    ("dispatch_dtype: fp8_e4m3\narch: sm_80\n", "dispatch_dtype: fp8 conversions need sm_89 or newer"),
    ("dispatch_dtype: fp8_e4m3\n", "shape: per_128 fp8 scales need hidden to be a multiple of 128"),
])
def test_moe_fp8_dispatch_errors(extra, expected):
    text = MOE_SPEC + extra
    if "multiple of 128" in expected:
        text = text.replace("256]", "272]")
    assert any(expected in e for e in moe_errors(text)), moe_errors(text)
    assert any("dispatch_dtype: fp8 dispatch quantizes bf16 or f16" in e for e in
               moe_errors(MOE_SPEC.replace("dtype: bf16", "dtype: f32") + "dispatch_dtype: fp8_e4m3\n"))


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["", "dispatch_dtype: fp8_e4m3\n",
                                   "dispatch_dtype: fp8_e4m3\nfp8_scales: per_token\n", "mode: low_latency\n",
                                   "mode: low_latency\ndispatch_dtype: fp8_e4m3\n"])
def test_symmetric_bytes_is_what_the_library_allocates(tmp_path, extra):
    """MoeSpec.symmetric_bytes (the manifest's figure and the spec's 64 GiB check) against
    tilegen/moe.cuh's own arithmetic: a host program built from the op's rendered traits prints it."""
    import re
    s, out = _build_host_program(tmp_path, MOE_SPEC + extra, "sizes", (
        "int main() {\n  for (int w : tilegen_op::Op::kWorlds)\n"
        "    printf(\"%d %lld\\n\", w,\n"
        "           static_cast<long long>(tilegen::moe::Host<tilegen_op::Op>::symmetric_bytes(w)));\n}\n"))
    got = {int(w): int(b) for w, b in re.findall(r"(\d+) (\d+)", out)}
    assert got == {w: s.symmetric_bytes(w) for w in s.world_sizes}, (got, extra)


@pytest.mark.slow
def test_moe_ll_route_bytes_is_the_kernels_shared_memory(tmp_path):
    """MoeSpec.ll_route_bytes (the spec's shared-memory check for low_latency) against sizeof(LLRoute)."""
    s, out = _build_host_program(tmp_path, MOE_SPEC + "mode: low_latency\n", "route", (
        "int main() { printf(\"%zu\\n\", sizeof(tilegen::moe::LLRoute<tilegen_op::Op>)); }\n"))
    assert int(out) == s.ll_route_bytes()


def test_moe_low_latency_routing_must_fit_shared_memory():
    text = MOE_SPEC.replace("max: 128}, 256]", "max: 2048}, 256]").replace("experts: 16", "experts: 256")
    assert any("shape: low_latency mode routes a call in shared memory" in e and "lower the tokens' max" in e
               for e in moe_errors(text + "mode: low_latency\n")), moe_errors(text + "mode: low_latency\n")
    parse_yaml_spec(text, "m.yaml")  # normal mode routes in global memory: no such bound


def moe_library() -> str:
    """The MoE kernels' and host's headers (include/tilegen/moe/), as one text."""
    from tilegen.core.render import INCLUDE_DIR
    return "\n".join(f.read_text() for f in sorted((INCLUDE_DIR / "tilegen" / "moe").glob("*.cuh")))


def _build_host_program(tmp_path, spec_text, name, body):
    """A host program from the op's rendered traits and tilegen/moe/ (host code only: no GPU)."""
    import subprocess

    from tilegen.core.render import INCLUDE_DIR
    from tilegen.core.toolchain import find_toolchain
    s = parse_yaml_spec(spec_text, "m.yaml").spec
    cu = pipeline.generate_op(s, "3.4.5")["moe_t.cu"]
    traits = cu[cu.index("namespace tilegen_op {"):cu.index("TILEGEN_EXPORT_MOE")]
    (tmp_path / f"{name}.cu").write_text("#include <cstdio>\n#include \"tilegen/moe/op.cuh\"\n" + traits + body)
    tc = find_toolchain()
    subprocess.run([tc.nvcc, "-std=c++17", f"-I{INCLUDE_DIR}", f"-I{tc.nvshmem_dir}/include",
                    str(tmp_path / f"{name}.cu"), "-o", str(tmp_path / name)], check=True, capture_output=True)
    return s, subprocess.run([str(tmp_path / name)], check=True, capture_output=True, text=True).stdout


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["", "dtype: f32\n", "dispatch_dtype: fp8_e4m3\n",
                                   "dispatch_dtype: fp8_e4m3\nfp8_scales: per_token\n"])
def test_moe_row_pieces_cover_each_kernels_row(tmp_path, extra):
    """The pieces the host gives each kernel cover that kernel's own row exactly, for decode-sized to
    large calls and small to large GPUs: the push's (a token row: 16-byte vectors, or fp8 steps of 8
    channels, per-128 pieces starting at a scale group), the expansion's (a payload row) and combine's
    send and reduction (a row of the token dtype), low-latency's push and expansion a line row's warp
    stores. (A combine cut
    by the fp8 payload's row once summed half of every row.)"""
    hidden, elem, fp8 = 7168, 4 if "f32" in extra else 2, "fp8" in extra
    spec = MOE_SPEC.replace("256]", f"{hidden}]").replace("dtype: bf16\n", "" if "f32" in extra else "dtype: bf16\n")
    spec += extra
    s, out = _build_host_program(tmp_path, spec, "cuts", (
        "int main() {\n  using H = tilegen::moe::Host<tilegen_op::Op>;\n"
        "  for (int grid : {16, 132, 528}) {\n    for (int& r : H::g->resident) r = grid;\n"
        "    for (long long m : {0LL, 1LL, 7LL, 128LL, 4096LL}) {\n"
        "      const tilegen::moe::Cut cuts[6] = {H::push_cut(tilegen::moe::kPush, m), H::expand_cut(m),"
        " H::send_cut(m), H::reduce_cut(m), H::ll_cut(tilegen::moe::kLLPush, m),"
        " H::ll_cut(tilegen::moe::kLLExpand, m)};\n"
        "      for (int k = 0; k < 6; ++k) {\n        printf(\"%d %d %lld %lld:\", k, grid, m, cuts[k].units);\n"
        "        for (int ch = 0; ch < cuts[k].pieces; ++ch) printf(\" %lld-%lld\", (long long)cuts[k].lo(ch),"
        " (long long)cuts[k].hi(ch));\n        printf(\"\\n\");\n      }\n    }\n  }\n}\n"))
    want_units = {0: hidden // 8 if fp8 else hidden * elem // 16, 1: hidden // 16 if fp8 else hidden * elem // 16,
                  2: hidden * elem // 16, 3: hidden * elem // 16}
    align = {0: 16 if fp8 and "per_token" not in extra else 1, 1: 1, 2: 1, 3: 1}
    line_units = s.line_row_bytes()[0] // 512  # low-latency's: a line row's warp stores of 4 lines
    want_units[4], want_units[5], align[4], align[5] = line_units, line_units, 1, 1
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 6 * 5 * 3
    for ln in lines:
        head, pieces = ln.split(":")
        k, grid, m, units = map(int, head.split())
        ranges = [tuple(map(int, p.split("-"))) for p in pieces.split()]
        assert units == want_units[k], (ln, want_units[k])
        assert ranges[0][0] == 0 and ranges[-1][1] == units, ln
        assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:])), ln
        assert all(a % align[k] == 0 for a, _ in ranges), ln
        if m and grid * 16 > m and units >= 64:  # few tokens: the row is cut finer than the compiled pieces
            assert len(ranges) > 1, ln


def test_trace_phases_named_in_python_are_the_ones_the_kernels_stamp():
    """MoeOp.read_trace names each kernel's stamps (TRACE_KERNELS, TRACE_PHASES); the kernels write them
    (tilegen/moe/'s stamp(p.trace, kernel, phase), or a warp's stamp_latest). A stamp added, dropped or
    reordered on either side would mislabel the profile: the kernel ids, their order and each kernel's
    phases must agree."""
    import re

    from tilegen.moe.runtime import MoeOp
    src = moe_library()
    enum = re.search(r"enum TraceKernel \{([^}]*)\}", src).group(1)
    ids = [e.strip() for e in enum.split(",")]
    consts = dict(re.findall(r"(kTrace(?:Kernels|Phases|Ctas)) = (\d+)", src))
    assert int(consts["kTraceKernels"]) == len(ids) == len(MoeOp.TRACE_KERNELS)
    stamped: dict[str, set[int]] = {}
    for kernel_id, phase in re.findall(r"stamp(?:_latest)?\(p\.trace, (kTrace\w+), (\d+)[,)]", src):
        stamped.setdefault(kernel_id, set()).add(int(phase))
    for kernel_id, name in zip(ids, MoeOp.TRACE_KERNELS):
        start = re.search(rf"__global__ void (?:__launch_bounds__\([^)]*\) )?{name}\(", src).start()
        body = src[start:src.index("\n}\n", start)]
        assert set(re.findall(r"stamp\(p\.trace, (kTrace\w+),", body)) == {kernel_id}, name  # its own stamps
        assert stamped[kernel_id] == set(range(len(MoeOp.TRACE_PHASES[name]))), (name, stamped[kernel_id])
        assert len(MoeOp.TRACE_PHASES[name]) <= int(consts["kTracePhases"])


def test_protocol_check_of_the_low_latency_epochs():
    """Low-latency halves take their epoch from the rank's own flag of the other half (moe.cuh:
    ll_flag), the half's second kernel reading it while the first still runs (launched early). The
    check passes those rules (the default in low_latency mode) and catches a half that took its epoch
    from its own flag (the expansion from the dispatch's, the combine from the combine's): launched
    early, or read before the half's own put, it is the previous call's."""
    from tilegen.moe.check import LL_EPOCHS, check_moe_protocol
    assert LL_EPOCHS == {"recv": ("back", 1), "back": ("recv", 0)}
    for world in (2, 4, 8):
        assert check_moe_protocol(world, "low_latency", epochs=LL_EPOCHS) == []
    stale = check_moe_protocol(4, "low_latency", epochs={"recv": ("recv", 0), "back": ("recv", 0)})
    assert stale and "call 0 read recv from rank 1 of call None" in stale[0], stale[:2]  # (before any put)
    own_combine = check_moe_protocol(2, "low_latency", epochs={"recv": ("back", 1), "back": ("back", 0)})
    assert own_combine and "read back from rank 1 of call None" in own_combine[0], own_combine[:2]


def test_low_latency_kernels_take_the_epochs_the_protocol_check_runs():
    """The check runs LL_EPOCHS; the kernels must take their epochs the same way: the dispatch (ll_push,
    ll_expand) one more than this rank's own combine flag, the combine the epoch in this rank's own
    dispatch flag, and no kernel stores an epoch word that an early-launched kernel could read first."""
    import re

    from tilegen.moe.check import LL_EPOCHS
    src = moe_library()
    assert LL_EPOCHS == {"recv": ("back", 1), "back": ("recv", 0)}
    assert "return dev::ld_acquire_gpu(own_combine_flag) + 1;" in src  # ll_dispatch_epoch
    assert src.count("ll_dispatch_epoch(p.own_combine_flag)") == 2  # ll_push's flags, ll_expand's wait
    assert src.count("g->cflag + g->rank") == 2  # both dispatch kernels' own_combine_flag
    ll_combine = src[src.index("static int ll_combine("):]
    assert "g->half[0], 0, g->dflag + g->rank," in ll_combine[:ll_combine.index("\n  }\n")]
    assert "ll_epoch(dev::ld_acquire_gpu(own_dispatch_flag))" in src
    assert not re.search(r"st_release_gpu\(p\.epoch|epoch_dev", src)
    for kernel in ("ll_expand", "combine_reduce"):  # the early-launched ones: flags only
        assert f"launch_early({kernel}<Op>" in src


def test_line_int_is_called_with_the_warps_index():
    """`line_int` gathers an int of a row's first warp store by `__shfl_sync`, where every lane sends the
    word its own index names: an index that differs between lanes reads another lane's word. The first
    line-row build did that for the slot weights (on GPUs: combine off, nan); no call may use the lane."""
    import re

    src = moe_library()
    args = []
    for m in re.finditer(r"\bline_int\(", src):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        args.append(src[m.end():i - 1])
    calls = [a for a in args if not a.startswith("uint64_t")]  # (not the definition)
    assert len(calls) >= 3, args
    bad = [a for a in calls if re.search(r"\blane\b|threadIdx", a)]
    assert not bad, bad
