// tilegen primitives, simple protocol: data moves by vector stores through peer pointers (NVLink, from
// nvshmem_ptr) where the peer is load/store reachable, by NVSHMEM device calls elsewhere, and a
// separate signal word (release store after a system fence, or NVSHMEM's signal op) says the data is
// there. Also the block arrival that elects the CTA which signals for the whole grid.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include "tilegen/common/memory.cuh"

namespace tilegen {
namespace dev {

// ---------------------------------------------------------------- signals
// Publish `value` into a peer's signal word after this block's prior stores: every thread's stores
// are ordered by the barrier, the fence makes them visible system-wide, then one release store.
// peer_sig == nullptr: the peer is not load/store reachable, use NVSHMEM's signal op on sym_sig.
__device__ __forceinline__ void signal_peer_one(uint64_t* peer_sig, uint64_t* sym_sig, uint64_t value, int pe) {
  if (peer_sig) {
    fence_acq_rel_sys();
    st_release_sys(peer_sig, value);
  } else {
    nvshmem_fence();  // orders earlier puts to pe before the signal
    nvshmemx_signal_op(sym_sig, value, NVSHMEM_SIGNAL_SET, pe);
  }
}

// ---------------------------------------------------------------- data movement
template <bool READ_ONLY>
__device__ __forceinline__ int4 load16(const int4* p) {
  if constexpr (READ_ONLY) return __ldg(p);
  int4 v;
  asm volatile("ld.relaxed.gpu.global.v4.s32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
// Copy `bytes` from src to up to N destinations with the calling group (warp or block): each 16 B
// vector is loaded once and stored to every destination. Destinations may be peer pointers.
// Falls back to element-wise when any address is not 16 B aligned. SRC_READ_ONLY selects the
// non-coherent load path, only valid when nothing writes src while the kernel runs.
template <int MAXD, bool SRC_READ_ONLY = true>
__device__ __forceinline__ void copy_multi(char* const (&dst)[MAXD], int ndst, const char* __restrict__ src,
                                           int64_t bytes, int lane, int width) {
  bool aligned = ((reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(bytes)) & 15) == 0;
#pragma unroll
  for (int d = 0; d < MAXD; ++d)
    if (d < ndst) aligned &= (reinterpret_cast<uintptr_t>(dst[d]) & 15) == 0;
  if (aligned) {
    const int4* s = reinterpret_cast<const int4*>(src);
    const int64_t n = bytes >> 4;
    constexpr int U = 4;  // independent loads in flight per thread
    for (int64_t i = lane; i < n; i += U * width) {
      // Every load of a step is issued before its stores, the last (partial) step's too: a decode-sized
      // piece of 2-3 vectors per lane waits for one round trip, not one per vector.
      const bool full = i + (U - 1) * width < n;
      int4 v[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (full || i + u * width < n) v[u] = load16<SRC_READ_ONLY>(s + i + u * width);
#pragma unroll
      for (int d = 0; d < MAXD; ++d) {
        if (d < ndst) {
          int4* o = reinterpret_cast<int4*>(dst[d]);
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (full || i + u * width < n) o[i + u * width] = v[u];
        }
      }
    }
  } else {
    for (int64_t i = lane; i < bytes; i += width) {
      const char v = SRC_READ_ONLY ? __ldg(src + i) : __ldcg(src + i);
#pragma unroll
      for (int d = 0; d < MAXD; ++d)
        if (d < ndst) dst[d][i] = v;
    }
  }
}

// put at block granularity to one PE: peer pointer if reachable, else NVSHMEM (NBI: return before
// the data has left; otherwise src may be reused on return).
template <bool NBI = true>
__device__ __forceinline__ void put_block(char* peer_dst, char* sym_dst, const char* src, int64_t bytes, int pe) {
  if (peer_dst) {
    char* const d[1] = {peer_dst};
    copy_multi<1>(d, 1, src, bytes, threadIdx.x, blockDim.x);
  } else if (NBI) {
    nvshmemx_putmem_nbi_block(sym_dst, src, bytes, pe);
  } else {
    nvshmemx_putmem_block(sym_dst, src, bytes, pe);
  }
}
// put, then set the peer's signal word to `value` once the data is there (the whole block calls;
// through a peer pointer: the block's stores, a system fence and one release store).
template <bool NBI = true>
__device__ __forceinline__ void put_signal_block(char* peer_dst, char* sym_dst, const char* src, int64_t bytes,
                                                 uint64_t* peer_sig, uint64_t* sym_sig, uint64_t value, int pe) {
  if (peer_dst) {
    put_block<NBI>(peer_dst, sym_dst, src, bytes, pe);
    __syncthreads();
    if (threadIdx.x == 0) signal_peer_one(peer_sig, sym_sig, value, pe);
  } else if (NBI) {
    nvshmemx_putmem_signal_nbi_block(sym_dst, src, bytes, sym_sig, value, NVSHMEM_SIGNAL_SET, pe);
  } else {
    nvshmemx_putmem_signal_block(sym_dst, src, bytes, sym_sig, value, NVSHMEM_SIGNAL_SET, pe);
  }
}

// ---------------------------------------------------------------- block arrival
// Arrive at a per-step counter of this rank; returns true in exactly one block per call: the last
// one to arrive. `target` = arrivals of all previous calls + gridDim.x (host keeps the count).
// SYS: the last block goes on to signal peers, so every block's stores (to peers too) are ordered
// system-wide first; without it only this GPU's view is ordered (much cheaper).
template <bool SYS = true>
__device__ __forceinline__ bool arrive_last(uint64_t* counter, uint64_t target) {
  __shared__ int last;
  __syncthreads();  // all of this block's stores precede the arrival
  if (threadIdx.x == 0) {
    if (SYS) fence_acq_rel_sys();
    last = (atomic_add_acq_rel_gpu(counter, 1) + 1 == target);
    if (last && SYS) fence_acq_rel_sys();
  }
  __syncthreads();
  return last;
}

}  // namespace dev
}  // namespace tilegen
