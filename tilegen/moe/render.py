"""The MoE family's rendering: the traits of tilegen/include/tilegen/moe.cuh's Op and the binding's constants."""
from __future__ import annotations

from ..core.render import op_id
from .spec import MoeSpec


def moe_context(spec: MoeSpec) -> dict:
    tokens, hidden = spec.max_shape
    return {
        "hidden": hidden,
        "max_tokens": tokens,
        "traits": [("int", "kOpId", str(op_id(spec.name))), ("int", "kMaxWorld", str(max(spec.world_sizes))),
                   ("int", "kExperts", str(spec.experts)), ("int", "kTopk", str(spec.topk)),
                   ("int64_t", "kMaxTokens", f"{tokens}LL"), ("int64_t", "kHidden", f"{hidden}LL"),
                   ("int64_t", "kFp8Group", f"{spec.fp8_group}LL"),
                   ("int", "kLowLatency", "1" if spec.mode == "low_latency" else "0")],
        "fp8_groups": hidden // spec.fp8_group if spec.fp8_group else 0,
    }
