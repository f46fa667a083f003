// tilegen primitives, LL protocols: the flag travels in the data, so a reader that sees the call's
// flag in a line sees that line's data, with no fence and no separate signal.
//   LL (NCCL's): a 16-byte line holds 8 data bytes as {lo, flag, hi, flag}; one vector store writes it
//     and each 8-byte half is written atomically (twice the bytes).
//   LL128 (NCCL's): 128-byte lines of 120 data bytes then an 8-byte flag, a lane storing 16 bytes, so one
//     warp store writes 4 whole lines. NVLink delivers a warp's line whole (NCCL relies on it on Hopper
//     too), so a reader that loads a line in one warp load and finds the flag in it has that line's data
//     (1/16 of the bytes). Lines here are global memory written by a peer (or by this GPU's warps).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "tilegen/common/memory.cuh"
#include "tilegen/common/wait.cuh"

namespace tilegen {
namespace dev {

// ---------------------------------------------------------------- LL
__device__ __forceinline__ void ll_store(char* line, uint64_t v, uint32_t flag) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(line), "r"(static_cast<uint32_t>(v)), "r"(flag),
               "r"(static_cast<uint32_t>(v >> 32)), "r"(flag)
               : "memory");
}
// Spins until the line holds `flag` in both halves; false on timeout (after recording it as an LL line).
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
        // (record_timeout's stores, written out: a call to it computes `seen` before the CAS, which
        // changes the code generated for every LL schedule)
        if (ctx.err && atomicCAS(&ctx.err->failed, 0, 1) == 0) {
          ctx.err->rank = ctx.rank;
          ctx.err->op_id = ctx.op_id;
          ctx.err->signal_kind = static_cast<int32_t>(SignalKind::kLLLine);
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

// ---------------------------------------------------------------- LL128
__device__ __forceinline__ void st_volatile_v2(char* p, uint64_t a, uint64_t b) {
  asm volatile("st.volatile.global.v2.u64 [%0], {%1,%2};" ::"l"(p), "l"(a), "l"(b) : "memory");
}
__device__ __forceinline__ void ld_volatile_v2(const char* p, uint64_t& a, uint64_t& b) {
  asm volatile("ld.volatile.global.v2.u64 {%0,%1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
}
// Warp: each lane's 16 bytes at `mine` (lane 8i + 7's in line i: its flag; lanes with !live load nothing
// and count as arrived), reloaded until every live line holds `flag`; false on timeout (recorded as
// kind, index + per_line * the stale line's index in the warp). One lane polls a line's flag first,
// sleeping between loads: a grid of warps re-reading whole lines while they land would load L2 with
// most of the traffic the lines themselves bring.
__device__ __forceinline__ bool ll128_load(const char* mine, bool live, uint64_t flag, uint64_t& a, uint64_t& b,
                                           const WaitCtx& ctx, SignalKind kind, int64_t index, int64_t per_line,
                                           int step) {
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

}  // namespace dev
}  // namespace tilegen
