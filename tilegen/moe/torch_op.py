"""A MoE op as torch ops (tilegen.core.torch_ops): `op.torch.dispatch(x, topk_idx, topk_weights, group=..)`
-> (recv_x, counts, handle) and `op.torch.combine(y, handle)`, i.e. torch.ops.tilegen.<name>_dispatch and
<name>_combine. The handle is tensors (and the group), so a compiled graph carries it between the two.

Normal mode: the received row counts are data (dispatch reads them back to size its outputs), so the
fake gives recv_x unbacked sizes (torch.compile traces on; the step is not CUDA-graph capturable, as
in eager). Low-latency mode: fixed shapes; its outputs live in the op's symmetric buffers, which the
functional op copies into new tensors (the eager op.dispatch returns them without a copy).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from ..core.torch_ops import check_tensor, define, group_of_slot, group_size, slot_of
from .runtime import MoeHandle

DISPATCH = ("(Tensor x, Tensor topk_idx, Tensor topk_weights, int group=0) -> "
            "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
COMBINE = ("(Tensor y, Tensor handle, Tensor slot_rows, Tensor stage_src, Tensor stage_w, Tensor topk_idx, "
           "int group=0) -> Tensor")


class TorchMoeHandle(NamedTuple):
    """What combine needs from its dispatch, as tensors (MoeHandle's), and the dispatch's group slot."""

    handle: Any
    slot_rows: Any
    stage_src: Any
    stage_w: Any
    topk_idx: Any
    group: int


class TorchMoe:
    def __init__(self, op: Any):
        import torch

        self.op = op
        name, hidden, k = op.name, op.hidden, op.topk
        dtype = getattr(torch, op.dtype)
        low_latency = op.mode == "low_latency"

        def check(x, idx, w, slot):
            world = group_size(slot)
            if world not in op.world_sizes:
                raise ValueError(f"{name}: a group of {world} ranks; this op was generated for world sizes "
                                 f"{op.world_sizes}")
            check_tensor(name, "x", x, dtype, (hidden,))
            op.check_routing_shapes(x, idx, w)
            for arg, t in (("topk_idx", idx), ("topk_weights", w)):
                if t.device != x.device:
                    raise ValueError(f"{name}: {arg} is on {t.device} but x is on {x.device}")
            return world

        def fake_dispatch(x, idx, w, group=0):
            world = check(x, idx, w, group)
            L, T = op.experts // world, op.max_rows()
            i32 = dict(dtype=torch.int32, device=x.device)
            if low_latency:
                rows, stage_rows, lead = world * T * L, world * T, (L, world * T)
                counts = x.new_empty((L, world), **i32)
            else:
                ctx = torch.library.get_ctx()
                rows, stage_rows, lead = ctx.new_dynamic_size(), ctx.new_dynamic_size(), None
                counts = x.new_empty((L,), **i32)
            shape = lead or (rows,)
            if op.fp8_group:
                recv = x.new_empty(shape + (hidden,), dtype=torch.float8_e4m3fn)
                scales = x.new_empty(shape + (hidden // op.fp8_group,), dtype=torch.float32)
            else:
                recv, scales = x.new_empty(shape + (hidden,)), x.new_empty((0,), dtype=torch.float32)
            return (recv, counts, x.new_empty(shape + (3,), **i32), x.new_empty((stage_rows, k), **i32),
                    x.new_empty((stage_rows, 2), **i32), x.new_empty((stage_rows, k), dtype=torch.float32), scales)

        def real_dispatch(x, idx, w, group=0):
            check(x, idx, w, group)
            recv, counts, h = op.dispatch(x, idx, w, group=group_of_slot(group))
            recv, scales = recv if op.fp8_group else (recv, torch.empty((0,), dtype=torch.float32, device=x.device))
            out = (recv, counts, h.handle, h.slot_rows, h.stage_src, h.stage_w, scales)
            # low-latency outputs are the op's buffers (normal mode's are new): a functional op returns copies
            return tuple(t.clone() for t in out) if low_latency else tuple(t.contiguous() for t in out)

        def fake_combine(y, handle, slot_rows, stage_src, stage_w, idx, group=0):
            check_tensor(name, "y", y.reshape(-1, hidden) if y.dim() == 3 else y, dtype, (hidden,))
            return y.new_empty((idx.shape[0], hidden))

        def real_combine(y, handle, slot_rows, stage_src, stage_w, idx, group=0):
            fake_combine(y, handle, slot_rows, stage_src, stage_w, idx, group)
            g = group_of_slot(group)
            return op.combine(y, MoeHandle(handle, slot_rows, stage_src, stage_w, idx, [], int(idx.shape[0]), g))

        self.dispatch_op = define(f"{name}_dispatch", DISPATCH, real_dispatch, fake_dispatch)
        self.combine_op = define(f"{name}_combine", COMBINE, real_combine, fake_combine)
        self._check = check

    def dispatch(self, x: Any, topk_idx: Any, topk_weights: Any, *, group: Any = None):
        """-> (recv_x (fp8 dispatch: (e4m3 tokens, scales)), counts, TorchMoeHandle), as op.dispatch."""
        slot = slot_of(self.op.name, group)
        self._check(x, topk_idx, topk_weights, slot)
        recv, counts, handle, slot_rows, stage_src, stage_w, scales = self.dispatch_op(x, topk_idx, topk_weights, slot)
        h = TorchMoeHandle(handle, slot_rows, stage_src, stage_w, topk_idx, slot)
        return ((recv, scales) if self.op.fp8_group else recv), counts, h

    def combine(self, y: Any, handle: TorchMoeHandle) -> Any:
        """-> [m, hidden] on the tokens' rank, as op.combine."""
        if not isinstance(handle, TorchMoeHandle):
            raise ValueError(f"{self.op.name}: handle must be what op.torch.dispatch returned, got "
                             f"{type(handle).__name__}")
        return self.combine_op(y, handle.handle, handle.slot_rows, handle.stage_src, handle.stage_w,
                               handle.topk_idx, handle.group)
