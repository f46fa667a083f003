// tilegen MoE layer, normal mode's dispatch: route (per block of 32 tokens) -> scan -> push every token
// once per destination rank into its staging row there, then its flag -> wait for every rank's flag and
// counts (to the host, which sizes the outputs) -> expand each staging row into its items' rows.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "tilegen/common/memory.cuh"
#include "tilegen/common/wait.cuh"
#include "tilegen/moe/copy.cuh"
#include "tilegen/moe/flags.cuh"
#include "tilegen/moe/layout.cuh"
#include "tilegen/moe/trace.cuh"
#include "tilegen/primitives/simple.cuh"

namespace tilegen {
namespace moe {

// ------------------------------------------------------------------------------------- dispatch
struct RouteParams {
  const void* idx;
  int idx64;
  int64_t m;
  int world, local;  // ranks, experts per rank
  int32_t* hist;     // [blocks][experts + world]: counts per block, then (scan) exclusive prefixes
  int32_t* rib;      // [m][k]: rank of each item among its block's items of the same expert (-1: dropped)
  int32_t* ribd;     // [m][world]: rank of each token among its block's tokens to that rank (-1: none)
  int32_t* totals;   // [experts + world]: items per expert, tokens per destination rank
  uint64_t* counter;  // blocks arrived (the last scans, then resets it)
  uint64_t* trace;    // phase stamps (null: off): start, counts stored, done
};

// The last block of route_block: per column (expert, then destination), the exclusive prefix over
// blocks, and the totals.
template <class Op>
__device__ __forceinline__ void scan_blocks(const RouteParams& p, int blocks) {
  const int C = Op::kExperts + p.world;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    int32_t run = 0;
    for (int b = 0; b < blocks; ++b) {
      const int32_t v = __ldcg(p.hist + b * C + c);  // (other blocks wrote it: past this SM's L1)
      p.hist[b * C + c] = run;
      run += v;
    }
    p.totals[c] = run;
  }
}

template <class Op>
__global__ void route_block(RouteParams p) {
  constexpr int K = Op::kTopk, E = Op::kExperts;
  __shared__ int32_t e_s[kBlockTokens * K];
  __shared__ int32_t hist[E + Op::kMaxWorld];
  stamp(p.trace, kTraceRoute, 0);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kBlockTokens;
  const int nt = static_cast<int>(p.m - t0 < kBlockTokens ? p.m - t0 : kBlockTokens);
  const int C = E + p.world, lane = threadIdx.x & 31;
  for (int i = threadIdx.x; i < C; i += blockDim.x) hist[i] = 0;
  for (int i = threadIdx.x; i < kBlockTokens * K; i += blockDim.x)
    e_s[i] = i / K < nt ? load_expert(p.idx, t0 * K + i, p.idx64, E) : -1;
  __syncthreads();
  if (threadIdx.x < 32) {  // warp 0: each item's rank among the block's items of its expert, 32 at a time
    for (int i0 = 0; i0 < nt * K; i0 += 32) {  // (token, slot) order
      const int i = i0 + lane, e = i < nt * K ? e_s[i] : -1;
      const unsigned same = __match_any_sync(0xffffffffu, e);
      const int before = __popc(same & ((1u << lane) - 1));
      const int r = e >= 0 ? hist[e] + before : -1;
      __syncwarp();  // every lane read its expert's count before the group's first lane adds the group
      if (e >= 0 && before == 0) hist[e] += __popc(same);
      __syncwarp();
      if (i < nt * K) p.rib[t0 * K + i] = r;
    }
  } else if (threadIdx.x < 64) {  // warp 1: each token's rank among the block's tokens to each rank
    static_assert(kBlockTokens == 32, "a routing block's tokens are one warp's lanes");
    uint32_t mask = 0;
    for (int j = 0; j < K && lane < nt; ++j)
      if (e_s[lane * K + j] >= 0) mask |= 1u << (e_s[lane * K + j] / p.local);
    for (int d = 0; d < p.world; ++d) {
      const unsigned to_d = __ballot_sync(0xffffffffu, mask >> d & 1);
      if (lane < nt) p.ribd[(t0 + lane) * p.world + d] = mask >> d & 1 ? __popc(to_d & ((1u << lane) - 1)) : -1;
      if (lane == 0) hist[E + d] = __popc(to_d);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < C; i += blockDim.x) p.hist[blockIdx.x * C + i] = hist[i];
  stamp(p.trace, kTraceRoute, 1);
  if (dev::arrive_last<false>(p.counter, gridDim.x)) {  // every block's counts precede the scan
    if (threadIdx.x == 0) *p.counter = 0;  // for the next call (a CUDA graph replays the same target)
    scan_blocks<Op>(p, gridDim.x);
  }
  stamp(p.trace, kTraceRoute, 2);
}

template <class Op>
struct PushParams {
  const char* x;
  const void* idx;
  int idx64;
  const float* w;
  int64_t m;
  const int32_t* prefix;  // RouteParams::hist after the scan
  const int32_t* rib;
  const int32_t* ribd;
  const int32_t* totals;
  char* stage[Op::kMaxWorld];     // at each rank: this rank's staging segment of the call's half
  int32_t* meta[Op::kMaxWorld];   // ... its meta rows
  int32_t* info[Op::kMaxWorld];   // ... its counts row (the destination's local experts, then tokens)
  uint64_t* flag[Op::kMaxWorld];  // ... its dispatch flag
  uint64_t* counter;  // blocks arrived (the last resets it)
  uint64_t epoch;
  int me, world, local;
  Cut cut;  // of a token row (Dims::kPushUnits)
  uint64_t* trace;  // phase stamps (null: off): start, rows pushed, arrived (last CTA: flags set)
};

template <class Op>
__global__ void __launch_bounds__(kWarps * 32, 2) push_tokens(PushParams<Op> p) {
  using D = Dims<Op>;
  constexpr int K = Op::kTopk, E = Op::kExperts;
  stamp(p.trace, kTracePush, 0);
  const int C = E + p.world;
  // Every destination's counts row (its local experts, then tokens), first and by block 0, an entry per
  // thread: the routing knows them, and the last block then only fences and signals (a tail that wrote
  // them after every push kept one CTA running long after the others).
  const int row = p.local + 1;
  for (int i = threadIdx.x; blockIdx.x == 0 && i < p.world * row; i += blockDim.x) {
    const int d = i / row, l = i % row;
    p.info[d][l] = l < p.local ? p.totals[d * p.local + l] : p.totals[E + d];
  }
  int32_t* mdst[Op::kMaxWorld];  // each destination's meta row of the token
  const auto dests = [&](int64_t t, char** dst, float** sdst) {
    const int64_t b = t / kBlockTokens;
    int nd = 0;
    for (int d = 0; d < p.world; ++d) {
      const int r = p.ribd[t * p.world + d];
      if (r < 0) continue;
      const int64_t row = p.prefix[b * C + E + d] + r;
      dst[nd] = p.stage[d] + row * D::kStageRowBytes;
      sdst[nd] = reinterpret_cast<float*>(dst[nd] + D::kOutRowBytes);  // (fp8: a staging row's scales follow it)
      mdst[nd++] = p.meta[d] + row * D::kMeta;
    }
    return nd;
  };
  const auto meta = [&](int64_t t, int nd, int lane) {  // the same meta row to every destination
    const int64_t b = t / kBlockTokens;
    for (int f = lane; f < D::kMeta; f += 32) {
      int32_t v;
      if (f == 0) {
        v = static_cast<int32_t>(t);
      } else if (f <= K) {
        v = load_expert(p.idx, t * K + f - 1, p.idx64, E);
      } else if (f <= 2 * K) {
        const int j = f - 1 - K, e = load_expert(p.idx, t * K + j, p.idx64, E);
        v = e >= 0 ? p.prefix[b * C + e] + p.rib[t * K + j] : -1;
      } else {
        v = __float_as_int(p.w[t * K + f - 1 - 2 * K]);
      }
      for (int d = 0; d < nd; ++d) mdst[d][f] = v;
    }
  };
  push_pieces<Op, Op::kMaxWorld>(p.x, p.m, p.cut, dests, meta);
  stamp(p.trace, kTracePush, 1);
  signal_when_last(p.counter, p.flag, p.world, p.epoch, nullptr);
  stamp(p.trace, kTracePush, 2);
}

// One warp: every rank's flag of this call, then its counts row, into host-mapped memory.
template <class Op>
__global__ void wait_counts(const uint64_t* flags, const int32_t* info, int32_t* out, int world, int local,
                            uint64_t epoch, dev::WaitCtx ctx) {
  const int lane = threadIdx.x, row = local + 1;
  if (!dev::block_wait_all_ge(flags, world, epoch, ctx, SignalKind::kMoeDispatchFlag, /*step=*/0)) return;  // (a lane per rank)
  // An entry per lane (one lane per source walked its row, a load then a store to host memory per
  // entry: the pattern that kept the push's last CTA running long after the others)
  for (int i = lane; i < world * row; i += 32) out[i] = __ldcg(info + (i / row) * (Op::kExperts + 1) + i % row);
  __threadfence_system();
}

template <class Op>
struct ExpandParams {
  const char* stage;   // this rank's half: [world sources][max_tokens rows]
  const int32_t* meta;
  const int32_t* info;  // [world sources][experts + 1]
  char* out;            // [rows, hidden] (fp8 dispatch: e4m3 bytes)
  float* scales;        // fp8 dispatch: [rows, groups]
  int32_t* handle;      // [rows, 3]: source rank, token, slot
  int32_t* slot_rows;   // [staging rows, k]: each slot's row in out (-1: not here)
  int32_t* stage_src;   // [staging rows, 2]: source rank, token
  float* stage_w;       // [staging rows, k]: the slots' weights (0: not here)
  int32_t* counts;      // [local experts]
  int64_t stage_rows, rows;
  int me, world, local;
  Cut cut;  // of a payload row (Dims::kExpandUnits)
  uint64_t* trace;  // phase stamps (null: off): start, set up, rows copied
};

template <class Op>
__global__ void __launch_bounds__(kWarps * 32, 2) expand_rows(ExpandParams<Op> p) {
  using D = Dims<Op>;
  constexpr int K = Op::kTopk, E = Op::kExperts, W = Op::kMaxWorld;
  __shared__ int32_t base[E];         // [local expert][source]: first row of that source's items
  __shared__ int64_t first[W + 1];    // compact staging row of each source's first
  const int lane = threadIdx.x & 31, L = p.local;
  const int32_t* cnt = p.info;  // cnt[s * (E + 1) + l]
  stamp(p.trace, kTraceExpand, 0);
  for (int l = threadIdx.x; l < L; l += blockDim.x) {  // rows per local expert, then per source in it
    int32_t tot = 0;
    for (int s = 0; s < p.world; ++s) tot += __ldcg(cnt + s * (E + 1) + l);
    base[l * p.world] = tot;
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // one warp scans (one thread walked the experts and sources one by one)
    warp_exclusive_scan(base, L, p.world, lane);
    const int32_t c = lane < p.world ? __ldcg(cnt + lane * (E + 1) + L) : 0;  // each source's staging rows
    const int32_t incl = warp_inclusive_sum(c, lane);
    if (lane < p.world) first[lane] = incl - c;
    if (lane == p.world - 1) first[p.world] = incl;
  }
  __syncthreads();
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    int32_t run = base[l * p.world], tot = 0;
    for (int s = 0; s < p.world; ++s) {
      const int32_t c = __ldcg(cnt + s * (E + 1) + l);
      base[l * p.world + s] = run;
      run += c;
      tot += c;
    }
    if (blockIdx.x == 0) p.counts[l] = tot;
  }
  __syncthreads();
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int P = p.cut.pieces;
  stamp(p.trace, kTraceExpand, 1);
  for (int64_t item = blockIdx.x * kWarps + (threadIdx.x >> 5); item < p.stage_rows * P; item += nwarps) {
    const int64_t r = item / P;
    const int ch = static_cast<int>(item % P);
    const int s = source_of(first, p.world, r);
    const int64_t i = r - first[s];
    const int32_t* mrow = p.meta + (static_cast<int64_t>(s) * Op::kMaxTokens + i) * D::kMeta;
    const int32_t t = __ldcg(mrow);
    char* dst[K];
    int64_t dst_row[K];
    int nd = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int e = __ldcg(mrow + 1 + j);
      int64_t row = -1;
      const int32_t index = e >= 0 ? __ldcg(mrow + 1 + K + j) : -1;
      if (e >= 0 && e / L == p.me) {
        row = base[(e - p.me * L) * p.world + s] + index;
        dst_row[nd] = row;
        dst[nd++] = p.out + row * D::kOutRowBytes;
      }
      if (ch == 0 && lane == j % 32) {
        p.slot_rows[r * K + j] = static_cast<int32_t>(row);
        p.stage_w[r * K + j] = row >= 0 ? __int_as_float(__ldcg(mrow + 1 + 2 * K + j)) : 0.f;
        if (row >= 0) {
          p.handle[row * 3] = s;
          p.handle[row * 3 + 1] = t;
          p.handle[row * 3 + 2] = j;
        }
      }
    }
    if (ch == 0 && lane == 0) p.stage_src[r * 2] = s, p.stage_src[r * 2 + 1] = t;
    const char* src = p.stage + (static_cast<int64_t>(s) * Op::kMaxTokens + i) * D::kStageRowBytes;
    copy_to_rows<Op>(dst, dst_row, nd, p.scales, src, reinterpret_cast<const float*>(src + D::kOutRowBytes), p.cut,
                     ch, lane);  // (fp8: a staging row's scales follow its bytes)
  }
  if (p.trace) __syncthreads();  // (the CTA's last copy, not thread 0's)
  stamp(p.trace, kTraceExpand, 2);
}

}  // namespace moe
}  // namespace tilegen
