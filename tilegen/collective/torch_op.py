"""A collective op as torch ops (tilegen.core.torch_ops): `op.torch(input, group=..)` and
`op.torch.out(input, out, group=..)`, i.e. torch.ops.tilegen.<name> and <name>_out. Epilogue ops
(TorchEpilogue) take their residual (which they update in place) and weight too."""
from __future__ import annotations

from typing import Any

from ..core.torch_ops import (
    check_tensor, define, group_of_slot, group_size, refuse_out_form_in_compile, slot_of,
)
from .ops import OPS

SCHEMA = "(Tensor input, int group=0, int root=0, float? scale=None) -> Tensor"
OUT_SCHEMA = "(Tensor input, Tensor(a!) out, int group=0, int root=0, float? scale=None) -> ()"


def output_rows(op: Any, input: Any, slot: int) -> int:
    """Rows of the op's output for `input` in the group of `slot`, after checking the input (dtype,
    device, inner dims, rows): a ValueError naming it, at trace time too."""
    import torch

    check_tensor(op.name, "input", input, tuple(getattr(torch, d) for d in op.dtypes), op.inner_shape,
                 op.free_inner)
    desc, world = OPS[op.kind], group_size(slot)
    k, rows = desc.in_rows(world), input.shape[0]
    if rows % k or not 1 <= rows // k <= op.max_rows():
        raise ValueError(f"{op.name}: input dim 0 must be {'%d * m with m' % k if k > 1 else 'm'} in "
                         f"[1, {op.max_rows()}], got {list(input.shape)}")
    return desc.out_rows(world) * (rows // k)


class TorchCollective:
    """torch.ops.tilegen.<name>(input, group_slot, root, scale) -> Tensor, and <name>_out(input, out, ...).
    The functional form returns a new tensor: where peers store into the op's output (a symmetric
    buffer the op keeps), the result is copied out of it; the out= form writes into `out` directly
    (a symmetric tensor then: tilegen.empty or op.empty_output)."""

    def __init__(self, op: Any):
        self.op = op
        name = op.name

        def out_shape(input: Any, slot: int) -> tuple:
            return (output_rows(op, input, slot),) + tuple(input.shape[1:])

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


class TorchEpilogue:
    """An epilogue op (allreduce / reduce_scatter + residual, RMSNorm, fp8) as torch ops:
    torch.ops.tilegen.<name>(input, residual, weight, group) -> y, or (y, scales) when quantising, with
    residual updated in place (declared mutated, as torch's fused_add_rms_norm-style ops do; torch.compile
    functionalises it); <name>_out(input, out, residual, weight, scales, group) writes into out/scales."""

    def __init__(self, op: Any):
        import torch

        self.op = op
        name, e = op.name, op.epilogue
        quant = e["quant"] is not None
        self.residual, self.weight, self.quant = e["residual"], e["rmsnorm"] is not None, quant
        res, wt = ("Tensor(a!) residual, " if self.residual else ""), ("Tensor weight, " if self.weight else "")
        ret = "(Tensor, Tensor)" if quant else "Tensor"
        schema = f"(Tensor input, {res}{wt}int group=0) -> {ret}"
        out_schema = (f"(Tensor input, Tensor(b!) out, {res}{wt}" + ("Tensor(c!) scales, " if quant else "")
                      + "int group=0) -> ()")

        def operands(input: Any, residual: Any, weight: Any, slot: int) -> int:
            n = output_rows(op, input, slot)
            if self.residual:
                check_tensor(name, "residual", residual, (input.dtype,), tuple(input.shape[1:]))
                if residual.shape[0] != n:
                    raise ValueError(f"{name}: residual must have {n} rows, got {list(residual.shape)}")
            if self.weight:
                hidden = input.numel() // input.shape[0]
                if weight.dtype != input.dtype or tuple(weight.shape) != (hidden,) or weight.device.type != "cuda":
                    raise ValueError(f"{name}: weight must be a CUDA [{hidden}] {input.dtype} tensor, got "
                                     f"{list(weight.shape)} {weight.dtype} on {weight.device}")
            return n

        def results(input: Any, n: int) -> Any:
            y = input.new_empty((n,) + tuple(input.shape[1:]), dtype=torch.float8_e4m3fn if quant else input.dtype)
            return (y, input.new_empty((n,), dtype=torch.float32)) if quant else y

        def unpack(args: tuple, out_form: bool = False) -> tuple:
            """(residual, weight, scales, group slot) from the arguments after input (and out): the ones
            this op's schema has, None for the others; scales only in the out form."""
            args = list(args)
            residual = args.pop(0) if self.residual else None
            weight = args.pop(0) if self.weight else None
            scales = args.pop(0) if out_form and quant else None
            return residual, weight, scales, (args[0] if args else 0)

        def fake(input, *args):
            residual, weight, _, group = unpack(args)
            return results(input, operands(input, residual, weight, group))

        def real(input, *args):
            residual, weight, _, group = unpack(args)
            operands(input, residual, weight, group)
            return op(input.contiguous(), None, residual=residual, weight=weight, group=group_of_slot(group))

        def fake_out(input, out, *args):
            residual, weight, scales, group = unpack(args, out_form=True)
            want = results(input, operands(input, residual, weight, group))
            for arg, t, w in (("out", out, want[0] if quant else want), ("scales", scales, want[1] if quant else None)):
                if w is not None and (t.dtype != w.dtype or tuple(t.shape) != tuple(w.shape)):
                    raise ValueError(f"{name}: {arg} must be {list(w.shape)} {w.dtype}, got {list(t.shape)} {t.dtype}")

        def real_out(input, out, *args):
            fake_out(input, out, *args)
            residual, weight, scales, group = unpack(args, out_form=True)
            op(input.contiguous(), out, residual=residual, weight=weight, scales=scales, group=group_of_slot(group))

        self.functional = define(name, schema, real, fake, mutates=("residual",) if self.residual else ())
        mutated = ("out",) + (("residual",) if self.residual else ()) + (("scales",) if quant else ())
        self.out_variant = define(f"{name}_out", out_schema, real_out, fake_out, mutates=mutated)
        self._operands, self._fake_out = operands, fake_out

    def _middle(self, residual: Any, weight: Any) -> tuple:
        for arg, value, wanted in (("residual", residual, self.residual), ("weight", weight, self.weight)):
            if (value is None) == wanted:
                raise ValueError(f"{self.op.name}: {arg}= is {'required' if wanted else 'not taken'} by this op's "
                                 f"epilogue")
        return tuple(v for v, on in ((residual, self.residual), (weight, self.weight)) if on)

    def __call__(self, input: Any, *, residual: Any = None, weight: Any = None, group: Any = None) -> Any:
        middle = self._middle(residual, weight)
        slot = slot_of(self.op.name, group)
        self._operands(input, residual, weight, slot)
        return self.functional(input, *middle, slot)

    def out(self, input: Any, out: Any, *, residual: Any = None, weight: Any = None, scales: Any = None,
            group: Any = None) -> Any:
        refuse_out_form_in_compile(self.op.name)
        middle = self._middle(residual, weight)
        if (scales is None) == self.quant:
            raise ValueError(f"{self.op.name}: scales= is {'required' if self.quant else 'not taken'} by this op")
        slot = slot_of(self.op.name, group)
        extra = (scales,) if self.quant else ()
        self._fake_out(input, out, *middle, *extra, slot)
        self.out_variant(input, out, *middle, *extra, slot)
        return (out, scales) if self.quant else out
