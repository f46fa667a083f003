// tilegen collective layer, host side: one op's symmetric state and calls (variant choice, launch,
// tuning). Ext adds a family's own state and steps at fixed points of init, run and release (its
// hooks: NoOverlap below):
// NoOverlap for the collective ops, overlap/host.cuh's GemmHost for the GEMM ops. Both export
// through TILEGEN_EXPORT_COLLECTIVE under fixed names (tilegen_op_*): every op is its own shared
// library, built with hidden visibility.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include "tilegen/collective/kernel.cuh"
#include "tilegen/collective/layout.cuh"
#include "tilegen/common/cuda_check.h"
#include "tilegen/common/host_msg.h"
#include "tilegen/host/base.cuh"

namespace tilegen {
namespace coll {

// A collective op's state.
template <class Op>
struct State : host::Common {
  // the plan and its programs
  const WorldPlan<Op>* plan = nullptr;
  typename Op::Step* steps = nullptr;  // every variant's step table of this world, in device memory
  int max_grid = 0;                    // CTAs that are all resident at once (GEMM ops: leaving the GEMMs SMs)
  // symmetric buffers, and the peers' addresses of them over NVLink (null: NVSHMEM)
  uint64_t* sig = nullptr;
  uint64_t* sig_peer[Op::kMaxWorld] = {};
  char* scr = nullptr;
  char* scr_peer[Op::kMaxWorld] = {};
  char* stage = nullptr;
  char* ll = nullptr;  // LL schedules' scratch (kLLBytes)
  char* ll_peer[Op::kMaxWorld] = {};
  bool ll_ok = false;  // every peer's LL scratch is load/store reachable
  uint64_t* state = nullptr;  // local: epoch, exit counter, step counters (Params::state), grid barrier
  char* acc = nullptr;        // epilogue ops: the buffer they reduce into (symmetric, kAccBytes)
  // the last call's output and its peers' addresses (nvshmem_ptr is a lookup: once per output buffer)
  const void* last_out = nullptr;
  char* out_peer[Op::kMaxWorld] = {};
  // a call run(..., defer) prepared, which launch_pending() issues
  bool has_pending = false;
  int pending_grid = 0, pending_dtype = 0;
  Params<Op> pending{};
  // tilegen tune: CTAs and tile bytes for every call instead of the variant's (0: its own)
  int tune_ctas = 0;
  int64_t tune_tile = 0;
};

// A collective op's Ext: nothing beyond the collective.
// Ext's hooks: on_alloc (init, before the device sync and the barrier: its symmetric words zeroed),
// on_load (its kernels, loaded with the collective kernel), on_attach (init, after the barrier: peers'
// addresses), on_prepare (run(), before the launch: the call's Params and layout), on_release.
// kBesideGemms: the kernel spins beside GEMMs, which get half the SMs.
struct NoOverlap {
  static constexpr bool kBesideGemms = false;
  static int on_alloc(char*, int) { return 0; }
  static cudaError_t on_load() { return cudaSuccess; }
  static int on_attach(char*, int) { return 0; }
  template <class Op>
  static int on_prepare(Params<Op>&, const Variant<Op>&, int, char*, int) { return 0; }
  static void on_release() {}
};

// Op with element type E: the kernel a call of that type runs. Its Params are Op's, member for member
// (nothing in them depends on the element type), so a call's Params pass as they are.
template <class Op, class E>
struct WithElem : Op {
  using Elem = E;
};

// An epilogue op's call operands (collective/epilogue.cuh's Param), checked by the binding.
struct EpilogueArgs {
  void* y;
  void* residual;
  const void* weight;
  float* scales;
  int64_t rows, hidden;
};

template <class Op, class Ext = NoOverlap>
struct Host : host::Base<Op, State<Op>> {
  using B = host::Base<Op, State<Op>>;
  using B::g;
  using B::launched;
  using B::usable;
  using B::wait_ctx;
  static constexpr int kStateWords = 2 + Op::kMaxSteps + 2;  // (the last two: the epilogue's grid barrier)

  // The checker proves the schedules deadlock-free with every CTA running: launch no more CTAs than
  // can be resident at once. A GEMM op's kernel spins beside GEMMs (which it may wait for): leave them
  // SMs even when each CTA takes an SM of its own.
  static cudaError_t resident_grid(int* max_grid) {
    int sms = 0, per_sm = 1 << 30;
    cudaError_t e = host::resident_sms(&sms);
    for (int i = 0; i < Op::kDtypes && e == cudaSuccess; ++i)  // the least resident of the element types' kernels
      e = Op::with_elem(i, [&](auto* tag) {
        using E = std::remove_pointer_t<decltype(tag)>;
        int n = 0;
        const cudaError_t r = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel<WithElem<Op, E>>, Op::kThreads, 0);
        per_sm = n < per_sm ? n : per_sm;
        return r;
      });
    *max_grid = per_sm * sms;
    if (Ext::kBesideGemms && *max_grid > sms / 2) *max_grid = sms / 2;
    return e;
  }

  // Collective: every rank calls it once (NVSHMEM must already be initialised, e.g. by nvshmem4py).
  // The world's group, in slot 0.
  static int init(char* msg, int len) {
    if (B::slots[0].allocated) return 0;
    int pes[host::kMaxPes];
    const int n = B::world_pes(pes);
    if (n > Op::kMaxWorld) return fail(msg, len, "%s: NVSHMEM has %d PEs; this op was generated for world sizes %s",
                                       Op::kName, n, Op::kWorldSizes);
    return init_group(0, n, pes, msg, len);
  }

  // Collective over every PE: sets up group slot `slot` (this PE's group: pes[0, size), or size 0) and
  // makes it current. A slot's first set-up allocates its symmetric buffers on every PE; a later one
  // (another group, disjoint from the slot's others) only joins.
  static int init_group(int slot, int size, const int* pes, char* msg, int len) {
    if (B::attach(slot, size, pes, msg, len)) return 1;
    const bool fresh = !g->allocated;  // every PE allocates a new slot together; a join is its members' alone
    if (fresh && allocate(msg, len)) return 1;
    const int rc = size ? join(msg, len) : 0;  // (its error after the barrier: the other PEs wait in it)
    if (cudaDeviceSynchronize() != cudaSuccess && !rc)
      return fail(msg, len, "%s: setting up group slot %d: %s", Op::kName, slot, cudaGetErrorString(cudaGetLastError()));
    if (fresh) nvshmem_barrier_all();  // every rank's signals are zero before anyone signals (a join: the caller's barrier)
    return rc;
  }

  // Collective: the slot's symmetric buffers (sizes are the op's constants, the same on every PE,
  // member or not), zeroed (init_group's barrier follows).
  static int allocate(char* msg, int len) {
    const int64_t sig_words = signals<Op>().words();
    g->sig = static_cast<uint64_t*>(nvshmem_malloc(sig_words * sizeof(uint64_t)));
    g->scr = Op::kScrBytes ? static_cast<char*>(nvshmem_malloc(Op::kScrBytes)) : nullptr;
    g->stage = static_cast<char*>(nvshmem_malloc(Op::kStageBytes * Op::kMaxCtas));  // CTAs of the widest variant
    g->ll = Op::kLLBytes ? static_cast<char*>(nvshmem_malloc(Op::kLLBytes)) : nullptr;
    g->acc = Op::kAccBytes ? static_cast<char*>(nvshmem_malloc(Op::kAccBytes)) : nullptr;
    if (!g->sig || (Op::kScrBytes && !g->scr) || !g->stage || (Op::kLLBytes && !g->ll) || (Op::kAccBytes && !g->acc))
      return fail(msg, len,
                  "%s: nvshmem_malloc of %lld signal + %lld scratch + %lld epilogue bytes failed (raise "
                  "NVSHMEM_SYMMETRIC_SIZE)", Op::kName, static_cast<long long>(sig_words * 8),
                  static_cast<long long>(Op::kScrBytes), static_cast<long long>(Op::kAccBytes));
    g->allocated = true;
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMemset(g->sig, 0, sig_words * sizeof(uint64_t)));
    if (g->ll) TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMemset(g->ll, 0, Op::kLLBytes));  // flag 0: no call's
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMalloc(&g->state, kStateWords * sizeof(uint64_t)));
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMemset(g->state, 0, kStateWords * sizeof(uint64_t)));
    if (B::alloc_wait_report(msg, len) || Ext::on_alloc(msg, len)) return 1;
    return 0;
  }

  // This PE's part (local): the plan of its group's size, kernels, peers' addresses.
  static int join(char* msg, int len) {
    g->plan = Op::plan(g->world);
    if (!g->plan) return B::unsupported_world(msg, len);
    if (upload_steps(msg, len)) return 1;
    cudaError_t e = cudaSuccess;
    for (int i = 0; i < Op::kDtypes && e == cudaSuccess; ++i)
      e = Op::with_elem(i, [](auto* tag) { return host::load_kernels(kernel<WithElem<Op, std::remove_pointer_t<decltype(tag)>>>); });
    if (e == cudaSuccess) e = Ext::on_load();
    if (e != cudaSuccess) return fail(msg, len, "%s: loading kernels: %s", Op::kName, cudaGetErrorString(e));
    if (resident_grid(&g->max_grid) != cudaSuccess || g->max_grid < 1)
      return fail(msg, len, "%s: the kernel cannot run %d threads per CTA here", Op::kName, Op::kThreads);
    for (int q = 0; q < g->world; ++q) {
      g->sig_peer[q] = Op::kAllowPeerPtr ? B::peer(g->sig, q) : nullptr;
      g->scr_peer[q] = (Op::kAllowPeerPtr && g->scr) ? B::peer(g->scr, q) : nullptr;
      g->ll_peer[q] = (Op::kAllowPeerPtr && g->ll) ? B::peer(g->ll, q) : nullptr;
      if (Op::kRequirePeerPtr && !g->sig_peer[q])
        return fail(msg, len, "%s: transport nvlink, but rank %d is not load/store reachable from rank %d (use transport: auto)",
                    Op::kName, q, g->rank);
    }
    if (Ext::on_attach(msg, len)) return 1;
    g->ll_ok = g->ll != nullptr;
    for (int q = 0; q < g->world; ++q) g->ll_ok &= q == g->rank || g->ll_peer[q] != nullptr;
    g->ready = true;
    return 0;
  }

  // Every variant's step tables of this world into device memory once: a launch then passes a
  // pointer, not the program (launch parameters of several KB cost microseconds per call).
  static int upload_steps(char* msg, int len) {
    const int64_t per_rank = Op::kMaxSteps, per_variant = per_rank * g->world;
    TILEGEN_CUDA_CHECK(Op::kName, msg, len,
                       cudaMalloc(&g->steps, g->plan->nvariants * per_variant * sizeof(typename Op::Step)));
    for (int v = 0; v < g->plan->nvariants; ++v)
      TILEGEN_CUDA_CHECK(Op::kName, msg, len,
                         cudaMemcpy(g->steps + v * per_variant, g->plan->variants[v].table,
                                    per_variant * sizeof(typename Op::Step), cudaMemcpyHostToDevice));
    return 0;
  }

  // Collective teardown of every slot (before NVSHMEM is finalised).
  static int release(char*, int) {
    if (!B::slots[0].allocated) return 0;
    cudaDeviceSynchronize();
    B::release_slots([] {
      nvshmem_free(g->sig);
      if (g->scr) nvshmem_free(g->scr);
      nvshmem_free(g->stage);
      if (g->ll) nvshmem_free(g->ll);
      if (g->acc) nvshmem_free(g->acc);
      Ext::on_release();
      cudaFree(g->steps);
      cudaFree(g->state);
      B::release_common();
    });
    return 0;
  }

  // True when [ptr, ptr + bytes) lies in this rank's symmetric heap.
  static int is_symmetric(const void* ptr, int64_t bytes) {
    if (!g->ready || bytes <= 0) return 0;
    static const void* last_ptr = nullptr;  // apps call with the same output again and again
    static int64_t last_bytes = 0;
    if (ptr == last_ptr && bytes == last_bytes) return 1;
    const char* p = static_cast<const char*>(ptr);
    const int me = nvshmem_my_pe();
    const int yes = nvshmem_ptr(p, me) != nullptr && nvshmem_ptr(p + bytes - 1, me) != nullptr;
    if (yes) last_ptr = ptr, last_bytes = bytes;
    return yes;
  }

  // in: in_bytes; out: as the op defines. Arguments were validated by the binding. defer: prepare
  // the call (checks, layout) and leave the launch to launch_pending().
  // dtype: the index of the call's element type among the op's (Op::with_elem). Epilogue ops take
  // their operands in `e` (and reduce into their own buffer: `out` is ignored).
  static int run(const void* in, void* out, int64_t in_bytes, int dtype, int root, float scale, void* stream,
                 uint64_t timeout_ns, int defer, char* msg, int len, const EpilogueArgs* e = nullptr) {
    if (usable(msg, len)) return 1;
    if (Op::kEpilogue != (e != nullptr))
      return fail(msg, len, Op::kEpilogue ? "%s: this op has an epilogue: call run_epilogue" : "%s: this op has no epilogue",
                  Op::kName);
    if constexpr (Op::kEpilogue) out = g->acc;
    if (dtype < 0 || dtype >= Op::kDtypes)
      return fail(msg, len, "%s: element type %d outside [0, %d)", Op::kName, dtype, Op::kDtypes);
    if (in_bytes <= 0 || in_bytes > Op::kMaxInBytes)
      return fail(msg, len, "%s: input of %lld bytes outside (0, %lld]", Op::kName, static_cast<long long>(in_bytes),
                  static_cast<long long>(Op::kMaxInBytes));
    if (root < 0 || root >= g->world) return fail(msg, len, "%s: root %d outside [0, %d)", Op::kName, root, g->world);
    int vi = 0;  // the first variant for this size; LL ones only where every peer's LL scratch is reachable
    while (vi + 1 < g->plan->nvariants &&
           (in_bytes > g->plan->variants[vi].max_in_bytes || (g->plan->variants[vi].ll && !g->ll_ok)))
      ++vi;
    const Variant<Op>& v = g->plan->variants[vi];
    if (v.ll && !g->ll_ok)
      return fail(msg, len, "%s: this size's only schedule is LL, which needs every peer load/store reachable", Op::kName);
    if (out != g->last_out) {  // nvshmem_ptr is a lookup: once per output buffer, not per call
      for (int q = 0; q < g->world; ++q)
        g->out_peer[q] = (q == g->rank || !Op::kAllowPeerPtr) ? nullptr : B::peer(static_cast<char*>(out), q);
      g->last_out = out;
    }
    Params<Op> p{};
    if constexpr (Op::kReduceOp == dev::kReducePreMulSum) p.scale = scale;
    p.in = static_cast<const char*>(in);
    p.out = static_cast<char*>(out);
    p.scr = g->scr;
    p.stage = g->stage;
    p.ll = g->ll;
    for (int q = 0; q < g->world; ++q) {
      p.out_peer[q] = g->out_peer[q];
      p.scr_peer[q] = q == g->rank ? nullptr : g->scr_peer[q];
      p.sig_peer[q] = g->sig_peer[q];
      p.ll_peer[q] = g->ll_peer[q];
      p.pe[q] = static_cast<int16_t>(g->pe[q]);
    }
    p.sig = g->sig;
    p.state = g->state;
    p.in_bytes = in_bytes;
    p.parts = v.parts;
    layout::shard_and_part(Op::kChunks, in_bytes, g->world, v.parts, Op::kElemBytes[dtype], &p.shard, &p.part);
    const int ctas = g->tune_ctas > 0 ? g->tune_ctas : v.ctas;
    p.tile = layout::tile_size(p.part, g->tune_tile > 0 ? g->tune_tile : v.tile_bytes, ctas);
    // LL: one thread per 16-byte line of a part (tiles play no part); others: one CTA per tile at most
    const int64_t ntiles = v.ll ? ((p.part + 7) / 8 + Op::kThreads - 1) / Op::kThreads : (p.part + p.tile - 1) / p.tile;
    if (!v.ll && ntiles > Op::kMaxTiles)
      return fail(msg, len, "%s: %lld tiles exceed the %lld signal slots", Op::kName, static_cast<long long>(ntiles),
                  static_cast<long long>(Op::kMaxTiles));
    p.rank = g->rank;
    p.world = g->world;
    p.root = root;
    p.nsteps = v.nsteps;
    p.is_ll = v.ll;
    p.wait = wait_ctx(timeout_ns);
    if constexpr (Op::kEpilogue) {
      p.y = static_cast<char*>(e->y);
      p.residual = static_cast<char*>(e->residual);
      p.weight = static_cast<const char*>(e->weight);
      p.scales = e->scales;
      p.rows = e->rows;
      p.hidden = e->hidden;
      p.bar = g->state + 2 + Op::kMaxSteps;
    }
    const int rel = (g->rank - root + g->world) % g->world;
    p.steps = g->steps + (static_cast<int64_t>(vi) * g->world + rel) * Op::kMaxSteps;
    int grid = static_cast<int>(ntiles < ctas ? (ntiles > 0 ? ntiles : 1) : ctas);
    grid = grid < g->max_grid ? grid : g->max_grid;
    if (Ext::on_prepare(p, v, grid, msg, len)) return 1;
    if (defer) {  // launched by launch_pending() after the producers are queued
      g->pending = p;
      g->pending_grid = grid;
      g->pending_dtype = dtype;
      g->has_pending = true;
      return 0;
    }
    return launch(p, grid, dtype, stream, msg, len);
  }

  static int launch(const Params<Op>& p, int grid, int dtype, void* stream, char* msg, int len) {
    const int launched = Op::with_elem(dtype, [&](auto* tag) {
      using K = WithElem<Op, std::remove_pointer_t<decltype(tag)>>;
      static_assert(sizeof(Params<K>) == sizeof(Params<Op>) && std::is_trivially_copyable_v<Params<Op>>);
      Params<K> q;
      std::memcpy(&q, &p, sizeof q);
      if constexpr (Op::kEpilogue) {
        // The epilogue's grid barrier needs every CTA resident at once: a cooperative launch guarantees
        // it (or fails to launch) where an ordinary one only makes it likely (ranks sharing a GPU under
        // MPS hung without it: some CTAs waited at the barrier for others that had no SM).
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(grid);
        cfg.blockDim = dim3(Op::kThreads);
        cfg.stream = static_cast<cudaStream_t>(stream);
        cudaLaunchAttribute coop[1];
        coop[0].id = cudaLaunchAttributeCooperative;
        coop[0].val.cooperative = 1;
        cfg.attrs = coop;
        cfg.numAttrs = 1;
        cudaError_t r = cudaLaunchKernelEx(&cfg, kernel<K>, q);
        while (r == cudaErrorCooperativeLaunchTooLarge && cfg.gridDim.x > 1) {  // fewer SMs than the count said
          (void)cudaGetLastError();
          cfg.gridDim.x /= 2;  // (every grid serves: CTAs stride over tiles and rows)
          g->max_grid = static_cast<int>(cfg.gridDim.x);
          r = cudaLaunchKernelEx(&cfg, kernel<K>, q);
        }
        return static_cast<int>(r);
      } else {
        kernel<K><<<grid, Op::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(q);
        return 0;
      }
    });
    const cudaError_t last = cudaGetLastError();  // (also clears what a failed launch left)
    const cudaError_t e = launched ? static_cast<cudaError_t>(launched) : last;
    return e == cudaSuccess ? 0 : fail(msg, len, "%s: launch of %d CTAs failed: %s", Op::kName, grid, cudaGetErrorString(e));
  }

  static int launch_pending(void* stream, char* msg, int len) {
    if (!g->has_pending) return fail(msg, len, "%s: no prepared call to launch", Op::kName);
    g->has_pending = false;
    return launch(g->pending, g->pending_grid, g->pending_dtype, stream, msg, len);
  }

  // tilegen tune: run every call with `ctas` CTAs and tiles of `tile_bytes` (0: the plan's).
  static int tune(int ctas, int64_t tile_bytes, char* msg, int len) {
    if (ctas < 0 || tile_bytes < 0 || (tile_bytes && tile_bytes % 16))
      return fail(msg, len, "%s: tune(%d CTAs, %lld-byte tiles): expected >= 0 and tiles of 16-byte multiples", Op::kName,
                  ctas, static_cast<long long>(tile_bytes));
    g->tune_ctas = ctas;
    g->tune_tile = tile_bytes;
    return 0;
  }

  static int wait_error(char* msg, int len) { return B::wait_error(msg, len); }
};

}  // namespace coll
}  // namespace tilegen

// The C entry points of every collective-kernel op (HOST: its Host class); the GEMM ops' others are
// overlap/op.cuh's.
#define TILEGEN_EXPORT_COLLECTIVE_CALLS(HOST)                                                                         \
  int tilegen_op_init(char* msg, int len) { return HOST::init(msg, len); }                                            \
  int tilegen_op_init_group(int slot, int alloc_world, int size, const int* pes, char* msg, int len) {                \
    (void)alloc_world; /* a collective's symmetric sizes do not depend on the group's */                              \
    return HOST::init_group(slot, size, pes, msg, len);                                                               \
  }                                                                                                                   \
  int tilegen_op_select(int slot, char* msg, int len) { return HOST::select(slot, msg, len); }                        \
  int tilegen_op_release(char* msg, int len) { return HOST::release(msg, len); }                                      \
  int tilegen_op_world(void) { return HOST::g->ready ? HOST::g->world : 0; }                                            \
  int tilegen_op_rank(void) { return HOST::g->ready ? HOST::g->rank : -1; }                                             \
  int tilegen_op_is_symmetric(const void* ptr, int64_t bytes) { return HOST::is_symmetric(ptr, bytes); }              \
  int tilegen_op_run(const void* in, void* out, int64_t in_bytes, int dtype, int root, float scale, void* stream,     \
                     uint64_t timeout_ns, int defer, char* msg, int len) {                                            \
    return HOST::run(in, out, in_bytes, dtype, root, scale, stream, timeout_ns, defer, msg, len);                     \
  }                                                                                                                   \
  int tilegen_op_launch_pending(void* stream, char* msg, int len) { return HOST::launch_pending(stream, msg, len); }  \
  int tilegen_op_run_epilogue(const void* in, void* y, void* residual, const void* weight, float* scales,             \
                              int64_t in_bytes, int64_t rows, int64_t hidden, int dtype, void* stream,                 \
                              uint64_t timeout_ns, char* msg, int len) {                                              \
    const tilegen::coll::EpilogueArgs e{y, residual, weight, scales, rows, hidden};                                   \
    return HOST::run(in, nullptr, in_bytes, dtype, 0, 1.f, stream, timeout_ns, 0, msg, len, &e);                      \
  }                                                                                                                   \
  int tilegen_op_wait_error(char* msg, int len) { return HOST::wait_error(msg, len); }                                \
  int tilegen_op_tune(int ctas, int64_t tile, char* msg, int len) { return HOST::tune(ctas, tile, msg, len); }        \
  TILEGEN_EXPORT_NVSHMEM_VERSIONS()
