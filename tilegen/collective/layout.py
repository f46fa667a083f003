"""Byte layout of a call: chunks, parts, units and tiles.

The same rules as include/tilegen/layout.cuh, which the generated host code and kernels use; a test
compiles that header and compares both on many sizes. Pure Python: the runtime and the checker
import it.
"""
from __future__ import annotations

from .ops import comm_op

MIN_TILE_BYTES = 16 * 1024  # below this a CTA's fixed cost dominates; small parts use fewer CTAs


def align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def layout(op: str, world: int, in_bytes: int, elem: int, parts: int) -> tuple[int, int]:
    """(shard, part) bytes for a call: the chunk size and the part size."""
    d = comm_op(op)
    if d.world_chunks:  # one tensor cut into world chunks; 16 B boundaries keep stores vectorised
        shard = align_up(-(-in_bytes // world), 16)
    else:
        shard = in_bytes // d.in_chunks(world)
    if parts == 1:
        return shard, shard
    return shard, align_up(-(-shard // parts), 16 if shard % 16 == 0 or d.world_chunks else elem)


def unit_length(op: str, world: int, in_bytes: int, shard: int, part: int, parts: int, unit: int) -> int:
    """Bytes of unit ``unit`` (part h of chunk c): world-chunked tensors end in short or empty chunks."""
    c, h = divmod(unit, parts)
    chunk = min(shard, max(0, in_bytes - c * shard)) if comm_op(op).world_chunks else shard
    return max(0, min(part, chunk - h * part))


def tile_bytes_for(part_bytes: int, tile_bytes: int, ctas: int) -> int:
    """Runtime tile size: spread small parts over the CTAs, never above the plan's tile size."""
    per_cta = align_up(-(-max(part_bytes, 1) // ctas), 16)
    return max(min(tile_bytes, per_cta), min(MIN_TILE_BYTES, tile_bytes))


def tile_ranges(n: int, tile: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + tile, n)) for lo in range(0, n, tile)]
