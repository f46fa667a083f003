// tilegen host layer: the scaffolding every op family's host code shares (coll::Host, moe::Host):
// joining NVSHMEM, the bounded waits' report (allocation, WaitCtx, decoding into a message), the
// usable / launched checks, loading kernels eagerly, peer addresses, release (residency: sms.cuh).
//
// Contract: a family's Host<Op> derives from Base<Op, State> with State deriving from Common; its
// state lives in one State per group slot, `g` the current one (one op per library: the op's traits
// are the template argument), and
// its C entry points return 0, or 1 with a message naming the op (host_msg.h).
#pragma once
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include "tilegen/common/cuda_check.h"
#include "tilegen/common/host_msg.h"
#include "tilegen/common/wait.cuh"
#include "tilegen/host/sms.cuh"

namespace tilegen {
namespace host {

// Groups: an op serves up to kMaxGroups groups of ranks (tilegen.group), each in its own slot with its
// own symmetric buffers, plan and call sequence; slot 0 is the world. A slot may hold several
// disjoint groups (TP groups side by side): on each PE its buffers serve the one group the PE is in.
// Symmetric allocation is collective over every PE, so every PE sets up every slot, members or not.
constexpr int kMaxGroups = 8;
constexpr int kMaxPes = 64;  // ranks of one group (the op's own bound, Op::kMaxWorld, is tighter)

// What every family's State (one per slot) holds first.
struct Common {
  bool allocated = false;  // the slot's symmetric buffers exist (on every PE)
  bool ready = false;      // this PE is in the slot's group and can take calls
  bool poisoned = false;   // a bounded wait gave up: peers' signal state is unknown, no further calls
  int rank = -1, world = 0;  // this PE's rank in its group, the group's size
  int pe[kMaxPes] = {};      // the group's ranks as NVSHMEM PEs
  dev::WaitError* err_host = nullptr;  // the waits' report, host-mapped (the device writes err_dev)
  dev::WaitError* err_dev = nullptr;
};

// A wait report as the message the binding raises (TimeoutError). Each SignalKind has one producer,
// so the message says what was awaited. packed_count_bits > 0: a MoE dispatch flag holds the epoch
// above that many bits of rows (low-latency mode, moe::ll_flag); the message shows the epochs.
inline int describe_timeout(const dev::WaitError& w, const char* name, int packed_count_bits, char* msg, int len) {
  const auto u = [](uint64_t v) { return static_cast<unsigned long long>(v); };
  const long long index = static_cast<long long>(w.signal_index);
  switch (static_cast<SignalKind>(w.signal_kind)) {
    case SignalKind::kEntry:
    case SignalKind::kTileFlag:
    case SignalKind::kCeFlag: {
      const char* what = w.signal_kind == static_cast<int32_t>(SignalKind::kEntry)      ? "entry"
                         : w.signal_kind == static_cast<int32_t>(SignalKind::kTileFlag) ? "tile flag"
                                                                                         : "copy-engine chunk flag";
      return fail(msg, len,
                  "%s: rank %d timed out in step %d (block %d) waiting for %s signal %lld >= %llu, saw %llu; "
                  "a peer rank did not make the matching call",
                  name, w.rank, w.step, w.block, what, index, u(w.expected), u(w.seen));
    }
    case SignalKind::kLLLine:
      return fail(msg, len,
                  "%s: rank %d timed out in step %d (block %d) waiting for the LL lines of scratch slot %lld to hold flag "
                  "%llu, saw %llu; a peer rank did not make the matching call",
                  name, w.rank, w.step, w.block, index, u(w.expected), u(w.seen));
    case SignalKind::kGridBarrier:  // (another CTA of the same kernel gave up first, or is not resident)
      return fail(msg, len, "%s: rank %d timed out before its epilogue (block %d) waiting for the kernel's other CTAs "
                  "(%llu of call %llu); a peer rank did not make the matching call", name, w.rank, w.block, u(w.seen),
                  u(w.expected));
    case SignalKind::kMoeLL128Line:  // (low-latency line rows or heads: the epoch in a line)
      return fail(msg, len, "%s: rank %d timed out waiting for rank %lld's dispatch lines of call %llu (a line held "
                  "%llu); a peer rank did not make the matching call", name, w.rank, index, u(w.expected), u(w.seen));
    case SignalKind::kMoeDispatchFlag:
    case SignalKind::kMoeCombineFlag: {
      const bool dispatch = w.signal_kind == static_cast<int32_t>(SignalKind::kMoeDispatchFlag);
      const int shift = dispatch ? packed_count_bits : 0;
      return fail(msg, len, "%s: rank %d timed out waiting for rank %lld's %s flag of call %llu (saw %llu); a peer "
                  "rank did not make the matching call", name, w.rank, index, dispatch ? "dispatch" : "combine",
                  u(w.expected >> shift), u(w.seen >> shift));
    }
  }
  return fail(msg, len, "%s: rank %d timed out waiting for signal %lld (unknown kind %d) >= %llu, saw %llu", name, w.rank,
              index, w.signal_kind, u(w.expected), u(w.seen));
}

// Loads every kernel of the module now, stopping at the first error: a lazily loaded kernel launched
// while a spinning kernel runs can wait for that kernel, which may be waiting for it
// (CUDA_MODULE_LOADING=LAZY).
template <class... K>
cudaError_t load_kernels(K*... kernels) {
  cudaFuncAttributes fa;
  cudaError_t e = cudaSuccess;
  ((e = e == cudaSuccess ? cudaFuncGetAttributes(&fa, kernels) : e), ...);
  return e;
}

template <class Op, class State>
struct Base {
  static inline State slots[kMaxGroups];
  static inline State* g = &slots[0];  // the slot calls use (select); host calls of an op are single-threaded

  // Later calls run on group slot `slot` (the binding selects before each group's calls).
  static int select(int slot, char* msg, int len) {
    if (slot < 0 || slot >= kMaxGroups || !slots[slot].ready)
      return fail(msg, len, "%s: group slot %d is not set up on this rank (tilegen.group() first)", Op::kName, slot);
    g = &slots[slot];
    return 0;
  }

  // Joins NVSHMEM and makes slot `slot` current with this PE's place in it: pes[0, size) are its group's
  // PEs in rank order (the world: 0 .. n-1); size 0: this PE is in none of the slot's groups.
  static int attach(int slot, int size, const int* pes, char* msg, int len) {
    nvshmem_init();
    const int me = nvshmem_my_pe(), n = nvshmem_n_pes();
    if (slot < 0 || slot >= kMaxGroups)
      return fail(msg, len, "%s: group slot %d outside [0, %d)", Op::kName, slot, kMaxGroups);
    if (slots[slot].ready) return fail(msg, len, "%s: group slot %d already holds this rank's group", Op::kName, slot);
    if (size < 0 || size > n || size > kMaxPes || size > Op::kMaxWorld)
      return fail(msg, len, "%s: a group of %d ranks (this op: at most %d, the job has %d)", Op::kName, size,
                  Op::kMaxWorld, n);
    g = &slots[slot];
    g->rank = -1;
    g->world = size;
    for (int q = 0; q < size; ++q) {
      if (pes[q] < 0 || pes[q] >= n) return fail(msg, len, "%s: group rank %d is PE %d, outside [0, %d)", Op::kName, q, pes[q], n);
      for (int r = 0; r < q; ++r)
        if (pes[r] == pes[q]) return fail(msg, len, "%s: PE %d appears twice in a group", Op::kName, pes[q]);
      g->pe[q] = pes[q];
      if (pes[q] == me) g->rank = q;
    }
    if (size && g->rank < 0) return fail(msg, len, "%s: PE %d was given a group it is not in", Op::kName, me);
    return 0;
  }
  // The world as slot 0's group: pes 0 .. n-1.
  static int world_pes(int* pes) {
    nvshmem_init();
    const int n = nvshmem_n_pes();
    for (int q = 0; q < n && q < kMaxPes; ++q) pes[q] = q;
    return n;
  }
  static int unsupported_world(char* msg, int len) {
    return fail(msg, len, "%s: a group of %d ranks; this op was generated for world sizes %s", Op::kName, g->world,
                Op::kWorldSizes);
  }

  // The waits' report: zeroed host-mapped memory the kernels write through err_dev.
  static int alloc_wait_report(char* msg, int len) {
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaHostAlloc(&g->err_host, sizeof(dev::WaitError), cudaHostAllocMapped));
    memset(g->err_host, 0, sizeof(dev::WaitError));
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaHostGetDevicePointer(&g->err_dev, g->err_host, 0));
    return 0;
  }

  // The bound and error report of a call's waits (timeout_ns 0: unbounded, nothing reported).
  static dev::WaitCtx wait_ctx(uint64_t timeout_ns) {
    return dev::WaitCtx{timeout_ns ? g->err_dev : nullptr, timeout_ns, g->rank, Op::kOpId};
  }

  // After a bounded call has finished on the stream: 0 if no wait timed out, else its message (and the
  // op is unusable from then on).
  static int wait_error(char* msg, int len, int packed_count_bits = 0) {
    if (!g->err_host || !g->err_host->failed) return 0;
    g->poisoned = true;
    return describe_timeout(*g->err_host, Op::kName, packed_count_bits, msg, len);
  }

  // 0 when the op can take a call: initialised, and no earlier call timed out.
  static int usable(char* msg, int len) {
    if (!g->ready) return fail(msg, len, "%s: not initialised (call tilegen.init() first)", Op::kName);
    if (g->poisoned) return fail(msg, len, "%s: an earlier call timed out; signal state is unreliable, restart the job", Op::kName);
    return 0;
  }

  // After launching one of the op's kernels: 0, or a message naming it.
  static int launched(const char* what, char* msg, int len) { return launched(what, cudaGetLastError(), msg, len); }
  static int launched(const char* what, cudaError_t e, char* msg, int len) {
    return e == cudaSuccess ? 0 : fail(msg, len, "%s: %s launch failed: %s", Op::kName, what, cudaGetErrorString(e));
  }

  // Group rank q's address of this rank's symmetric `local_ptr` over NVLink, or null (not load/store reachable).
  template <class P>
  static P* peer(P* local_ptr, int q) {
    return static_cast<P*>(nvshmem_ptr(local_ptr, g->pe[q]));
  }

  // What every family frees last (after its own buffers).
  static void release_common() {
    if (g->err_host) cudaFreeHost(g->err_host);
  }
  // Every slot's teardown (collective: every PE allocated the same slots), through the family's
  // release_slot of the current one; then slot 0 is current again.
  template <class F>
  static void release_slots(F&& release_slot) {
    for (int s = 0; s < kMaxGroups; ++s) {
      g = &slots[s];
      if (g->allocated) release_slot();
      *g = State{};
    }
    g = &slots[0];
  }
};

}  // namespace host
}  // namespace tilegen

// Every op library's NVSHMEM versions entry point (the binding compares the two).
#define TILEGEN_EXPORT_NVSHMEM_VERSIONS()                                                                             \
  void tilegen_op_nvshmem_versions(int* compiled, int* runtime) {                                                     \
    *compiled = NVSHMEM_VENDOR_MAJOR_VERSION * 10000 + NVSHMEM_VENDOR_MINOR_VERSION * 100 + NVSHMEM_VENDOR_PATCH_VERSION; \
    int maj = 0, min = 0, patch = 0;                                                                                  \
    nvshmemx_vendor_get_version_info(&maj, &min, &patch);                                                             \
    *runtime = maj * 10000 + min * 100 + patch;                                                                       \
  }
