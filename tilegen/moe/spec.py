"""The MoE family's spec: expert-parallel dispatch and combine of a rank's tokens."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from ..core.spec import OpSpec, ShardedDim

LL_ROUTE_SMEM = 40 << 10  # low_latency: shared memory for a call's routing (of the 48 KiB static limit)
MOE_OPS = {"moe": "expert-parallel token dispatch (each token to its top-k experts' ranks, laid out per local "
                  "expert) and combine (the experts' outputs back to the tokens' ranks, weighted sum per token)"}


class MoeSpec(OpSpec):
    """Tokens [m (dynamic or static max), hidden] per rank, routed to top-k of `experts` experts."""

    op: Literal["moe"] = Field(description="moe: " + MOE_OPS["moe"])
    experts: Annotated[int, Field(ge=1, le=1024)] = Field(
        description="number of experts, split evenly over the ranks (rank r holds experts r * E / world .. "
                    "(r + 1) * E / world - 1)")
    topk: Annotated[int, Field(ge=1, le=32)] = Field(description="experts per token")
    mode: Literal["normal", "low_latency"] = Field(
        default="normal", description="normal (throughput: counts exchanged first, the host sizes the outputs) or "
                                      "low_latency (fixed capacity of max tokens per expert and source rank, no host "
                                      "round trip, CUDA-graph capturable; distinct experts per token)")
    dispatch_dtype: Optional[Literal["fp8_e4m3"]] = Field(
        default=None, description="fp8_e4m3 sends and returns the dispatched tokens quantized to e4m3 with fp32 "
                                  "scales (fp8_scales); combine stays in dtype (default: tokens move in dtype)")
    fp8_scales: Optional[Literal["per_token", "per_128"]] = Field(
        default=None, description="with dispatch_dtype fp8_e4m3: one scale per token or per 128 channels "
                                  "(default per_128): scale = amax / 448")
    transport: Literal["auto", "nvlink", "nvshmem"] = Field(
        default="auto", description="the MoE kernels store through NVLink peer pointers (one node): auto or nvlink")

    @model_validator(mode="after")
    def _consistent(self) -> "MoeSpec":
        self._fixed_inner()
        if len(self.shape) != 2 or any(isinstance(d, ShardedDim) for d in self.shape):
            raise ValueError("shape: op moe takes the tokens of a rank as [m, hidden] (m may be {name, max})")
        if self.dtype not in ("bf16", "f16", "f32"):
            raise ValueError(f"dtype: op moe moves bf16, f16 or f32 tokens (fp32 combine), not {self.dtype}")
        if self.shape[1] * self.elem_bytes % 16:
            raise ValueError(f"shape: a token's {self.shape[1]} x {self.elem_bytes} bytes must be a multiple of 16 "
                             f"(the kernels move 16-byte vectors)")
        bad = [w for w in self.world_sizes if self.experts % w]
        if bad:
            raise ValueError(f"experts: {self.experts} experts do not split evenly over world sizes {bad}")
        if self.topk > self.experts:
            raise ValueError(f"topk: {self.topk} exceeds the {self.experts} experts")
        if self.sm < 80:
            raise ValueError(f"arch: op moe needs sm_80 or newer (warp reductions), got {self.arch}")
        if self.fp8_scales is not None and self.dispatch_dtype is None:
            raise ValueError("fp8_scales: only an fp8 dispatch (dispatch_dtype: fp8_e4m3) has scales")
        if self.dispatch_dtype is not None:
            if self.dtype not in ("bf16", "f16"):
                raise ValueError(f"dispatch_dtype: fp8 dispatch quantizes bf16 or f16 tokens, not {self.dtype}")
            if self.sm < 89:
                raise ValueError(f"dispatch_dtype: fp8 conversions need sm_89 or newer, got {self.arch}")
            if self.fp8_group == 128 and self.shape[1] % 128:
                raise ValueError(f"shape: per_128 fp8 scales need hidden to be a multiple of 128, got {self.shape[1]}")
        if self.transport == "nvshmem":
            raise ValueError("transport: op moe stores through NVLink peer pointers (one node); use auto or nvlink")
        if self.mode == "low_latency" and self.ll_route_bytes() > LL_ROUTE_SMEM:
            raise ValueError(f"shape: low_latency mode routes a call in shared memory ({self.ll_route_bytes()} bytes "
                             f"for {self.max_shape[0]} tokens, top-{self.topk} of {self.experts} experts; at most "
                             f"{LL_ROUTE_SMEM}): lower the tokens' max or use mode normal")
        need, w = self.symmetric_bytes(max(self.world_sizes)), max(self.world_sizes)
        if need > 64 << 30:
            raise ValueError(f"shape: staging for {self.max_shape[0]} tokens from {w} ranks needs {need} bytes of "
                             f"symmetric memory, over 64 GiB")
        return self

    def symmetric_bytes(self, world: int) -> int:
        """The symmetric memory the op allocates at `world` ranks (tilegen/moe.cuh's Host::symmetric_bytes):
        two halves of, per source rank, max_tokens staging rows, meta rows, counts and combine rows; the flags;
        in low_latency mode the outputs too (every source writes its rows there: Host::ll_layout)."""
        t, h = self.max_shape
        a = lambda b: -(-b // 256) * 256  # noqa: E731
        stage_row = h * self.elem_bytes if not self.fp8_group else h + -(-4 * (h // self.fp8_group) // 16) * 16
        half = (a(world * t * stage_row) + a(world * t * h * self.elem_bytes) + a(world * t * (1 + 3 * self.topk) * 4)
                + a(world * (self.experts + 1) * 4))
        total = 2 * half + 2 * max(self.world_sizes) * 8
        if self.mode == "low_latency":
            total = a(total)
            local, k = self.experts // world, self.topk
            rows, srows = local * world * t, world * t
            groups = h // self.fp8_group if self.fp8_group else 0
            out_row = h if self.fp8_group else h * self.elem_bytes
            total += (a(rows * out_row) + a(rows * groups * 4) + a(rows * 3 * 4) + a(srows * k * 4) + a(srows * 2 * 4)
                      + a(srows * k * 4) + a(local * world * 4) + a(world * 4))
            row_bytes, head_bytes = self.line_row_bytes()
            total += a(srows * row_bytes) + a(world * head_bytes)
        return total

    def line_row_bytes(self) -> tuple[int, int]:
        """low_latency: the bytes of a line row and of a head (tilegen/moe.cuh's LLLines): 128-byte lines
        of 120 data bytes (meta: token, pad, slot rows, weights; fp8 scales; the payload row) and the epoch,
        in whole warp stores of 4 lines."""
        h, k2 = self.max_shape[1], -(-self.topk // 2) * 2
        groups = h // self.fp8_group if self.fp8_group else 0
        data = 4 * (2 + 2 * k2) + 4 * (-(-groups // 2) * 2) + (h if self.fp8_group else h * self.elem_bytes)
        lines, head_lines = -(-data // 120), -(-4 * (2 + self.experts) // 120)
        return -(-lines // 4) * 512, -(-head_lines // 4) * 512

    def ll_route_bytes(self) -> int:
        """low_latency: the shared memory each CTA of the push routes a call in (tilegen/moe.cuh's LLRoute):
        every item's expert, a token mask per expert and per rank."""
        t, words = self.max_shape[0], -(-self.max_shape[0] // 32)
        return 4 * (t * self.topk + (self.experts + max(self.world_sizes)) * words)

    @property
    def fp8_group(self) -> int:
        """fp8 dispatch: channels per scale (the hidden size for per_token); 0 without fp8."""
        if self.dispatch_dtype is None:
            return 0
        return self.shape[1] if self.fp8_scales == "per_token" else 128
