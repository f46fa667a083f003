"""A GEMM + communication op as torch ops (tilegen.core.torch_ops): `op.torch(a, b, group=..)` -> c and
`op.torch.out(a, b, c, group=..)`, i.e. torch.ops.tilegen.<name> and <name>_out. ag_gemm: a [m, k]
-> c [group * m, n]; gemm_rs: a [group * m, k] -> c [m, n] (n, k: this rank's at the group's size)."""
from __future__ import annotations

from typing import Any

from ..core.torch_ops import (
    check_tensor, define, group_of_slot, group_size, refuse_out_form_in_compile, slot_of,
)

SCHEMA = "(Tensor a, Tensor b, int group=0) -> Tensor"
OUT_SCHEMA = "(Tensor a, Tensor b, Tensor(a!) c, int group=0) -> ()"


class TorchGemm:
    def __init__(self, op: Any):
        import torch

        self.op = op
        name = op.name
        dtype = getattr(torch, op.dtype)
        gather = op.kind == "ag_gemm"

        def c_shape(a: Any, b: Any, slot: int) -> tuple:
            world = group_size(slot)
            if world not in op.gemm_nk:
                raise ValueError(f"{name}: a group of {world} ranks; this op was generated for world sizes "
                                 f"{op.world_sizes}")
            n, k = op.gemm_nk[world]
            check_tensor(name, "a", a, dtype, (k,))
            check_tensor(name, "b", b, dtype, (n,) if op.b_layout == "kn" else (k,))
            if b.shape[0] != (k if op.b_layout == "kn" else n):
                raise ValueError(f"{name}: b must be {[k, n] if op.b_layout == 'kn' else [n, k]} (b_layout "
                                 f"{op.b_layout}), got {list(b.shape)}")
            per = 1 if gather else world
            rows = a.shape[0]
            if rows % per or not 1 <= rows // per <= op.max_rows():
                raise ValueError(f"{name}: a must be [{'m' if gather else '%d * m' % world}, {k}] with 1 <= m <= "
                                 f"{op.max_rows()}, got {list(a.shape)}")
            return (rows * world if gather else rows // world, n)

        def fake(a, b, group=0):
            return a.new_empty(c_shape(a, b, group))

        def real(a, b, group=0):
            c_shape(a, b, group)
            return op(a, b, None, group=group_of_slot(group))

        def fake_out(a, b, c, group=0):
            want = c_shape(a, b, group)
            check_tensor(name, "c", c, dtype, (want[1],))
            if tuple(c.shape) != want:
                raise ValueError(f"{name}: c must be {list(want)}, got {list(c.shape)}")

        def real_out(a, b, c, group=0):
            fake_out(a, b, c, group)
            op(a, b, c, group=group_of_slot(group))

        self.functional = define(name, SCHEMA, real, fake)
        self.out_variant = define(f"{name}_out", OUT_SCHEMA, real_out, fake_out, mutates=("c",))
        self._check, self._check_out = c_shape, fake_out

    # (the checks run in the caller's frame too: a ValueError, eager or compiled)
    def __call__(self, a: Any, b: Any, *, group: Any = None) -> Any:
        slot = slot_of(self.op.name, group)
        self._check(a, b, slot)
        return self.functional(a, b, slot)

    def out(self, a: Any, b: Any, c: Any, *, group: Any = None) -> Any:
        refuse_out_form_in_compile(self.op.name)
        slot = slot_of(self.op.name, group)
        self._check_out(a, b, c, slot)
        self.out_variant(a, b, c, slot)
        return c
