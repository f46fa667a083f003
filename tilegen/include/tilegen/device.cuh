// tilegen device library: distributed primitives that generated kernels are written on.
// Lowering: peer pointers (plain vector stores over NVLink, from nvshmem_ptr) where the peer is
// reachable, NVSHMEM device calls elsewhere. The generic collective kernel (tilegen/collective.cuh)
// is written on these. Copied verbatim into every generated package.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <cuda_runtime.h>
#ifndef TILEGEN_NO_NVSHMEM  // the fused GEMMs are compiled without NVSHMEM (whole-program, no -rdc)
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace tilegen {
namespace dev {

// ---------------------------------------------------------------- loads / stores with memory order
// Scopes: gpu (this device) and sys (peers over NVLink and the host).
__device__ __forceinline__ uint64_t ld_relaxed_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint64_t ld_acquire_gpu(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_release_gpu(uint64_t* p, uint64_t v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
// A CTA's warps passing a word through shared memory: one publishes (release), the others poll (acquire),
// so what the publisher acquired before (a peer's flag) orders the pollers' reads after.
__device__ __forceinline__ unsigned ld_acquire_cta_shared(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.cta.shared::cta.u32 %0, [%1];"
               : "=r"(v) : "r"(static_cast<unsigned>(__cvta_generic_to_shared(p))) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_cta_shared(unsigned* p, unsigned v) {
  asm volatile("st.release.cta.shared::cta.u32 [%0], %1;"
               ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(p))), "r"(v) : "memory");
}
__device__ __forceinline__ uint64_t atomic_add_acq_rel_gpu(uint64_t* p, uint64_t v) {
  uint64_t old;
  asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], %2;" : "=l"(old) : "l"(p), "l"(v) : "memory");
  return old;
}

// ---------------------------------------------------------------- fences
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }
__device__ __forceinline__ void fence_sc_sys() { asm volatile("fence.sc.sys;" ::: "memory"); }

// ---------------------------------------------------------------- warp vote / election
__device__ __forceinline__ bool warp_any(bool p) { return __any_sync(0xffffffffu, p); }
__device__ __forceinline__ bool warp_all(bool p) { return __all_sync(0xffffffffu, p); }
__device__ __forceinline__ bool elect_one_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t pred = 0;
  asm volatile(
      "{\n .reg .pred P;\n elect.sync _|P, %1;\n selp.u32 %0, 1, 0, P;\n}\n"
      : "=r"(pred)
      : "r"(0xffffffffu));
  return pred != 0;
#else
  return (threadIdx.x & 31) == 0;
#endif
}

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ---------------------------------------------------------------- bounded waits
// A wait that gives up reports who waited on what in a WaitError (host-mapped memory), so that a
// missing peer shows up as a message instead of a hang. timeout_ns == 0 waits forever.
struct WaitError {
  int32_t failed;      // 0 = no error; set once by the first waiter that timed out
  int32_t rank;        // rank that waited
  int32_t op_id;       // which op (index in the generated package)
  int32_t signal_kind; // 0 = entry, 1 = tile flag, 2 = CTA counter, 3 = LL line, 5 / 6 = MoE dispatch /
                       // combine flag, 7 = MoE LL128 line
  int64_t signal_index;
  uint64_t expected;
  uint64_t seen;
  int32_t block;
  int32_t step;
};

struct WaitCtx {
  WaitError* err;       // may be null when timeouts are off
  uint64_t timeout_ns;  // 0: unbounded
  int32_t rank;
  int32_t op_id;
};

enum class Cmp : int { EQ, NE, GE, GT, LE, LT };

template <Cmp C>
__device__ __forceinline__ bool compare(uint64_t v, uint64_t want) {
  if constexpr (C == Cmp::EQ) return v == want;
  if constexpr (C == Cmp::NE) return v != want;
  if constexpr (C == Cmp::GE) return v >= want;
  if constexpr (C == Cmp::GT) return v > want;
  if constexpr (C == Cmp::LE) return v <= want;
  return v < want;
}

// The first wait to give up records who waited on what (later ones keep it).
__device__ __forceinline__ void record_timeout(const WaitCtx& ctx, int kind, int64_t index, uint64_t want,
                                               uint64_t seen, int step) {
  if (!ctx.err || atomicCAS(&ctx.err->failed, 0, 1) != 0) return;
  ctx.err->rank = ctx.rank;
  ctx.err->op_id = ctx.op_id;
  ctx.err->signal_kind = kind;
  ctx.err->signal_index = index;
  ctx.err->expected = want;
  ctx.err->seen = seen;
  ctx.err->block = blockIdx.x;
  ctx.err->step = step;
  __threadfence_system();
}

// Spin on a local signal word with acquire semantics (one thread). Returns false on timeout,
// after recording the error; callers then abandon the kernel.
template <Cmp C>
__device__ __forceinline__ bool wait_until(const uint64_t* sig, uint64_t want, const WaitCtx& ctx, int kind,
                                           int64_t index, int step) {
  uint64_t v = ld_acquire_sys(sig);
  if (compare<C>(v, want)) return true;
  const uint64_t t0 = ctx.timeout_ns ? globaltimer_ns() : 0;
  uint32_t spins = 0;
  while (true) {
    v = ld_acquire_sys(sig);
    if (compare<C>(v, want)) return true;
    if (ctx.timeout_ns && ((++spins & 1023u) == 0) && globaltimer_ns() - t0 > ctx.timeout_ns) {
      record_timeout(ctx, kind, index, want, v, step);
      return false;
    }
  }
}
#define TILEGEN_DEFINE_WAIT(NAME, CMP)                                                                  \
  __device__ __forceinline__ bool NAME(const uint64_t* sig, uint64_t want, const WaitCtx& ctx, int kind, \
                                       int64_t index, int step) {                                       \
    return wait_until<Cmp::CMP>(sig, want, ctx, kind, index, step);                                      \
  }
TILEGEN_DEFINE_WAIT(wait_eq, EQ)
TILEGEN_DEFINE_WAIT(wait_ne, NE)
TILEGEN_DEFINE_WAIT(wait_ge, GE)
TILEGEN_DEFINE_WAIT(wait_gt, GT)
TILEGEN_DEFINE_WAIT(wait_le, LE)
TILEGEN_DEFINE_WAIT(wait_lt, LT)
#undef TILEGEN_DEFINE_WAIT

// Block-wide wait: thread 0 spins, the block learns the outcome through shared memory.
__device__ __forceinline__ bool block_wait_ge(const uint64_t* sig, uint64_t want, const WaitCtx& ctx, int kind,
                                              int64_t index, int step) {
  __shared__ int ok;
  if (threadIdx.x == 0) ok = wait_ge(sig, want, ctx, kind, index, step);
  __syncthreads();
  return ok;
}

// The whole block waits until sig[i] >= want for every i < n (n <= 32): lane i of warp 0 waits for
// sig[i], so n flags cost one wait, not n in a row; each lane's acquire precedes the barrier and so
// every thread's reads after it. False (recorded in ctx) where a wait gave up.
__device__ __forceinline__ bool block_wait_all_ge(const uint64_t* sig, int n, uint64_t want, const WaitCtx& ctx,
                                                  int kind, int step) {
  __shared__ int ok;
  if (threadIdx.x < 32) {
    const int i = threadIdx.x;
    const bool mine = i >= n || wait_ge(sig + i, want, ctx, kind, i, step);
    const bool all = __all_sync(0xffffffffu, mine);
    if (threadIdx.x == 0) ok = all;
  }
  __syncthreads();
  return ok;
}

// ---------------------------------------------------------------- programmatic dependent launch
// A kernel launched with programmatic stream serialization (moe::Host::launch_early) may start once
// every CTA of the kernel before it has run pdl_trigger or exited, so it must read only what a flag
// publishes and end only after the flag that follows that kernel's last store. A no-op below sm_90 and
// when the next kernel was launched plainly.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---------------------------------------------------------------- signals
#ifndef TILEGEN_NO_NVSHMEM
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

#endif

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

#ifndef TILEGEN_NO_NVSHMEM
// put/get at warp or block granularity to one PE: peer pointer if reachable, else NVSHMEM (NBI:
// return before the data has left; otherwise src may be reused on return).
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
__device__ __forceinline__ void put_warp(char* peer_dst, char* sym_dst, const char* src, int64_t bytes, int pe) {
  if (peer_dst) {
    char* const d[1] = {peer_dst};
    copy_multi<1>(d, 1, src, bytes, threadIdx.x & 31, 32);
  } else {
    nvshmemx_putmem_nbi_warp(sym_dst, src, bytes, pe);
  }
}
__device__ __forceinline__ void get_block(char* dst, const char* peer_src, const char* sym_src, int64_t bytes, int pe) {
  if (peer_src) {
    char* const d[1] = {dst};
    copy_multi<1>(d, 1, peer_src, bytes, threadIdx.x, blockDim.x);
  } else {
    nvshmemx_getmem_block(dst, sym_src, bytes, pe);
  }
}
__device__ __forceinline__ void get_warp(char* dst, const char* peer_src, const char* sym_src, int64_t bytes, int pe) {
  if (peer_src) {
    char* const d[1] = {dst};
    copy_multi<1>(d, 1, peer_src, bytes, threadIdx.x & 31, 32);
  } else {
    nvshmemx_getmem_warp(dst, sym_src, bytes, pe);
  }
}

#endif

// ---------------------------------------------------------------- LL: flag in data
// NCCL's LL protocol: a 16-byte line holds 8 data bytes as {lo, flag, hi, flag}; one vector store
// writes it and each 8-byte half is written atomically, so a reader that sees both flags equal to
// the call's sees that call's data: no fence and no separate signal (twice the bytes).
__device__ __forceinline__ void ll_store(char* line, uint64_t v, uint32_t flag) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(line), "r"(static_cast<uint32_t>(v)), "r"(flag),
               "r"(static_cast<uint32_t>(v >> 32)), "r"(flag)
               : "memory");
}
// Spins until the line holds `flag` in both halves; false on timeout (after recording it).
__device__ __forceinline__ bool ll_load(const char* line, uint32_t flag, uint64_t* v, const WaitCtx& ctx, int64_t index,
                                        int step) {
  uint32_t lo, f0, hi, f1;
  uint64_t t0 = 0;
  uint32_t spins = 0;
  while (true) {
    asm volatile("ld.volatile.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(lo), "=r"(f0), "=r"(hi), "=r"(f1) : "l"(line) : "memory");
    if (f0 == flag && f1 == flag) break;
    if (ctx.timeout_ns && ((++spins & 1023u) == 0)) {
      const uint64_t now = globaltimer_ns();
      if (!t0) t0 = now;
      else if (now - t0 > ctx.timeout_ns) {
        if (ctx.err && atomicCAS(&ctx.err->failed, 0, 1) == 0) {
          ctx.err->rank = ctx.rank;
          ctx.err->op_id = ctx.op_id;
          ctx.err->signal_kind = 3;
          ctx.err->signal_index = index;
          ctx.err->expected = flag;
          ctx.err->seen = f0 != flag ? f0 : f1;
          ctx.err->block = blockIdx.x;
          ctx.err->step = step;
          __threadfence_system();
        }
        return false;
      }
    }
  }
  *v = static_cast<uint64_t>(lo) | static_cast<uint64_t>(hi) << 32;
  return true;
}
// NCCL's LL128: 128-byte lines of 120 data bytes then an 8-byte flag, a lane storing 16 bytes, so one
// warp store writes 4 whole lines (lanes 8i..8i+7 line i; lane 8i+7: 8 data bytes, then the flag).
// NVLink delivers a warp's line whole (NCCL relies on it on Hopper too), so a reader that loads a line
// in one warp load and finds the flag in it has that line's data: no fence, no separate signal, 1/16
// of the bytes. Lines here are global memory written by a peer (or by this GPU's warps).
__device__ __forceinline__ void st_volatile_v2(char* p, uint64_t a, uint64_t b) {
  asm volatile("st.volatile.global.v2.u64 [%0], {%1,%2};" ::"l"(p), "l"(a), "l"(b) : "memory");
}
__device__ __forceinline__ void ld_volatile_v2(const char* p, uint64_t& a, uint64_t& b) {
  asm volatile("ld.volatile.global.v2.u64 {%0,%1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
}
// Warp: each lane's 16 bytes at `mine` (lane 8i + 7's in line i: its flag; lanes with !live load nothing
// and count as arrived), reloaded until every live line holds `flag`; false on timeout (recorded as
// kind, index + per_line * the stale line's index in the warp). One lane polls a line's flag first, sleeping between loads: a grid of warps re-reading
// whole lines while they land would load L2 with most of the traffic the lines themselves bring.
__device__ __forceinline__ bool ll128_load(const char* mine, bool live, uint64_t flag, uint64_t& a, uint64_t& b,
                                           const WaitCtx& ctx, int kind, int64_t index, int64_t per_line, int step) {
  const int lane = threadIdx.x & 31;
  const bool tag = (lane & 7) == 7;
  uint64_t t0 = 0;
  while (true) {
    a = b = 0;
    if (live) ld_volatile_v2(mine, a, b);
    const unsigned stale = __ballot_sync(0xffffffffu, live && tag && b != flag);
    if (!stale) return true;
    // (wait on the first stale line's flag alone, then load the unit again)
    const int who = __ffs(stale) - 1;
    uint64_t f = 0, unused;
    for (uint32_t naps = 0;; ++naps) {
      if (lane == who) ld_volatile_v2(mine, unused, f);
      if (__shfl_sync(0xffffffffu, f, who) == flag) break;
      __nanosleep(128);
      if (ctx.timeout_ns && (naps & 255u) == 255u) {
        const uint64_t now = __shfl_sync(0xffffffffu, globaltimer_ns(), 0);
        if (!t0) {
          t0 = now;
        } else if (now - t0 > ctx.timeout_ns) {
          if (lane == who) record_timeout(ctx, kind, index + per_line * (who >> 3), flag, f, step);
          return false;
        }
      }
    }
  }
}
// Up to 8 bytes of plain memory (the tail of a unit may be shorter or unaligned).
template <bool READ_ONLY>
__device__ __forceinline__ uint64_t load8(const char* p, int n) {
  if (n == 8 && (reinterpret_cast<uintptr_t>(p) & 7) == 0) {
    if constexpr (READ_ONLY) return __ldg(reinterpret_cast<const unsigned long long*>(p));
    return __ldcg(reinterpret_cast<const unsigned long long*>(p));
  }
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(static_cast<uint8_t>(READ_ONLY ? __ldg(p + i) : __ldcg(p + i))) << (8 * i);
  return v;
}
__device__ __forceinline__ void store8(char* p, uint64_t v, int n) {
  if (n == 8 && (reinterpret_cast<uintptr_t>(p) & 7) == 0) {
    *reinterpret_cast<uint64_t*>(p) = v;
    return;
  }
  for (int i = 0; i < n; ++i) p[i] = static_cast<char>(v >> (8 * i));
}

// ---------------------------------------------------------------- barriers
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

#ifndef TILEGEN_NO_NVSHMEM
// barrier_blocks: every block of every rank in `ranks` arrives; nobody leaves before all arrived.
// counter: local; flags: symmetric u64[world] (peer_flags[p] = this rank's slot at p, or null).
__device__ __forceinline__ bool barrier_blocks(uint64_t* counter, uint64_t target, uint64_t* local_flags,
                                               uint64_t* const* peer_flags, uint64_t* sym_flags, int me,
                                               int world, uint64_t epoch, const WaitCtx& ctx) {
  __shared__ int ok;
  if (arrive_last(counter, target) && threadIdx.x == 0) {
    for (int p = 0; p < world; ++p)
      if (p != me) signal_peer_one(peer_flags[p], sym_flags + me, epoch, p);
  }
  if (threadIdx.x == 0) {
    ok = 1;
    for (int p = 0; p < world && ok; ++p)
      if (p != me) ok = wait_ge(local_flags + p, epoch, ctx, 0, p, -1);
  }
  __syncthreads();
  return ok;
}

#endif
}  // namespace dev
}  // namespace tilegen

// ---------------------------------------------------------------- reductions
// Element-wise reduction of up to MAXS sources into up to MAXD destinations, accumulating in fp32
// for bf16/f16 (int32 stays integer). OP: 0 sum, 1 max, 2 min. Sources may be written by peers
// during the kernel (coherent loads); destinations may be peer pointers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
namespace tilegen {
namespace dev {
template <typename T> struct Acc { using type = float; };
template <> struct Acc<int32_t> { using type = int32_t; };
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ int32_t to_acc(int32_t v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ int32_t from_acc<int32_t>(int32_t v) { return v; }

// One element; data peers may have written in this kernel is read past L1 (ld.global.cg).
template <typename T>
__device__ __forceinline__ T load_elem(const T* p, bool read_only) {
  using R = typename std::conditional<sizeof(T) == 2, unsigned short, unsigned int>::type;
  R r = read_only ? __ldg(reinterpret_cast<const R*>(p)) : __ldcg(reinterpret_cast<const R*>(p));
  T v;
  memcpy(&v, &r, sizeof(T));
  return v;
}

template <int OP, typename A>
__device__ __forceinline__ A combine(A a, A b) {
  if constexpr (OP == 0) return a + b;
  else if constexpr (OP == 1) return a > b ? a : b;
  else return a < b ? a : b;
}

// acc (8 bytes of T) op= v, element-wise in T's accumulator type; first: acc = v.
template <typename T, int OP>
__device__ __forceinline__ void combine8(typename Acc<T>::type (&acc)[8 / sizeof(T)], uint64_t v, bool first) {
  T e[8 / sizeof(T)];
  memcpy(e, &v, 8);
#pragma unroll
  for (int k = 0; k < int(8 / sizeof(T)); ++k) acc[k] = first ? to_acc(e[k]) : combine<OP>(acc[k], to_acc(e[k]));
}
template <typename T>
__device__ __forceinline__ uint64_t pack8(const typename Acc<T>::type (&acc)[8 / sizeof(T)]) {
  T e[8 / sizeof(T)];
#pragma unroll
  for (int k = 0; k < int(8 / sizeof(T)); ++k) e[k] = from_acc<T>(acc[k]);
  uint64_t v;
  memcpy(&v, e, 8);
  return v;
}

template <typename T, int OP, int MAXS, int MAXD>
__device__ __forceinline__ void reduce_multi(char* const (&dst)[MAXD], int ndst, const char* const (&src)[MAXS], int nsrc,
                                             const bool (&src_ro)[MAXS], int64_t bytes, int lane, int width) {
  using A = typename Acc<T>::type;
  constexpr int V = 16 / sizeof(T);
  uintptr_t bits = static_cast<uintptr_t>(bytes);
#pragma unroll
  for (int s = 0; s < MAXS; ++s)
    if (s < nsrc) bits |= reinterpret_cast<uintptr_t>(src[s]);
#pragma unroll
  for (int d = 0; d < MAXD; ++d)
    if (d < ndst) bits |= reinterpret_cast<uintptr_t>(dst[d]);
  if ((bits & 15) == 0) {
    const int64_t n = bytes >> 4;
    for (int64_t i = lane; i < n; i += width) {
      A acc[V];
#pragma unroll
      for (int s = 0; s < MAXS; ++s) {
        if (s >= nsrc) break;
        const int4* p = reinterpret_cast<const int4*>(src[s]) + i;
        int4 raw = src_ro[s] ? load16<true>(p) : load16<false>(p);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = s == 0 ? to_acc(e[k]) : combine<OP>(acc[k], to_acc(e[k]));
      }
      int4 out;
      T* o = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int k = 0; k < V; ++k) o[k] = from_acc<T>(acc[k]);
#pragma unroll
      for (int d = 0; d < MAXD; ++d)
        if (d < ndst) reinterpret_cast<int4*>(dst[d])[i] = out;
    }
  } else {
    const int64_t n = bytes / static_cast<int64_t>(sizeof(T));
    for (int64_t i = lane; i < n; i += width) {
      A acc = to_acc(load_elem(reinterpret_cast<const T*>(src[0]) + i, src_ro[0]));
      for (int s = 1; s < nsrc; ++s) acc = combine<OP>(acc, to_acc(load_elem(reinterpret_cast<const T*>(src[s]) + i, src_ro[s])));
      const T v = from_acc<T>(acc);
#pragma unroll
      for (int d = 0; d < MAXD; ++d)
        if (d < ndst) reinterpret_cast<T*>(dst[d])[i] = v;
    }
  }
}
}  // namespace dev
}  // namespace tilegen
