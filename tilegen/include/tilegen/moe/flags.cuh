// tilegen MoE layer: the flags that end each copy kernel and the epochs they carry (normal mode: the
// host's count; low-latency mode: taken from this rank's own flag of the other half, moe/layout's
// protocol as tilegen/moe's check runs it).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "tilegen/common/memory.cuh"
#include "tilegen/primitives/simple.cuh"

namespace tilegen {
namespace moe {

// Low-latency flags. Each half's epoch is one more than the other half's last, read from this rank's own
// flag of that half here (dispatch: its combine flag, combine: its dispatch flag): only this rank sets
// that word, in the half before, so it holds still while this half runs (MoeOp makes calls alternate),
// and no kernel of the half writes anything its other kernels must read before their flags. The
// dispatch flag (set by ll_push here, for this rank only: the other ranks read lines) also carries the
// rows it kept.
constexpr int kLLCountBits = 20;
__host__ __device__ constexpr uint64_t ll_flag(uint64_t epoch, int64_t rows) {
  return epoch << kLLCountBits | static_cast<uint64_t>(rows);
}
__host__ __device__ constexpr uint64_t ll_epoch(uint64_t flag) { return flag >> kLLCountBits; }

// The call's epoch: the host's (normal mode), or (low-latency combine) the one in this rank's own
// dispatch flag here.
__device__ __forceinline__ uint64_t call_epoch(uint64_t host, const uint64_t* own_dispatch_flag) {
  return own_dispatch_flag ? ll_epoch(dev::ld_acquire_gpu(own_dispatch_flag)) : host;
}
// The low-latency dispatch's epoch: one more than this rank's own combine flag here (the last combine's
// epoch; only this rank sets it, in the half before, so it holds still while the dispatch runs).
__device__ __forceinline__ uint64_t ll_dispatch_epoch(const uint64_t* own_combine_flag) {
  return dev::ld_acquire_gpu(own_combine_flag) + 1;
}

// The copy kernels' end: the last block to arrive resets the arrival counter and sets each rank's flag
// (flag[d]: this rank's word at rank d) to the call's epoch; true in that block. Blocks arrive by a
// gpu-scope acq_rel atomic (after the block barrier: it releases every warp's stores, the peers' too),
// and only the last block fences at system scope, before its flag stores: causality is transitive across
// the two scopes (PTX memory model), so a peer that acquires the flag sees every block's stores. A system
// fence in every block (each waiting for its own stores to reach the peers) cost 3-4 us of a decode-sized
// dispatch on 4 x H100, and a fence then a release store per flag (two system fences each) 1.5-2 us of the
// low-latency push and combine's send: one thread fences once, then stores every flag relaxed (a
// release pattern each: fence, then a strong store of the same thread; docs/log/2026-11.md).
// value(d): rank d's flag.
template <class Value>
__device__ __forceinline__ void set_flags(uint64_t* counter, uint64_t* const* flag, int world, Value value) {
  if (threadIdx.x != 0) return;
  *counter = 0;  // for the next call (a CUDA graph replays the same target)
  dev::fence_acq_rel_sys();
  for (int d = 0; d < world; ++d) dev::st_relaxed_sys(flag[d], value(d));
}
__device__ __forceinline__ bool signal_when_last(uint64_t* counter, uint64_t* const* flag, int world, uint64_t epoch,
                                                 const uint64_t* own_dispatch_flag) {
  if (!dev::arrive_last<false>(counter, gridDim.x)) return false;
  const uint64_t v = threadIdx.x == 0 ? call_epoch(epoch, own_dispatch_flag) : 0;
  set_flags(counter, flag, world, [v](int) { return v; });
  return true;
}

}  // namespace moe
}  // namespace tilegen
