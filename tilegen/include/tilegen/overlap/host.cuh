// tilegen overlap layer, host side: a GEMM op (ag_gemm, gemm_rs; decomposed, copy-engine or fused
// overlap) is a collective op (collective/host.cuh) plus the state and calls that overlap its
// communication with GEMMs: the call's epoch word and the compute stream's chunk hooks (decomposed),
// the copy-engine protocol's words, streams, flags and program executor with cuBLASLt GEMMs, and the
// fused GEMM's view of the call (chunk_sync). Only GEMM ops include it (overlap/op.cuh).
#pragma once
#include <cstdint>
#include <cstring>
#include <map>
#include <cuda.h>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include "tilegen/collective/host.cuh"
#include "tilegen/common/cuda_check.h"
#include "tilegen/common/host_msg.h"
#include "tilegen/overlap/ce_gemm.cuh"
#include "tilegen/overlap/chunk_sync.cuh"
#include "tilegen/overlap/copy_engine.cuh"
#include "tilegen/overlap/kernels.cuh"

extern "C" int tilegen_op_fused_load(char* msg, int len);  // the fused GEMM's translation unit (fused ops only)

namespace tilegen {
namespace coll {

template <class Op>
struct GemmState {
  static constexpr int kJoinEvents = 32;  // reused round-robin: a wait takes the event's state when queued
  // the call: its epoch word (every kernel of a call reads it) and what run() prepared for the compute side
  uint64_t* epoch_dev = nullptr;  // advanced by begin() on the caller's stream
  bool begun = false;             // begin() advanced the epoch word for the next run()
  bool prepared = false;          // run() prepared a call (layout, order) that the compute side joins
  int64_t last_shard = 0, last_part = 0, last_tile = 0;
  int last_parts = 1, last_grid = 0;
  const Variant<Op>* last_variant = nullptr;
  uint64_t* counters = nullptr;  // fused gemm_rs: finished tiles per input part (local, zero between calls)
  // copy-engine overlap
  uint64_t* ce_sig = nullptr;           // the protocol's words (CeSignals), symmetric
  CeSignals<Op> ce{};                   // every rank's words through NVLink (null where unreachable)
  bool ce_ok = false;                   // every peer's words are load/store reachable
  StreamMemOps memops{};                // flags by stream memory operations where the device has them
  cudaEvent_t joins[kJoinEvents] = {};  // events that order one stream after another
  int next_join = 0;
  std::map<int64_t, CeProgram> ce_programs;  // programs by the op's key (m, splits)
  cudaStream_t ce_copy[Op::kMaxWorld] = {};  // their copy streams
  BlasLt blas;                               // their GEMMs
};

template <class Op>
struct GemmHost : Host<Op, GemmHost<Op>> {
  using H = Host<Op, GemmHost<Op>>;
  using H::g;
  using H::is_symmetric;
  using H::launched;
  using H::usable;
  using H::wait_ctx;
  static constexpr int kJoinEvents = GemmState<Op>::kJoinEvents;
  static inline GemmState<Op> os[host::kMaxGroups];  // one per group slot, beside Host's
  struct Current {  // `o`: the current slot's (the one H::g points to)
    GemmState<Op>* operator->() const { return &os[H::g - H::slots]; }
  };
  static constexpr Current o{};
  static inline bool memops_allowed = true;  // TILEGEN_CE_MEMOPS, set by the runtime before the first init

  static int allow_memops(int yes) {
    memops_allowed = yes != 0;
    return 0;
  }

  // ------------------------------------------------------------ Host's Ext: init, run, release
  static constexpr bool kBesideGemms = true;

  static int on_alloc(char* msg, int len) {
    o->ce_sig = static_cast<uint64_t*>(nvshmem_malloc(CeSignals<Op>::kWords * sizeof(uint64_t)));
    if (!o->ce_sig) return fail(msg, len, "%s: nvshmem_malloc of the copy-engine signals failed", Op::kName);
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMemset(o->ce_sig, 0, CeSignals<Op>::kWords * sizeof(uint64_t)));
    if (Op::kFused) {
      TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMalloc(&o->counters, Op::kInSlots * sizeof(uint64_t)));
      TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMemset(o->counters, 0, Op::kInSlots * sizeof(uint64_t)));
    }
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMalloc(&o->epoch_dev, sizeof(uint64_t)));
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaMemset(o->epoch_dev, 0, sizeof(uint64_t)));
    return 0;
  }

  static cudaError_t on_load() {
    cudaError_t e = host::load_kernels(begin_call<Op>);
    if constexpr (Op::kGemm == Gemm::kConsume)
      if (e == cudaSuccess) e = host::load_kernels(wait_chunk<Op>);
    if constexpr (Op::kGemm == Gemm::kProduce)
      if (e == cudaSuccess) e = host::load_kernels(signal_chunk<Op>);
    if (e == cudaSuccess) e = host::load_kernels(ce_begin<Op>, ce_signal, ce_wait, ce_reduce<typename Op::Elem>);
    return e;
  }

  // After every rank's words are zero (the barrier): the fused GEMM, the events, the peers' words.
  static int on_attach(char* msg, int len) {
    if constexpr (Op::kFused)
      if (tilegen_op_fused_load(msg, len)) return 1;
    int device = 0;
    TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaGetDevice(&device));
    o->memops.load(device, memops_allowed);
    for (int i = 0; i < kJoinEvents; ++i)
      TILEGEN_CUDA_CHECK(Op::kName, msg, len, cudaEventCreateWithFlags(&o->joins[i], cudaEventDisableTiming));
    o->ce_ok = true;
    for (int q = 0; q < g->world; ++q) {
      o->ce.peer[q] = H::peer(o->ce_sig, q);
      o->ce_ok &= o->ce.peer[q] != nullptr;
    }
    return 0;
  }

  // run(): every kernel of the call reads the epoch begin() advanced; the compute side's hooks and the
  // fused GEMM read the call's layout, order and grid.
  static int on_prepare(Params<Op>& p, const Variant<Op>& v, int grid, char* msg, int len) {
    if (!o->begun) return fail(msg, len, "%s: run() without begin() on the caller's stream first", Op::kName);
    o->begun = false;
    o->prepared = true;
    p.epoch_src = o->epoch_dev;
    o->last_shard = p.shard;
    o->last_part = p.part;
    o->last_tile = p.tile;
    o->last_parts = p.parts;
    o->last_variant = &v;
    o->last_grid = grid;
    return 0;
  }

  static void on_release() {
    if (o->ce_sig) nvshmem_free(o->ce_sig);
    for (cudaEvent_t ev : o->joins)
      if (ev) cudaEventDestroy(ev);
    for (cudaStream_t cs : o->ce_copy)
      if (cs) cudaStreamDestroy(cs);
    o->blas.release();
    if (o->counters) cudaFree(o->counters);
    if (o->epoch_dev) cudaFree(o->epoch_dev);
    *o.operator->() = GemmState<Op>{};
  }

  // ------------------------------------------------------------ decomposed overlap: the compute stream
  static int begin(void* stream, char* msg, int len) {
    if (!g->ready) return fail(msg, len, "%s: not initialised (call tilegen.init() first)", Op::kName);
    begin_call<Op><<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(o->epoch_dev);
    if (launched("begin", msg, len)) return 1;
    o->begun = true;
    return 0;
  }

  static int check_chunk(const char* what, int chunk, char* msg, int len) {
    if (!g->ready || !o->prepared) return fail(msg, len, "%s: %s before any call", Op::kName, what);
    if (chunk < 0 || chunk >= g->world) return fail(msg, len, "%s: chunk %d outside [0, %d)", Op::kName, chunk, g->world);
    return 0;
  }

  // gemm_rs: after the GEMM of chunk `chunk` on `stream`, let the communication kernel take it.
  static int signal_chunk_after(int chunk, void* stream, char* msg, int len) {
    if (check_chunk("signal_chunk", chunk, msg, len)) return 1;
    if constexpr (Op::kGemm == Gemm::kProduce) {
      signal_chunk<Op><<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(g->sig, chunk, o->last_parts, o->epoch_dev);
      return launched("signal", msg, len);
    }
    return 0;
  }

  // ag_gemm: wait on `stream` until chunk `chunk` of this call's gather is complete.
  static int wait_chunk_on(int chunk, void* stream, uint64_t timeout_ns, char* msg, int len) {
    if (check_chunk("wait_chunk", chunk, msg, len)) return 1;
    if constexpr (Op::kGemm == Gemm::kConsume) {
      const dev::WaitCtx w = wait_ctx(timeout_ns);
      wait_chunk<Op><<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(g->sig, chunk, o->last_parts, o->last_shard, o->last_part,
                                                                       o->last_tile, o->epoch_dev, w);
      return launched("wait", msg, len);
    }
    return 0;
  }

  // The compute stream's chunk order for the last call (world entries).
  static int compute_order(int* out) {
    if (!g->ready || !o->last_variant || !o->last_variant->order) return 1;
    for (int i = 0; i < g->world; ++i) out[i] = o->last_variant->order[g->rank][i];
    return 0;
  }

  // ------------------------------------------------------------ GEMM ops, copy-engine overlap
  // The orchestration (which chunk, which stream, in what order) is the Python op's
  // (tilegen/overlap/runtime.py); these check their arguments and queue the copies and the flag kernels.
  static int ce_check(const char* what, int peer, int flag, char* msg, int len) {
    if (usable(msg, len)) return 1;
    if (!o->ce_ok)
      return fail(msg, len, "%s: %s: the copy-engine overlap needs every peer's memory reachable over NVLink (P2P); "
                  "use overlap: decomposed", Op::kName, what);
    if (peer < 0 || peer >= g->world) return fail(msg, len, "%s: %s: peer %d outside [0, %d)", Op::kName, what, peer, g->world);
    if (flag < 0 || flag >= Op::kMaxWorld * kCeMaxSplits)
      return fail(msg, len, "%s: %s: flag %d outside [0, %d)", Op::kName, what, flag, Op::kMaxWorld * kCeMaxSplits);
    return 0;
  }

  static int ce_begin_call(void* stream, uint64_t timeout_ns, char* msg, int len) {
    if (ce_check("begin", g->rank, 0, msg, len)) return 1;
    const dev::WaitCtx w = wait_ctx(timeout_ns);
    ce_begin<Op><<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(o->epoch_dev, o->ce, g->rank, g->world, w);
    return launched("begin", msg, len);
  }

  // Rank `peer`'s address of symmetric [ptr, ptr + bytes), or null (with a message) if it is not one.
  static char* peer_address(const char* what, const void* ptr, int64_t bytes, int peer, char* msg, int len) {
    if (!is_symmetric(ptr, bytes)) {
      fail(msg, len, "%s: %s: the buffer is not on the NVSHMEM symmetric heap", Op::kName, what);
      return nullptr;
    }
    char* p = H::peer(static_cast<char*>(const_cast<void*>(ptr)), peer);
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
    return set_flag(o->ce.peer[peer] + CeSignals<Op>::kFlags + flag, s, msg, len);
  }

  // Sets a flag after the work queued before on `stream` (its writes are visible first).
  static int set_flag(uint64_t* flag, cudaStream_t s, char* msg, int len) {
    if (o->memops.ok) {
      CUresult r = o->memops.write(reinterpret_cast<CUstream>(s), reinterpret_cast<CUdeviceptr>(flag), 1, 0);
      return r == CUDA_SUCCESS ? 0 : fail(msg, len, "%s: cuStreamWriteValue64 failed (CUresult %d; TILEGEN_CE_MEMOPS=0 "
                                          "signals in kernels)", Op::kName, static_cast<int>(r));
    }
    ce_signal<<<1, 1, 0, s>>>(flag);
    return launched("signal", msg, len);
  }

  // `waiter` runs what is queued on it from now on after the work queued on `producer` so far.
  static int join(void* waiter, void* producer, char* msg, int len) {
    if (!g->ready) return fail(msg, len, "%s: not initialised (call tilegen.init() first)", Op::kName);
    cudaEvent_t ev = o->joins[o->next_join];
    o->next_join = (o->next_join + 1) % kJoinEvents;
    cudaError_t e = cudaEventRecord(ev, static_cast<cudaStream_t>(producer));
    if (e == cudaSuccess) e = cudaStreamWaitEvent(static_cast<cudaStream_t>(waiter), ev, 0);
    return e == cudaSuccess ? 0 : fail(msg, len, "%s: join: %s", Op::kName, cudaGetErrorString(e));
  }

  // Holds `stream` until this rank's flag `flag` is set, then clears it. A bounded wait runs as a
  // kernel (it reports a missing peer); an unbounded one in the front end where the device can.
  static int ce_wait_flag(int flag, void* stream, uint64_t timeout_ns, char* msg, int len) {
    if (ce_check("wait", g->rank, flag, msg, len)) return 1;
    uint64_t* word = o->ce.peer[g->rank] + CeSignals<Op>::kFlags + flag;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (o->memops.ok && !timeout_ns) {
      const CUstream cs = reinterpret_cast<CUstream>(s);
      const CUdeviceptr p = reinterpret_cast<CUdeviceptr>(word);
      CUresult r = o->memops.wait(cs, p, 1, CU_STREAM_WAIT_VALUE_EQ);
      if (r != CUDA_SUCCESS)
        return fail(msg, len, "%s: cuStreamWaitValue64 failed (CUresult %d; TILEGEN_CE_MEMOPS=0 waits in kernels)",
                    Op::kName, static_cast<int>(r));
      r = o->memops.write(cs, p, 0, 0);
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
      const bool moves = st.kind == CeStep::kPut || st.kind == CeStep::kGemm || st.kind == CeStep::kReduce;
      const bool flags = st.kind == CeStep::kPut || st.kind == CeStep::kWait;
      const bool remote = st.kind == CeStep::kPut;
      const bool same_rows = st.kind == CeStep::kGemm || st.kind == CeStep::kReduce;  // (copies: bytes, per call)
      bool ok = f[0] >= 0 && f[0] < CeStep::kKinds && f[1] >= 0 && f[1] <= Op::kMaxWorld && f[4] >= 1 && f[5] >= 0;
      ok = ok && (st.kind != CeStep::kFork || f[1] > 0) && (st.kind != CeStep::kJoin || f[1] == 0);
      ok = ok && (!remote || (f[2] >= 0 && f[2] < g->world && f[2] != g->rank));
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
    o->ce_programs[key] = std::move(p);
    return 0;
  }

  // Runs program `key` once on buffers ptr[i] (rows[i] rows of row_bytes[i] bytes; the symmetric
  // one is this rank's address) with B (n x k, [k, n] if b_kn): every step's library call, from here.
  static int ce_run(int64_t key, char* const* ptr, const int64_t* rows, const int64_t* row_bytes, const void* b, int64_t n,
                    int64_t k, int b_kn, void* stream, uint64_t timeout_ns, char* msg, int len) {
    if (usable(msg, len)) return 1;
    auto it = o->ce_programs.find(key);
    if (it == o->ce_programs.end())
      return fail(msg, len, "%s: copy-engine program %lld was not registered", Op::kName, static_cast<long long>(key));
    const CeProgram& p = it->second;
    for (int i = 0; i < CeStep::kBuffers; ++i)
      if (p.max_row[i] > rows[i])
        return fail(msg, len, "%s: the copy-engine program needs %lld rows of buffer %d, it has %lld", Op::kName,
                    static_cast<long long>(p.max_row[i]), i, static_cast<long long>(rows[i]));
    void* streams[1 + Op::kMaxWorld] = {stream};
    for (int i = 0; i < p.copies; ++i) {
      if (!o->ce_copy[i]) {
        cudaError_t e = cudaStreamCreateWithFlags(&o->ce_copy[i], cudaStreamNonBlocking);
        if (e != cudaSuccess) return fail(msg, len, "%s: copy stream: %s", Op::kName, cudaGetErrorString(e));
      }
      streams[1 + i] = o->ce_copy[i];
    }
    o->blas.pinned = Op::kDeterministic;  // one GEMM algorithm for every row count (ce_gemm.cuh)
    if (o->blas.load(msg, len)) return 1;
    const int64_t in_row = k * static_cast<int64_t>(sizeof(typename Op::Elem)), out_row = n * static_cast<int64_t>(sizeof(typename Op::Elem));
    for (const CeStep& st : p.steps) {
      void* on = streams[st.stream];
      int rc = 0;
      switch (st.kind) {
        case CeStep::kBegin: rc = ce_begin_call(on, timeout_ns, msg, len); break;
        case CeStep::kFork: rc = join(on, stream, msg, len); break;
        case CeStep::kJoin:  // the caller's stream after every copy stream's work so far
          for (int i = 0; i < p.copies && !rc; ++i) rc = join(stream, o->ce_copy[i], msg, len);
          break;
        case CeStep::kWait: rc = ce_wait_flag(st.flag, on, timeout_ns, msg, len); break;
        case CeStep::kPut: {
          const int64_t bytes = (st.shi - st.slo) * row_bytes[st.src];
          if (bytes != (st.dhi - st.dlo) * row_bytes[st.dst])
            return fail(msg, len, "%s: a copy-engine copy of %lld bytes into %lld", Op::kName, static_cast<long long>(bytes),
                        static_cast<long long>((st.dhi - st.dlo) * row_bytes[st.dst]));
          char* dst = ptr[st.dst] + st.dlo * row_bytes[st.dst];
          const char* src = ptr[st.src] + st.slo * row_bytes[st.src];
          rc = ce_put(src, dst, bytes, st.peer, st.flag, on, msg, len);
          break;
        }
        case CeStep::kGemm: {
          if (row_bytes[st.src] != in_row || row_bytes[st.dst] != out_row || (st.addend >= 0 && row_bytes[st.addend] != out_row))
            return fail(msg, len, "%s: copy-engine GEMM rows of %lld / %lld bytes, expected %lld / %lld", Op::kName,
                        static_cast<long long>(row_bytes[st.src]), static_cast<long long>(row_bytes[st.dst]),
                        static_cast<long long>(in_row), static_cast<long long>(out_row));
          const char* addend = st.addend >= 0 ? ptr[st.addend] + st.alo * out_row : nullptr;
          rc = o->blas.gemm(BlasType<typename Op::Elem>::kType, ptr[st.src] + st.slo * in_row, st.shi - st.slo, b, n, k,
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

  // A decomposed deterministic op's chunk GEMM: out[rows, n] = x[rows, k] @ B (n x k, [k, n] if b_kn) on
  // `stream` by the pinned cuBLASLt algorithm that serves every row count (ce_gemm.cuh), where torch.mm
  // would let cuBLAS choose a kernel, and so a row's bits, by the row count.
  static int pinned_gemm(const void* x, int64_t rows, const void* b, int64_t n, int64_t k, int b_kn, void* out,
                         void* stream, char* msg, int len) {
    if (usable(msg, len)) return 1;
    if (!Op::kDeterministic) return fail(msg, len, "%s: pinned_gemm serves deterministic ops only", Op::kName);
    o->blas.pinned = true;
    if (o->blas.load(msg, len)) return 1;
    return o->blas.gemm(BlasType<typename Op::Elem>::kType, x, rows, b, n, k, b_kn != 0, out, nullptr,
                        static_cast<cudaStream_t>(stream), msg, len);
  }

  // Diagnostics: this rank's copy-engine words (entry epochs by rank, then the flags) and its epoch,
  // read on a stream of their own (no wait for work queued elsewhere, a stuck wait included).
  static int ce_words(uint64_t* out, int n, int* count, char* msg, int len) {
    if (!g->ready || !o->ce_sig) return fail(msg, len, "%s: no copy-engine words (not initialised, or not a GEMM op)", Op::kName);
    if (n < CeSignals<Op>::kWords + 1) return fail(msg, len, "%s: ce_words needs %d words", Op::kName, CeSignals<Op>::kWords + 1);
    cudaStream_t s = nullptr;
    cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaMemcpyAsync(out, o->ce_sig, CeSignals<Op>::kWords * sizeof(uint64_t), cudaMemcpyDeviceToHost, s);
    if (e == cudaSuccess) e = cudaMemcpyAsync(out + CeSignals<Op>::kWords, o->epoch_dev, sizeof(uint64_t), cudaMemcpyDeviceToHost, s);
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
      if (o->ce_copy[i]) join(stream, o->ce_copy[i], ignored, sizeof ignored);
    }
    cudaGetLastError();
    if (first) return 1;
    g->poisoned = true;
    const size_t used = strlen(msg);
    if (used + 1 < static_cast<size_t>(len))
      snprintf(msg + used, len - used, " (the call stopped midway: this op is unusable now, restart the job)");
    return 1;
  }

  // For the fused GEMM of the call run() just prepared: where its flags are, the epoch, the chunk
  // order and the layout, checked against the GEMM's view of the rows.
  static int chunk_sync(fused::ChunkSync* out, int64_t rows, int tile_m, int tiles_n, int64_t row_bytes, uint64_t timeout_ns,
                        int* comm_ctas, char* msg, int len) {
    if (!g->ready || !o->prepared) return fail(msg, len, "%s: fused GEMM before run() prepared the communication", Op::kName);
    if (g->world > fused::kMaxChunks) return fail(msg, len, "%s: world %d exceeds %d chunks", Op::kName, g->world, fused::kMaxChunks);
    if (rows * row_bytes != o->last_shard)
      return fail(msg, len, "%s: fused GEMM of %lld rows x %lld B does not match the communication's %lld-byte chunks",
                  Op::kName, static_cast<long long>(rows), static_cast<long long>(row_bytes),
                  static_cast<long long>(o->last_shard));
    fused::ChunkSync s{};
    s.mode = Op::kGemm == Gemm::kConsume ? fused::kWaitRows : fused::kPublishParts;
    s.world = g->world;
    for (int i = 0; i < g->world; ++i) s.order[i] = o->last_variant->order[g->rank][i];
    s.rows = static_cast<int>(rows);
    s.tile_m = tile_m;
    s.tiles_n = tiles_n;
    s.parts = o->last_parts;
    s.per_tile = Op::kPerTile ? 1 : 0;
    s.row_bytes = row_bytes;
    s.shard = o->last_shard;
    s.part = o->last_part;
    s.tile = o->last_tile;
    s.sig = g->sig;
    s.flag_base = signals<Op>().flag(kOut, 0, 0);
    s.flag_stride = Op::kMaxTiles;
    s.in_flag_base = signals<Op>().flag(kIn, 0, 0);
    s.counters = o->counters;
    s.epoch = o->epoch_dev;
    s.wait = wait_ctx(timeout_ns);
    *out = s;
    *comm_ctas = o->last_grid;
    return 0;
  }
};

}  // namespace coll
}  // namespace tilegen
