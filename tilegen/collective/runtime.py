"""The collective family's runtime: a generated collective op, called with tensors."""
from __future__ import annotations

from typing import Any

from ..core.runtime import GeneratedOp, _capturing, _stream_handle, _synchronize, _torch, empty
from .ops import OPS


class CollectiveOp(GeneratedOp):
    """Callable: op(input, output=None, *, root=0, scale=None, group=None, stream=None, timeout_ms=None);
    epilogue ops also take residual=, weight= and scales= (see __call__)."""

    def __init__(self, *args, premul: str | None = None, dtypes: list[str] | None = None,
                 epilogue: dict | None = None, reduce: str | None = None, **kw):
        super().__init__(*args, **kw)
        self.reduce = reduce  # reducing ops: sum, max, min, avg or premul_sum
        self.premul = premul  # reduce: "avg" (scale 1 / world) or "premul_sum" (scale per call), else None
        self.dtypes = list(dtypes or [self.dtype])  # torch dtype names the library serves (a call takes its input's)
        # {"residual": bool, "rmsnorm": eps or None, "quant": "fp8_e4m3" or None}, or None
        self.epilogue = epilogue

    def _make_torch_op(self) -> Any:
        """torch.ops.tilegen.<name> and <name>_out: op.torch(input, group=...), op.torch.out(input, out, ...)."""
        from .torch_op import TorchCollective, TorchEpilogue
        return TorchEpilogue(self) if self.epilogue else TorchCollective(self)

    def shard_rows(self, input_rows: int) -> int:
        """m for an input of input_rows rows (inputs of reduce_scatter and all_to_all hold group size * m)
        in the current call's group."""
        k = OPS[self.kind].in_rows(self._world)
        if input_rows % k:
            raise ValueError(f"{self.name}: input dim 0 must be a multiple of {k}, got {input_rows}")
        return input_rows // k

    def output_shape(self, rows: int, world: int | None = None, inner: tuple | None = None) -> tuple[int, ...]:
        """The output's shape for shards of `rows` rows in a group of `world` ranks (None: the current
        call's), inner dims `inner` (None: the spec's; free ones: their max)."""
        return (OPS[self.kind].out_rows(world or self._world) * rows,) + tuple(inner or self.inner_shape)

    def _inner(self, inner: Any) -> tuple[int, ...]:
        """A call's inner dims, checked against the spec's (free ones: 1 up to their max)."""
        if inner is None:
            return self.inner_shape
        inner = tuple(int(d) for d in inner)
        ok = len(inner) == len(self.inner_shape) and all(
            (1 <= d <= m) if free else d == m for d, m, free in zip(inner, self.inner_shape, self.free_inner))
        if not ok:
            want = ", ".join(f"<={m}" if free else str(m) for m, free in zip(self.inner_shape, self.free_inner))
            raise ValueError(f"{self.name}: inner dims must be [{want}], got {list(inner)}")
        return inner

    def empty_output(self, rows: int, group: Any = None, dtype: Any = None, inner: Any = None) -> Any:
        """Output for shards of `rows` rows in `group` (None: the world) of element type `dtype` (a torch
        dtype or its name; None: the op's first): on the symmetric heap when peers store into it, cached
        per size; `inner`: the inner dims where the spec leaves some free (default: their max). Symmetric
        allocation is collective over the whole world (NVSHMEM's is): every rank makes the first call of
        a size, or calls this first."""
        self.load()
        self._use(group)
        world = self._world
        name = self.dtype if dtype is None else str(dtype).removeprefix("torch.")
        if name not in self.dtypes:
            raise ValueError(f"{self.name}: dtype must be one of {', '.join(self.dtypes)}, got {name}")
        if not 1 <= rows <= self.max_rows():
            raise ValueError(f"{self.name}: rows must be in [1, {self.max_rows()}], got {rows}")
        inner = self._inner(inner)
        key = (rows, world, name, inner)
        if key not in self._outputs:
            if self.symmetric_output and _capturing(None):
                raise RuntimeError(
                    f"{self.name}: the symmetric output for {rows} rows is allocated collectively, which a "
                    f"CUDA graph cannot capture: call the op once with this size (or "
                    f"{self.name}.empty_output({rows})) before capturing"
                )
            if self.symmetric_output:
                self._outputs[key] = empty(self.output_shape(rows, world, inner), name)
            else:
                torch = _torch()
                return torch.empty(self.output_shape(rows, world, inner), dtype=getattr(torch, name), device="cuda")
        return self._outputs[key]

    def __call__(self, input: Any, output: Any = None, *, root: int = 0, scale: float | None = None,
                 group: Any = None, stream: Any = None, timeout_ms: float | None = None,
                 residual: Any = None, weight: Any = None, scales: Any = None) -> Any:
        """Run the op on the current stream (or `stream`). Rooted ops (broadcast) take `root`; where only
        the root's input is read, other ranks may pass None (the output is then the nominal input).
        reduce: premul_sum ops take `scale` (each rank's input is multiplied by it before the sum).
        group: a tilegen.group() this rank is in (None: the world); root and ranks are the group's.
        The common call (tensors given, default stream and timeout) does little Python: an eager call's
        host cost is the launch's.

        Epilogue ops return the rows their epilogue makes: residual (with residual: true) is added to
        the reduced rows and overwritten with the sum; weight ([hidden], with rmsnorm) scales the
        normalised rows; with quant they return (output, scales), fp8 rows and one float32 scale per row
        (output and scales may be given). The output is any tensor (not a symmetric one); it may be the input."""
        if self.epilogue is not None or residual is not None or weight is not None or scales is not None:
            return self._call_epilogue(input, output, residual, weight, scales, group, stream, timeout_ms)
        run = self._run
        if run is None:
            self.load()
            run = self._run
        if group is not None or self._slot:
            self._use(group)
        if input is None or output is None:
            input, output = self._complete_args(input, output, group)
        if root and not OPS[self.kind].rooted:
            rooted = ", ".join(k for k, d in OPS.items() if d.rooted)
            raise ValueError(f"{self.name}: root is only meaningful for rooted ops ({rooted})")
        if self.premul is not None or scale is not None:
            scale = self._scale(scale)
        else:
            scale = 1.0
        handle = _stream_handle(stream)
        timeout_ns = self._timeout_ns(timeout_ms, handle)
        run(input, output, root, scale, handle, timeout_ns, False)
        if timeout_ns:  # bounded mode: wait for the call, then report a wait that gave up
            _synchronize(input, handle)
            self._mod.check_wait_error()
        return output

    def _call_epilogue(self, input: Any, output: Any, residual: Any, weight: Any, scales: Any, group: Any,
                       stream: Any, timeout_ms: float | None) -> Any:
        e = self.epilogue
        if e is None:
            raise ValueError(f"{self.name}: residual=, weight= and scales= are for ops with an epilogue; "
                             f"this op has none")
        for arg, value, wanted, what in (("residual", residual, e["residual"], "residual: true"),
                                         ("weight", weight, e["rmsnorm"] is not None, "rmsnorm"),
                                         ("scales", scales, e["quant"] is not None, "quant")):
            if value is None and wanted and arg != "scales":
                raise ValueError(f"{self.name}: {arg}= is required (the op's epilogue has {what})")
            if value is not None and not wanted:
                raise ValueError(f"{self.name}: {arg}= is for epilogues with {what}; this op's has "
                                 f"{', '.join(k for k, v in e.items() if v not in (None, False))}")
        if not hasattr(input, "shape") or len(input.shape) < 2:
            raise ValueError(f"{self.name}: input must be a tensor of shape {self.shape}")
        self.load()
        self._use(group)
        rows = OPS[self.kind].out_rows(self._world) * self.shard_rows(int(input.shape[0]))
        if output is None or (e["quant"] and scales is None):
            torch = _torch()
            if output is None:
                dtype = torch.float8_e4m3fn if e["quant"] else input.dtype
                output = torch.empty((rows,) + tuple(input.shape[1:]), dtype=dtype, device=input.device)
            if e["quant"] and scales is None:
                scales = torch.empty((rows,), dtype=torch.float32, device=input.device)
        handle = _stream_handle(stream)
        timeout_ns = self._timeout_ns(timeout_ms, handle)
        self._mod.run_epilogue(input, output, residual if residual is not None else input,
                               weight if weight is not None else input, scales if scales is not None else input,
                               handle, timeout_ns)
        if timeout_ns:
            _synchronize(input, handle)
            self._mod.check_wait_error()
        return (output, scales) if e["quant"] else output

    def _complete_args(self, input: Any, output: Any, group: Any = None) -> tuple[Any, Any]:
        """A missing output (cached symmetric one) or, on non-root ranks of root-only-input ops, input."""
        desc = OPS[self.kind]
        if input is None:
            if not desc.root_only_input or output is None:
                raise ValueError(
                    f"{self.name}: input is required"
                    + (" (None is allowed on non-root ranks when an output is given)" if desc.root_only_input else "")
                )
            return output, output
        if not hasattr(input, "shape") or len(input.shape) < 1:
            raise ValueError(f"{self.name}: input must be a tensor of shape {self.shape}")
        dtype = getattr(input, "dtype", None) if len(self.dtypes) > 1 else None
        inner = tuple(input.shape[1:]) if any(self.free_inner) else None
        return input, self.empty_output(self.shard_rows(int(input.shape[0])), group, dtype, inner)



    def _scale(self, scale: float | None) -> float:
        """The factor each contribution is multiplied by: 1 / world for avg, the call's for premul_sum."""
        if self.premul == "avg":
            if scale is not None:
                raise ValueError(f"{self.name}: reduce avg scales by 1 / world itself; scale= is for premul_sum ops")
            return 1.0 / self._world
        if self.premul != "premul_sum":
            raise ValueError(f"{self.name}: scale= is for ops with reduce: premul_sum; this op does not scale")
        if scale is None:
            raise ValueError(f"{self.name}: a premul_sum op needs scale= (the factor of every rank's input)")
        try:
            value = float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}: scale must be a number, got {type(scale).__name__}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{self.name}: scale must be finite, got {value}")
        return value
