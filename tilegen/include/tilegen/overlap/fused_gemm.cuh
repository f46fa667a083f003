// tilegen overlap layer: the tile scheduler of the fused GEMM + communication kernels.
//
// A CUTLASS 3 Hopper GEMM (TMA loads, wgmma, warp-specialized cooperative persistent kernel) gets
// this scheduler instead of CUTLASS's persistent one. The M rows are world chunks of `rows` rows,
// chunk c being rank c's (ag_gemm: gathered from it; gemm_rs: destined to it). On top of CUTLASS's
// persistent, rasterised walk the scheduler
//   - renumbers row blocks so that chunks come in the order the communication delivers (ag_gemm)
//     or needs (gemm_rs) them (a block that straddles two chunks goes with the later one);
//   - ag_gemm: before the mainloop producer warp issues the TMA loads of a tile, waits until the
//     communication kernel's flags cover the tile's rows (per flag tile, not per chunk);
//   - gemm_rs: after the consumer warp groups stored a tile, waits for its TMA stores, counts it
//     towards each part of the chunk it touches, and the tile that completes a part publishes that
//     part's input flag, on which the reduce-scatter kernel running beside it waits.
// Everything else (pipelines, epilogue, grid shape) is CUTLASS's. Waits are bounded like every
// tilegen wait (WaitCtx): a wait that gives up records rank/flag/expected/seen and lets the kernel
// finish instead of hanging.
#pragma once
#include <cstdint>
#include <cutlass/arch/barrier.h>
#include <cutlass/gemm/kernel/sm90_tile_scheduler.hpp>
#include <cutlass/gemm/kernel/tile_scheduler.hpp>
#include "tilegen/common/memory.cuh"
#include "tilegen/common/wait.cuh"
#include "tilegen/overlap/chunk_sync.cuh"

namespace tilegen::fused {

__device__ __forceinline__ int64_t part_length(const ChunkSync& s, int h) {
  const int64_t len = s.shard - static_cast<int64_t>(h) * s.part;
  return len < 0 ? 0 : (len > s.part ? s.part : len);
}

// ag_gemm: one thread waits until every flag piece overlapping rows [r0, r1) of chunk c is set.
__device__ __forceinline__ void wait_rows(const ChunkSync& s, int c, int64_t r0, int64_t r1) {
  const int64_t b0 = r0 * s.row_bytes, b1 = r1 * s.row_bytes;
  if (b1 <= b0 || s.part <= 0) return;
  const uint64_t epoch = dev::ld_acquire_gpu(s.epoch);
  for (int64_t h = b0 / s.part; h <= (b1 - 1) / s.part && h < s.parts; ++h) {
    const int64_t base = h * s.part, len = part_length(s, static_cast<int>(h));
    const int64_t lo = (b0 > base ? b0 : base) - base, hi = (b1 < base + len ? b1 : base + len) - base;
    if (hi <= lo) continue;
    const int64_t t0 = s.per_tile ? lo / s.tile : 0, t1 = s.per_tile ? (hi - 1) / s.tile : 0;
    for (int64_t t = t0; t <= t1; ++t) {
      const int64_t idx = s.flag_base + (static_cast<int64_t>(c) * s.parts + h) * s.flag_stride + t;
      if (!dev::wait_ge(s.sig + idx, epoch, s.wait, SignalKind::kTileFlag, idx, -1)) return;  // recorded; finish, do not hang
    }
  }
}

// gemm_rs: tiles of a chunk that touch part h (every row block overlapping its rows, all columns).
__device__ __forceinline__ uint64_t tiles_touching_part(const ChunkSync& s, int c, int h) {
  const int64_t begin = static_cast<int64_t>(h) * s.part, end = begin + part_length(s, h);
  const int64_t row0 = static_cast<int64_t>(c) * s.rows;  // global rows of the part: [row0 + pr0, row0 + pr1)
  const int64_t pr0 = row0 + begin / s.row_bytes, pr1 = row0 + (end + s.row_bytes - 1) / s.row_bytes;
  return static_cast<uint64_t>((pr1 - 1) / s.tile_m - pr0 / s.tile_m + 1) * s.tiles_n;
}

// gemm_rs: one thread, after the tile's stores are complete and visible: count it; the last tile of
// a part publishes the part (and any empty parts after the last non-empty one).
__device__ __forceinline__ void publish_tile(const ChunkSync& s, int c, int64_t r0, int64_t r1) {
  const int64_t b0 = r0 * s.row_bytes, b1 = r1 * s.row_bytes;
  if (b1 <= b0 || s.part <= 0) return;
  const uint64_t epoch = dev::ld_acquire_gpu(s.epoch);
  for (int64_t h = b0 / s.part; h <= (b1 - 1) / s.part && h < s.parts; ++h) {
    if (part_length(s, static_cast<int>(h)) == 0) continue;
    const int64_t slot = static_cast<int64_t>(c) * s.parts + h;
    const uint64_t want = tiles_touching_part(s, c, static_cast<int>(h));
    if (dev::atomic_add_acq_rel_gpu(s.counters + slot, 1) + 1 != want) continue;
    s.counters[slot] = 0;  // every tile of this call has counted: reset for the next call
    dev::fence_acq_rel_gpu();
    dev::st_release_gpu(s.sig + s.in_flag_base + slot, epoch);
    const bool last_nonempty = h + 1 >= s.parts || part_length(s, static_cast<int>(h + 1)) == 0;
    for (int64_t e = h + 1; last_nonempty && e < s.parts; ++e) dev::st_release_gpu(s.sig + s.in_flag_base + c * s.parts + e, epoch);
  }
}

// Row block of the v-th block to visit: chunks in s.order; chunk c owns blocks
// [floor(c*rows/BM), floor((c+1)*rows/BM)) (the last chunk: up to the end), a partition of all blocks.
__device__ __forceinline__ int block_to_visit(const ChunkSync& s, int v, int blocks) {
  for (int k = 0; k < s.world; ++k) {
    const int c = s.order[k];
    const int lo = static_cast<int>(static_cast<int64_t>(c) * s.rows / s.tile_m);
    const int hi = c == s.world - 1 ? blocks : static_cast<int>(static_cast<int64_t>(c + 1) * s.rows / s.tile_m);
    if (v < hi - lo) return lo + v;
    v -= hi - lo;
  }
  return v;  // not reached for v < blocks
}

// Calls f(chunk, first row, end row) for the chunk-local rows of global rows [r0, r1).
template <class F>
__device__ __forceinline__ void for_each_chunk_rows(const ChunkSync& s, int64_t r0, int64_t r1, F&& f) {
  for (int64_t c = r0 / s.rows; c < s.world && c * s.rows < r1; ++c) {
    const int64_t lo = r0 > c * s.rows ? r0 - c * s.rows : 0;
    const int64_t hi = r1 < (c + 1) * s.rows ? r1 - c * s.rows : s.rows;
    f(static_cast<int>(c), lo, hi);
  }
}

// Thread roles of CUTLASS's KernelTmaWarpSpecializedCooperative: warp group 0 loads (its warp 0
// issues the mainloop TMA loads), warp groups 1 and 2 compute and run the epilogue.
constexpr int kMainloopWarp = 0;
constexpr int kConsumerThreads = 256;
constexpr int kFirstConsumerThread = 128;
constexpr uint32_t kPublishBarrier = 0;  // CUTLASS's first user named barrier

class ChunkScheduler : public cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90 {
  using Base = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90;

 public:
  struct Arguments : Base::Arguments {
    ChunkSync sync{};
  };
  struct Params : Base::Params {
    ChunkSync sync{};
  };

  template <class ProblemShapeMNKL, class TileShape, class ClusterShape>
  static Params to_underlying_arguments(ProblemShapeMNKL problem, TileShape tile, ClusterShape cluster,
                                        cutlass::KernelHardwareInfo const& hw, Arguments const& args,
                                        void* workspace = nullptr, const uint32_t epilogue_subtile = 1,
                                        uint32_t ktile_start_alignment_count = 1u) {
    Params p;
    static_cast<Base::Params&>(p) = Base::to_underlying_arguments(problem, tile, cluster, hw, args, workspace,
                                                                   epilogue_subtile, ktile_start_alignment_count);
    p.sync = args.sync;
    return p;
  }

  CUTLASS_HOST_DEVICE ChunkScheduler() {}
  CUTLASS_DEVICE explicit ChunkScheduler(Params const& p) : Base(p), sync_(p.sync) {}

  template <class ClusterShape>
  CUTLASS_DEVICE WorkTileInfo initial_work_tile_info(ClusterShape) { return enter(Base::get_current_work()); }

  // CUTLASS's pingpong kernel advances the scheduler itself (its producer by one tile, each consumer warp
  // group by two) and reads the tile here: renumbered and, for the load warp, waited for, as above.
  CUTLASS_DEVICE WorkTileInfo get_current_work() const { return enter(Base::get_current_work()); }

  CUTLASS_DEVICE auto fetch_next_work(WorkTileInfo done) {
    leave(done);
    Base::advance_to_next_work();
    return cute::make_tuple(enter(Base::get_current_work()), true);
  }
  template <class Pipeline, class PipelineState>
  CUTLASS_DEVICE auto fetch_next_work(WorkTileInfo done, Pipeline&, PipelineState) { return fetch_next_work(done); }

 private:
  CUTLASS_DEVICE void rows_of(WorkTileInfo const& w, int64_t& r0, int64_t& r1) const {
    const int64_t m = static_cast<int64_t>(sync_.world) * sync_.rows;
    r0 = static_cast<int64_t>(w.M_idx) * sync_.tile_m;
    r1 = r0 + sync_.tile_m < m ? r0 + sync_.tile_m : m;
  }

  // A tile is about to be worked on: renumber its row block; the load warp waits for its rows (ag_gemm).
  CUTLASS_DEVICE WorkTileInfo enter(WorkTileInfo w) const {
    if (!w.is_valid()) return w;
    w.M_idx = block_to_visit(sync_, w.M_idx, static_cast<int>(scheduler_params.problem_tiles_m_));
    if (sync_.mode == kWaitRows && threadIdx.x / 32 == kMainloopWarp) {
      int64_t r0, r1;
      rows_of(w, r0, r1);
      if (cute::elect_one_sync())
        for_each_chunk_rows(sync_, r0, r1, [&](int c, int64_t lo, int64_t hi) { wait_rows(sync_, c, lo, hi); });
      __syncwarp();
      // The rows were written through the generic proxy; TMA reads them through the async proxy.
      asm volatile("fence.proxy.async.global;" ::: "memory");
    }
    return w;
  }

  // A tile's epilogue has been issued (consumers): publish it once its stores are complete (gemm_rs).
  CUTLASS_DEVICE void leave(WorkTileInfo const& w) const {
    if (sync_.mode != kPublishParts || !w.is_valid() || threadIdx.x < kFirstConsumerThread) return;
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");  // the issuing threads' TMA stores are done
    asm volatile("fence.proxy.async.global;" ::: "memory");
    cutlass::arch::NamedBarrier::sync(kConsumerThreads, kPublishBarrier);
    if (threadIdx.x == kFirstConsumerThread) {
      int64_t r0, r1;
      rows_of(w, r0, r1);
      dev::fence_acq_rel_gpu();
      for_each_chunk_rows(sync_, r0, r1, [&](int c, int64_t lo, int64_t hi) { publish_tile(sync_, c, lo, hi); });
    }
  }

  ChunkSync sync_{};
};

struct ChunkSchedulerTag {};

}  // namespace tilegen::fused

// CUTLASS picks a kernel's scheduler from its tag; this tag picks ours.
namespace cutlass::gemm::kernel::detail {
template <class ArchTag, class TileShape, class ClusterShape, uint32_t Stages>
struct TileSchedulerSelector<tilegen::fused::ChunkSchedulerTag, ArchTag, TileShape, ClusterShape, Stages> {
  using Scheduler = tilegen::fused::ChunkScheduler;
};
}  // namespace cutlass::gemm::kernel::detail
