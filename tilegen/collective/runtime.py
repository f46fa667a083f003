"""The collective family's runtime: a generated collective op, called with tensors."""
from __future__ import annotations

from typing import Any

from ..core.runtime import GeneratedOp, _capturing, _stream_handle, _synchronize, _torch, empty, world_size
from .ops import OPS


class CollectiveOp(GeneratedOp):
    """Callable: op(input, output=None, *, root=0, scale=None, stream=None, timeout_ms=None)."""

    def __init__(self, *args, premul: str | None = None, **kw):
        super().__init__(*args, **kw)
        self.premul = premul  # reduce: "avg" (scale 1 / world) or "premul_sum" (scale per call), else None

    def shard_rows(self, input_rows: int) -> int:
        """m for an input of input_rows rows (inputs of reduce_scatter and all_to_all hold world * m)."""
        k = OPS[self.kind].in_rows(world_size())
        if input_rows % k:
            raise ValueError(f"{self.name}: input dim 0 must be a multiple of {k}, got {input_rows}")
        return input_rows // k

    def output_shape(self, rows: int) -> tuple[int, ...]:
        return (OPS[self.kind].out_rows(world_size()) * rows,) + self.inner_shape

    def empty_output(self, rows: int) -> Any:
        """Output for shards of `rows` rows: on the symmetric heap when peers store into it
        (collective then; cached per size)."""
        world = world_size()
        if not 1 <= rows <= self.max_rows():
            raise ValueError(f"{self.name}: rows must be in [1, {self.max_rows()}], got {rows}")
        key = (rows, world)
        if key not in self._outputs:
            if self.symmetric_output and _capturing(None):
                raise RuntimeError(
                    f"{self.name}: the symmetric output for {rows} rows is allocated collectively, which a "
                    f"CUDA graph cannot capture: call the op once with this size (or "
                    f"{self.name}.empty_output({rows})) before capturing"
                )
            if self.symmetric_output:
                self._outputs[key] = empty(self.output_shape(rows), self.dtype)
            else:
                torch = _torch()
                return torch.empty(self.output_shape(rows), dtype=getattr(torch, self.dtype), device="cuda")
        return self._outputs[key]

    def __call__(self, input: Any, output: Any = None, *, root: int = 0, scale: float | None = None,
                 stream: Any = None, timeout_ms: float | None = None) -> Any:
        """Run the op on the current stream (or `stream`). Rooted ops (broadcast) take `root`; where only
        the root's input is read, other ranks may pass None (the output is then the nominal input).
        reduce: premul_sum ops take `scale` (each rank's input is multiplied by it before the sum).
        The common call (tensors given, default stream and timeout) does little Python: an eager call's
        host cost is the launch's."""
        run = self._run
        if run is None:
            self.load()
            run = self._run
        if input is None or output is None:
            input, output = self._complete_args(input, output)
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

    def _complete_args(self, input: Any, output: Any) -> tuple[Any, Any]:
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
        return input, self.empty_output(self.shard_rows(int(input.shape[0])))



    def _scale(self, scale: float | None) -> float:
        """The factor each contribution is multiplied by: 1 / world for avg, the call's for premul_sum."""
        if self.premul == "avg":
            if scale is not None:
                raise ValueError(f"{self.name}: reduce avg scales by 1 / world itself; scale= is for premul_sum ops")
            return 1.0 / world_size()
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
