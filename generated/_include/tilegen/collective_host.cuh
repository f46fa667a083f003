// tilegen collective library, host side: one op's symmetric state and calls (included by
// tilegen/collective.cuh). Each generated op library exports these through TILEGEN_EXPORT_COLLECTIVE
// under fixed names (tilegen_op_*): every op is its own shared library, built with hidden visibility.
#pragma once

#include <cstdlib>
#include <map>
#include <vector>
#include <cuda.h>  // driver API types only: its functions come through the runtime's entry points (no -lcuda)
#include "tilegen/ce_gemm.cuh"
#include "tilegen/host_msg.h"

extern "C" int tilegen_op_fused_load(char* msg, int len);  // the fused GEMM's translation unit (fused ops only)

namespace tilegen {
namespace coll {

// Stream memory operations (cuStreamWaitValue64 / cuStreamWriteValue64): a stream waits for or
// writes a word in the GPU's front end, without a kernel. TILEGEN_CE_MEMOPS=0 uses kernels instead.
struct StreamMemOps {
  using ValueFn = CUresult (*)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
  using AttrFn = CUresult (*)(int*, CUdevice_attribute, CUdevice);
  ValueFn wait = nullptr, write = nullptr;
  bool ok = false;

  static void* entry(const char* name) {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    return cudaGetDriverEntryPointByVersion(name, &f, 12000, cudaEnableDefault, &q) == cudaSuccess &&
                   q == cudaDriverEntryPointSuccess
               ? f
               : nullptr;
  }

  void load(int device) {
    const char* env = getenv("TILEGEN_CE_MEMOPS");
    if (env && env[0] == '0') return;
    wait = reinterpret_cast<ValueFn>(entry("cuStreamWaitValue64"));
    write = reinterpret_cast<ValueFn>(entry("cuStreamWriteValue64"));
    auto attr = reinterpret_cast<AttrFn>(entry("cuDeviceGetAttribute"));
    int yes = 0;
    ok = wait && write && attr && attr(&yes, CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, device) == CUDA_SUCCESS && yes;
  }
};

// One step of a copy-engine program (tilegen/ce_program.py, as tilegen/overlap.py encodes it): what,
// on which stream, with whom, and rows [lo, hi) of buffers (0 a, 1 the symmetric one, 2 c, 3 acc).
struct CeStep {
  enum Kind : int8_t { kBegin, kFork, kJoin, kPut, kGet, kSignal, kWait, kGemm, kReduce, kKinds };
  static constexpr int kFields = 15, kBuffers = 4;
  int8_t kind, stream;  // stream 0: the caller's, 1 + i: copy stream i
  int16_t peer;
  int32_t flag;
  int32_t count;   // reduce: terms, each `stride` rows after the previous
  int64_t stride;
  int8_t dst, src, addend;  // buffer ids, -1: none
  int64_t dlo, dhi, slo, shi, alo, ahi;
};
struct CeProgram {
  std::vector<CeStep> steps;
  int64_t max_row[CeStep::kBuffers] = {};  // rows each buffer must have
  int copies = 0;                          // copy streams it uses: 1 .. copies
};

template <class Op>
struct Host {
  static constexpr int kJoinEvents = 32;  // reused round-robin: a wait takes the event's state when queued
  struct State {
    bool ready = false;
    bool has_pending = false;  // run(..., defer) prepared a launch that launch_pending() issues
    int pending_grid = 0;
    bool begun = false;     // GEMM ops: begin() advanced the epoch word for the next run()
    bool prepared = false;  // GEMM ops: run() prepared a call (layout, order) that the compute side joins
    int max_grid = 0;       // CTAs that are all resident at once (and, GEMM ops, leave the GEMMs SMs)
    int64_t last_shard = 0, last_part = 0, last_tile = 0;
    int last_parts = 1, last_grid = 0;
    const Variant<Op>* last_variant = nullptr;
    uint64_t* counters = nullptr;   // fused gemm_rs: finished tiles per input part (local, zero between calls)
    uint64_t* epoch_dev = nullptr;  // GEMM ops: the epoch of the current call, advanced by begin()
    bool poisoned = false;
    int tune_ctas = 0;          // tilegen tune: CTAs and tile bytes for every call instead of the variant's (0: its own)
    int64_t tune_tile = 0;
    int rank = -1, world = 0;
    const WorldPlan<Op>* plan = nullptr;
    uint64_t* sig = nullptr;
    uint64_t* sig_peer[Op::kMaxWorld] = {};
    char* scr = nullptr;
    char* scr_peer[Op::kMaxWorld] = {};
    char* stage = nullptr;
    char* ll = nullptr;                   // LL schedules' scratch (kLLBytes, symmetric)
    char* ll_peer[Op::kMaxWorld] = {};
    bool ll_ok = false;                   // every peer's LL scratch is load/store reachable
    typename Op::Step* steps = nullptr;   // every variant's step table of this world, in device memory
    const void* last_out = nullptr;       // the last call's output and its peers' addresses
    char* out_peer[Op::kMaxWorld] = {};
    uint64_t* state = nullptr;
    dev::WaitError* err_host = nullptr;
    dev::WaitError* err_dev = nullptr;
    uint64_t* ce_sig = nullptr;           // GEMM ops: the copy-engine protocol's words (CeSignals), symmetric
    CeSignals<Op> ce{};                   // every rank's words through NVLink (null where unreachable)
    bool ce_ok = false;                   // every peer's words are load/store reachable
    StreamMemOps memops{};                // flags by stream memory operations where the device has them
    cudaEvent_t joins[kJoinEvents] = {};  // GEMM ops: events that order one stream after another
    int next_join = 0;
    std::map<int64_t, CeProgram> ce_programs;  // copy-engine programs by the op's key (m, splits)
    cudaStream_t ce_copy[Op::kMaxWorld] = {};  // their copy streams
    BlasLt blas;                               // their GEMMs
  };
  static inline State g;
  static inline Params<Op> pending;
  static constexpr bool kGemm = Op::kGemm != Gemm::kNone;
  static constexpr int kStateWords = 2 + Op::kMaxSteps;

  // Loads every kernel of the module now: a lazily loaded kernel launched while a spinning kernel
  // runs can wait for that kernel, which may be waiting for it (CUDA_MODULE_LOADING=LAZY).
  static cudaError_t load_kernels() {
    cudaFuncAttributes fa;
    cudaError_t e = cudaFuncGetAttributes(&fa, kernel<Op>);
    if constexpr (kGemm)
      if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, begin_call<Op>);
    if constexpr (Op::kGemm == Gemm::kConsume)
      if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, wait_chunk<Op>);
    if constexpr (Op::kGemm == Gemm::kProduce)
      if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, signal_chunk<Op>);
    if constexpr (kGemm) {
      if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, ce_begin<Op>);
      if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, ce_signal);
      if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, ce_wait);
      if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, ce_reduce<typename Op::Elem>);
    }
    return e;
  }

  // The checker proves the schedules deadlock-free with every CTA running: launch no more CTAs than
  // can be resident at once. A GEMM op's kernel spins beside GEMMs (which it may wait for): leave them
  // SMs even when each CTA takes an SM of its own.
  static cudaError_t resident_grid(int* max_grid) {
    int device = 0, sms = 0, per_sm = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel<Op>, Op::kThreads, 0);
    *max_grid = per_sm * sms;
    if (kGemm && *max_grid > sms / 2) *max_grid = sms / 2;
    return e;
  }

  // Collective: every rank calls it once (NVSHMEM must already be initialised, e.g. by nvshmem4py).
  static int init(char* msg, int len) {
    if (g.ready) return 0;
    nvshmem_init();  // refcounted: attaches this module's device state to the running NVSHMEM
    g.rank = nvshmem_my_pe();
    g.world = nvshmem_n_pes();
    g.plan = Op::plan(g.world);
    if (!g.plan)
      return fail(msg, len, "%s: NVSHMEM has %d PEs; this op was generated for world sizes %s", Op::kName, g.world,
                  Op::kWorldSizes);
    const int64_t sig_words = signals<Op>().words();
    g.sig = static_cast<uint64_t*>(nvshmem_malloc(sig_words * sizeof(uint64_t)));
    g.scr = Op::kScrBytes ? static_cast<char*>(nvshmem_malloc(Op::kScrBytes)) : nullptr;
    g.stage = static_cast<char*>(nvshmem_malloc(Op::kStageBytes * Op::kMaxCtas));  // CTAs of the widest variant
    g.ll = Op::kLLBytes ? static_cast<char*>(nvshmem_malloc(Op::kLLBytes)) : nullptr;
    if constexpr (kGemm) {
      g.ce_sig = static_cast<uint64_t*>(nvshmem_malloc(CeSignals<Op>::kWords * sizeof(uint64_t)));
      if (!g.ce_sig) return fail(msg, len, "%s: nvshmem_malloc of the copy-engine signals failed", Op::kName);
    }
    if (!g.sig || (Op::kScrBytes && !g.scr) || !g.stage || (Op::kLLBytes && !g.ll))
      return fail(msg, len, "%s: nvshmem_malloc of %lld signal + %lld scratch bytes failed (raise NVSHMEM_SYMMETRIC_SIZE)",
                  Op::kName, static_cast<long long>(sig_words * 8), static_cast<long long>(Op::kScrBytes));
    cudaError_t e = cudaMemset(g.sig, 0, sig_words * sizeof(uint64_t));
    if (e == cudaSuccess && g.ll) e = cudaMemset(g.ll, 0, Op::kLLBytes);  // flag 0: no call's
    if (e == cudaSuccess && g.ce_sig) e = cudaMemset(g.ce_sig, 0, CeSignals<Op>::kWords * sizeof(uint64_t));
    if (e == cudaSuccess) e = upload_steps();
    if (e == cudaSuccess) e = cudaMalloc(&g.state, kStateWords * sizeof(uint64_t));
    if (e == cudaSuccess) e = cudaMemset(g.state, 0, kStateWords * sizeof(uint64_t));
    if (Op::kFused && e == cudaSuccess) e = cudaMalloc(&g.counters, Op::kInSlots * sizeof(uint64_t));
    if (Op::kFused && e == cudaSuccess) e = cudaMemset(g.counters, 0, Op::kInSlots * sizeof(uint64_t));
    if (kGemm && e == cudaSuccess) e = cudaMalloc(&g.epoch_dev, sizeof(uint64_t));
    if (kGemm && e == cudaSuccess) e = cudaMemset(g.epoch_dev, 0, sizeof(uint64_t));
    if (e == cudaSuccess) e = cudaHostAlloc(&g.err_host, sizeof(dev::WaitError), cudaHostAllocMapped);
    if (e == cudaSuccess) {
      memset(g.err_host, 0, sizeof(dev::WaitError));
      e = cudaHostGetDevicePointer(&g.err_dev, g.err_host, 0);
    }
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e != cudaSuccess) return fail(msg, len, "%s: init: %s", Op::kName, cudaGetErrorString(e));
    if ((e = load_kernels()) != cudaSuccess) return fail(msg, len, "%s: loading kernels: %s", Op::kName, cudaGetErrorString(e));
    if (resident_grid(&g.max_grid) != cudaSuccess || g.max_grid < 1)
      return fail(msg, len, "%s: the kernel cannot run %d threads per CTA here", Op::kName, Op::kThreads);
    if constexpr (Op::kFused)
      if (tilegen_op_fused_load(msg, len)) return 1;
    nvshmem_barrier_all();  // every rank's signals are zero before anyone signals
    for (int q = 0; q < g.world; ++q) {
      g.sig_peer[q] = Op::kAllowPeerPtr ? static_cast<uint64_t*>(nvshmem_ptr(g.sig, q)) : nullptr;
      g.scr_peer[q] = (Op::kAllowPeerPtr && g.scr) ? static_cast<char*>(nvshmem_ptr(g.scr, q)) : nullptr;
      g.ll_peer[q] = (Op::kAllowPeerPtr && g.ll) ? static_cast<char*>(nvshmem_ptr(g.ll, q)) : nullptr;
      if (Op::kRequirePeerPtr && !g.sig_peer[q])
        return fail(msg, len, "%s: transport nvlink, but rank %d is not load/store reachable from rank %d (use transport: auto)",
                    Op::kName, q, g.rank);
    }
    if constexpr (kGemm) {
      int device = 0;
      cudaGetDevice(&device);
      g.memops.load(device);
      for (int i = 0; i < kJoinEvents && e == cudaSuccess; ++i) e = cudaEventCreateWithFlags(&g.joins[i], cudaEventDisableTiming);
      if (e != cudaSuccess) return fail(msg, len, "%s: init: %s", Op::kName, cudaGetErrorString(e));
    }
    g.ce_ok = g.ce_sig != nullptr;
    for (int q = 0; q < g.world && g.ce_sig; ++q) {
      g.ce.peer[q] = static_cast<uint64_t*>(nvshmem_ptr(g.ce_sig, q));
      g.ce_ok &= g.ce.peer[q] != nullptr;
    }
    g.ll_ok = g.ll != nullptr;
    for (int q = 0; q < g.world; ++q) g.ll_ok &= q == g.rank || g.ll_peer[q] != nullptr;
    g.ready = true;
    return 0;
  }

  // Every variant's step tables of this world into device memory once: a launch then passes a
  // pointer, not the program (launch parameters of several KB cost microseconds per call).
  static cudaError_t upload_steps() {
    const int64_t per_rank = Op::kMaxSteps, per_variant = per_rank * g.world;
    cudaError_t e = cudaMalloc(&g.steps, g.plan->nvariants * per_variant * sizeof(typename Op::Step));
    for (int v = 0; v < g.plan->nvariants && e == cudaSuccess; ++v)
      e = cudaMemcpy(g.steps + v * per_variant, g.plan->variants[v].table, per_variant * sizeof(typename Op::Step),
                     cudaMemcpyHostToDevice);
    return e;
  }

  // Collective teardown (before NVSHMEM is finalised).
  static int release(char*, int) {
    if (!g.ready) return 0;
    cudaDeviceSynchronize();
    nvshmem_free(g.sig);
    if (g.scr) nvshmem_free(g.scr);
    nvshmem_free(g.stage);
    if (g.ll) nvshmem_free(g.ll);
    if (g.ce_sig) nvshmem_free(g.ce_sig);
    for (cudaEvent_t ev : g.joins)
      if (ev) cudaEventDestroy(ev);
    for (cudaStream_t cs : g.ce_copy)
      if (cs) cudaStreamDestroy(cs);
    g.blas.release();
    cudaFree(g.steps);
    cudaFree(g.state);
    if (g.counters) cudaFree(g.counters);
    if (g.epoch_dev) cudaFree(g.epoch_dev);
    cudaFreeHost(g.err_host);
    g = State{};
    return 0;
  }

  // True when [ptr, ptr + bytes) lies in this rank's symmetric heap.
  static int is_symmetric(const void* ptr, int64_t bytes) {
    if (!g.ready || bytes <= 0) return 0;
    static const void* last_ptr = nullptr;  // apps call with the same output again and again
    static int64_t last_bytes = 0;
    if (ptr == last_ptr && bytes == last_bytes) return 1;
    const char* p = static_cast<const char*>(ptr);
    const int yes = nvshmem_ptr(p, g.rank) != nullptr && nvshmem_ptr(p + bytes - 1, g.rank) != nullptr;
    if (yes) last_ptr = ptr, last_bytes = bytes;
    return yes;
  }

  // in: in_bytes; out: as the op defines. Arguments were validated by the binding. defer: prepare
  // the call (checks, layout) and leave the launch to launch_pending().
  static int run(const void* in, void* out, int64_t in_bytes, int root, void* stream, uint64_t timeout_ns, int defer,
                 char* msg, int len) {
    if (usable(msg, len)) return 1;
    if (in_bytes <= 0 || in_bytes > Op::kMaxInBytes)
      return fail(msg, len, "%s: input of %lld bytes outside (0, %lld]", Op::kName, static_cast<long long>(in_bytes),
                  static_cast<long long>(Op::kMaxInBytes));
    if (root < 0 || root >= g.world) return fail(msg, len, "%s: root %d outside [0, %d)", Op::kName, root, g.world);
    int vi = 0;  // the first variant for this size; LL ones only where every peer's LL scratch is reachable
    while (vi + 1 < g.plan->nvariants &&
           (in_bytes > g.plan->variants[vi].max_in_bytes || (g.plan->variants[vi].ll && !g.ll_ok)))
      ++vi;
    const Variant<Op>& v = g.plan->variants[vi];
    if (v.ll && !g.ll_ok)
      return fail(msg, len, "%s: this size's only schedule is LL, which needs every peer load/store reachable", Op::kName);
    if (out != g.last_out) {  // nvshmem_ptr is a lookup: once per output buffer, not per call
      for (int q = 0; q < g.world; ++q)
        g.out_peer[q] = (q == g.rank || !Op::kAllowPeerPtr) ? nullptr : static_cast<char*>(nvshmem_ptr(out, q));
      g.last_out = out;
    }
    Params<Op> p{};
    p.in = static_cast<const char*>(in);
    p.out = static_cast<char*>(out);
    p.scr = g.scr;
    p.stage = g.stage;
    p.ll = g.ll;
    for (int q = 0; q < g.world; ++q) {
      p.out_peer[q] = g.out_peer[q];
      p.scr_peer[q] = q == g.rank ? nullptr : g.scr_peer[q];
      p.sig_peer[q] = g.sig_peer[q];
      p.ll_peer[q] = g.ll_peer[q];
    }
    p.sig = g.sig;
    p.state = g.state;
    p.in_bytes = in_bytes;
    p.parts = v.parts;
    layout::shard_and_part(Op::kChunks, in_bytes, g.world, v.parts, sizeof(typename Op::Elem), &p.shard, &p.part);
    const int ctas = g.tune_ctas > 0 ? g.tune_ctas : v.ctas;
    p.tile = layout::tile_size(p.part, g.tune_tile > 0 ? g.tune_tile : v.tile_bytes, ctas);
    // LL: one thread per 16-byte line of a part (tiles play no part); others: one CTA per tile at most
    const int64_t ntiles = v.ll ? ((p.part + 7) / 8 + Op::kThreads - 1) / Op::kThreads : (p.part + p.tile - 1) / p.tile;
    if (!v.ll && ntiles > Op::kMaxTiles)
      return fail(msg, len, "%s: %lld tiles exceed the %lld signal slots", Op::kName, static_cast<long long>(ntiles),
                  static_cast<long long>(Op::kMaxTiles));
    p.rank = g.rank;
    p.world = g.world;
    p.root = root;
    p.nsteps = v.nsteps;
    p.is_ll = v.ll;
    const int rel = (g.rank - root + g.world) % g.world;
    p.steps = g.steps + (static_cast<int64_t>(vi) * g.world + rel) * Op::kMaxSteps;
    if (v.ll && 2 * ((p.part + 7) / 8 * 8) * Op::kLLSlots > Op::kLLBytes / 2)
      return fail(msg, len, "%s: %lld-byte parts exceed the LL scratch (%lld bytes)", Op::kName,
                  static_cast<long long>(p.part), static_cast<long long>(Op::kLLBytes));
    p.wait = wait_ctx(timeout_ns);
    if constexpr (kGemm) {
      if (!g.begun) return fail(msg, len, "%s: run() without begin() on the caller's stream first", Op::kName);
      g.begun = false;
      g.prepared = true;
      p.epoch_src = g.epoch_dev;
    }
    g.last_shard = p.shard;
    g.last_part = p.part;
    g.last_tile = p.tile;
    g.last_parts = p.parts;
    g.last_variant = &v;
    int grid = static_cast<int>(ntiles < ctas ? (ntiles > 0 ? ntiles : 1) : ctas);
    grid = grid < g.max_grid ? grid : g.max_grid;
    g.last_grid = grid;
    if (defer) {  // launched by launch_pending() after the producers are queued
      pending = p;
      g.pending_grid = grid;
      g.has_pending = true;
      return 0;
    }
    return launch(p, grid, stream, msg, len);
  }

  static int launch(const Params<Op>& p, int grid, void* stream, char* msg, int len) {
    kernel<Op><<<grid, Op::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? 0 : fail(msg, len, "%s: launch failed: %s", Op::kName, cudaGetErrorString(e));
  }

  // After launching one of the op's small kernels: 0, or a message naming it.
  static int launched(const char* what, char* msg, int len) {
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? 0 : fail(msg, len, "%s: %s launch failed: %s", Op::kName, what, cudaGetErrorString(e));
  }

  // The bound and error report of a call's waits (timeout_ns 0: unbounded, nothing reported).
  static dev::WaitCtx wait_ctx(uint64_t timeout_ns) {
    return dev::WaitCtx{timeout_ns ? g.err_dev : nullptr, timeout_ns, g.rank, Op::kOpId};
  }

  // 0 when the op can take a call: initialised, and no earlier call timed out.
  static int usable(char* msg, int len) {
    if (!g.ready) return fail(msg, len, "%s: not initialised (call tilegen.init() first)", Op::kName);
    if (g.poisoned) return fail(msg, len, "%s: an earlier call timed out; signal state is unreliable, restart the job", Op::kName);
    return 0;
  }

  static int launch_pending(void* stream, char* msg, int len) {
    if (!g.has_pending) return fail(msg, len, "%s: no prepared call to launch", Op::kName);
    g.has_pending = false;
    return launch(pending, g.pending_grid, stream, msg, len);
  }

  // tilegen tune: run every call with `ctas` CTAs and tiles of `tile_bytes` (0: the plan's).
  static int tune(int ctas, int64_t tile_bytes, char* msg, int len) {
    if (ctas < 0 || tile_bytes < 0 || (tile_bytes && tile_bytes % 16))
      return fail(msg, len, "%s: tune(%d CTAs, %lld-byte tiles): expected >= 0 and tiles of 16-byte multiples", Op::kName,
                  ctas, static_cast<long long>(tile_bytes));
    g.tune_ctas = ctas;
    g.tune_tile = tile_bytes;
    return 0;
  }

  // After a bounded-wait call has finished on the stream: 0 if no wait timed out, else a message.
  static int wait_error(char* msg, int len) {
    if (!g.err_host || !g.err_host->failed) return 0;
    const dev::WaitError& w = *g.err_host;
    static const char* kinds[] = {"entry", "tile flag", "CTA counter", "LL line", "copy-engine chunk flag"};
    g.poisoned = true;
    if (w.signal_kind == 3)
      return fail(msg, len,
                  "%s: rank %d timed out in step %d (block %d) waiting for the LL lines of scratch slot %lld to hold flag "
                  "%llu, saw %llu; a peer rank did not make the matching call",
                  Op::kName, w.rank, w.step, w.block, static_cast<long long>(w.signal_index),
                  static_cast<unsigned long long>(w.expected), static_cast<unsigned long long>(w.seen));
    return fail(msg, len,
                "%s: rank %d timed out in step %d (block %d) waiting for %s signal %lld >= %llu, saw %llu; "
                "a peer rank did not make the matching call",
                Op::kName, w.rank, w.step, w.block, kinds[w.signal_kind >= 0 && w.signal_kind < 5 ? w.signal_kind : 0],
                static_cast<long long>(w.signal_index), static_cast<unsigned long long>(w.expected),
                static_cast<unsigned long long>(w.seen));
  }

  // ---------------------------------------------------------------------------------- GEMM ops
  // Starts a call on the caller's stream, before it forks: advances the epoch every kernel of it reads.
  static int begin(void* stream, char* msg, int len) {
    if (!g.ready) return fail(msg, len, "%s: not initialised (call tilegen.init() first)", Op::kName);
    if constexpr (kGemm) {
      begin_call<Op><<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(g.epoch_dev);
      if (launched("begin", msg, len)) return 1;
      g.begun = true;
    }
    return 0;
  }

  static int check_chunk(const char* what, int chunk, char* msg, int len) {
    if (!g.ready || !g.prepared) return fail(msg, len, "%s: %s before any call", Op::kName, what);
    if (chunk < 0 || chunk >= g.world) return fail(msg, len, "%s: chunk %d outside [0, %d)", Op::kName, chunk, g.world);
    return 0;
  }

  // gemm_rs: after the GEMM of chunk `chunk` on `stream`, let the communication kernel take it.
  static int signal_chunk_after(int chunk, void* stream, char* msg, int len) {
    if (check_chunk("signal_chunk", chunk, msg, len)) return 1;
    if constexpr (Op::kGemm == Gemm::kProduce) {
      signal_chunk<Op><<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(g.sig, chunk, g.last_parts, g.epoch_dev);
      return launched("signal", msg, len);
    }
    return 0;
  }

  // ag_gemm: wait on `stream` until chunk `chunk` of this call's gather is complete.
  static int wait_chunk_on(int chunk, void* stream, uint64_t timeout_ns, char* msg, int len) {
    if (check_chunk("wait_chunk", chunk, msg, len)) return 1;
    if constexpr (Op::kGemm == Gemm::kConsume) {
      const dev::WaitCtx w = wait_ctx(timeout_ns);
      wait_chunk<Op><<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(g.sig, chunk, g.last_parts, g.last_shard, g.last_part,
                                                                       g.last_tile, g.epoch_dev, w);
      return launched("wait", msg, len);
    }
    return 0;
  }

  // The compute stream's chunk order for the last call (world entries).
  static int compute_order(int* out) {
    if (!g.ready || !g.last_variant || !g.last_variant->order) return 1;
    for (int i = 0; i < g.world; ++i) out[i] = g.last_variant->order[g.rank][i];
    return 0;
  }

  // ------------------------------------------------------------ GEMM ops, copy-engine overlap
  // The orchestration (which chunk, which stream, in what order) is the Python op's
  // (tilegen/overlap.py); these check their arguments and queue the copies and the flag kernels.
  static int ce_check(const char* what, int peer, int flag, char* msg, int len) {
    if (usable(msg, len)) return 1;
    if (!g.ce_ok)
      return fail(msg, len, "%s: %s: the copy-engine overlap needs every peer's memory reachable over NVLink (P2P); "
                  "use overlap: decomposed", Op::kName, what);
    if (peer < 0 || peer >= g.world) return fail(msg, len, "%s: %s: peer %d outside [0, %d)", Op::kName, what, peer, g.world);
    if (flag < 0 || flag >= Op::kMaxWorld * kCeMaxSplits)
      return fail(msg, len, "%s: %s: flag %d outside [0, %d)", Op::kName, what, flag, Op::kMaxWorld * kCeMaxSplits);
    return 0;
  }

  static int ce_begin_call(void* stream, uint64_t timeout_ns, char* msg, int len) {
    if (ce_check("begin", g.rank, 0, msg, len)) return 1;
    const dev::WaitCtx w = wait_ctx(timeout_ns);
    ce_begin<Op><<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(g.epoch_dev, g.ce, g.rank, g.world, w);
    return launched("begin", msg, len);
  }

  // Rank `peer`'s address of symmetric [ptr, ptr + bytes), or null (with a message) if it is not one.
  static char* peer_address(const char* what, const void* ptr, int64_t bytes, int peer, char* msg, int len) {
    if (!is_symmetric(ptr, bytes)) {
      fail(msg, len, "%s: %s: the buffer is not on the NVSHMEM symmetric heap", Op::kName, what);
      return nullptr;
    }
    char* p = static_cast<char*>(nvshmem_ptr(ptr, peer));
    if (!p) fail(msg, len, "%s: %s: rank %d's buffer is not reachable over NVLink", Op::kName, what, peer);
    return p;
  }

  // Copy `bytes` from local `src` into rank `peer`'s symmetric `dst` (this rank's address), then
  // set the peer's flag `flag`.
  static int ce_put(const void* src, void* dst, int64_t bytes, int peer, int flag, void* stream, char* msg, int len) {
    if (ce_check("put", peer, flag, msg, len)) return 1;
    char* to = peer_address("put", dst, bytes, peer, msg, len);
    if (!to) return 1;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaError_t e = cudaMemcpyAsync(to, src, bytes, cudaMemcpyDeviceToDevice, s);
    if (e != cudaSuccess) return fail(msg, len, "%s: put: %s", Op::kName, cudaGetErrorString(e));
    return set_flag(g.ce.peer[peer] + CeSignals<Op>::kFlags + flag, s, msg, len);
  }

  // Sets a flag after the work queued before on `stream` (its writes are visible first).
  static int set_flag(uint64_t* flag, cudaStream_t s, char* msg, int len) {
    if (g.memops.ok) {
      CUresult r = g.memops.write(reinterpret_cast<CUstream>(s), reinterpret_cast<CUdeviceptr>(flag), 1, 0);
      return r == CUDA_SUCCESS ? 0 : fail(msg, len, "%s: cuStreamWriteValue64 failed (CUresult %d; TILEGEN_CE_MEMOPS=0 "
                                          "signals in kernels)", Op::kName, static_cast<int>(r));
    }
    ce_signal<<<1, 1, 0, s>>>(flag);
    return launched("signal", msg, len);
  }

  // Copy `bytes` from rank `peer`'s symmetric `src` (this rank's address) into local `dst`.
  static int ce_get(void* dst, const void* src, int64_t bytes, int peer, void* stream, char* msg, int len) {
    if (ce_check("get", peer, 0, msg, len)) return 1;
    const char* from = peer_address("get", src, bytes, peer, msg, len);
    if (!from) return 1;
    cudaError_t e = cudaMemcpyAsync(dst, from, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream));
    return e == cudaSuccess ? 0 : fail(msg, len, "%s: get: %s", Op::kName, cudaGetErrorString(e));
  }

  // After the work queued before it on `stream`: set rank `peer`'s flag `flag` to the call's epoch.
  static int ce_signal_peer(int peer, int flag, void* stream, char* msg, int len) {
    if (ce_check("signal", peer, flag, msg, len)) return 1;
    return set_flag(g.ce.peer[peer] + CeSignals<Op>::kFlags + flag, static_cast<cudaStream_t>(stream), msg, len);
  }

  // `waiter` runs what is queued on it from now on after the work queued on `producer` so far.
  static int join(void* waiter, void* producer, char* msg, int len) {
    if (!g.ready) return fail(msg, len, "%s: not initialised (call tilegen.init() first)", Op::kName);
    cudaEvent_t ev = g.joins[g.next_join];
    g.next_join = (g.next_join + 1) % kJoinEvents;
    cudaError_t e = cudaEventRecord(ev, static_cast<cudaStream_t>(producer));
    if (e == cudaSuccess) e = cudaStreamWaitEvent(static_cast<cudaStream_t>(waiter), ev, 0);
    return e == cudaSuccess ? 0 : fail(msg, len, "%s: join: %s", Op::kName, cudaGetErrorString(e));
  }

  // Holds `stream` until this rank's flag `flag` is set, then clears it. A bounded wait runs as a
  // kernel (it reports a missing peer); an unbounded one in the front end where the device can.
  static int ce_wait_flag(int flag, void* stream, uint64_t timeout_ns, char* msg, int len) {
    if (ce_check("wait", g.rank, flag, msg, len)) return 1;
    uint64_t* word = g.ce.peer[g.rank] + CeSignals<Op>::kFlags + flag;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (g.memops.ok && !timeout_ns) {
      const CUstream cs = reinterpret_cast<CUstream>(s);
      const CUdeviceptr p = reinterpret_cast<CUdeviceptr>(word);
      CUresult r = g.memops.wait(cs, p, 1, CU_STREAM_WAIT_VALUE_EQ);
      if (r != CUDA_SUCCESS)
        return fail(msg, len, "%s: cuStreamWaitValue64 failed (CUresult %d; TILEGEN_CE_MEMOPS=0 waits in kernels)",
                    Op::kName, static_cast<int>(r));
      r = g.memops.write(cs, p, 0, 0);
      return r == CUDA_SUCCESS ? 0 : fail(msg, len, "%s: cuStreamWriteValue64 failed (CUresult %d)", Op::kName, static_cast<int>(r));
    }
    const dev::WaitCtx w = wait_ctx(timeout_ns);
    ce_wait<<<1, 32, 0, s>>>(word, flag, w);
    return launched("wait", msg, len);
  }

  // Registers program `key` (n steps of CeStep::kFields numbers), checked here once: the executor
  // below then trusts its kinds, streams, peers, flags and row ranges (row counts are per call).
  static int ce_set_program(int64_t key, const int64_t* v, int64_t n, char* msg, int len) {
    if (usable(msg, len)) return 1;
    CeProgram p;
    auto buffer_ok = [](int64_t b, bool optional) { return (optional && b == -1) || (b >= 0 && b < CeStep::kBuffers); };
    for (int64_t i = 0; i < n; ++i) {
      const int64_t* f = v + i * CeStep::kFields;
      CeStep st{static_cast<int8_t>(f[0]), static_cast<int8_t>(f[1]), static_cast<int16_t>(f[2]), static_cast<int32_t>(f[3]),
                static_cast<int32_t>(f[4]), f[5], static_cast<int8_t>(f[6]), static_cast<int8_t>(f[9]),
                static_cast<int8_t>(f[12]), f[7], f[8], f[10], f[11], f[13], f[14]};
      const bool moves = st.kind == CeStep::kPut || st.kind == CeStep::kGet || st.kind == CeStep::kGemm ||
                         st.kind == CeStep::kReduce;
      const bool flags = st.kind == CeStep::kPut || st.kind == CeStep::kSignal || st.kind == CeStep::kWait;
      const bool remote = st.kind == CeStep::kPut || st.kind == CeStep::kGet || st.kind == CeStep::kSignal;
      const bool same_rows = st.kind == CeStep::kGemm || st.kind == CeStep::kReduce;  // (copies: bytes, per call)
      bool ok = f[0] >= 0 && f[0] < CeStep::kKinds && f[1] >= 0 && f[1] <= Op::kMaxWorld && f[4] >= 1 && f[5] >= 0;
      ok = ok && (st.kind != CeStep::kFork || f[1] > 0) && (st.kind != CeStep::kJoin || f[1] == 0);
      ok = ok && (!remote || (f[2] >= 0 && f[2] < g.world && f[2] != g.rank));
      ok = ok && (!flags || (f[3] >= 0 && f[3] < Op::kMaxWorld * kCeMaxSplits));
      ok = ok && (!moves || (buffer_ok(f[6], false) && buffer_ok(f[9], false) && 0 <= f[7] && f[7] < f[8] && 0 <= f[10] && f[10] < f[11]));
      ok = ok && (st.kind == CeStep::kGemm ? buffer_ok(f[12], true) && (f[12] == -1 || (0 <= f[13] && f[14] - f[13] == f[8] - f[7]))
                                           : f[12] == -1);
      ok = ok && (!same_rows || f[11] - f[10] == f[8] - f[7]);
      ok = ok && (st.kind == CeStep::kReduce || f[4] == 1 || st.kind == CeStep::kGemm);
      if (!ok) return fail(msg, len, "%s: copy-engine program %lld: step %lld is malformed", Op::kName,
                           static_cast<long long>(key), static_cast<long long>(i));
      if (moves) {
        const int64_t src_hi = st.shi + (st.kind == CeStep::kReduce ? (st.count - 1) * st.stride : 0);
        p.max_row[st.dst] = st.dhi > p.max_row[st.dst] ? st.dhi : p.max_row[st.dst];
        p.max_row[st.src] = src_hi > p.max_row[st.src] ? src_hi : p.max_row[st.src];
        if (st.addend >= 0) p.max_row[st.addend] = st.ahi > p.max_row[st.addend] ? st.ahi : p.max_row[st.addend];
      }
      p.copies = st.stream > p.copies ? st.stream : p.copies;
      p.steps.push_back(st);
    }
    g.ce_programs[key] = std::move(p);
    return 0;
  }

  // Runs program `key` once on buffers ptr[i] (rows[i] rows of row_bytes[i] bytes; the symmetric
  // one is this rank's address) with B (n x k, [k, n] if b_kn): every step's library call, from here.
  static int ce_run(int64_t key, char* const* ptr, const int64_t* rows, const int64_t* row_bytes, const void* b, int64_t n,
                    int64_t k, int b_kn, void* stream, uint64_t timeout_ns, char* msg, int len) {
    if constexpr (!kGemm) return fail(msg, len, "%s: not a GEMM op", Op::kName);
    else return ce_execute(key, ptr, rows, row_bytes, b, n, k, b_kn, stream, timeout_ns, msg, len);
  }

  static int ce_execute(int64_t key, char* const* ptr, const int64_t* rows, const int64_t* row_bytes, const void* b,
                        int64_t n, int64_t k, int b_kn, void* stream, uint64_t timeout_ns, char* msg, int len) {
    if (usable(msg, len)) return 1;
    auto it = g.ce_programs.find(key);
    if (it == g.ce_programs.end())
      return fail(msg, len, "%s: copy-engine program %lld was not registered", Op::kName, static_cast<long long>(key));
    const CeProgram& p = it->second;
    for (int i = 0; i < CeStep::kBuffers; ++i)
      if (p.max_row[i] > rows[i])
        return fail(msg, len, "%s: the copy-engine program needs %lld rows of buffer %d, it has %lld", Op::kName,
                    static_cast<long long>(p.max_row[i]), i, static_cast<long long>(rows[i]));
    void* streams[1 + Op::kMaxWorld] = {stream};
    for (int i = 0; i < p.copies; ++i) {
      if (!g.ce_copy[i]) {
        cudaError_t e = cudaStreamCreateWithFlags(&g.ce_copy[i], cudaStreamNonBlocking);
        if (e != cudaSuccess) return fail(msg, len, "%s: copy stream: %s", Op::kName, cudaGetErrorString(e));
      }
      streams[1 + i] = g.ce_copy[i];
    }
    if (g.blas.load(msg, len)) return 1;
    const int64_t in_row = k * static_cast<int64_t>(sizeof(typename Op::Elem)), out_row = n * static_cast<int64_t>(sizeof(typename Op::Elem));
    for (const CeStep& st : p.steps) {
      void* on = streams[st.stream];
      int rc = 0;
      switch (st.kind) {
        case CeStep::kBegin: rc = ce_begin_call(on, timeout_ns, msg, len); break;
        case CeStep::kFork: rc = join(on, stream, msg, len); break;
        case CeStep::kJoin:  // the caller's stream after every copy stream's work so far
          for (int i = 0; i < p.copies && !rc; ++i) rc = join(stream, g.ce_copy[i], msg, len);
          break;
        case CeStep::kSignal: rc = ce_signal_peer(st.peer, st.flag, on, msg, len); break;
        case CeStep::kWait: rc = ce_wait_flag(st.flag, on, timeout_ns, msg, len); break;
        case CeStep::kPut:
        case CeStep::kGet: {
          const int64_t bytes = (st.shi - st.slo) * row_bytes[st.src];
          if (bytes != (st.dhi - st.dlo) * row_bytes[st.dst])
            return fail(msg, len, "%s: a copy-engine copy of %lld bytes into %lld", Op::kName, static_cast<long long>(bytes),
                        static_cast<long long>((st.dhi - st.dlo) * row_bytes[st.dst]));
          char* dst = ptr[st.dst] + st.dlo * row_bytes[st.dst];
          const char* src = ptr[st.src] + st.slo * row_bytes[st.src];
          rc = st.kind == CeStep::kPut ? ce_put(src, dst, bytes, st.peer, st.flag, on, msg, len)
                                       : ce_get(dst, src, bytes, st.peer, on, msg, len);
          break;
        }
        case CeStep::kGemm: {
          if (row_bytes[st.src] != in_row || row_bytes[st.dst] != out_row || (st.addend >= 0 && row_bytes[st.addend] != out_row))
            return fail(msg, len, "%s: copy-engine GEMM rows of %lld / %lld bytes, expected %lld / %lld", Op::kName,
                        static_cast<long long>(row_bytes[st.src]), static_cast<long long>(row_bytes[st.dst]),
                        static_cast<long long>(in_row), static_cast<long long>(out_row));
          const char* addend = st.addend >= 0 ? ptr[st.addend] + st.alo * out_row : nullptr;
          rc = g.blas.gemm(BlasType<typename Op::Elem>::kType, ptr[st.src] + st.slo * in_row, st.shi - st.slo, b, n, k,
                           b_kn != 0, ptr[st.dst] + st.dlo * out_row, addend, static_cast<cudaStream_t>(on), msg, len);
          break;
        }
        case CeStep::kReduce: {
          if (row_bytes[st.src] != out_row || row_bytes[st.dst] != out_row)
            return fail(msg, len, "%s: copy-engine reduce of rows of %lld / %lld bytes, expected %lld", Op::kName,
                        static_cast<long long>(row_bytes[st.src]), static_cast<long long>(row_bytes[st.dst]),
                        static_cast<long long>(out_row));
          using T = typename Op::Elem;
          T* dst = reinterpret_cast<T*>(ptr[st.dst] + st.dlo * out_row);
          const T* src = reinterpret_cast<const T*>(ptr[st.src] + st.slo * out_row);
          const int64_t elems = (st.dhi - st.dlo) * n, stride = st.stride * n;
          constexpr int kVec = 16 / sizeof(T);
          const bool vec = elems % kVec == 0 && stride % kVec == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(src) % 16 == 0;
          const int64_t items = vec ? elems / kVec : elems;
          const int grid = static_cast<int>(items / 256 + 1 < 1024 ? items / 256 + 1 : 1024);
          ce_reduce<T><<<grid, 256, 0, static_cast<cudaStream_t>(on)>>>(dst, src, stride, st.count, elems, vec);
          rc = launched("reduce", msg, len);
          break;
        }
        default: rc = fail(msg, len, "%s: copy-engine step kind %d", Op::kName, st.kind);
      }
      if (rc) return abandon(p, stream, &st == &p.steps.front(), msg, len);
    }
    return 0;
  }

  // Diagnostics: this rank's copy-engine words (entry epochs by rank, then the flags) and its epoch,
  // read on a stream of their own (no wait for work queued elsewhere, a stuck wait included).
  static int ce_words(uint64_t* out, int n, int* count, char* msg, int len) {
    if (!g.ready || !g.ce_sig) return fail(msg, len, "%s: no copy-engine words (not initialised, or not a GEMM op)", Op::kName);
    if (n < CeSignals<Op>::kWords + 1) return fail(msg, len, "%s: ce_words needs %d words", Op::kName, CeSignals<Op>::kWords + 1);
    cudaStream_t s = nullptr;
    cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaMemcpyAsync(out, g.ce_sig, CeSignals<Op>::kWords * sizeof(uint64_t), cudaMemcpyDeviceToHost, s);
    if (e == cudaSuccess) e = cudaMemcpyAsync(out + CeSignals<Op>::kWords, g.epoch_dev, sizeof(uint64_t), cudaMemcpyDeviceToHost, s);
    if (e == cudaSuccess) e = cudaStreamSynchronize(s);
    if (s) cudaStreamDestroy(s);
    *count = CeSignals<Op>::kWords + 1;
    return e == cudaSuccess ? 0 : fail(msg, len, "%s: ce_words: %s", Op::kName, cudaGetErrorString(e));
  }

  // A call that failed at a step: the copy streams are joined back (a CUDA graph capture must end
  // joined) and, if anything was issued, the op is unusable (peers may have been signalled or be
  // waiting for this rank's flags); the step's message says so.
  static int abandon(const CeProgram& p, void* stream, bool first, char* msg, int len) {
    for (int i = 0; i < p.copies; ++i) {
      char ignored[8];
      if (g.ce_copy[i]) join(stream, g.ce_copy[i], ignored, sizeof ignored);
    }
    cudaGetLastError();
    if (first) return 1;
    g.poisoned = true;
    const size_t used = strlen(msg);
    if (used + 1 < static_cast<size_t>(len))
      snprintf(msg + used, len - used, " (the call stopped midway: this op is unusable now, restart the job)");
    return 1;
  }

  // For the fused GEMM of the call run() just prepared: where its flags are, the epoch, the chunk
  // order and the layout, checked against the GEMM's view of the rows.
  static int chunk_sync(fused::ChunkSync* out, int64_t rows, int tile_m, int tiles_n, int64_t row_bytes, uint64_t timeout_ns,
                        int* comm_ctas, char* msg, int len) {
    if (!g.ready || !g.prepared) return fail(msg, len, "%s: fused GEMM before run() prepared the communication", Op::kName);
    if (g.world > fused::kMaxChunks) return fail(msg, len, "%s: world %d exceeds %d chunks", Op::kName, g.world, fused::kMaxChunks);
    if (rows * row_bytes != g.last_shard)
      return fail(msg, len, "%s: fused GEMM of %lld rows x %lld B does not match the communication's %lld-byte chunks",
                  Op::kName, static_cast<long long>(rows), static_cast<long long>(row_bytes),
                  static_cast<long long>(g.last_shard));
    fused::ChunkSync s{};
    s.mode = Op::kGemm == Gemm::kConsume ? fused::kWaitRows : fused::kPublishParts;
    s.world = g.world;
    for (int i = 0; i < g.world; ++i) s.order[i] = g.last_variant->order[g.rank][i];
    s.rows = static_cast<int>(rows);
    s.tile_m = tile_m;
    s.tiles_n = tiles_n;
    s.parts = g.last_parts;
    s.per_tile = Op::kPerTile ? 1 : 0;
    s.row_bytes = row_bytes;
    s.shard = g.last_shard;
    s.part = g.last_part;
    s.tile = g.last_tile;
    s.sig = g.sig;
    s.flag_base = signals<Op>().flag(kOut, 0, 0);
    s.flag_stride = Op::kMaxTiles;
    s.in_flag_base = signals<Op>().flag(kIn, 0, 0);
    s.counters = g.counters;
    s.epoch = g.epoch_dev;
    s.wait = wait_ctx(timeout_ns);
    *out = s;
    *comm_ctas = g.last_grid;
    return 0;
  }
};

}  // namespace coll
}  // namespace tilegen

// The op library's C interface (its binding and fused GEMM call these). One op per library.
#define TILEGEN_EXPORT_COLLECTIVE(OP)                                                                                      \
  extern "C" {                                                                                                            \
  int tilegen_op_init(char* msg, int len) { return tilegen::coll::Host<OP>::init(msg, len); }                             \
  int tilegen_op_release(char* msg, int len) { return tilegen::coll::Host<OP>::release(msg, len); }                       \
  int tilegen_op_world(void) { return tilegen::coll::Host<OP>::g.ready ? tilegen::coll::Host<OP>::g.world : 0; }           \
  int tilegen_op_rank(void) { return tilegen::coll::Host<OP>::g.ready ? tilegen::coll::Host<OP>::g.rank : -1; }            \
  int tilegen_op_is_symmetric(const void* ptr, int64_t bytes) { return tilegen::coll::Host<OP>::is_symmetric(ptr, bytes); } \
  int tilegen_op_run(const void* in, void* out, int64_t in_bytes, int root, void* stream, uint64_t timeout_ns, int defer,  \
                     char* msg, int len) {                                                                                \
    return tilegen::coll::Host<OP>::run(in, out, in_bytes, root, stream, timeout_ns, defer, msg, len);                     \
  }                                                                                                                       \
  int tilegen_op_launch_pending(void* stream, char* msg, int len) {                                                       \
    return tilegen::coll::Host<OP>::launch_pending(stream, msg, len);                                                     \
  }                                                                                                                       \
  int tilegen_op_wait_error(char* msg, int len) { return tilegen::coll::Host<OP>::wait_error(msg, len); }                 \
  void tilegen_op_nvshmem_versions(int* compiled, int* runtime) {                                                         \
    *compiled = NVSHMEM_VENDOR_MAJOR_VERSION * 10000 + NVSHMEM_VENDOR_MINOR_VERSION * 100 + NVSHMEM_VENDOR_PATCH_VERSION;  \
    int maj = 0, min = 0, patch = 0;                                                                                      \
    nvshmemx_vendor_get_version_info(&maj, &min, &patch);                                                                 \
    *runtime = maj * 10000 + min * 100 + patch;                                                                           \
  }                                                                                                                       \
  int tilegen_op_begin(void* stream, char* msg, int len) { return tilegen::coll::Host<OP>::begin(stream, msg, len); }     \
  int tilegen_op_signal_chunk(int chunk, void* stream, char* msg, int len) {                                              \
    return tilegen::coll::Host<OP>::signal_chunk_after(chunk, stream, msg, len);                                          \
  }                                                                                                                       \
  int tilegen_op_wait_chunk(int chunk, void* stream, uint64_t timeout_ns, char* msg, int len) {                           \
    return tilegen::coll::Host<OP>::wait_chunk_on(chunk, stream, timeout_ns, msg, len);                                   \
  }                                                                                                                       \
  int tilegen_op_compute_order(int* out) { return tilegen::coll::Host<OP>::compute_order(out); }                          \
  int tilegen_op_ce_begin(void* stream, uint64_t timeout_ns, char* msg, int len) {                                        \
    return tilegen::coll::Host<OP>::ce_begin_call(stream, timeout_ns, msg, len);                                          \
  }                                                                                                                       \
  int tilegen_op_ce_put(const void* src, void* dst, int64_t bytes, int peer, int flag, void* stream, char* msg, int len) { \
    return tilegen::coll::Host<OP>::ce_put(src, dst, bytes, peer, flag, stream, msg, len);                                \
  }                                                                                                                       \
  int tilegen_op_ce_get(void* dst, const void* src, int64_t bytes, int peer, void* stream, char* msg, int len) {         \
    return tilegen::coll::Host<OP>::ce_get(dst, src, bytes, peer, stream, msg, len);                                      \
  }                                                                                                                       \
  int tilegen_op_ce_signal(int peer, int flag, void* stream, char* msg, int len) {                                        \
    return tilegen::coll::Host<OP>::ce_signal_peer(peer, flag, stream, msg, len);                                         \
  }                                                                                                                       \
  int tilegen_op_join(void* waiter, void* producer, char* msg, int len) {                                                 \
    return tilegen::coll::Host<OP>::join(waiter, producer, msg, len);                                                     \
  }                                                                                                                       \
  int tilegen_op_ce_wait(int flag, void* stream, uint64_t timeout_ns, char* msg, int len) {                              \
    return tilegen::coll::Host<OP>::ce_wait_flag(flag, stream, timeout_ns, msg, len);                                     \
  }                                                                                                                       \
  int tilegen_op_ce_program(int64_t key, const int64_t* steps, int64_t n, char* msg, int len) {                         \
    return tilegen::coll::Host<OP>::ce_set_program(key, steps, n, msg, len);                                              \
  }                                                                                                                       \
  int tilegen_op_ce_run(int64_t key, char* const* ptr, const int64_t* rows, const int64_t* row_bytes, const void* b,     \
                        int64_t n, int64_t k, int b_kn, void* stream, uint64_t timeout_ns, char* msg, int len) {          \
    return tilegen::coll::Host<OP>::ce_run(key, ptr, rows, row_bytes, b, n, k, b_kn, stream, timeout_ns, msg, len);       \
  }                                                                                                                       \
  int tilegen_op_tune(int ctas, int64_t tile, char* msg, int len) { return tilegen::coll::Host<OP>::tune(ctas, tile, msg, len); } \
  int tilegen_op_ce_words(uint64_t* out, int n, int* count, char* msg, int len) {                                       \
    return tilegen::coll::Host<OP>::ce_words(out, n, count, msg, len);                                                    \
  }                                                                                                                       \
  int tilegen_op_chunk_sync(tilegen::fused::ChunkSync* out, int64_t rows, int tile_m, int tiles_n, int64_t row_bytes,     \
                            uint64_t timeout_ns, int* comm_ctas, char* msg, int len) {                                    \
    return tilegen::coll::Host<OP>::chunk_sync(out, rows, tile_m, tiles_n, row_bytes, timeout_ns, comm_ctas, msg, len);  \
  }                                                                                                                       \
  }
