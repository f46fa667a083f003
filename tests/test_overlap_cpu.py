"""The copy-engine overlap's host side without a GPU: the op hands its checked program
(tilegen.overlap.ce_program) to the op library once and runs it with one call per op call; the Python
executor (the reference) issues the library calls and cuBLAS GEMMs below, in this order, on these
streams and byte ranges. A fake torch records what would be launched."""

import pytest

from tilegen.overlap import runtime as overlap
from tilegen.overlap.ce_program import STYLES
from tilegen.overlap.runtime import AgGemmOp, GemmRsOp, split_bounds


class FakeTensor:
    def __init__(self, name, rows, cols, lo=0, log=None):
        self.name, self.rows, self.cols, self.lo, self.log = name, rows, cols, lo, log
        self.device = type("Dev", (), {"index": 0})()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return FakeTensor(self.name, i.stop - i.start, self.cols, self.lo + i.start, self.log)
        return FakeTensor(f"{self.name}[{i}]", 1, self.cols, 0, self.log)

    def numel(self):
        return self.rows * self.cols

    def stride(self, dim):
        return self.cols if dim == 0 else 1

    def element_size(self):
        return 2

    def t(self):
        return self

    def contiguous(self):
        return self

    def float(self):
        return self

    def sum(self, dim):
        return self

    def copy_(self, x):
        self.log.append(("copy", STREAM[0], x.name, self.name, self.lo, self.rows))

    @property
    def shape(self):
        return (self.rows, self.cols)



STREAM = ["main"]


class FakeCuda:
    class Stream:
        def __init__(self, device=None):
            self.cuda_stream = 222

    @staticmethod
    def current_stream(device=None):
        s = FakeCuda.Stream()
        s.cuda_stream = 111
        return s

    class stream:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            self.prev = STREAM[0]
            STREAM[0] = "copy" if self.s.cuda_stream == 222 else "other"

        def __exit__(self, *a):
            STREAM[0] = self.prev


class FakeTorch:
    def __init__(self, log):
        self.log = log

    def mm(self, x, b, out):
        self.log.append(("gemm", STREAM[0], x.name, x.lo, x.lo + x.rows, out.name, out.lo, out.lo + out.rows))

    def stack(self, ts):
        self.log.append(("sum", STREAM[0], [(t.name, t.lo, t.rows) for t in ts]))
        return FakeTensor("sum", 0, 0)

    def addmm(self, add, x, b, out):
        self.log.append(("gemm+", STREAM[0], x.name, x.lo, x.lo + x.rows, out.name, out.lo, out.lo + out.rows,
                         add.name, add.lo))

    class cuda(FakeCuda):
        @staticmethod
        def ExternalStream(handle, device=None):
            s = FakeCuda.Stream()
            s.cuda_stream = handle
            return s


class FakeMod:
    def __init__(self, log):
        self.log = log

    def __getattr__(self, name):
        def call(*args):
            shown = tuple(getattr(x, "name", x) for x in args)
            self.log.append((name,) + shown)
        return call


def _run(op_cls, kind, world, me, m, splits, monkeypatch, executor="python", calls=1, style=""):
    log = []
    monkeypatch.setattr(overlap, "_torch", lambda: FakeTorch(log))
    monkeypatch.setattr(overlap, "world_size", lambda: world)
    monkeypatch.setenv("TILEGEN_CE_SPLITS", str(splits))
    monkeypatch.setenv("TILEGEN_CE_EXECUTOR", executor)
    monkeypatch.setenv("TILEGEN_CE_STYLE", style)
    op = op_cls(directory=".", name="x", kind=kind, dtype="bfloat16", shape=[{"name": "m", "max": 64}, 8],
                world_sizes=[world], gemm_nk={world: (4, 8)}, b_layout="kn", overlap="copy_engine")
    op._world, op._rank = world, me  # (the call's group: the world)
    if kind == "ag_gemm":
        bufs = {"a": FakeTensor("a", m, 8, 0, log), "gathered": FakeTensor("gathered", world * m, 8, 0, log),
                "c": FakeTensor("c", world * m, 4, 0, log)}
    else:
        bufs = {"a": FakeTensor("a", world * m, 8, 0, log), "recv": FakeTensor("recv", (world - 1) * m, 4, 0, log),
                "c": FakeTensor("c", m, 4, 0, log), "acc": FakeTensor("acc", (world - 1) * m, 4, 0, log)}
    for _ in range(calls):
        op._copy_engine(bufs, m, FakeTensor("b", 8, 4, 0, log), FakeMod(log), None, 0)
    return log


def test_ag_gemm_copy_engine_issues_its_program(monkeypatch):
    """World 2, rank 0, 10 rows, 2 splits: handshake, fork, pushes of each split to rank 1 with flags
    0 and 1, own GEMM, then per split: wait for rank 1's flag (8 + s), GEMM its rows; join."""
    log = _run(AgGemmOp, "ag_gemm", 2, 0, 10, 2, monkeypatch)
    rb = 8 * 2  # bytes per row of a
    assert log == [
        ("ce_begin", 111, 0), ("join", 222, 111),
        ("ce_put", "a", 0, "gathered", 0, 5 * rb, 1, 0, 222),
        ("ce_put", "a", 5 * rb, "gathered", 5 * rb, 5 * rb, 1, 1, 222),
        ("gemm", "main", "a", 0, 10, "c", 0, 10),
        ("ce_wait", 8, 111, 0), ("gemm", "main", "gathered", 10, 15, "c", 10, 15),
        ("ce_wait", 9, 111, 0), ("gemm", "main", "gathered", 15, 20, "c", 15, 20),
        ("join", 111, 222),
    ]


def test_gemm_rs_ring_copy_engine_issues_its_program(monkeypatch):
    """World 3, rank 1, 6 rows, 2 splits, a ring: step 0 computes rank 0's rows into acc, step 1 rank
    2's rows plus what rank 0 pushed (recv), each split pushed to rank 2 (flag 8 * step + split) once
    its GEMM is done (fork); then its own rows plus the sum received at step 1, into c."""
    log = _run(GemmRsOp, "gemm_rs", 3, 1, 6, 2, monkeypatch, style="ring")
    rb = 4 * 2  # bytes per row of acc / recv / c
    want = [("ce_begin", 111, 0)]
    for t, d in enumerate((0, 2)):
        for s, (lo, hi) in enumerate(split_bounds(6, 2)):
            if t:
                want += [("ce_wait", 8 * (t - 1) + s, 111, 0),
                         ("gemm+", "main", "a", d * 6 + lo, d * 6 + hi, "acc", t * 6 + lo, t * 6 + hi, "recv", lo)]
            else:
                want += [("gemm", "main", "a", d * 6 + lo, d * 6 + hi, "acc", lo, hi)]
            want += [("join", 222, 111), ("ce_put", "acc", (t * 6 + lo) * rb, "recv", (t * 6 + lo) * rb,
                                          (hi - lo) * rb, 2, 8 * t + s, 222)]
    for s, (lo, hi) in enumerate(split_bounds(6, 2)):
        want += [("ce_wait", 8 + s, 111, 0), ("gemm+", "main", "a", 6 + lo, 6 + hi, "c", lo, hi, "recv", 6 + lo)]
    want.append(("join", 111, 222))
    assert log == want


def test_gemm_rs_direct_copy_engine_issues_its_program(monkeypatch):
    """World 4, rank 1, 6 rows, 1 split, direct: the rows of ranks 2, 3, 0 into acc slots 0-2, each
    pushed (once computed) into that rank's recv slot for rank 1 (0, 1, 2) with flag 8; then its
    own rows plus the first arrival (rank 0's, slot 0), and ranks 3's and 2's (slots 1, 2) summed in."""
    log = _run(GemmRsOp, "gemm_rs", 4, 1, 6, 1, monkeypatch, style="direct")
    rb = 4 * 2
    want = [("ce_begin", 111, 0)]
    for j, d in enumerate((2, 3, 0)):
        want += [("gemm", "main", "a", d * 6, d * 6 + 6, "acc", j * 6, j * 6 + 6), ("join", 222, 111),
                 ("ce_put", "acc", j * 6 * rb, "recv", j * 6 * rb, 6 * rb, d, 8, 222)]
    want += [("ce_wait", 0, 111, 0), ("gemm+", "main", "a", 6, 12, "c", 0, 6, "recv", 0),
             ("ce_wait", 24, 111, 0), ("ce_wait", 16, 111, 0),
             ("sum", "main", [("c", 0, 6), ("recv", 6, 6), ("recv", 12, 6)]), ("copy", "main", "sum", "c", 0, 6),
             ("join", 111, 222)]
    assert log == want


@pytest.mark.parametrize("kind, op_cls", [("ag_gemm", AgGemmOp), ("gemm_rs", GemmRsOp)])
def test_library_executor_registers_once_and_runs_in_one_call(kind, op_cls, monkeypatch):
    log = _run(op_cls, kind, 4, 2, 10, 2, monkeypatch, executor="library", calls=3)
    key = (10 * 16 + 2) * 4
    assert log[0] == ("ce_program", key, list(overlap.ce_encoded(kind, 4, 2, 10, 2)))
    sym, acc = ("gathered", "c") if kind == "ag_gemm" else ("recv", "acc")
    assert log[1:] == [("ce_run", key, "a", "b", "c", sym, acc, 111, 0)] * 3


@pytest.mark.parametrize("kind", ["ag_gemm", "gemm_rs"])
@pytest.mark.parametrize("world, splits", [(2, 1), (4, 2), (8, 3)])
def test_library_encoding_is_the_checked_program(kind, world, splits):
    """Decoding the op library's 15-number steps gives back every step of the checked program."""
    m = 37
    for style in STYLES[kind]:
        for me in range(world):
            flat = overlap.ce_encoded(kind, world, me, m, splits, style)
            steps = overlap.ce_steps(kind, world, me, m, splits, style)
            assert len(flat) == overlap.CE_FIELDS * len(steps)
            names = {v: k for k, v in overlap.CE_BUFFERS.items() if k not in ("recv",)}
            sym = "gathered" if kind == "ag_gemm" else "recv"
            streams = {overlap.ce_stream_index(st[1]): st[1] for st in steps}
            assert len(streams) == len({st[1] for st in steps})  # distinct streams, distinct numbers
            for i, st in enumerate(steps):
                f = flat[15 * i: 15 * i + 15]
                assert f[5] == m  # a reduce's terms are chunks of m rows
                got = [overlap.CE_KINDS[f[0]], streams[f[1]], f[2], f[3], f[4]]
                for j in (6, 9, 12):
                    buf = None if f[j] < 0 else (sym if f[j] == 1 else names[f[j]])
                    got += [buf, None if buf is None else (f[j + 1], f[j + 2])]
                assert tuple(got) == st


def test_spread_pushes_use_one_copy_stream_per_peer(monkeypatch):
    """ag_gemm merged_spread, world 4, rank 0 (Python executor): a fork per copy stream, each push on
    its own stream, and the final join waits for all of them."""
    log = _run(AgGemmOp, "ag_gemm", 4, 0, 10, 1, monkeypatch, style="merged_spread")
    assert [e[0] for e in log[:4]] == ["ce_begin", "join", "join", "join"]
    puts = [e for e in log if e[0] == "ce_put"]
    assert [e[6] for e in puts] == [1, 2, 3]  # peers r+1, r+2, r+3
    assert log[-3:] == [("join", 111, 222)] * 3  # (the fake gives every side stream one handle)
    flat = overlap.ce_encoded("ag_gemm", 4, 0, 10, 1, "merged_spread")
    assert sorted({flat[15 * i + 1] for i in range(len(flat) // 15)}) == [0, 1, 2, 3]


def test_merged_gemm_covers_contiguous_peer_rows():
    """ag_gemm merged, world 4, rank 2: GEMMs of rows [0, 2m) and [3m, 4m) of gathered into c."""
    gemms = [(st[6], st[8]) for st in overlap.ce_steps("ag_gemm", 4, 2, 10, 1, "merged") if st[0] == "gemm"]
    assert gemms == [((20, 30), (0, 10)), ((0, 20), (0, 20)), ((30, 40), (30, 40))]


def test_copy_engine_executor_setting(monkeypatch):
    monkeypatch.setenv("TILEGEN_CE_EXECUTOR", "cuda")
    with pytest.raises(ValueError, match="TILEGEN_CE_EXECUTOR must be library or python"):
        overlap.ce_executor()


def test_copy_engine_config_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("TILEGEN_CE_SPLITS", "9")
    with pytest.raises(ValueError, match=r"TILEGEN_CE_SPLITS must be in \[1, 8\]"):
        overlap.ce_config("gemm_rs", 2, 100)
    monkeypatch.setenv("TILEGEN_CE_SPLITS", "x")
    with pytest.raises(ValueError, match="a number of splits"):
        overlap.ce_config("gemm_rs", 2, 100)
    monkeypatch.delenv("TILEGEN_CE_SPLITS")
    monkeypatch.setenv("TILEGEN_CE_STYLE", "merged")
    with pytest.raises(ValueError, match="TILEGEN_CE_STYLE must be one of direct, ring for gemm_rs"):
        overlap.ce_config("gemm_rs", 2, 100)
    monkeypatch.delenv("TILEGEN_CE_STYLE")
    assert overlap.ce_config("gemm_rs", 2, 100) == ("direct", 2) and overlap.ce_config("gemm_rs", 2, 1) == ("direct", 1)
    assert overlap.ce_config("ag_gemm", 2, 100) == ("chunks", 1)
    assert split_bounds(5, 2) == [(0, 2), (2, 5)]
    # an op's measured choices by size (rows: largest m, style, splits; past the last: the last)
    choices = ((600, "merged", 1), (1500, "chunks", 2))
    assert [overlap.ce_config("ag_gemm", 4, m, choices) for m in (512, 600, 601, 4096)] == \
        [("merged", 1), ("merged", 1), ("chunks", 2), ("chunks", 2)]
    assert overlap.ce_config("ag_gemm", 2, 512, ()) == ("chunks", 1)  # no measurement: the default


CE_SPEC = ("name: agce\nop: ag_gemm\ndtype: bf16\nworld_sizes: [2, 4]\nshape: [{name: m, max: 1024}, 512]\n"
           "n: 256\noverlap: copy_engine\n")


def test_copy_engine_choices_come_from_the_calibration_generate_reads(tmp_path, capsys):
    """--calibration decides the copy-engine choices like the plans (they were read at run time from
    the installed package's data, whatever generate was told); op.py carries them, the manifest
    records them."""
    import json
    import runpy
    from tilegen import cli
    (tmp_path / "box" / "copy_engine").mkdir(parents=True)
    (tmp_path / "box" / "copy_engine" / "choices.json").write_text(
        '{"choices": {"ag_gemm": {"4": [[600, "merged", 1], [1500, "chunks", 2]]}}}')
    (tmp_path / "agce.yaml").write_text(CE_SPEC)
    for cal, expect in ((str(tmp_path / "box"), {2: (), 4: ((600, "merged", 1), (1500, "chunks", 2))}),
                        ("none", {2: (), 4: ()})):
        out = tmp_path / f"pkg_{len(expect[4])}"
        assert cli.main(["generate", str(tmp_path / "agce.yaml"), "-o", str(out), "--no-build",
                         "--calibration", cal]) == 0
        op = runpy.run_path(str(out / "agce" / "op.py"))["OP"]
        assert op.ce_choices == expect
        man = json.loads((out / "agce" / "manifest.json").read_text())
        assert man["copy_engine"] == {"default": ["chunks", 1],
                                      "choices": {str(w): [list(r) for r in rows] for w, rows in expect.items()}}
    assert "ag_gemm copy-engine choices, world 4" in man_of(tmp_path / "pkg_2")["calibration"]["measured"]


def man_of(pkg):
    import json
    return json.loads((pkg / "agce" / "manifest.json").read_text())


def test_bounded_library_call_waits_for_the_call_before_reading_its_report(monkeypatch):
    """A bounded call (timeout) runs the program, waits for the caller's stream, then reads the wait
    report: on 2 x H100 the wait was ExternalStream(0).synchronize(), which returned before the legacy
    default stream's work finished, so a missing peer was never reported (and the next call hung)."""
    log, synced = [], []
    monkeypatch.setattr(overlap, "_torch", lambda: FakeTorch(log))
    monkeypatch.setattr(overlap, "_synchronize",
                        lambda t, handle: synced.append((t.name, handle)) or log.append("sync"))
    monkeypatch.setattr(overlap, "world_size", lambda: 2)
    monkeypatch.setenv("TILEGEN_CE_EXECUTOR", "library")
    from tilegen.core import runtime
    monkeypatch.setattr(runtime, "_capturing", lambda handle: False)
    legacy = type("S", (), {"cuda_stream": 0})()  # the caller runs on the legacy default stream
    monkeypatch.setattr(FakeCuda, "current_stream", staticmethod(lambda device=None: legacy))
    op = GemmRsOp(directory=".", name="x", kind="gemm_rs", dtype="bfloat16", shape=[{"name": "m", "max": 64}, 8],
                  world_sizes=[2], gemm_nk={2: (4, 8)}, b_layout="kn", overlap="copy_engine")
    op._world, op._rank = 2, 0
    bufs = {"a": FakeTensor("a", 12, 8, 0, log), "recv": FakeTensor("recv", 6, 4, 0, log),
            "c": FakeTensor("c", 6, 4, 0, log), "acc": FakeTensor("acc", 6, 4, 0, log)}
    op._copy_engine(bufs, 6, FakeTensor("b", 8, 4, 0, log), FakeMod(log), None, 300_000_000)
    assert synced == [("a", 0)]
    assert [e if isinstance(e, str) else e[0] for e in log][-3:] == ["ce_run", "sync", "check_wait_error"]


def test_synchronize_of_the_legacy_default_stream_is_device_wide(monkeypatch):
    from tilegen.core import runtime
    calls = []

    class Torch:
        class cuda:
            @staticmethod
            def synchronize():
                calls.append("device")

            @staticmethod
            def ExternalStream(handle):
                return type("S", (), {"synchronize": lambda self: calls.append(("stream", handle))})()

    monkeypatch.setattr(runtime, "_torch", lambda: Torch)
    tensor = type("Tensor", (), {"__module__": "torch"})()
    runtime._synchronize(tensor, 0)
    runtime._synchronize(tensor, 7)
    assert calls == ["device", ("stream", 7)]


@pytest.mark.parametrize("deterministic", [False, True])
def test_decomposed_gemm_rs_runs_its_chunk_gemms_by_the_pinned_algorithm_when_deterministic(deterministic, monkeypatch):
    """The decomposed gemm_rs computes each rank's chunk of partial products in the library's order, each
    followed by its signal: by torch.mm, or, deterministic, by the op library's pinned cuBLASLt GEMM (one
    algorithm for every row count; torch.mm would let cuBLAS choose by m)."""
    log, world, m = [], 2, 3
    monkeypatch.setattr(overlap, "_torch", lambda: FakeTorch(log))

    class Mod:
        def compute_order(self):
            return [1, 0]

        def __getattr__(self, name):
            return lambda *args: log.append((name,) + tuple(
                (x.name, x.lo, x.lo + x.rows) if isinstance(x, FakeTensor) else x for x in args))
    streams = [FakeCuda.Stream() for _ in range(3)]
    for s, handle in zip(streams, (111, 333, 222)):
        s.cuda_stream = handle
    op = GemmRsOp(directory=".", name="x", kind="gemm_rs", dtype="bfloat16", shape=[{"name": "m", "max": 64}, 8],
                  world_sizes=[world], gemm_nk={world: (4, 8)}, b_layout="kn", overlap="decomposed",
                  deterministic=deterministic)
    op._world, op._rank = world, 0
    monkeypatch.setattr(op, "load", Mod)
    monkeypatch.setattr(op, "_use", lambda group: None)
    monkeypatch.setattr(op, "_check", lambda *args: m)
    monkeypatch.setattr(op, "_begin", lambda *args: tuple(streams))
    monkeypatch.setattr(op, "_local", lambda what, shape, device: FakeTensor(what, shape[0], shape[1], 0, log))
    monkeypatch.setattr(op, "_finish", lambda *args: log.append(("finish",)))
    a, b, c = FakeTensor("a", world * m, 8, 0, log), FakeTensor("b", 8, 4, 0, log), FakeTensor("c", m, 4, 0, log)
    op(a, b, c, timeout_ms=0)
    chunk = ([("pinned_gemm", ("a", lo, lo + m), ("b", 0, 8), ("partial", lo, lo + m), 222) for lo in (3, 0)]
             if deterministic else [("gemm", "copy", "a", lo, lo + m, "partial", lo, lo + m) for lo in (3, 0)])
    assert log == [("run", ("partial", 0, 6), ("c", 0, 3), 0, 1.0, 333, 0, True),
                   chunk[0], ("signal_chunk", 1, 222), chunk[1], ("signal_chunk", 0, 222),
                   ("launch_pending", 333), ("finish",)]
