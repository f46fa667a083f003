// tilegen overlap layer: what a fused GEMM kernel needs to know of the communication kernel
// running beside it (signal layout, epoch, chunk order). Filled by the op's host code
// (overlap/host.cuh, chunk_sync), read by the GEMM's tile scheduler (fused_gemm.cuh). No CUTLASS here.
#pragma once
#include <cstdint>
#include "tilegen/common/wait.cuh"

namespace tilegen::fused {

constexpr int kMaxChunks = 8;

enum Mode : int { kPlain = 0, kWaitRows = 1, kPublishParts = 2 };

// Per call. The communicated tensor of a chunk is `shard` bytes of `row_bytes`-byte rows, cut into
// `parts` parts of `part` bytes; ag_gemm flags cover `tile`-byte pieces of a part (one per part when
// !per_tile).
struct ChunkSync {
  int mode = kPlain;
  int world = 1;
  int order[kMaxChunks] = {};  // k-th chunk to visit
  int rows = 0;                // rows per chunk (M = world * rows)
  int tile_m = 0;              // GEMM tile rows
  int tiles_n = 0;             // GEMM tiles along n
  int parts = 1;
  int per_tile = 1;
  int64_t row_bytes = 0, shard = 0, part = 0, tile = 0;
  uint64_t* sig = nullptr;     // this rank's signal block
  int64_t flag_base = 0;       // ag_gemm: flag of (chunk c, part h, piece t) = sig[flag_base + (c*parts+h)*flag_stride + t]
  int64_t flag_stride = 0;
  int64_t in_flag_base = 0;    // gemm_rs: input flag of (c, h) = sig[in_flag_base + c*parts + h]
  uint64_t* counters = nullptr;  // gemm_rs: finished tiles per (c, h); zero between calls
  const uint64_t* epoch = nullptr;  // the call's epoch, on the device (advanced by the op's begin kernel)
  dev::WaitCtx wait{};
};

}  // namespace tilegen::fused
