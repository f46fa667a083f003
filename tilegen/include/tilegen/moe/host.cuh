// tilegen MoE layer, host side: a MoE op's symmetric state and calls (both modes' dispatch and combine,
// profiling), on the shared host base (host/base.cuh). Exported by moe/op.cuh's TILEGEN_EXPORT_MOE.
#pragma once
#include <cstdint>
#include <cstring>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include "tilegen/common/cuda_check.h"
#include "tilegen/common/host_msg.h"
#include "tilegen/host/base.cuh"
#include "tilegen/moe/combine.cuh"
#include "tilegen/moe/flags.cuh"
#include "tilegen/moe/layout.cuh"
#include "tilegen/moe/low_latency.cuh"
#include "tilegen/moe/normal.cuh"
#include "tilegen/moe/trace.cuh"

namespace tilegen {
namespace moe {

struct Half {  // one call parity's symmetric buffers
  char* stage;
  int32_t* meta;
  int32_t* info;
  char* back;
};

// A MoE op's state.
template <class Op>
struct State : host::Common {
  int local = 0;                // experts per rank
  int resident[kKernels] = {};  // CTAs of each copy kernel the GPU holds at once (its own occupancy)
  bool early_launch = false;    // programmatic dependent launch (compute capability 9.0 and newer)
  char* sym = nullptr;  // one symmetric allocation: both halves, the flags, then (low-latency mode) the outputs
  Half half[2] = {};
  char* ll = nullptr;  // low-latency mode: this rank's outputs, written by every source (ll_layout)
  LLLayout lay{};
  uint64_t* dflag = nullptr;  // [world]: each source's dispatch epoch
  uint64_t* cflag = nullptr;  // [world]: each sender's combine epoch
  int32_t* scratch = nullptr; // routing: hist, rib, ribd, totals
  uint64_t* counters = nullptr;  // blocks arrived (dispatch push, combine send, routing)
  uint64_t dispatch_epoch = 0, combine_epoch = 0;
  int64_t last_stage_rows = -1, last_rows = -1;
  int32_t* counts_host = nullptr;  // host-mapped [world][local + 1]
  int32_t* counts_dev = nullptr;
  cudaEvent_t done = nullptr;
  uint64_t* trace = nullptr;      // what launches pass for phase stamps: trace_buf while profiling, else null
  uint64_t* trace_buf = nullptr;  // allocated by the first set_trace(1), kept until release (a graph
                                  // captured while profiling keeps stamping into it)
};

template <class Op>
struct Host : host::Base<Op, State<Op>> {
  using B = host::Base<Op, State<Op>>;
  using B::g;
  using B::launched;
  using B::peer;
  using B::usable;
  using B::wait_ctx;
  using D = Dims<Op>;
  static constexpr int W = Op::kMaxWorld, E = Op::kExperts, K = Op::kTopk;
  static constexpr int64_t T = Op::kMaxTokens;

  static int64_t half_bytes(int world) {
    const int64_t stage = world * T * D::kStageRowBytes, meta = world * T * D::kMeta * 4, info = world * (E + 1) * 4;
    const int64_t back = world * T * D::kRowBytes;
    return align(stage) + align(meta) + align(info) + align(back);
  }
  static int64_t align(int64_t b) { return (b + 255) / 256 * 256; }
  // Low-latency mode's outputs: recv rows [L][world][T] (fp8: e4m3 bytes, scales [rows][groups]), the
  // handle of each row, combine's state per staging row [world][T] (slot rows, source and token,
  // weights), counts [L][world], tokens from each source; then the line rows [world][T] and heads [world]
  // the other ranks send (zeroed once: no call's epoch).
  static LLLayout ll_layout(int world) {
    LLLayout l{};
    if (!Op::kLowLatency) return l;
    const int64_t rows = static_cast<int64_t>(E / world) * world * T, srows = world * T;
    int64_t at = 0;
    const auto take = [&at](int64_t bytes) { const int64_t o = at; at += align(bytes); return o; };
    l.out = take(rows * D::kOutRowBytes);
    l.scales = take(rows * D::kGroups * 4);
    l.handle = take(rows * 3 * 4);
    l.slot_rows = take(srows * K * 4);
    l.stage_src = take(srows * 2 * 4);
    l.stage_w = take(srows * K * 4);
    l.counts = take(static_cast<int64_t>(E / world) * world * 4);
    l.ntok = take(world * 4);
    l.lines = take(srows * LLLines<Op>::kRowBytes);
    l.heads = take(world * LLLines<Op>::kHeadBytes);
    l.bytes = at;
    return l;
  }
  // The op's symmetric allocation at `world` ranks (KernelSpec.moe_symmetric_bytes says the same).
  static int64_t symmetric_bytes(int world) {
    const int64_t halves_and_flags = 2 * half_bytes(world) + 2 * W * 8;
    return Op::kLowLatency ? align(halves_and_flags) + ll_layout(world).bytes : halves_and_flags;
  }
  static int blocks(int64_t m) { return static_cast<int>((m + kBlockTokens - 1) / kBlockTokens); }
  // Pieces of a row of `units` for `rows` rows: `base` pieces, more where fewer rows would leave warps
  // of kernel `k`'s resident CTAs idle, each at least `least` units (one per lane: a unit is a lane's) and
  // a multiple of `align` units.
  static Cut cut_for(int k, int64_t rows, int64_t units, int base, int64_t align, int64_t least = 32) {
    const int64_t resident = static_cast<int64_t>(g->resident[k]) * kWarps;
    int64_t want = rows > 0 ? (resident + rows - 1) / rows : 1;
    want = want > base ? want : base;
    int64_t per = (units + want - 1) / want;
    per = per > least ? per : least;
    per = (per + align - 1) / align * align;
    return Cut{static_cast<int>((units + per - 1) / per), per, units};
  }
  // Each kernel's pieces of its own row: the push's of a token (fp8 per-128: whole scale groups of 16
  // steps), the expansion's of a payload row, combine's (send and reduce) of a row of the token dtype.
  static Cut push_cut(int k, int64_t m) {
    constexpr int64_t align = D::kFp8 && Op::kFp8Group != Op::kHidden ? 16 : 1;
    return cut_for(k, m, D::kPushUnits, D::kPushPieces, align);
  }
  static Cut expand_cut(int64_t rows) { return cut_for(kExpand, rows, D::kExpandUnits, D::kExpandPieces, 1); }
  // The low-latency kernels' of a line row: its warp stores (a unit is the whole warp's).
  static Cut ll_cut(int k, int64_t rows) { return cut_for(k, rows, LLLines<Op>::kUnits, 1, 1, 1); }
  static Cut send_cut(int64_t rows) { return cut_for(kSend, rows, D::kCombineUnits, D::kCombinePieces, 1); }
  static Cut reduce_cut(int64_t rows) { return cut_for(kReduce, rows, D::kCombineUnits, D::kCombinePieces, 1); }
  // CTAs of kernel `k` for `rows` rows of `pieces` warp-sized pieces each: one warp per piece, at most
  // one wave of what the GPU holds of that kernel (a second wave would redo each CTA's waits and setup).
  static int grid_for(int k, int64_t rows, int pieces) {
    const int64_t want = (rows * pieces + kWarps - 1) / kWarps, cap = g->resident[k];
    return static_cast<int>(want < 1 ? 1 : (want < cap ? want : cap));
  }

  static bool supported_world(int world) {
    for (int w : Op::kWorlds)
      if (w == world) return true;
    return false;
  }

  // Collective: the world's group, in slot 0.
  static int init(char* msg, int len) {
    if (B::slots[0].allocated) return 0;
    int pes[host::kMaxPes];
    const int n = B::world_pes(pes);
    if (!supported_world(n))
      return fail(msg, len, "%s: NVSHMEM has %d PEs; this op was generated for world sizes %s", Op::kName, n,
                  Op::kWorldSizes);
    return init_group(0, n, n, pes, msg, len);
  }

  // Collective over every PE: sets up group slot `slot` and makes it current (this PE's group:
  // pes[0, size), or size 0). alloc_world: the largest group of the slot (the same on every PE), which
  // sizes the symmetric allocation; a later set-up of the slot (a disjoint group) only joins.
  static int init_group(int slot, int alloc_world, int size, const int* pes, char* msg, int len) {
    if (B::attach(slot, size, pes, msg, len)) return 1;
    if (size && !supported_world(size)) return B::unsupported_world(msg, len);  // (the runtime checked every PE's)
    const bool fresh = !g->allocated;  // every PE allocates a new slot together; a join is its members' alone
    if (fresh && allocate(alloc_world, msg, len)) return 1;
    const int rc = size ? join(msg, len) : 0;  // (its error after the barrier: the other PEs wait in it)
    if (cudaDeviceSynchronize() != cudaSuccess && !rc)
      return fail(msg, len, "%s: setting up group slot %d: %s", Op::kName, slot, cudaGetErrorString(cudaGetLastError()));
    if (fresh) nvshmem_barrier_all();  // every PE's words of the slot are initial before anyone signals (a join: the caller's barrier)
    return rc;
  }

  // The symmetric bytes a slot whose groups have at most `alloc_world` ranks takes: the most any of
  // the op's world sizes up to it needs (the layout is not monotonic in the world size).
  static int64_t slot_bytes(int alloc_world) {
    int64_t most = 0;
    for (int w : Op::kWorlds)
      if (w <= alloc_world && symmetric_bytes(w) > most) most = symmetric_bytes(w);
    return most;
  }

  // Collective: the slot's one symmetric allocation, the same size on every PE, zeroed.
  static int allocate(int alloc_world, char* msg, int len) {
    const int64_t total = slot_bytes(alloc_world);
    g->allocated = true;
    if (!total) return 0;  // no group of the slot has a size this op serves: nothing of it is used
    g->sym = static_cast<char*>(nvshmem_malloc(total));
    if (!g->sym)
      return fail(msg, len, "%s: nvshmem_malloc of %lld bytes (staging for %lld tokens of %lld bytes from up to %d ranks, "
                  "twice%s) failed: raise NVSHMEM_SYMMETRIC_SIZE", Op::kName, static_cast<long long>(total),
                  static_cast<long long>(T), static_cast<long long>(D::kStageRowBytes), alloc_world,
                  Op::kLowLatency ? ", and the received rows" : "");
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMemset(g->sym, 0, total));  // flags and counts: no call's
    return 0;
  }

  // This PE's part (local): its group's layout in the slot's allocation, buffers, kernels, peers.
  static int join(char* msg, int len) {
    g->local = E / g->world;
    const int64_t hb = half_bytes(g->world), flag_bytes = 2 * W * 8;
    for (int h = 0; h < 2; ++h) {
      char* p = g->sym + h * hb;
      g->half[h].stage = p;
      p += align(g->world * T * D::kStageRowBytes);
      g->half[h].meta = reinterpret_cast<int32_t*>(p);
      p += align(g->world * T * D::kMeta * 4);
      g->half[h].info = reinterpret_cast<int32_t*>(p);
      p += align(g->world * (E + 1) * 4);
      g->half[h].back = p;
    }
    g->dflag = reinterpret_cast<uint64_t*>(g->sym + 2 * hb);
    g->cflag = g->dflag + W;
    g->lay = ll_layout(g->world);
    g->ll = Op::kLowLatency ? g->sym + align(2 * hb + flag_bytes) : nullptr;
    const int64_t scratch_ints = blocks(T) * (E + W) + T * K + T * W + (E + W);
    if (g->ll)  // the handles start at -1 (no row)
      TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMemset(g->ll + g->lay.handle, 0xff, g->lay.slot_rows - g->lay.handle));
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMalloc(&g->scratch, scratch_ints * 4));
    constexpr size_t counter_bytes = 3 * sizeof(uint64_t);  // 3 arrival counters
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMalloc(&g->counters, counter_bytes));
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMemset(g->counters, 0, counter_bytes));
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaHostAlloc(&g->counts_host, W * (E + 1) * 4, cudaHostAllocMapped));
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaHostGetDevicePointer(&g->counts_dev, g->counts_host, 0));
    if (B::alloc_wait_report(msg, len)) return 1;
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaEventCreateWithFlags(&g->done, cudaEventDisableTiming));
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, load_kernels());
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, find_residency());
    for (int q = 0; q < g->world; ++q)
      if (!peer(g->sym, q))
        return fail(msg, len, "%s: rank %d is not load/store reachable from rank %d: MoE ops run over NVLink within "
                    "one node", Op::kName, q, g->rank);
    g->ready = true;
    return 0;
  }

  // Each copy kernel's resident CTAs on this process's SMs: its grid's cap and what its pieces are cut
  // for; and whether it launches kernels early.
  static cudaError_t find_residency() {
    int sms = 0, major = 0;
    cudaError_t e = host::device_sms(&sms, &major);
    if (e == cudaSuccess) e = host::resident_sms(&sms);  // (under MPS: this client's share)
    g->early_launch = major >= 9;
    const void* kernels[kKernels] = {reinterpret_cast<const void*>(push_tokens<Op>),
                                     reinterpret_cast<const void*>(expand_rows<Op>),
                                     reinterpret_cast<const void*>(combine_send<Op>),
                                     reinterpret_cast<const void*>(combine_reduce<Op>)};
    if constexpr (Op::kLowLatency) {  // (only low-latency ops have them: their routing fits shared memory)
      kernels[kLLPush] = reinterpret_cast<const void*>(ll_push<Op>);
      kernels[kLLExpand] = reinterpret_cast<const void*>(ll_expand<Op>);
    }
    for (int k = 0; k < kKernels && e == cudaSuccess; ++k) {
      if (!kernels[k]) continue;
      int per_sm = 0;
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernels[k], kWarps * 32, 0);
      g->resident[k] = sms * (per_sm > 0 ? per_sm : 1);
    }
    return e;
  }

  // Loads every kernel now (host::load_kernels: a lazily loaded one could wait for a spinning kernel
  // that waits for it).
  static cudaError_t load_kernels() {
    cudaError_t e = host::load_kernels(route_block<Op>, push_tokens<Op>, wait_counts<Op>, expand_rows<Op>,
                                       combine_send<Op>, combine_reduce<Op>);
    if constexpr (Op::kLowLatency)
      if (e == cudaSuccess) e = host::load_kernels(ll_push<Op>, ll_expand<Op>);
    return e;
  }

  // Collective teardown of every slot.
  static int release(char*, int) {
    if (!B::slots[0].allocated) return 0;
    cudaDeviceSynchronize();
    B::release_slots([] {
      if (g->sym) nvshmem_free(g->sym);
      if (g->ready) {
        cudaFree(g->scratch);
        cudaFree(g->counters);
        cudaFreeHost(g->counts_host);
        cudaEventDestroy(g->done);
        cudaFree(g->trace_buf);
      }
      B::release_common();
    });
    return 0;
  }

  // Profiling: calls launched (or captured) from now on stamp their phases into a device buffer (on),
  // or not (off: the buffer stays, for graphs captured while on). read_trace copies the stamps to
  // `out` (host, kTraceKernels * kTracePhases * kTraceCtas ns, 0 where none) after the device
  // finished, then clears them.
  static constexpr size_t kTraceBytes = size_t{kTraceKernels} * kTracePhases * kTraceCtas * sizeof(uint64_t);
  static int set_trace(int on, char* msg, int len) {
    if (usable(msg, len)) return 1;
    cudaError_t e = cudaDeviceSynchronize();
    if (e == cudaSuccess && on && !g->trace_buf) e = cudaMalloc(&g->trace_buf, kTraceBytes);
    if (e == cudaSuccess && on) e = cudaMemset(g->trace_buf, 0, kTraceBytes);
    if (e != cudaSuccess) return fail(msg, len, "%s: trace: %s", Op::kName, cudaGetErrorString(e));
    g->trace = on ? g->trace_buf : nullptr;
    return 0;
  }
  static int read_trace(uint64_t* out, char* msg, int len) {
    if (usable(msg, len)) return 1;
    if (!g->trace_buf) return fail(msg, len, "%s: read_trace before trace(True)", Op::kName);
    cudaError_t e = cudaDeviceSynchronize();
    if (e == cudaSuccess) e = cudaMemcpy(out, g->trace_buf, kTraceBytes, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess) e = cudaMemset(g->trace_buf, 0, kTraceBytes);
    return e == cudaSuccess ? 0 : fail(msg, len, "%s: read_trace: %s", Op::kName, cudaGetErrorString(e));
  }

  // Launches a kernel that may start before the kernel before it in the stream ends (programmatic
  // dependent launch): once every CTA of that one ran dev::pdl_trigger or left. It must read only what
  // flags publish, and end only after the flag that follows that kernel's last store (its successors
  // in the stream then see every store of both). A graph captures the launch as a programmatic edge.
  // Below compute capability 9.0 it is a plain launch (the kernels are right either way).
  template <class P>
  static cudaError_t launch_early(void (*kernel)(P), int grid, cudaStream_t s, P params) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(kWarps * 32);
    cfg.stream = s;
    cfg.attrs = attr;
    cfg.numAttrs = g->early_launch ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, params);
  }

  // After a bounded call finished: 0, or the message of the wait that gave up (the op is then unusable).
  // A low-latency dispatch flag packs the rows below the epoch (ll_flag): the message shows epochs.
  static int wait_error(char* msg, int len) { return B::wait_error(msg, len, Op::kLowLatency ? kLLCountBits : 0); }

  static int check_tokens(int64_t m, char* msg, int len) {
    return m < 0 || m > T ? fail(msg, len, "%s: %lld tokens outside [0, %lld]", Op::kName, static_cast<long long>(m),
                                 static_cast<long long>(T))
                          : 0;
  }

  // Normal mode's dispatch: route this rank's m tokens, then push each once per destination rank into
  // this rank's segment of half `hf` there; the flags carry `epoch`.
  static int route_and_push(const void* x, const void* idx, int idx64, const float* w, int64_t m, const Half& hf,
                            uint64_t epoch, cudaStream_t s, char* msg, int len) {
    const int nb = m > 0 ? blocks(m) : 1;  // (m = 0: one block of no tokens, whose scan zeroes the totals)
    RouteParams rp{idx, idx64, m, g->world, g->local, g->scratch, nullptr, nullptr, nullptr, g->counters + 2};
    rp.trace = g->trace;
    rp.rib = rp.hist + blocks(T) * (E + W);
    rp.ribd = rp.rib + T * K;
    rp.totals = rp.ribd + T * W;
    route_block<Op><<<nb, 256, 0, s>>>(rp);
    if (launched("route", msg, len)) return 1;
    PushParams<Op> pp{};
    pp.x = static_cast<const char*>(x);
    pp.idx = idx;
    pp.idx64 = idx64;
    pp.w = w;
    pp.m = m;
    pp.prefix = rp.hist;
    pp.rib = rp.rib;
    pp.ribd = rp.ribd;
    pp.totals = rp.totals;
    for (int q = 0; q < g->world; ++q) {
      pp.stage[q] = peer(hf.stage, q) + g->rank * T * D::kStageRowBytes;
      pp.meta[q] = peer(hf.meta, q) + g->rank * T * D::kMeta;
      pp.info[q] = peer(hf.info, q) + g->rank * (E + 1);
      pp.flag[q] = peer(g->dflag, q) + g->rank;
    }
    pp.counter = g->counters;
    pp.epoch = epoch;
    pp.me = g->rank;
    pp.world = g->world;
    pp.local = g->local;
    pp.cut = push_cut(kPush, m);
    pp.trace = g->trace;
    push_tokens<Op><<<grid_for(kPush, m, pp.cut.pieces), kWarps * 32, 0, s>>>(pp);
    return launched("push", msg, len);
  }

  // Both modes' combine: send each staging row's weighted sum back to its token's rank through half
  // `hf`, then sum what every rank sent here. stage_rows: the rows (normal mode), or (low-latency mode)
  // a bound, the rows being segments of max_tokens per source, ntok[s] filled; the flags carry `epoch`
  // (normal mode) or the epoch in this rank's own dispatch flag (low-latency mode: own_dispatch_flag).
  // The reduction launches early (its CTAs start as the send's leave).
  static int send_and_reduce(const void* y, const int32_t* slot_rows, const int32_t* stage_src, const float* stage_w,
                             int64_t stage_rows, const int32_t* ntok, const void* idx, int idx64, int64_t m,
                             void* out, const Half& hf, uint64_t epoch, const uint64_t* own_dispatch_flag,
                             uint64_t timeout_ns, cudaStream_t s, char* msg, int len) {
    CombineParams<Op> cp{};
    cp.y = static_cast<const char*>(y);
    cp.slot_rows = slot_rows;
    cp.stage_src = stage_src;
    cp.stage_w = stage_w;
    cp.stage_rows = stage_rows;
    for (int q = 0; q < g->world; ++q) {
      cp.back[q] = peer(hf.back, q) + g->rank * T * D::kRowBytes;
      cp.flag[q] = peer(g->cflag, q) + g->rank;
    }
    cp.counter = g->counters + 1;
    cp.epoch = epoch;
    cp.world = g->world;
    cp.own_dispatch_flag = own_dispatch_flag;
    cp.ntok = ntok;
    cp.cut = send_cut(stage_rows);
    cp.trace = g->trace;
    combine_send<Op><<<grid_for(kSend, stage_rows, cp.cut.pieces), kWarps * 32, 0, s>>>(cp);
    if (launched("combine send", msg, len)) return 1;
    ReduceParams<Op> rp{hf.back, g->cflag, idx, idx64, m, static_cast<char*>(out), epoch, wait_ctx(timeout_ns),
                        g->world, g->local, own_dispatch_flag, reduce_cut(m), g->trace};
    return launched("combine reduce", launch_early(combine_reduce<Op>, grid_for(kReduce, m, rp.cut.pieces), s, rp),
                    msg, len);
  }

  // Dispatch, first half: route, push, wait for every rank's counts; out[s * (local + 1) + l] =
  // items source s sent to local expert l, out[s * (local + 1) + local] = its tokens (staging rows).
  static int dispatch_send(const void* x, const void* idx, int idx64, const float* w, int64_t m, void* stream,
                           uint64_t timeout_ns, int64_t* out, char* msg, int len) {
    if (usable(msg, len) || check_tokens(m, msg, len)) return 1;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const uint64_t epoch = ++g->dispatch_epoch;
    const Half& hf = g->half[epoch & 1];
    if (route_and_push(x, idx, idx64, w, m, hf, epoch, s, msg, len)) return 1;
    wait_counts<Op><<<1, 32, 0, s>>>(g->dflag, hf.info, g->counts_dev, g->world, g->local, epoch, wait_ctx(timeout_ns));
    if (launched("wait", msg, len)) return 1;
    cudaError_t e = cudaEventRecord(g->done, s);
    if (e == cudaSuccess) e = cudaEventSynchronize(g->done);  // normal mode: the host sizes the outputs
    if (e != cudaSuccess) return fail(msg, len, "%s: dispatch: %s", Op::kName, cudaGetErrorString(e));
    if (wait_error(msg, len)) return 1;
    int64_t stage_rows = 0, rows = 0;
    for (int q = 0; q < g->world; ++q)
      for (int l = 0; l <= g->local; ++l) {
        out[q * (g->local + 1) + l] = g->counts_host[q * (g->local + 1) + l];
        (l < g->local ? rows : stage_rows) += g->counts_host[q * (g->local + 1) + l];
      }
    g->last_rows = rows;
    g->last_stage_rows = stage_rows;
    return 0;
  }

  // Dispatch, second half: the staging rows of the last dispatch_send into the caller's outputs.
  static int dispatch_recv(void* out, float* scales, int32_t* handle, int32_t* slot_rows, int32_t* stage_src, float* stage_w,
                           int32_t* counts, int64_t rows, int64_t stage_rows, void* stream, char* msg, int len) {
    if (usable(msg, len)) return 1;
    if (g->last_rows < 0) return fail(msg, len, "%s: dispatch_recv before dispatch_send", Op::kName);
    if (rows != g->last_rows || stage_rows != g->last_stage_rows)
      return fail(msg, len, "%s: outputs for %lld rows / %lld staging rows, but the last dispatch received %lld / %lld",
                  Op::kName, static_cast<long long>(rows), static_cast<long long>(stage_rows),
                  static_cast<long long>(g->last_rows), static_cast<long long>(g->last_stage_rows));
    const Half& hf = g->half[g->dispatch_epoch & 1];
    ExpandParams<Op> p{hf.stage, hf.meta, hf.info, static_cast<char*>(out), scales, handle, slot_rows, stage_src,
                       stage_w, counts, stage_rows, rows, g->rank, g->world, g->local};
    p.cut = expand_cut(stage_rows);
    p.trace = g->trace;
    expand_rows<Op><<<grid_for(kExpand, stage_rows, p.cut.pieces), kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
    g->last_rows = -1;  // one expansion per dispatch
    return launched("expand", msg, len);
  }

  static int combine(const void* y, const int32_t* slot_rows, const int32_t* stage_src, const float* stage_w,
                     int64_t stage_rows, const void* idx, int idx64, int64_t m, void* out, void* stream,
                     uint64_t timeout_ns, char* msg, int len) {
    if (usable(msg, len)) return 1;
    if (m < 0 || m > T || stage_rows < 0 || stage_rows > W * T)
      return fail(msg, len, "%s: combine of %lld tokens / %lld staging rows outside [0, %lld] / [0, %lld]", Op::kName,
                  static_cast<long long>(m), static_cast<long long>(stage_rows), static_cast<long long>(T),
                  static_cast<long long>(W * T));
    const uint64_t epoch = ++g->combine_epoch;
    return send_and_reduce(y, slot_rows, stage_src, stage_w, stage_rows, nullptr, idx, idx64, m, out,
                           g->half[epoch & 1], epoch, nullptr, timeout_ns, static_cast<cudaStream_t>(stream), msg, len);
  }

  // ------------------------------------------------------------------ low-latency mode
  // No host round trip and nothing the host must know per call: each half's epoch comes from this rank's
  // own flag of the other half (ll_flag), the outputs are the op's own (symmetric: every source writes its rows there), in fixed segments. Calls
  // alternate dispatch, combine (MoeOp enforces it); with that order one set of buffers is safe (each
  // write into a peer follows that peer's flag of the step that finished reading it).
  static int not_low_latency(char* msg, int len) {
    return fail(msg, len, "%s: a normal-mode op has no low-latency calls", Op::kName);
  }

  // The outputs' device addresses (MoeOp wraps them as tensors): recv rows, scales (fp8; else null),
  // handle, slot rows, stage source, stage weights, counts.
  static int ll_outputs(int64_t* out, char* msg, int len) {
    if (usable(msg, len)) return 1;
    if (!Op::kLowLatency) return not_low_latency(msg, len);
    const LLLayout& l = g->lay;
    const int64_t offs[7] = {l.out, l.scales, l.handle, l.slot_rows, l.stage_src, l.stage_w, l.counts};
    for (int i = 0; i < 7; ++i) out[i] = reinterpret_cast<int64_t>(g->ll + offs[i]);
    if (!D::kFp8) out[1] = 0;
    return 0;
  }

  static int ll_dispatch(const void* x, const void* idx, int idx64, const float* w, int64_t m, void* stream,
                         uint64_t timeout_ns, char* msg, int len) {
    if (usable(msg, len) || check_tokens(m, msg, len)) return 1;
    if constexpr (!Op::kLowLatency) {
      return not_low_latency(msg, len);
    } else {
      cudaStream_t s = static_cast<cudaStream_t>(stream);
      LLPushParams<Op> pp{};
      pp.x = static_cast<const char*>(x);
      pp.idx = idx;
      pp.idx64 = idx64;
      pp.w = w;
      pp.m = m;
      for (int q = 0; q < g->world; ++q) pp.ll[q] = peer(g->ll, q);
      pp.lay = g->lay;
      pp.own_flag = g->dflag + g->rank;
      pp.counter = g->counters;
      pp.own_combine_flag = g->cflag + g->rank;
      pp.me = g->rank;
      pp.world = g->world;
      pp.local = g->local;
      pp.trace = g->trace;
      pp.cut = ll_cut(kLLPush, m * g->world);  // (a warp per piece and rank)
      ll_push<Op><<<grid_for(kLLPush, m * g->world, pp.cut.pieces), kWarps * 32, 0, s>>>(pp);
      if (launched("push", msg, len)) return 1;
      const int64_t rows = (g->world - 1) * T;  // a bound: tokens from the other ranks
      LLExpandParams<Op> ep{g->ll, g->lay, g->dflag + g->rank, g->cflag + g->rank, g->rank, g->world, g->local,
                            wait_ctx(timeout_ns), ll_cut(kLLExpand, rows), g->trace};
      return launched("expand", launch_early(ll_expand<Op>, grid_for(kLLExpand, rows, ep.cut.pieces), s, ep), msg, len);
    }
  }

  static int ll_combine(const void* y, const void* idx, int idx64, int64_t m, void* out, void* stream,
                        uint64_t timeout_ns, char* msg, int len) {
    if (usable(msg, len) || check_tokens(m, msg, len)) return 1;
    if (!Op::kLowLatency) return not_low_latency(msg, len);
    const LLLayout& l = g->lay;
    return send_and_reduce(y, at<int32_t>(g->ll, l.slot_rows), at<int32_t>(g->ll, l.stage_src), at<float>(g->ll, l.stage_w),
                           g->world * T, at<int32_t>(g->ll, l.ntok), idx, idx64, m, out, g->half[0], 0, g->dflag + g->rank,
                           timeout_ns, static_cast<cudaStream_t>(stream), msg, len);
  }
};

}  // namespace moe
}  // namespace tilegen
