// tilegen common layer: bounded waits. A wait that gives up reports who waited on what in a WaitError
// (host-mapped memory), so that a missing peer shows up as a message instead of a hang: the kernel
// then abandons the call and the host (host/base.cuh, describe_timeout) decodes the report.
// timeout_ns == 0 waits forever and reports nothing.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "tilegen/common/memory.cuh"

namespace tilegen {

// What a wait that gave up was waiting for: WaitError::signal_kind. The values are the report's wire
// format (the device writes them into host-mapped memory, the host decodes them): never renumber.
// Each kind has one producer, so the host can phrase its message. (2, a CTA counter, is retired.)
enum class SignalKind : int32_t {
  kEntry = 0,           // entry handshake: a peer entered the call (collective, copy-engine begin)
  kTileFlag = 1,        // a tile's (or part's) flag: its data landed (collective, GEMM chunk waits)
  kLLLine = 3,          // LL: a 16-byte line holding the call's flag in both halves
  kCeFlag = 4,          // copy-engine overlap: a chunk flag set after a copy or GEMM
  kMoeDispatchFlag = 5, // MoE: a source's dispatch flag (low-latency mode: epoch and rows, moe::ll_flag)
  kMoeCombineFlag = 6,  // MoE: a sender's combine flag
  kMoeLL128Line = 7,    // MoE low-latency: an LL128 line (row or head) holding the call's epoch
  kGridBarrier = 8,     // collective epilogue: every CTA of this rank's kernel finished the reduction
};

namespace dev {

struct WaitError {
  int32_t failed;       // 0 = no error; set once by the first waiter that timed out
  int32_t rank;         // rank that waited
  int32_t op_id;        // which op (index in the generated package)
  int32_t signal_kind;  // a SignalKind
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

enum class Cmp : int { EQ, GE };

template <Cmp C>
__device__ __forceinline__ bool compare(uint64_t v, uint64_t want) {
  if constexpr (C == Cmp::EQ) return v == want;
  return v >= want;
}

// The first wait to give up records who waited on what (later ones keep it).
__device__ __forceinline__ void record_timeout(const WaitCtx& ctx, SignalKind kind, int64_t index, uint64_t want,
                                               uint64_t seen, int step) {
  if (!ctx.err || atomicCAS(&ctx.err->failed, 0, 1) != 0) return;
  ctx.err->rank = ctx.rank;
  ctx.err->op_id = ctx.op_id;
  ctx.err->signal_kind = static_cast<int32_t>(kind);
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
__device__ __forceinline__ bool wait_until(const uint64_t* sig, uint64_t want, const WaitCtx& ctx, SignalKind kind,
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
__device__ __forceinline__ bool wait_eq(const uint64_t* sig, uint64_t want, const WaitCtx& ctx, SignalKind kind,
                                        int64_t index, int step) {
  return wait_until<Cmp::EQ>(sig, want, ctx, kind, index, step);
}
// Epochs only grow, so a flag at or past the call's epoch has this call's data (>=, not ==).
__device__ __forceinline__ bool wait_ge(const uint64_t* sig, uint64_t want, const WaitCtx& ctx, SignalKind kind,
                                        int64_t index, int step) {
  return wait_until<Cmp::GE>(sig, want, ctx, kind, index, step);
}

// The whole block waits until sig[i] >= want for every i < n (n <= 32): lane i of warp 0 waits for
// sig[i], so n flags cost one wait, not n in a row; each lane's acquire precedes the barrier and so
// every thread's reads after it. False (recorded in ctx) where a wait gave up.
__device__ __forceinline__ bool block_wait_all_ge(const uint64_t* sig, int n, uint64_t want, const WaitCtx& ctx,
                                                  SignalKind kind, int step) {
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

}  // namespace dev
}  // namespace tilegen
