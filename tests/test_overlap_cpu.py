"""The copy-engine overlap's host side without a GPU: the op runs its checked program
(tilegen.ce_program) as the op library calls and cuBLAS GEMMs below, in this order, on these streams
and byte ranges. A fake torch records what would be launched."""
import pytest

from tilegen import overlap
from tilegen.overlap import AgGemmOp, GemmRsOp, split_bounds


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

    def addmm_(self, x, b):
        self.log.append(("gemm+=", STREAM[0], x.name, x.lo, x.lo + x.rows, self.name, self.lo, self.lo + self.rows))

    def add_(self, x):
        self.log.append(("add", STREAM[0], x.name, x.lo, self.name, self.lo, self.rows))


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
    cuda = FakeCuda

    def __init__(self, log):
        self.log = log

    def mm(self, x, b, out):
        self.log.append(("gemm", STREAM[0], x.name, x.lo, x.lo + x.rows, out.name, out.lo, out.lo + out.rows))


class FakeMod:
    def __init__(self, log):
        self.log = log

    def __getattr__(self, name):
        def call(*args):
            shown = tuple(getattr(x, "name", x) for x in args)
            self.log.append((name,) + shown)
        return call


def _run(op_cls, kind, world, me, m, splits, monkeypatch):
    log = []
    monkeypatch.setattr(overlap, "_torch", lambda: FakeTorch(log))
    monkeypatch.setattr(overlap, "world_size", lambda: world)
    monkeypatch.setattr(overlap, "rank", lambda: me)
    monkeypatch.setenv("TILEGEN_CE_SPLITS", str(splits))
    op = op_cls(directory=".", name="x", kind=kind, dtype="bfloat16", shape=[{"name": "m", "max": 64}, 8],
                world_sizes=[world], gemm_nk={world: (4, 8)}, b_layout="kn", overlap="copy_engine")
    if kind == "ag_gemm":
        bufs = {"a": FakeTensor("a", m, 8, 0, log), "gathered": FakeTensor("gathered", world * m, 8, 0, log),
                "c": FakeTensor("c", world * m, 4, 0, log)}
    else:
        bufs = {"a": FakeTensor("a", world * m, 8, 0, log), "partial": FakeTensor("partial", world * m, 4, 0, log),
                "c": FakeTensor("c", m, 4, 0, log)}
        bufs.update({f"extra.{j}": FakeTensor(f"extra.{j}", m, 4, 0, log) for j in range(world - 2)})
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


def test_gemm_rs_copy_engine_issues_its_program(monkeypatch):
    """World 3, rank 1, 6 rows, 2 splits: partial products for ranks 2 then 0, each flagged at that
    rank; per split: pulls from rank 0 (into c) and rank 2 (into scratch, added on the copy stream),
    the caller's stream joins the copies and adds its own product into c (beta = 1)."""
    log = _run(GemmRsOp, "gemm_rs", 3, 1, 6, 2, monkeypatch)
    rb = 4 * 2  # bytes per row of partial / c
    want = [("ce_begin", 111, 0), ("join", 222, 111)]
    for s, (lo, hi) in enumerate(split_bounds(6, 2)):
        for d in (2, 0):
            want += [("gemm", "main", "a", d * 6 + lo, d * 6 + hi, "partial", d * 6 + lo, d * 6 + hi),
                     ("ce_signal", d, 8 + s, 111)]
    for s, (lo, hi) in enumerate(split_bounds(6, 2)):
        want += [("ce_wait", 0 * 8 + s, 222, 0), ("ce_get", "c", lo * rb, "partial", (6 + lo) * rb, 3 * rb, 0, 222),
                 ("ce_wait", 2 * 8 + s, 222, 0),
                 ("ce_get", "extra.0", lo * rb, "partial", (6 + lo) * rb, 3 * rb, 2, 222),
                 ("add", "copy", "extra.0", lo, "c", lo, 3),
                 ("join", 111, 222), ("gemm+=", "main", "a", 6 + lo, 6 + hi, "c", lo, hi)]
    want.append(("join", 111, 222))
    assert log == want


def test_copy_engine_splits_setting(monkeypatch):
    monkeypatch.setenv("TILEGEN_CE_SPLITS", "9")
    with pytest.raises(ValueError, match=r"TILEGEN_CE_SPLITS must be in \[1, 8\]"):
        overlap.ce_splits("gemm_rs", 100)
    monkeypatch.setenv("TILEGEN_CE_SPLITS", "x")
    with pytest.raises(ValueError, match="a number of splits"):
        overlap.ce_splits("gemm_rs", 100)
    monkeypatch.delenv("TILEGEN_CE_SPLITS")
    assert overlap.ce_splits("gemm_rs", 100) == 2 and overlap.ce_splits("gemm_rs", 1) == 1
    assert overlap.ce_splits("ag_gemm", 100) == 1
    assert split_bounds(5, 2) == [(0, 2), (2, 5)]
