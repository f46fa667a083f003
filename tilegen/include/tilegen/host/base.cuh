// tilegen host layer: the scaffolding every op family's host code shares (coll::Host, moe::Host):
// joining NVSHMEM, the bounded waits' report (allocation, WaitCtx, decoding into a message), the
// usable / launched checks, loading kernels eagerly, residency and peer addresses, release.
//
// Contract: a family's Host<Op> derives from Base<Op, State> with State deriving from Common; its
// state lives in the one `g` (one op per library: the op's traits are the template argument), and
// its C entry points return 0, or 1 with a message naming the op (host_msg.h).
#pragma once
#include <cstdint>
#include <cstring>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include "tilegen/common/cuda_check.h"
#include "tilegen/common/host_msg.h"
#include "tilegen/common/wait.cuh"

namespace tilegen {
namespace host {

// What every family's State holds first.
struct Common {
  bool ready = false;
  bool poisoned = false;  // a bounded wait gave up: peers' signal state is unknown, no further calls
  int rank = -1, world = 0;
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

// The current device's SMs and, optionally, its compute capability's major version.
inline cudaError_t device_sms(int* sms, int* major = nullptr) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess && major) e = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
  return e;
}

template <class Op, class State>
struct Base {
  static inline State g;

  // Collective: every rank calls it once (NVSHMEM must already be initialised, e.g. by nvshmem4py).
  // Attaches this module's device state to the running NVSHMEM (refcounted) and takes rank and world.
  static void attach() {
    nvshmem_init();
    g.rank = nvshmem_my_pe();
    g.world = nvshmem_n_pes();
  }
  static int unsupported_world(char* msg, int len) {
    return fail(msg, len, "%s: NVSHMEM has %d PEs; this op was generated for world sizes %s", Op::kName, g.world,
                Op::kWorldSizes);
  }

  // The waits' report: zeroed host-mapped memory the kernels write through err_dev.
  static int alloc_wait_report(char* msg, int len) {
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaHostAlloc(&g.err_host, sizeof(dev::WaitError), cudaHostAllocMapped));
    memset(g.err_host, 0, sizeof(dev::WaitError));
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaHostGetDevicePointer(&g.err_dev, g.err_host, 0));
    return 0;
  }

  // The bound and error report of a call's waits (timeout_ns 0: unbounded, nothing reported).
  static dev::WaitCtx wait_ctx(uint64_t timeout_ns) {
    return dev::WaitCtx{timeout_ns ? g.err_dev : nullptr, timeout_ns, g.rank, Op::kOpId};
  }

  // After a bounded call has finished on the stream: 0 if no wait timed out, else its message (and the
  // op is unusable from then on).
  static int wait_error(char* msg, int len, int packed_count_bits = 0) {
    if (!g.err_host || !g.err_host->failed) return 0;
    g.poisoned = true;
    return describe_timeout(*g.err_host, Op::kName, packed_count_bits, msg, len);
  }

  // 0 when the op can take a call: initialised, and no earlier call timed out.
  static int usable(char* msg, int len) {
    if (!g.ready) return fail(msg, len, "%s: not initialised (call tilegen.init() first)", Op::kName);
    if (g.poisoned) return fail(msg, len, "%s: an earlier call timed out; signal state is unreliable, restart the job", Op::kName);
    return 0;
  }

  // After launching one of the op's kernels: 0, or a message naming it.
  static int launched(const char* what, char* msg, int len) { return launched(what, cudaGetLastError(), msg, len); }
  static int launched(const char* what, cudaError_t e, char* msg, int len) {
    return e == cudaSuccess ? 0 : fail(msg, len, "%s: %s launch failed: %s", Op::kName, what, cudaGetErrorString(e));
  }

  // Rank q's address of this rank's symmetric `local_ptr` over NVLink, or null (not load/store reachable).
  template <class P>
  static P* peer(P* local_ptr, int q) {
    return static_cast<P*>(nvshmem_ptr(local_ptr, q));
  }

  // What every family frees last (after its own buffers); the caller then resets g.
  static void release_common() {
    if (g.err_host) cudaFreeHost(g.err_host);
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
