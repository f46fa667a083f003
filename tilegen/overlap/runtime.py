"""GEMM + communication overlap ops: the orchestration of the communication (a kernel, or the copy
engines) and GEMMs (cuBLAS per chunk, or one fused CUTLASS kernel) on side streams, around the
generated op library.

Copy-engine overlap (overlap: copy_engine): the op runs its checked program (tilegen.overlap.ce_program),
registered once with the op library, which runs it in one call (no Python per step): cuBLASLt GEMMs
on the caller's stream, chunks moved by cudaMemcpyAsync between symmetric buffers over NVLink on a
copy stream (DMA engines, no SMs taken from the GEMMs), ordered by flags (stream memory operations)
and event joins. Every call starts with a handshake on the caller's
stream (each rank tells its peers it entered the call, after its previous call finished, and waits
until they all did), so a copy never lands in, or reads from, a buffer a peer's previous call still
uses.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from typing import Any

from .ce_program import CE_DEFAULT, DETERMINISTIC_STYLE, MAX_SPLITS, STYLES, program
from .. import settings
from ..collective.runtime import CollectiveOp
from ..core.runtime import _capturing, _stream_handle, _synchronize, _torch, empty, world_size


def ce_config(kind: str, world: int, m: int, choices: tuple = (), deterministic: bool = False) -> tuple[str, int]:
    """(style, row splits) of the copy-engine overlap for m rows per chunk: TILEGEN_CE_STYLE /
    TILEGEN_CE_SPLITS, else the op's measured choice for the nearest size range (`choices`: (largest
    m, style, splits) rows, ascending, which generate took from the calibration and op.py carries),
    else the default; never more splits than rows. Every rank must choose the same (the checker shows
    a mismatch deadlocks). A deterministic op runs one style at every size (its choices carry only that
    one): TILEGEN_CE_STYLE naming another is refused."""
    style, splits = CE_DEFAULT[kind]
    if choices:
        style, splits = next(((st, sp) for top, st, sp in choices if m <= top), tuple(choices[-1][1:]))
    splits = settings.get("TILEGEN_CE_SPLITS") or splits
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"TILEGEN_CE_SPLITS must be in [1, {MAX_SPLITS}], got {splits}")
    style = settings.get("TILEGEN_CE_STYLE") or style
    if style not in STYLES[kind]:
        raise ValueError(f"TILEGEN_CE_STYLE must be one of {', '.join(STYLES[kind])} for {kind}, got {style!r}")
    if deterministic and style != DETERMINISTIC_STYLE[kind]:
        raise ValueError(f"TILEGEN_CE_STYLE={style}: a deterministic {kind} runs {DETERMINISTIC_STYLE[kind]} only "
                         f"(another style adds the ranks' partials in another order)")
    return style, min(splits, m)


def split_bounds(m: int, splits: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of `splits` near-equal splits of m rows."""
    return [(m * s // splits, m * (s + 1) // splits) for s in range(splits)]


@lru_cache(maxsize=64)
def ce_steps(kind: str, world: int, me: int, m: int, splits: int, style: str | None = None) -> tuple[tuple, ...]:
    """The checked program (tilegen.overlap.ce_program) with its regions as row ranges: (kind, stream, peer,
    flag, count, dst buffer, dst rows, src buffer, src rows, addend buffer, addend rows). A GEMM's
    count chunks are one block of rows; a reduce's src rows are its first term's (the others follow
    every m rows)."""
    bounds = split_bounds(m, splits)

    def rows(reg, count=1):
        if reg is None:
            return None, None
        buf, chunk, split = reg
        lo, hi = (0, m) if split is None else bounds[split]
        base = 0 if chunk is None else chunk * m
        return buf, (base + lo, base + hi + (count - 1) * m)

    return tuple((st.kind, st.stream, st.peer, st.flag, st.count,
                  *rows(st.dst, st.count if st.kind == "gemm" else 1),
                  *rows(st.src, st.count if st.kind == "gemm" else 1), *rows(st.addend))
                 for st in program(kind, world, me, splits, style))


# The op library's encoding of a step (tilegen/collective_host.cuh, CeStep): 15 numbers.
CE_KINDS = ("begin", "fork", "join", "put", "wait", "gemm", "reduce")  # CeStep::Kind's order (overlap/host.cuh)
CE_BUFFERS = {"a": 0, "gathered": 1, "recv": 1, "c": 2, "acc": 3}  # 1: the op's symmetric buffer
CE_FIELDS = 15


def ce_stream_index(name: str) -> int:
    """The op library's stream number: 0 the caller's, 1 + i copy stream i ("copy" is copy stream 0)."""
    return 0 if name == "main" else 1 + int(name.removeprefix("copy") or 0)


@lru_cache(maxsize=64)
def ce_encoded(kind: str, world: int, me: int, m: int, splits: int, style: str | None = None) -> tuple[int, ...]:
    """ce_steps as the op library's flat program: per step kind, stream, peer, flag, count, the rows
    between a reduce's terms (m), then (buffer, lo, hi) of dst, src and addend (-1, 0, 0: none)."""
    out: list[int] = []
    for kind_, stream, peer, flag, count, dst, drows, src, srows, add, arows in ce_steps(kind, world, me, m, splits,
                                                                                         style):
        out += [CE_KINDS.index(kind_), ce_stream_index(stream), peer, flag, count, m]
        for buf, rows in ((dst, drows), (src, srows), (add, arows)):
            out += [CE_BUFFERS[buf], *rows] if buf is not None else [-1, 0, 0]
    return tuple(out)


def ce_executor() -> str:
    """Who runs the program: the op library, one call (default), or Python step by step with
    torch's GEMMs (TILEGEN_CE_EXECUTOR=python: the reference the library's executor is tested against)."""
    return settings.get("TILEGEN_CE_EXECUTOR")


class _GemmOp(CollectiveOp):
    """Shared parts of the GEMM + communication ops: argument checks, side streams, bounds."""

    def __init__(self, *args, gemm_nk: dict[int, tuple[int, int]], b_layout: str, fused: bool = False,
                 overlap: str | None = None, ce_choices: dict[int, tuple] | None = None,
                 deterministic: bool = False, **kw):
        super().__init__(*args, **kw)
        self.gemm_nk = gemm_nk  # world size -> this rank's (n, k)
        self.ce_choices = ce_choices or {}  # world size -> the copy-engine choices by size (ce_config)
        self.deterministic = deterministic  # a row's bits do not depend on m (tilegen.overlap.spec)
        self.b_layout = b_layout
        self.overlap = overlap or ("fused" if fused else "decomposed")
        if self.overlap not in ("decomposed", "fused", "copy_engine"):
            raise ValueError(f"{self.name}: overlap must be decomposed, fused or copy_engine, got {self.overlap!r}")
        self.fused = self.overlap == "fused"
        self._streams: dict[int, tuple] = {}
        self._buffers: dict[tuple, Any] = {}
        self._ce_comm: dict[tuple, tuple[Any, int]] = {}  # (device, name) -> (copy stream, handle): Python executor
        self._ce_programs: set[tuple[int, int]] = set()  # (group slot, key): programs registered with the op library

    def _configure(self, mod: Any) -> None:
        mod.allow_memops(settings.get("TILEGEN_CE_MEMOPS"))

    def _make_torch_op(self) -> Any:
        """torch.ops.tilegen.<name> and <name>_out: op.torch(a, b, group=...) -> c, op.torch.out(a, b, c, ...)."""
        from .torch_op import TorchGemm
        return TorchGemm(self)

    def _side_streams(self, device: Any) -> tuple[Any, Any]:
        """(communication stream, compute stream) of a device, created once."""
        torch = _torch()
        key = device.index if device.index is not None else torch.cuda.current_device()
        if key not in self._streams:
            self._streams[key] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[key]

    def _symmetric(self, what: str, shape: tuple[int, ...]) -> Any:
        """A symmetric-heap buffer (collective on first use; cached, freed by free_outputs)."""
        key = (what, shape, self._world)
        if key not in self._outputs:
            if _capturing(None):
                raise RuntimeError(
                    f"{self.name}: its symmetric {what} buffer {list(shape)} is allocated collectively, which a "
                    f"CUDA graph cannot capture: call the op once with this size before capturing"
                )
            self._outputs[key] = empty(shape, self.dtype)
        return self._outputs[key]

    def _local(self, what: str, shape: tuple[int, ...], device: Any) -> Any:
        """A local scratch buffer, cached per shape and device."""
        key = (what, shape, device.index)
        if key not in self._buffers:
            torch = _torch()
            self._buffers[key] = torch.empty(shape, dtype=getattr(torch, self.dtype), device=device)
        return self._buffers[key]

    @property
    def n(self) -> int:
        """This rank's columns of B in the current call's group (before any call: the world)."""
        return self.gemm_nk[self._world or world_size()][0]

    @property
    def k(self) -> int:
        """This rank's inner dimension (columns of A) in the current call's group (before any call: the world)."""
        return self.gemm_nk[self._world or world_size()][1]

    def _check(self, a: Any, b: Any, c: Any, a_rows_per_m: int, c_rows_per_m: int, world: int) -> int:
        """Validates a, b (and c); returns m."""
        torch = _torch()
        k = self.k
        dtype = getattr(torch, self.dtype)
        for name, t in (("a", a), ("b", b)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{self.name}: {name} must be a torch tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise ValueError(f"{self.name}: {name} must have dtype {self.dtype}, got {t.dtype}")
            if not t.is_cuda:
                raise ValueError(f"{self.name}: {name} must be a CUDA tensor, got device {t.device}")
        rows = f"{a_rows_per_m} * m" if a_rows_per_m > 1 else "m"
        if (a.dim() != 2 or a.shape[1] != k or a.shape[0] % a_rows_per_m
                or not 1 <= a.shape[0] // a_rows_per_m <= self.max_rows()):
            raise ValueError(
                f"{self.name}: a must be [{rows}, {k}] with 1 <= m <= {self.max_rows()}, got {list(a.shape)}"
            )
        m = a.shape[0] // a_rows_per_m
        want_b = [k, self.n] if self.b_layout == "kn" else [self.n, k]
        if list(b.shape) != want_b:
            raise ValueError(f"{self.name}: b must be {want_b} (b_layout {self.b_layout}), got {list(b.shape)}")
        if b.device != a.device:
            raise ValueError(f"{self.name}: b is on {b.device} but a is on {a.device}")
        if c is not None:
            want_c = [c_rows_per_m * m, self.n]
            if list(c.shape) != want_c or c.dtype != dtype or c.device != a.device or not c.is_contiguous():
                raise ValueError(
                    f"{self.name}: c must be a contiguous {self.dtype} tensor {want_c} on {a.device}, got "
                    f"{list(c.shape)} {c.dtype} on {c.device}"
                )
        return m

    @staticmethod
    def _gemm_sms() -> int:
        """CTAs of a fused GEMM: TILEGEN_GEMM_SMS, else 0 (the SMs this process may fill minus the communication's)."""
        return settings.get("TILEGEN_GEMM_SMS")

    def _finish(self, main: Any, comm: Any, comp: Any, tensors: tuple, timeout_ns: int, mod: Any) -> None:
        main.wait_stream(comp)
        main.wait_stream(comm)
        if not _capturing(main.cuda_stream):  # a graph's memory stays with the graph
            for t in tensors:  # the caching allocator must not reuse them before the side streams finish
                t.record_stream(comp)
                t.record_stream(comm)
        if timeout_ns > 0:
            main.synchronize()
            mod.check_wait_error()

    def _begin(self, a: Any, stream: Any, mod: Any, timeout_ns: int) -> tuple[Any, Any, Any]:
        """(caller's stream, communication stream, compute stream): the call's epoch advances on the
        caller's stream (so a CUDA graph replays it right), then both side streams start after it."""
        torch = _torch()
        main = (
            torch.cuda.ExternalStream(_stream_handle(stream))
            if stream is not None
            else torch.cuda.current_stream(a.device)
        )
        mod.begin(main.cuda_stream)
        comm, comp = self._side_streams(a.device)
        comm.wait_stream(main)
        comp.wait_stream(main)
        return main, comm, comp

    # ---------------------------------------------------------------- copy-engine overlap
    # The GEMMs run on the caller's stream, the copies on a copy stream; the op library orders them
    # (entry handshake, flags, joins by pooled events), as the checked program says.
    def _copy_engine(self, bufs: dict, m: int, b: Any, mod: Any, stream: Any, timeout_ns: int) -> None:
        """Runs this rank's program (tilegen.overlap.ce_program) for one call on buffers `bufs`."""
        torch = _torch()
        a = bufs["a"]
        current = torch.cuda.current_stream(a.device)
        main = current.cuda_stream if stream is None else _stream_handle(stream)
        world, me = self._world, self._rank
        style, splits = ce_config(self.kind, world, m, self.ce_choices.get(world, ()), self.deterministic)
        if self.deterministic and ce_executor() != "library":
            raise ValueError(f"{self.name} is deterministic: its GEMMs are the op library's pinned cuBLASLt "
                             f"algorithm, so TILEGEN_CE_EXECUTOR=python (torch's GEMMs) cannot run it")
        if ce_executor() == "library":
            key = (m * 16 + splits) * 4 + STYLES[self.kind].index(style)  # per op and process: world, rank fixed
            if (self._slot, key) not in self._ce_programs:  # (the library keeps programs per group slot)
                mod.ce_program(key, list(ce_encoded(self.kind, world, me, m, splits, style)))
                self._ce_programs.add((self._slot, key))
            sym = bufs["gathered" if self.kind == "ag_gemm" else "recv"]
            mod.ce_run(key, a, b, bufs["c"], sym, bufs.get("acc", bufs["c"]), main, timeout_ns)
        else:
            steps = ce_steps(self.kind, world, me, m, splits, style)
            self._copy_engine_python(bufs, b, mod, main, current, steps, timeout_ns)
        if timeout_ns > 0:  # the program ends with the caller's stream joined to the copies
            # (not ExternalStream(0).synchronize(): for the legacy default stream it returned before
            # the call's waits had finished, on 2 x H100, so a missing peer went unreported)
            _synchronize(a, main)
            mod.check_wait_error()

    def _copy_engine_python(self, bufs: dict, b: Any, mod: Any, main: int, current: Any, steps,
                            timeout_ns: int) -> None:
        """The same program, step by step from Python, GEMMs by torch on the caller's stream."""
        torch = _torch()
        a = bufs["a"]
        handles = {"main": main}
        for name in {st[1] for st in steps} - {"main"}:  # copy streams, created once per device
            key = (a.device.index, name)
            if key not in self._ce_comm:
                side = torch.cuda.Stream(a.device)
                self._ce_comm[key] = (side, side.cuda_stream)
            handles[name] = self._ce_comm[key][1]
        bm = b if self.b_layout == "kn" else b.t()
        row_bytes = {name: t.stride(0) * t.element_size() for name, t in bufs.items()}  # contiguous 2-d buffers
        # torch's GEMMs go on the caller's stream (made current if it is not)
        caller = torch.cuda.ExternalStream(main, a.device) if main != current.cuda_stream else None
        with torch.cuda.stream(caller) if caller is not None else nullcontext():
            for kind, on, peer, flag, count, dst, drows, src, srows, add, arows in steps:
                if kind == "reduce":  # dst += the count chunks of src, m rows apart, summed in fp32
                    out = bufs[dst][drows[0]:drows[1]]
                    step = bufs["c"].shape[0]  # gemm_rs: c holds m rows, a chunk
                    terms = [bufs[src][srows[0] + j * step:srows[1] + j * step].float() for j in range(count)]
                    out.copy_(torch.stack([out.float()] + terms).sum(0))
                elif kind == "gemm":
                    out, x = bufs[dst][drows[0]:drows[1]], bufs[src][srows[0]:srows[1]]
                    if add is None:
                        torch.mm(x, bm, out=out)
                    else:
                        torch.addmm(bufs[add][arows[0]:arows[1]], x, bm, out=out)
                elif kind == "put":
                    mod.ce_put(bufs[src], srows[0] * row_bytes[src], bufs[dst], drows[0] * row_bytes[dst],
                               (srows[1] - srows[0]) * row_bytes[src], peer, flag, handles[on])
                elif kind == "wait":
                    mod.ce_wait(flag, handles[on], timeout_ns)
                elif kind == "begin":
                    mod.ce_begin(main, timeout_ns)
                elif kind == "fork":
                    mod.join(handles[on], main)
                elif kind == "join":
                    for name in sorted(handles.keys() - {"main"}):
                        mod.join(main, handles[name])
                else:
                    raise AssertionError(f"unknown copy-engine step {kind}")


class AgGemmOp(_GemmOp):
    """C = allgather(A) @ B. Callable: op(a, b, c=None, *, stream=None, timeout_ms=None).

    A communication kernel gathers A into a symmetric buffer (per-tile signals) on one stream. Fused:
    one CUTLASS GEMM on a second stream loads each block of A rows once its signals are set (own
    chunk first, then by arrival). Decomposed: for each chunk in arrival order (own chunk straight
    from `a`), a wait kernel holds the second stream until the chunk's signals are set and cuBLAS
    computes that chunk's rows of C. The caller's stream waits for both before it goes on."""

    def __call__(self, a: Any, b: Any, c: Any = None, *, group: Any = None, stream: Any = None,
                 timeout_ms: float | None = None) -> Any:
        torch = _torch()
        mod = self.load()
        self._use(group)
        world, me = self._world, self._rank
        m = self._check(a, b, c, 1, world, world)
        a = a.contiguous()
        gathered = self.empty_output(m, group)  # symmetric [world * m, k], reused across calls of this size
        if c is None:
            c = torch.empty((world * m, self.n), dtype=a.dtype, device=a.device)
        timeout_ns = self._timeout_ns(timeout_ms, _stream_handle(stream))
        if self.overlap == "copy_engine":
            self._copy_engine({"a": a, "gathered": gathered, "c": c}, m, b.contiguous(), mod, stream, timeout_ns)
            return c
        main, comm, comp = self._begin(a, stream, mod, timeout_ns)
        mod.run(a, gathered, 0, 1.0, comm.cuda_stream, timeout_ns, False)
        if self.fused:
            b = b.contiguous()
            mod.fused_gemm(gathered, b, c, self._gemm_sms(), comp.cuda_stream, timeout_ns)
        else:
            bm = b if self.b_layout == "kn" else b.t()
            with torch.cuda.stream(comp):
                for chunk in (int(x) for x in mod.compute_order()):
                    rows = slice(chunk * m, (chunk + 1) * m)
                    if chunk == me:
                        torch.mm(a, bm, out=c[rows])
                    else:
                        mod.wait_chunk(chunk, comp.cuda_stream, timeout_ns)
                        torch.mm(gathered[rows], bm, out=c[rows])
        self._finish(main, comm, comp, (a, b, c, gathered), timeout_ns, mod)
        return c


class GemmRsOp(_GemmOp):
    """C = reduce_scatter(A @ B). Callable: op(a, b, c=None, *, stream=None, timeout_ms=None).

    a is this rank's [world * m, k] (K-sharded) operand. Decomposed: on a compute stream cuBLAS
    computes the rows of A @ B destined to each rank, others' first, each followed by a signal kernel.
    Fused: one CUTLASS GEMM computes them in that order and publishes each part as its last tile is
    stored. The reduce-scatter kernel on the communication stream waits for each chunk's (part's)
    signal before it pushes and reduces it."""

    def __call__(self, a: Any, b: Any, c: Any = None, *, group: Any = None, stream: Any = None,
                 timeout_ms: float | None = None) -> Any:
        torch = _torch()
        mod = self.load()
        self._use(group)
        world = self._world
        m = self._check(a, b, c, world, 1, world)
        if c is None:
            c = torch.empty((m, self.n), dtype=a.dtype, device=a.device)
        timeout_ns = self._timeout_ns(timeout_ms, _stream_handle(stream))
        if self.overlap == "copy_engine":
            a, b = a.contiguous(), b.contiguous()  # (no copy when they are)
            rows = ((world - 1) * m, self.n)  # a chunk per ring step: the sums sent and received
            bufs = {"a": a, "recv": self._symmetric("recv", rows), "c": c, "acc": self._local("acc", rows, a.device)}
            self._copy_engine(bufs, m, b, mod, stream, timeout_ns)
            return c
        main, comm, comp = self._begin(a, stream, mod, timeout_ns)
        # Prepare the reduce-scatter (checks, epoch, layout), queue the GEMMs and their signals, then
        # launch it: it spins on those signals, so everything it waits for is queued (and loaded) first.
        partial = self._local("partial", (world * m, self.n), a.device)  # read by this rank's kernel only
        mod.run(partial, c, 0, 1.0, comm.cuda_stream, timeout_ns, True)
        if self.fused:
            a, b = a.contiguous(), b.contiguous()
            mod.fused_gemm(a, b, partial, self._gemm_sms(), comp.cuda_stream, timeout_ns)
        else:
            if self.deterministic:  # the op's pinned cuBLASLt algorithm: the same kernel at every m
                a, b = a.contiguous(), b.contiguous()

                def gemm(rows: slice) -> None:
                    mod.pinned_gemm(a[rows], b, partial[rows], comp.cuda_stream)
            else:
                bm = b if self.b_layout == "kn" else b.t()

                def gemm(rows: slice) -> None:
                    torch.mm(a[rows], bm, out=partial[rows])
            with torch.cuda.stream(comp):
                for chunk in (int(x) for x in mod.compute_order()):
                    gemm(slice(chunk * m, (chunk + 1) * m))
                    mod.signal_chunk(chunk, comp.cuda_stream)
        mod.launch_pending(comm.cuda_stream)
        self._finish(main, comm, comp, (a, b, c, partial), timeout_ns, mod)
        return c
