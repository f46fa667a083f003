// tilegen collective layout: the byte arithmetic of a call (chunks, parts, units, tiles, signal words), one
// definition for host code, kernels and waits. tilegen/collective/layout.py holds the same rules for the
// planner and the checker; a test compiles this header and compares the two on many sizes.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TILEGEN_HD __host__ __device__ __forceinline__
#else
#define TILEGEN_HD inline
#endif

namespace tilegen {
namespace layout {

constexpr int64_t kMinTileBytes = 16 * 1024;  // below this a CTA's fixed cost dominates

// How a call's input is cut into the chunks the schedules name.
enum class Chunks : int {
  kOne = 0,      // the input is one chunk (allgather, broadcast)
  kPerRank = 1,  // world chunks of m rows (reduce_scatter, all_to_all)
  kSplit = 2,    // one tensor cut into world chunks of ceil(bytes / world), 16 B aligned, the last ones short
};

enum Buf : uint8_t { kIn = 0, kOut = 1, kScr = 2 };

TILEGEN_HD int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

// Chunk and part bytes of a call on a per-rank input of in_bytes.
TILEGEN_HD void shard_and_part(Chunks c, int64_t in_bytes, int world, int parts, int elem, int64_t* shard,
                               int64_t* part) {
  if (c == Chunks::kSplit) *shard = align_up((in_bytes + world - 1) / world, 16);
  else *shard = in_bytes / (c == Chunks::kPerRank ? world : 1);
  if (parts == 1) {
    *part = *shard;
    return;
  }
  const int64_t align = (*shard % 16 == 0 || c == Chunks::kSplit) ? 16 : elem;
  *part = align_up((*shard + parts - 1) / parts, align);
}

// Bytes of a unit: part h of chunk c (split tensors end in short or empty chunks).
TILEGEN_HD int64_t unit_length(Chunks c, int64_t in_bytes, int64_t shard, int64_t part, int parts, int unit) {
  const int64_t chunk_index = unit / parts, h = unit % parts;
  int64_t chunk = shard;
  if (c == Chunks::kSplit) {
    chunk = in_bytes - chunk_index * shard;
    chunk = chunk < 0 ? 0 : (chunk > shard ? shard : chunk);
  }
  const int64_t len = chunk - h * part;
  return len < 0 ? 0 : (len > part ? part : len);
}

// Byte offset of slot k of a buffer: part k % parts of chunk k / parts.
TILEGEN_HD int64_t slot_offset(int64_t shard, int64_t part, int parts, int slot) {
  return static_cast<int64_t>(slot / parts) * shard + static_cast<int64_t>(slot % parts) * part;
}

// Runtime tile size: small parts are spread over the CTAs, never above the plan's tile size.
TILEGEN_HD int64_t tile_size(int64_t part, int64_t tile_bytes, int ctas) {
  const int64_t per_cta = align_up(((part > 1 ? part : 1) + ctas - 1) / ctas, 16);
  const int64_t lo = kMinTileBytes < tile_bytes ? kMinTileBytes : tile_bytes;
  const int64_t t = per_cta < tile_bytes ? per_cta : tile_bytes;
  return t > lo ? t : lo;
}

// An op's signal block (symmetric u64 words): entry[max_world], then one flag per (out or scratch
// slot, tile), then one flag per input slot (inputs produced during the call: gemm_rs).
struct Signals {
  int max_world, out_slots, scr_slots, in_slots;
  int64_t max_tiles;
  TILEGEN_HD int64_t flag(int buf, int slot, int64_t tile) const {
    if (buf == kIn) return max_world + static_cast<int64_t>(out_slots + scr_slots) * max_tiles + slot;
    return max_world + static_cast<int64_t>((buf == kScr ? out_slots : 0) + slot) * max_tiles + tile;
  }
  TILEGEN_HD int64_t words() const { return max_world + static_cast<int64_t>(out_slots + scr_slots) * max_tiles + in_slots; }
};

}  // namespace layout
}  // namespace tilegen
