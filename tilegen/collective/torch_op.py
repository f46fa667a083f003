"""A collective op as torch ops (tilegen.core.torch_ops): `op.torch(input, group=..)` and
`op.torch.out(input, out, group=..)`, i.e. torch.ops.tilegen.<name> and <name>_out."""
from __future__ import annotations

from typing import Any

from ..core.torch_ops import (
    check_tensor, define, group_of_slot, group_size, refuse_out_form_in_compile, slot_of,
)
from .ops import OPS

SCHEMA = "(Tensor input, int group=0, int root=0, float? scale=None) -> Tensor"
OUT_SCHEMA = "(Tensor input, Tensor(a!) out, int group=0, int root=0, float? scale=None) -> ()"


class TorchCollective:
    """torch.ops.tilegen.<name>(input, group_slot, root, scale) -> Tensor, and <name>_out(input, out, ...).
    The functional form returns a new tensor: where peers store into the op's output (a symmetric
    buffer the op keeps), the result is copied out of it; the out= form writes into `out` directly
    (a symmetric tensor then: tilegen.empty or op.empty_output)."""

    def __init__(self, op: Any):
        import torch

        self.op = op
        name, desc, inner = op.name, OPS[op.kind], op.inner_shape
        dtypes = tuple(getattr(torch, d) for d in op.dtypes)

        def out_shape(input: Any, slot: int) -> tuple:
            check_tensor(name, "input", input, dtypes, inner, op.free_inner)
            world = group_size(slot)
            k = desc.in_rows(world)
            rows = input.shape[0]
            if rows % k or not 1 <= rows // k <= op.max_rows():
                raise ValueError(f"{name}: input dim 0 must be {'%d * m with m' % k if k > 1 else 'm'} in "
                                 f"[1, {op.max_rows()}], got {list(input.shape)}")
            return (desc.out_rows(world) * (rows // k),) + tuple(input.shape[1:])

        def fake(input, group=0, root=0, scale=None):
            return input.new_empty(out_shape(input, group))

        def real(input, group=0, root=0, scale=None):
            out_shape(input, group)
            out = op(input.contiguous(), None, root=root, scale=scale, group=group_of_slot(group))
            return out.clone() if op.symmetric_output else out

        def fake_out(input, out, group=0, root=0, scale=None):
            want = out_shape(input, group)
            check_tensor(name, "out", out, (input.dtype,), tuple(input.shape[1:]))
            if tuple(out.shape) != want:
                raise ValueError(f"{name}: out must be {list(want)}, got {list(out.shape)}")

        def real_out(input, out, group=0, root=0, scale=None):
            fake_out(input, out, group, root, scale)
            op(input.contiguous(), out, root=root, scale=scale, group=group_of_slot(group))

        self.functional = define(name, SCHEMA, real, fake)
        self.out_variant = define(f"{name}_out", OUT_SCHEMA, real_out, fake_out, mutates=("out",))
        self._check, self._check_out = out_shape, fake_out

    # The checks run here too, in the caller's frame: eager code and compiled code (traced, then guarded)
    # get the ValueError itself, not torch.compile's report of a failing fake.
    def __call__(self, input: Any, *, group: Any = None, root: int = 0, scale: float | None = None) -> Any:
        slot = slot_of(self.op.name, group)
        self._check(input, slot)
        return self.functional(input, slot, root, scale)

    def out(self, input: Any, out: Any, *, group: Any = None, root: int = 0, scale: float | None = None) -> Any:
        refuse_out_form_in_compile(self.op.name)
        slot = slot_of(self.op.name, group)
        self._check_out(input, out, slot)
        self.out_variant(input, out, slot, root, scale)
        return out
