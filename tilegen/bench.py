"""Benchmarks of generated ops against NCCL (torch.distributed) and torch symmetric memory.

`tilegen bench generated:allreduce_bf16 --out r.json --plot r.png`, launched with
`torchrun --nproc-per-node N -m tilegen.cli bench ...`. Sizes follow nccl-tests (allgather counts
the output, reduce_scatter the input, allreduce/broadcast the buffer, all_to_all one rank's
buffer); times are medians over batches of back-to-back calls between CUDA events, reported as the
slowest rank's; busbw uses nccl-tests' factors. Results are checked against NCCL where it runs.

Every implementation is timed twice: eager (Python calls) and, with graph=True, as replays of one
CUDA graph holding `calls` back-to-back calls (no host cost per call: what the kernels alone take).
Rows: times_us / busbw_GBps (eager) and times_graph_us / busbw_graph_GBps (only the implementations
whose capture succeeded on every rank), each keyed by implementation.
"""
from __future__ import annotations

import importlib
import json
import statistics
import sys

from .collective.ops import OPS
from .core.spec import article

MiB = 1 << 20
DEFAULT_SIZES_KIB = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
GRAPH_REPS = 10  # replays of a captured batch: a replay holds `calls` calls, so 10 are enough for a median


def _slowest(us: float) -> float:
    """The largest value over the ranks (collective)."""
    import torch
    import torch.distributed as dist
    t = torch.tensor([us], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _batch_us(fn, calls: int) -> float:
    """One batch: the ranks meet, then `calls` back-to-back calls between CUDA events; us per call."""
    import torch
    import torch.distributed as dist
    dist.barrier()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / calls


def time_batches(fn, calls: int, reps: int, warmup: int = 5) -> float:
    """Median over `reps` batches of `calls` back-to-back calls, us per call, slowest rank's."""
    return time_interleaved({"fn": fn}, calls, reps, warmup)["fn"]


def time_interleaved(fns: dict, calls: int, reps: int, warmup: int = 5) -> dict[str, float]:
    """time_batches for several implementations of one problem, taken in turns: each of `reps` rounds
    times one batch of every fn, so the GPU's clock drift (power and heat under back-to-back GEMMs
    moved cuBLAS's time by 25% from one row to the next) falls on all of them alike. Median per fn, us
    per call, slowest rank's."""
    import torch
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_batch_us(fn, calls))
    return {name: _slowest(statistics.median(ts)) for name, ts in times.items()}


def time_graph(fn, calls: int, reps: int = GRAPH_REPS, warmup: int = 2) -> tuple[float | None, str | None]:
    """`calls` back-to-back calls captured into one CUDA graph; median over `reps` replays, us per call,
    slowest rank's. Returns (us, None), or (None, 'rank r: error') on every rank when the capture failed
    on any rank: ranks agree (a MIN all-reduce of a success flag) before any of them replays.

    fn must have run eagerly before (a tilegen op allocates on its first call, which a graph cannot
    hold), and fn must either be capturable or refuse before it enqueues work, as tilegen ops do (a
    bounded wait, a host round trip): a capture the CUDA runtime itself invalidates is reported too, but
    torch versions that raise before ending the capture's allocation leave the allocator routing to
    the graph's pool, so time such a fn in a process of its own. Collective: every rank must call it
    with the same `calls` and `reps`."""
    import torch
    import torch.distributed as dist
    caller = torch.cuda.current_stream()
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()  # known even when the capture fails (graph.pool() is not then)
    err = None
    try:
        side = torch.cuda.Stream()  # warm-up on a side stream, as torch advises before a capture
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        caller.wait_stream(side)
        torch.cuda.synchronize()
        # thread_local: NCCL's watchdog thread may query events of earlier calls during the capture
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            for _ in range(calls):
                fn()
    except Exception as e:  # the context manager ended the capture; reported below, never fatal
        err = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    finally:
        torch.cuda.set_stream(caller)  # a failed capture_begin / capture_end leaves the capture stream current
    try:
        torch.cuda.synchronize()
    except Exception as e:
        err = err or f"{type(e).__name__}: {e}".splitlines()[0][:300]
    ok = torch.tensor([0 if err else 1], dtype=torch.int32,
                      device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
        del graph
        r = next(i for i, m in enumerate(errs) if m)
        return None, f"rank {r}: {errs[r]}"
    graph.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    del graph
    torch.cuda.synchronize()
    return _slowest(statistics.median(times)), None


def busbw_GBps(kind: str, size_bytes: int, us: float, world: int) -> float:
    """nccl-tests' bus bandwidth (the registry holds each op's factor)."""
    return size_bytes / (us * 1e-6) * OPS[kind].busbw(world) / 1e9


def calls_for(size_bytes: int) -> int:
    return 50 if size_bytes <= 16 * MiB else 10


# The op kinds `tilegen bench` does not time (it times collectives against NCCL), and how to.
OTHER_BENCHES = {"ag_gemm": "time op(a, b) in your model", "gemm_rs": "time op(a, b) in your model",
                 "moe": "time op.dispatch and op.combine in your MoE layer"}


def resolve(ref: str) -> list:
    """'package:op' -> [op]; 'package:*' -> every collective op of the package (GEMM and MoE ops are
    left out: OTHER_BENCHES; naming one is an error that says how to time it)."""
    pkg, _, name = ref.partition(":")
    if not name:
        raise ValueError(f"expected package:op or package:* (e.g. generated:allreduce_bf16), got {ref!r}")
    mod = importlib.import_module(pkg)
    ops = [getattr(mod, n) for n in (mod.OPS if name == "*" else [name])]
    if name != "*" and ops[0].kind in OTHER_BENCHES:
        raise ValueError(f"{ref}: tilegen bench times collectives, not {article(ops[0].kind)} op: "
                         f"{OTHER_BENCHES[ops[0].kind]}")
    return [op for op in ops if op.kind not in OTHER_BENCHES]


BENCH_SCALE = 0.5  # premul_sum ops' scale in benchmarks (NCCL's premul sum multiplies by the same)


def reduce_of(op) -> str:
    """The op's reduction (sum where it has none or none is given)."""
    return getattr(op, "reduce", None) or "sum"


def op_call_args(op) -> dict:
    """What a benchmark passes the op besides its tensors (premul_sum ops: their scale)."""
    return {"scale": BENCH_SCALE} if reduce_of(op) == "premul_sum" else {}


def nccl_reduce_op(op):
    """NCCL's reduction for the op's own (sum, max, min, avg; premul_sum times BENCH_SCALE)."""
    import torch.distributed as dist
    red = reduce_of(op)
    if red == "premul_sum":
        return dist._make_nccl_premul_sum(BENCH_SCALE)
    return {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
            "avg": dist.ReduceOp.AVG}[red]


def nccl_result(kind: str, x, out, root: int = 0, red=None):
    """The op through NCCL (torch.distributed) into `out`, as the registry describes it, reducing with
    `red` (a torch.distributed ReduceOp; None: sum)."""
    import torch.distributed as dist
    desc = OPS[kind]
    if desc.nccl_in_place:
        out.copy_(x.reshape(out.shape))
    desc.nccl(dist, x, out, root, dist.ReduceOp.SUM if red is None else red)
    return out


def baselines(kind: str, x, out, world: int, op=None) -> dict:
    """name -> callable for the reference implementations of one op on input x (outputs like `out`),
    reducing as `op` does (None: sum)."""
    import torch
    import torch.distributed as dist
    if dist.get_backend() != "nccl" or OPS[kind].nccl is None:
        return {}
    desc = OPS[kind]
    red = nccl_reduce_op(op)
    y = nccl_result(kind, x, torch.empty_like(out), 0, red)  # sets y up (in-place ops: the input), warms NCCL
    fns = {"nccl": lambda: desc.nccl(dist, x, y, 0, red)}  # in-place ops reduce y again each call: timing only
    if kind == "allreduce" and reduce_of(op) == "sum":
        # torch symmetric memory's one-shot / two-shot kernels (sums only), the small-message bar
        try:
            import torch.distributed._symmetric_memory as symm_mem
            group = dist.group.WORLD.group_name
            buf = symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device)
            symm_mem.rendezvous(buf, group)
            buf.copy_(x.flatten())
            fns["torch_symm_one_shot"] = lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group)
            fns["torch_symm_two_shot"] = lambda: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group)
        except Exception as e:  # reported, and the table shows n/a
            if dist.get_rank() == 0:
                print(f"torch symmetric memory unavailable: {type(e).__name__}: {e}")
    return fns


def matches_nccl(kind: str, ours, x, op=None) -> bool | None:
    """Whether the op's output `ours` of input x is NCCL's (with the op's reduction), within bf16 rounding."""
    import torch
    import torch.distributed as dist
    if dist.get_backend() != "nccl" or OPS[kind].nccl is None:
        return None
    ref = nccl_result(kind, x, torch.empty_like(ours), 0, nccl_reduce_op(op))
    return bool(torch.allclose(ours.float(), ref.float(), rtol=1e-2, atol=1e-2))


def bench_op(op, sizes_kib=DEFAULT_SIZES_KIB, reps: int = 20, bounded_ms: float = 0.0, graph: bool = True,
             graph_reps: int = GRAPH_REPS) -> list[dict]:
    """Time `op` and its baselines at each size it accepts, eager and (graph=True) CUDA-graph replayed;
    with bounded_ms also the op in bounded mode (every wait limited, the call synchronised to read the
    wait-error record: eager only, a graph cannot hold it)."""
    import torch
    import torch.distributed as dist
    world = dist.get_world_size()
    kind = op.kind
    inner = 1
    for d in op.inner_shape:
        inner *= d
    dtype = getattr(torch, op.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    k_in, k_out = OPS[kind].in_rows(world), OPS[kind].out_rows(world)
    k_size = k_out if OPS[kind].bench_counts == "out" else k_in  # rows the nccl-tests size counts
    rows = []
    for kib in sizes_kib:
        m = kib * 1024 // (k_size * inner * elem)
        if m < 1 or m > op.max_rows():
            continue
        size = m * k_size * inner * elem
        x = torch.randn((k_in * m,) + op.inner_shape, device="cuda").to(dtype)
        out = op.empty_output(m)
        kw = op_call_args(op)
        impls = {op.name: lambda: op(x, out, timeout_ms=0, **kw)}
        eager_only = set()
        if bounded_ms:
            impls[op.name + "+bounded"] = lambda: op(x, out, timeout_ms=bounded_ms, **kw)
            eager_only.add(op.name + "+bounded")
        impls.update(baselines(kind, x, out, world, op))
        res = {"op": op.name, "kind": kind, "bytes": size, "rows": m, "times_us": {}, "busbw_GBps": {}}
        if graph:
            res.update(times_graph_us={}, busbw_graph_GBps={})
        calls = calls_for(size)
        for name, fn in impls.items():
            us = time_batches(fn, calls, reps)  # also the eager call a tilegen op needs before a capture
            res["times_us"][name] = us
            res["busbw_GBps"][name] = busbw_GBps(kind, size, us, world)
            if graph and name not in eager_only:
                gus, err = time_graph(fn, calls, graph_reps)
                if gus is None:
                    if dist.get_rank() == 0:
                        print(f"graph capture of {name} at {size} B failed ({err}): no graph time")
                else:
                    res["times_graph_us"][name] = gus
                    res["busbw_graph_GBps"][name] = busbw_GBps(kind, size, gus, world)
        op(x, out, **kw)
        res["matches_nccl"] = matches_nccl(kind, out, x, op)
        rows.append(res)
        op.free_outputs()
    return rows


def _role(row: dict, impl: str) -> str:
    """Column of an implementation: the row's own op is 'tilegen', baselines keep their names."""
    return impl.replace(row["op"], "tilegen", 1) if impl.startswith(row["op"]) else impl


_TIMES = ("times_us", "busbw_GBps", "times_graph_us", "busbw_graph_GBps")


def _num(v, width: int, fmt: str = ".1f") -> str:
    """A number right-aligned in `width`, '-' when missing."""
    return f"{'-':>{width}}" if v is None or v != v else f"{v:>{width}{fmt}}"


def _ratio(times: dict, width: int) -> str:
    """nccl/ours of one timing dict, 'x' after it; '-' when either is missing."""
    if "nccl" in times and "tilegen" in times and times["tilegen"] > 0:
        return f"{times['nccl'] / times['tilegen']:>{width - 1}.2f}x"
    return f"{'-':>{width - 1}} "


def format_table(rows: list[dict], world: int, device: str, shared_gpu: bool) -> str:
    """Per implementation: median us per call eager | CUDA-graph replayed (when any row has graph times)
    | busbw GB/s of the eager calls; then nccl/ours of each timing, and whether ours matched NCCL."""
    rows = [{**r, **{k: {_role(r, n): v for n, v in (r.get(k) or {}).items()} for k in _TIMES}} for r in rows]
    impls = list(dict.fromkeys(n for r in rows for n in r["times_us"]))
    graph = any(r["times_graph_us"] for r in rows)
    note = " -- RANKS SHARE ONE GPU: no baselines, not link bandwidth" if shared_gpu else ""
    if graph:
        what = "median us per call eager | graph (CUDA-graph replayed) | busbw GB/s eager"
        sub = f"{'eager':>8}{'graph':>8}{'GB/s':>7} |"
        ratio_head, ratio_sub = f"{'nccl/ours':^16}", f"{'eager':>8}{'graph':>8}"
    else:
        what = "median us per call | busbw GB/s"
        sub = f"{'us':>12}{'GB/s':>9} |"
        ratio_head, ratio_sub = f"{'nccl/ours':>9}", ""

    def cell(r: dict, n: str) -> str:
        if graph:
            return _num(r["times_us"].get(n), 8) + _num(r["times_graph_us"].get(n), 8) + _num(r["busbw_GBps"].get(n), 7)
        return _num(r["times_us"].get(n), 12) + _num(r["busbw_GBps"].get(n), 9)

    def ratios(r: dict) -> str:
        return _ratio(r["times_us"], 8) + _ratio(r["times_graph_us"], 8) if graph else _ratio(r["times_us"], 9)

    w = len(sub) - 2
    lines = [f"{world} ranks on {device}: {what}{note}",
             f"{'':<34} |" + "".join(f" {n[:w - 2]:^{w - 2}}  |" for n in impls) + f"{ratio_head} ok",
             f"{'op':<24}{'size MiB':>10} |" + sub * len(impls) + ratio_sub]
    for r in rows:
        ok = {True: "yes", False: "NO", None: "-"}[r["matches_nccl"]]
        lines.append(f"{r['op'][:23]:<24}{r['bytes'] / MiB:>10.3f} |" + "".join(cell(r, n) + " |" for n in impls)
                     + f"{ratios(r)} {ok}")
    return "\n".join(line.rstrip() for line in lines)


def _short_bytes(n: float) -> str:
    """16384 -> '16K', 268435456 -> '256M' (axis ticks)."""
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.3g}{unit}"
    return f"{n:.0f}"


def _series(rows: list[dict], times: str, bw: str, latency: bool) -> dict:
    """impl -> sorted [(bytes, value)] of one timing (the first row of a size wins: a baseline repeats
    for every op of a kind)."""
    out: dict[str, dict] = {}
    for r in rows:
        for impl, v in (r.get(times if latency else bw) or {}).items():
            out.setdefault(impl, {}).setdefault(r["bytes"], v)
    return {impl: sorted(pts.items()) for impl, pts in out.items()}


def figure(results: list[dict], latency: bool = False):
    """One figure of bench results ({"world", "rows", "device"?} each, as run() writes them): a panel per
    op kind (columns) and world size (rows of panels); busbw GB/s (or, latency=True, us per call on a log
    scale) against the nccl-tests message size; a colour per implementation, eager solid, CUDA-graph
    replayed dashed. Results of the same world size are merged."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    from .draw import pyplot
    plt = pyplot()
    by_world: dict[int, list] = {}
    for res in results:
        by_world.setdefault(int(res["world"]), []).extend(res["rows"])
    worlds = sorted(by_world)
    kinds = list(dict.fromkeys(r["kind"] for w in worlds for r in by_world[w]))
    if not kinds:
        raise ValueError("no benchmark rows to plot")
    devices = list(dict.fromkeys(res["device"] for res in results if res.get("device")))
    colours: dict[str, str] = {"tilegen": "C0", "nccl": "C1"}
    fig, axes = plt.subplots(len(worlds), len(kinds), figsize=(4.6 * len(kinds), 3.6 * len(worlds)), squeeze=False)
    for i, w in enumerate(worlds):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            rs = [r for r in by_world[w] if r["kind"] == kind]
            ax.set_title(f"{kind}, {w} ranks", fontsize=9)
            if not rs:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            ops = list(dict.fromkeys(r["op"] for r in rs))
            eager = _series(rs, "times_us", "busbw_GBps", latency)
            graph = _series(rs, "times_graph_us", "busbw_graph_GBps", latency)
            handles = []
            for impl in list(dict.fromkeys([*eager, *graph])):
                key = "tilegen" if len(ops) == 1 and impl == ops[0] else impl
                c = colours.setdefault(key, f"C{len(colours) % 10}")
                for pts, style, marker in ((eager.get(impl), "-", "o"), (graph.get(impl), "--", "x")):
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, ls=style, marker=marker, ms=3)
                handles.append(Line2D([], [], color=c, label=impl))
            if graph:
                handles += [Line2D([], [], color="k", ls="-", label="eager"),
                            Line2D([], [], color="k", ls="--", label="CUDA graph")]
            ax.set_xscale("log", base=2)
            sizes = sorted({r["bytes"] for r in rs})
            ax.set_xticks(sizes, [_short_bytes(s) for s in sizes], fontsize=7)
            ax.xaxis.set_minor_locator(NullLocator())
            if latency:
                ax.set_yscale("log")
            ax.set_xlabel("bytes (nccl-tests convention)", fontsize=8)
            ax.set_ylabel("us per call" if latency else "busbw GB/s", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(handles=handles, fontsize=7)
    what = "us per call (median, slowest rank)" if latency else "bus bandwidth (nccl-tests)"
    fig.suptitle(f"{what}; eager solid, CUDA-graph replayed dashed" + (f" -- {', '.join(devices)}" if devices else ""),
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_results(results: list[dict], path: str, latency: bool = False) -> None:
    """figure(results, latency) saved to `path` (.png, .svg, ...)."""
    from .draw import pyplot
    plt = pyplot()
    fig = figure(results, latency)
    fig.savefig(path)
    plt.close(fig)


def plot(rows: list[dict], path: str, world: int) -> None:
    """One run's busbw plot (bench/scripts/plot_collectives.py combines runs)."""
    plot_results([{"world": world, "rows": rows}], path)


def run(refs: list[str], sizes_kib=DEFAULT_SIZES_KIB, reps: int = 20, out: str | None = None,
        plot_path: str | None = None, bounded_ms: float = 0.0, graph: bool = True,
        graph_reps: int = GRAPH_REPS) -> int:
    """Entry point of `tilegen bench` (under torchrun)."""
    import torch
    import torch.distributed as dist

    import tilegen
    try:  # before anything collective: every rank stops here the same way
        ops = [op for ref in refs for op in resolve(ref)]
    except (ValueError, ImportError, AttributeError) as e:
        print(f"tilegen bench: {e}", file=sys.stderr)
        return 2
    rank, world = tilegen.init()
    rows = []
    for op in ops:
        rows += bench_op(op, sizes_kib, reps, bounded_ms, graph, graph_reps)
    if rank == 0:
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
        print(format_table(rows, world, device, dist.get_backend() != "nccl"))
        if out:
            with open(out, "w") as f:
                json.dump({"device": device, "world": world, "backend": dist.get_backend(), "rows": rows}, f, indent=2)
        if plot_path:
            plot(rows, plot_path, world)
    tilegen.finalize()
    dist.destroy_process_group()
    return 0
