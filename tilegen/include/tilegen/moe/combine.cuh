// tilegen MoE layer, both modes' combine: combine_send pushes each staging row's weighted sum (fp32,
// slot order, rounded to the token dtype) back to its token's rank, then its flag; combine_reduce,
// launched early, waits for every sender's flag and sums each token's rows in rank order.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "tilegen/common/memory.cuh"
#include "tilegen/common/wait.cuh"
#include "tilegen/moe/copy.cuh"
#include "tilegen/moe/flags.cuh"
#include "tilegen/moe/layout.cuh"
#include "tilegen/moe/trace.cuh"
#include "tilegen/primitives/reduce.cuh"

namespace tilegen {
namespace moe {

// ------------------------------------------------------------------------------------- combine
template <class Op>
struct CombineParams {
  const char* y;  // expert outputs [rows, hidden] in dispatch's layout
  const int32_t* slot_rows;
  const int32_t* stage_src;
  const float* stage_w;
  int64_t stage_rows;
  char* back[Op::kMaxWorld];      // at each rank: this rank's receive rows of the call's half [max_tokens, hidden]
  uint64_t* flag[Op::kMaxWorld];  // ... its combine flag
  uint64_t* counter;  // blocks arrived (the last resets it)
  uint64_t epoch;
  int world;
  const uint64_t* own_dispatch_flag;  // low-latency mode: this rank's dispatch flag here (the call's epoch)
  const int32_t* ntok;               // ... and the tokens each source sent (staging rows in segments)
  Cut cut;                           // of a row of the token dtype (Dims::kCombineUnits)
  uint64_t* trace;                   // phase stamps (null: off): start, rows sent, arrived (last: flags)
};

template <class Op>
__global__ void __launch_bounds__(kWarps * 32) combine_send(CombineParams<Op> p) {
  using D = Dims<Op>;
  using T = typename Op::Elem;
  constexpr int K = Op::kTopk, V = D::kVec;
  __shared__ int64_t first[Op::kMaxWorld + 1];
  stamp(p.trace, kTraceSend, 0);
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  if (p.ntok) {  // low-latency mode: every source's segment
    if (threadIdx.x < 32) ll_segments<Op>(p.ntok, p.world, -1, first, lane);
    __syncthreads();
  }
  const int64_t stage_rows = p.ntok ? first[p.world] : p.stage_rows;
  for (int64_t item = blockIdx.x * kWarps + (threadIdx.x >> 5); item < stage_rows * p.cut.pieces; item += nwarps) {
    const int64_t r = p.ntok ? ll_stage_row(first, p.world, item / p.cut.pieces, Op::kMaxTokens) : item / p.cut.pieces;
    const int ch = static_cast<int>(item % p.cut.pieces);
    const int s = p.stage_src[r * 2], t = p.stage_src[r * 2 + 1];
    int32_t row[K];
    float w[K];
#pragma unroll
    for (int j = 0; j < K; ++j) row[j] = p.slot_rows[r * K + j], w[j] = p.stage_w[r * K + j];
    int4* out = reinterpret_cast<int4*>(p.back[s] + static_cast<int64_t>(t) * D::kRowBytes);
    for (int64_t c = p.cut.lo(ch) + lane; c < p.cut.hi(ch); c += 32) {
      float acc[V] = {};
#pragma unroll
      for (int j = 0; j < K; ++j) {  // slot order
        if (row[j] >= 0) {
          const int4 v = __ldg(reinterpret_cast<const int4*>(p.y + row[j] * D::kRowBytes) + c);
          const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
          for (int q = 0; q < V; ++q) acc[q] += w[j] * dev::to_acc(e[q]);
        }
      }
      T o[V];
#pragma unroll
      for (int q = 0; q < V; ++q) o[q] = dev::from_acc<T>(acc[q]);
      out[c] = *reinterpret_cast<const int4*>(o);
    }
  }
  stamp(p.trace, kTraceSend, 1);
  dev::pdl_trigger();  // (combine_reduce's CTAs may start once every CTA sent its rows: as in ll_push)
  signal_when_last(p.counter, p.flag, p.world, p.epoch, p.own_dispatch_flag);
  stamp(p.trace, kTraceSend, 2);
}

template <class Op>
struct ReduceParams {
  const char* back;  // this rank's half: [world senders][max_tokens] rows
  const uint64_t* flags;
  const void* idx;
  int idx64;
  int64_t m;
  char* out;  // [m, hidden]
  uint64_t epoch;
  dev::WaitCtx wait;
  int world, local;
  const uint64_t* own_dispatch_flag;  // low-latency mode: this rank's dispatch flag here (the call's epoch)
  Cut cut;  // of an output row (Dims::kCombineUnits)
  uint64_t* trace;  // phase stamps (null: off): start, flags seen, rows summed
};

template <class Op>
__global__ void __launch_bounds__(kWarps * 32) combine_reduce(ReduceParams<Op> p) {
  using D = Dims<Op>;
  using T = typename Op::Elem;
  constexpr int K = Op::kTopk, V = D::kVec;
  stamp(p.trace, kTraceReduce, 0);
  // (Launched early: it reads only what the flags publish, every sender's, its own rank's too, so every
  // store of combine_send happens before this kernel ends.)
  if (!dev::block_wait_all_ge(p.flags, p.world, call_epoch(p.epoch, p.own_dispatch_flag), p.wait, SignalKind::kMoeCombineFlag, 0)) return;
  stamp(p.trace, kTraceReduce, 1);
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t item = blockIdx.x * kWarps + (threadIdx.x >> 5); item < p.m * p.cut.pieces; item += nwarps) {
    const int64_t t = item / p.cut.pieces;
    const int ch = static_cast<int>(item % p.cut.pieces);
    unsigned mask = 0;
    for (int j = lane; j < K; j += 32) {
      const int e = load_expert(p.idx, t * K + j, p.idx64, Op::kExperts);
      if (e >= 0) mask |= 1u << (e / p.local);
    }
    mask = __reduce_or_sync(0xffffffffu, mask);
    for (int64_t c = p.cut.lo(ch) + lane; c < p.cut.hi(ch); c += 32) {
      float acc[V] = {};
      for (int s = 0; s < p.world; ++s) {  // rank order: deterministic
        if (!(mask >> s & 1)) continue;
        const int4 v = __ldcg(reinterpret_cast<const int4*>(
            p.back + (static_cast<int64_t>(s) * Op::kMaxTokens + t) * D::kRowBytes) + c);
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] += dev::to_acc(e[q]);
      }
      T o[V];
#pragma unroll
      for (int q = 0; q < V; ++q) o[q] = dev::from_acc<T>(acc[q]);
      reinterpret_cast<int4*>(p.out + t * D::kRowBytes)[c] = *reinterpret_cast<const int4*>(o);
    }
  }
  if (p.trace) __syncthreads();  // (the CTA's last row, not thread 0's)
  stamp(p.trace, kTraceReduce, 2);
}

}  // namespace moe
}  // namespace tilegen
