"""The collective family's spec: the fields of a communication kernel (allgather, reduce_scatter,
allreduce, all_to_all, broadcast, reduce). The overlap family's GEMM ops extend it: their data move
by the same kernels."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from ..core.spec import DTYPES, OpSpec, ShardedDim, _Frozen, dim_size
from .ops import COLLECTIVE_OPS, OPS, algorithms_for, all_schedule_names, make_schedule, order_problems
from .schedules import LL_MAX_BYTES, is_ll

REDUCING = tuple(k for k, d in OPS.items() if d.reduces)
FLOATS = ("bf16", "f16", "f32")  # element types with fractional values (scales, norms, rounding)
SCHEDULES = {k: tuple(algorithms_for(k)) for k in OPS}  # the schedules each op kind has
ScheduleName = Literal[("auto",) + all_schedule_names()]  # type: ignore[valid-type]
CollectiveKind = Literal[COLLECTIVE_OPS]  # type: ignore[valid-type]


class RmsNorm(_Frozen):
    """y = h * rsqrt(mean(h^2) + eps) * weight over each row (the weight: a call argument)."""

    eps: float = Field(default=1e-5, gt=0, le=1, description="added to the mean square before the root")


class Epilogue(_Frozen):
    """What an allreduce or reduce_scatter does to each reduced row before it returns it, in the same
    kernel (include/tilegen/collective/epilogue.cuh)."""

    residual: bool = Field(default=False, description="h = row + residual (a call argument, [rows, ...] like the "
                                                      "output), written back into residual")
    rmsnorm: Optional[RmsNorm] = Field(default=None, description="RMSNorm of h times a weight the call passes "
                                                                 "([hidden]: the product of the inner dims)")
    quant: Optional[Literal["fp8_e4m3"]] = Field(
        default=None, description="the output as fp8 e4m3, each row scaled by max|y| / 448 (returned with it)")

    @model_validator(mode="after")
    def _something(self):
        if not (self.residual or self.rmsnorm or self.quant):
            raise ValueError("an epilogue needs residual: true, rmsnorm or quant")
        return self

    @property
    def stages(self) -> str:
        """What it does, in a few words."""
        return " + ".join(w for w, on in (("residual", self.residual), ("rmsnorm", self.rmsnorm),
                                          (str(self.quant), self.quant)) if on)


EPILOGUE_OPS = ("allreduce", "reduce_scatter")  # ops whose output is whole reduced rows


def _dtype_or_dtypes(schema: dict) -> None:
    """The exported JSON Schema: dtype may be left out where dtypes is given (the first is taken)."""
    schema["required"] = [r for r in schema.get("required", []) if r != "dtype"]
    schema["anyOf"] = [{"required": ["dtype"]}, {"required": ["dtypes"]}]


class CollectiveSpec(OpSpec):
    """A collective: one communication kernel per call, planned per message size."""

    model_config = ConfigDict(json_schema_extra=_dtype_or_dtypes)

    op: CollectiveKind = Field(description="what the op computes: " + "; ".join(
        f"{k}: {OPS[k].summary}" for k in COLLECTIVE_OPS))
    reduce: Literal["sum", "max", "min", "avg", "premul_sum"] = Field(
        default="sum", description="reduction of reduce_scatter/allreduce/reduce, accumulated in fp32 for bf16/f16: "
                                   "sum, max, min, avg (the sum of every rank's input times 1 / world) or "
                                   "premul_sum (times the scale each call passes: op(x, scale=s)); avg and "
                                   "premul_sum multiply each contribution once, before it is summed (NCCL's "
                                   "PreMulSum), and take bf16, f16 or f32")
    tile_bytes: Union[int, Literal["auto"]] = Field(
        default="auto",
        description="largest tile a CTA moves before it signals (multiple of 16, 1 KiB..64 MiB), or auto (the "
                    "planner's, measured where a calibration has it)")
    transport: Literal["auto", "nvlink", "nvshmem"] = Field(
        default="auto",
        description="nvlink: plain vector stores through peer pointers; nvshmem: NVSHMEM put calls; "
                    "auto: peer pointers where NVLink reaches, NVSHMEM elsewhere")
    sync: Literal["per_tile", "barrier"] = Field(
        default="per_tile", description="per_tile: one signal per tile; barrier: one signal per chunk after all CTAs")
    schedule: ScheduleName = Field(
        default="auto", description="auto: the planner chooses per message size, from measurements where a "
                                    "calibration has them (tilegen tune), else by its cost model")
    topology: Literal["nvswitch", "ring_links"] = Field(
        default="nvswitch", description="link layout the cost model assumes")
    ctas: Union[Annotated[int, Field(ge=1, le=4096)], Literal["auto"]] = Field(
        default="auto", description="CTAs (thread blocks) used for communication, or auto (the planner's, measured "
                                    "where a calibration has it); GEMM ops take at most 64 (the GEMMs need the SMs)")
    threads: int = Field(default=512, ge=32, le=1024, description="threads per CTA (multiple of 32)")
    dtypes: Optional[list[Literal["bf16", "f16", "f32", "i32", "u8"]]] = Field(
        default=None, min_length=1,
        description="every element type one library serves (a call takes its input's; the symmetric buffers "
                    "are shared, sized for the widest); dtype may then be left out (the first) or must be one of "
                    "them; GEMM ops serve one")

    deterministic: bool = Field(
        default=False,
        description="reductions' bits depend only on the inputs: each output element is one fp32 sum of "
                    "the ranks' contributions in ascending rank order (from the root for reduce), rounded "
                    "once, whatever the message size, row count, CTAs, tiles or schedule picked per size "
                    "(the planner keeps to schedules the checker proves do that: not the rings beyond 2 ranks); "
                    "gemm_rs: a row's bits do not depend on m (overlap fused or copy_engine)")

    epilogue: Optional[Epilogue] = Field(
        default=None, description="allreduce / reduce_scatter: residual add, RMSNorm and fp8 quantisation of each "
                                  "reduced row, in the same kernel")

    @model_validator(mode="before")
    @classmethod
    def _dtype_of_dtypes(cls, data):
        """dtype defaults to the first of dtypes."""
        if isinstance(data, dict) and "dtype" not in data and isinstance(data.get("dtypes"), list) and data["dtypes"]:
            data = {**data, "dtype": data["dtypes"][0]}
        return data

    @field_validator("dtypes")
    @classmethod
    def _dtypes(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"element types must be distinct, got {v}")
        return v

    @field_validator("tile_bytes")
    @classmethod
    def _tile(cls, v):
        if v == "auto":
            return v
        if not 1024 <= v <= 64 << 20:
            raise ValueError(f"must be between 1024 and {64 << 20} bytes, got {v}")
        if v % 16:
            raise ValueError(f"must be a multiple of 16 bytes (vector width), got {v}")
        return v

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (warp size), got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        self._check_operands()
        self._check_kernel()
        return self

    def _check_operands(self) -> None:
        """What the op's own tensors must be (the GEMM ops' model says it for theirs)."""
        if any(isinstance(d, ShardedDim) for d in self.shape):
            raise ValueError("shape: only a GEMM op's k (gemm_rs) may be sharded ({full: K})")
        if self.dtypes is not None and self.dtype not in self.dtypes:
            raise ValueError(f"dtype: {self.dtype} is not among dtypes {self.dtypes}")

    def _check_kernel(self) -> None:
        """The communication kernel's rules: sizes, the schedule named, the element type reduced."""
        shard = self.max_shard_bytes
        if shard * max(self.world_sizes) > (1 << 40):
            raise ValueError(f"shape: the output at world {max(self.world_sizes)} would be "
                             f"{shard * max(self.world_sizes)} bytes, over 1 TiB")
        if self.schedule != "auto" and self.schedule not in SCHEDULES[self.op]:
            raise ValueError(
                f"schedule: {self.op} has schedules {', '.join(SCHEDULES[self.op])} (or auto), not {self.schedule}"
            )
        if self.schedule != "auto" and is_ll(self.schedule):
            if self.transport == "nvshmem":
                raise ValueError(f"schedule: {self.schedule} stores through NVLink peer pointers, which transport "
                                 f"nvshmem does not use (transport auto or nvlink, or another schedule)")
            big = [w for w in self.world_sizes if self.max_in_bytes(w) > LL_MAX_BYTES]
            if big:
                raise ValueError(f"schedule: {self.schedule} carries its flags in the data and serves inputs up to "
                                 f"{LL_MAX_BYTES} bytes; this spec allows {self.max_in_bytes(big[0])} at world "
                                 f"{big[0]} (schedule: auto uses it for the small ones)")
        if self.deterministic:
            self._check_deterministic()
        if self.epilogue:
            self._check_epilogue()
        field = "dtypes" if self.dtypes else "dtype"
        if self.op in REDUCING and "u8" in self.all_dtypes:
            raise ValueError(f"{field}: {self.op} reduces; use bf16, f16, f32 or i32")
        if self.premul:
            if self.op not in REDUCING or OPS[self.op].gemm:
                raise ValueError(f"reduce: {self.reduce} scales the contributions of a reduction "
                                 f"({', '.join(k for k in REDUCING if not OPS[k].gemm)}), not {self.op}'s")
            ints = self.non_float_dtypes
            if ints:
                raise ValueError(f"reduce: {self.reduce} multiplies by a fractional scale: use bf16, f16 or f32, "
                                 f"not {ints[0]}")

    def _check_epilogue(self) -> None:
        if self.op not in EPILOGUE_OPS:
            raise ValueError(f"epilogue: {self.op} cannot take one; {' and '.join(EPILOGUE_OPS)} can (their output "
                             f"is rows of reduced values)")
        ints = self.non_float_dtypes
        if ints:
            raise ValueError(f"epilogue: {self.epilogue.stages} works on floats: use bf16, f16 or f32, not {ints[0]}")
        if len(self.shape) < 2:
            raise ValueError("epilogue: works on rows: the shape needs an inner dim ([m, hidden])")

    def _check_deterministic(self) -> None:
        if self.schedule != "auto" and self.order_matters:
            bad = [w for w in self.world_sizes if order_problems(self.op, make_schedule(
                self.op, self.schedule, w, self.sync))]
            if bad:
                ok = [a for a in SCHEDULES[self.op] if not order_problems(self.op, make_schedule(
                    self.op, a, bad[0], self.sync))]
                raise ValueError(f"schedule: {self.schedule} adds partial sums at world {bad[0]}, so its bits "
                                 f"differ from the other schedules'; deterministic takes {', '.join(ok)} (or auto)")

    @property
    def order_matters(self) -> bool:
        """Whether the reduction's bits depend on the order it adds in (float sums; max, min and integer
        sums are exact in any order)."""
        return (OPS[self.op].reduces and self.reduce in ("sum", "avg", "premul_sum")
                and len(self.non_float_dtypes) < len(self.all_dtypes))

    @property
    def non_float_dtypes(self) -> list[str]:
        """The element types the op serves that hold integers."""
        return [d for d in self.all_dtypes if d not in FLOATS]

    @property
    def all_dtypes(self) -> tuple[str, ...]:
        """The element types the op serves, dtype first."""
        return tuple(self.dtypes) if self.dtypes else (self.dtype,)

    @property
    def elem_bytes(self) -> int:
        """The widest element's bytes: what the op's buffers and byte bounds are sized for."""
        return max(DTYPES[d][0] for d in self.all_dtypes)

    @property
    def premul(self) -> bool:
        """Whether each contribution is multiplied by the call's scale (avg: 1 / world)."""
        return self.reduce in ("avg", "premul_sum")

    @property
    def fused(self) -> bool:
        """Whether a fused GEMM consumes the kernel's chunks (the overlap family's GEMM ops)."""
        return False

    def kernel_settings(self) -> list[str]:
        """The communication kernel's settings this spec fixes (not auto)."""
        return [f for f in ("ctas", "tile_bytes", "schedule") if getattr(self, f) != "auto"]

    @property
    def comm_inner(self) -> tuple[int, ...]:
        """Inner dims of the tensors the communication moves."""
        return tuple(self.max_shape[1:])

    @property
    def max_shard_bytes(self) -> int:
        n = 1
        for d in self.comm_inner:
            n *= d
        return self.max_shape[0] * n * self.elem_bytes

    def max_in_bytes(self, world: int) -> int:
        return OPS[self.op].in_rows(world) * self.max_shard_bytes

    def max_out_bytes(self, world: int) -> int:
        return OPS[self.op].out_rows(world) * self.max_shard_bytes


__all__ = ["CollectiveSpec", "REDUCING", "SCHEDULES", "dim_size"]
