"""torch-native ops: every generated op is also a torch.library custom op (namespace `tilegen`) with a
fake implementation, so torch.compile traces it into the graph (no graph break) and CUDA graphs
(mode="reduce-overhead") replay it. Two forms, as torch.distributed's functional collectives and
their out= variants: `torch.ops.tilegen.<op>(...) -> Tensor` allocates its result;
`torch.ops.tilegen.<op>_out(..., out)` writes into `out` (a symmetric one where the op needs it).

A group crosses the op boundary as its slot (an int): on each rank a slot holds at most one group of
that rank (tilegen.core.group), so the slot names it. Each family's runtime class says what its ops
take and return (`torch_ops()`); this module registers them once per op.
"""
from __future__ import annotations

from typing import Any, Callable

from .group import Group

_registered: dict[str, Any] = {}


def slot_of(op_name: str, group: Any) -> int:
    """The slot a torch op takes for `group` (None: the world's, 0)."""
    if group is None:
        return 0
    if not isinstance(group, Group):
        raise ValueError(f"{op_name}: group must be a tilegen group (tilegen.group(...)), got {type(group).__name__}")
    return group.slot


def group_of_slot(slot: int) -> Group | None:
    """This rank's group in `slot` (None for the world's slot 0), for the real and fake implementations."""
    from .runtime import _state

    if slot == 0:
        return None
    registry = _state.get("groups")
    if registry is None or not 0 < slot < len(registry.slots):
        raise ValueError(f"group slot {slot} does not exist (make groups with tilegen.group() on every rank)")
    ranks = registry.slots[slot].group_of(_state["rank"])
    return Group(ranks, slot, ranks.index(_state["rank"]) if ranks else -1)


def group_size(slot: int) -> int:
    """Ranks of this rank's group in `slot` (trace time and run time alike)."""
    from .runtime import _state

    g = group_of_slot(slot)
    return g.size if g is not None else _state["world"]


def define(name: str, schema: str, real: Callable, fake: Callable, mutates: tuple[str, ...] = ()) -> Any:
    """Registers `tilegen::<name>` with `schema` (once per process), its real function (CUDA) and fake;
    returns the torch.ops handle."""
    import torch

    if name not in _registered:
        op = torch.library.custom_op(f"tilegen::{name}", real, mutates_args=mutates, device_types="cuda",
                                     schema=schema)
        op.register_fake(fake)
        _registered[name] = getattr(torch.ops.tilegen, name).default
    return _registered[name]


def refuse_out_form_in_compile(op_name: str) -> None:
    """The out= forms are for eager code and CUDA graphs. Compiled by inductor (torch 2.11, H200,
    2026-12-07), `h = x + op.out(x, buf); h + op.out(h * 2, buf)` came out 0.64-0.69 (relative) off the
    eager result: the graph read the first result from the buffer after the second call had reused it.
    The functional forms returned the eager results, so compiled code takes those."""
    import torch

    if torch.compiler.is_compiling():
        raise RuntimeError(f"{op_name}: under torch.compile call the functional form (op.torch(...)); the out= "
                           f"form writes into a buffer the compiled graph may read after a later call reused it")


def check_tensor(op_name: str, arg: str, t: Any, dtype: Any, inner: tuple[int, ...],
                 free: tuple[bool, ...] = ()) -> None:
    """dtype (one, or a tuple of those allowed), device, rank and inner dims (free ones: up to inner's)
    of a tensor argument: a ValueError naming it (the fakes run it at trace time, so compiled code
    fails before anything is launched too)."""
    allowed = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in allowed:
        raise ValueError(f"{op_name}: {arg} must have dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if t.device.type != "cuda":
        raise ValueError(f"{op_name}: {arg} must be a CUDA tensor, got device {t.device}")
    free = tuple(free) or (False,) * len(inner)
    if t.dim() != 1 + len(inner) or not all(
            (1 <= d <= m) if f else d == m for d, m, f in zip(t.shape[1:], inner, free)):
        want = ", ".join(["rows", *(f"<={m}" if f else str(m) for m, f in zip(inner, free))])
        raise ValueError(f"{op_name}: {arg} must be [{want}], got {list(t.shape)}")
