// tilegen collective layer, device side: the one generic kernel that executes an op's checked step
// tables (tilegen/collective/ir.py's programs, proven deadlock-free by tilegen/collective/check.py
// with every CTA running), on the simple, LL and reduction primitives. Everything is templated on an
// op's traits struct, which a generated <op>.cu defines (constants, step tables, plans) before it
// exports the op (collective/op.cuh, or overlap/op.cuh for GEMM ops).
//
// Traits (struct Op): kName, Elem, kOpId, kMaxWorld, kMaxSteps, kMaxSrc, kMaxDst, kMaxWait, kOutSlots,
// kScrSlots, kInSlots, kMaxTiles, kScrBytes, kLLBytes, kLLSlots, kStageBytes, kMaxInBytes, kThreads, kReduceOp, kMaxCtas,
// kMaxVariants, kChunks, kReduces, kPerTile, kAllowPeerPtr, kRequirePeerPtr, kGemm, kFused, kWorldSizes,
// using Step = coll::Step<kMaxSrc, kMaxDst, kMaxWait>, and static const WorldPlan<Op>* plan(int world).
// kEpilogue, kResidual, kRmsNorm, kQuant, kEps: the epilogue (collective/epilogue.cuh; kEpilogue false: none).
// kReduceOp is the integer reduce code (0 sum, 1 max, 2 min, 3 premul sum: dev::ReduceOp maps it to the functor).
// The kernel also serves the GEMM ops' communication (kGemm, kFused: their flags), whose other kernels
// and host code are overlap/'s.
#pragma once
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include "tilegen/collective/epilogue.cuh"
#include "tilegen/collective/layout.cuh"
#include "tilegen/common/memory.cuh"
#include "tilegen/common/wait.cuh"
#include "tilegen/primitives/ll.cuh"
#include "tilegen/primitives/reduce.cuh"
#include "tilegen/primitives/simple.cuh"

namespace tilegen {
namespace coll {
using layout::Chunks;
using layout::kIn;
using layout::kOut;
using layout::kScr;

enum : uint8_t { kEntry = 0, kMove = 1, kWait = 2 };
enum class Gemm : int { kNone = 0, kConsume = 1, kProduce = 2 };  // ag_gemm reads gathered chunks; gemm_rs makes its input

// A segment: slot `slot` of buffer `buf` on rank `rank` (relative to the root for rooted ops).
struct Seg {
  int8_t rank;
  uint8_t buf;
  uint8_t slot;
};
constexpr Seg In(int rank, int slot) { return Seg{static_cast<int8_t>(rank), kIn, static_cast<uint8_t>(slot)}; }
constexpr Seg Out(int rank, int slot) { return Seg{static_cast<int8_t>(rank), kOut, static_cast<uint8_t>(slot)}; }
constexpr Seg Scr(int rank, int slot) { return Seg{static_cast<int8_t>(rank), kScr, static_cast<uint8_t>(slot)}; }

// One step of a rank's program (see tilegen/collective/ir.py): entry handshake, move (copy or reduce tiles of a
// unit into its destinations, signalling remote ones) or wait (for the flags of a unit's tiles).
template <int S, int D, int W>
struct Step {
  uint8_t kind, nsrc, ndst, nwait;
  int16_t unit;
  uint8_t scaled;               // move: bit s set -> source s is multiplied by the call's scale (premul sum)
  uint32_t notify, await_mask;  // entry: the ranks told / awaited, as bit masks
  Seg src[S];
  Seg dst[D];
  Seg wait[W];

  static constexpr Step entry(uint32_t notify, uint32_t await_mask) {
    Step s{};
    s.kind = kEntry;
    s.notify = notify;
    s.await_mask = await_mask;
    return s;
  }
  static constexpr Step move(int unit, std::initializer_list<Seg> src, std::initializer_list<Seg> dst,
                             std::initializer_list<Seg> wait = {}, uint8_t scaled = 0) {
    Step s{};
    s.kind = kMove;
    s.unit = static_cast<int16_t>(unit);
    s.scaled = scaled;
    s.nsrc = static_cast<uint8_t>(src.size());
    s.ndst = static_cast<uint8_t>(dst.size());
    s.nwait = static_cast<uint8_t>(wait.size());
    int i = 0;
    for (const Seg& g : src) s.src[i++] = g;
    i = 0;
    for (const Seg& g : dst) s.dst[i++] = g;
    i = 0;
    for (const Seg& g : wait) s.wait[i++] = g;
    return s;
  }
  static constexpr Step wait_for(int unit, std::initializer_list<Seg> wait) {
    Step s = move(unit, {}, {}, wait);
    s.kind = kWait;
    return s;
  }
};

template <class Op>
struct Variant {
  int64_t max_in_bytes;
  int parts, ctas;
  int64_t tile_bytes;
  int nsteps;
  bool ll;                                          // flag-in-data schedule (LL scratch, no signals)
  const typename Op::Step (*table)[Op::kMaxSteps];  // [rank][step]
  const int (*order)[Op::kMaxWorld];                // GEMM ops: compute-stream chunk order per rank, else null
};

template <class Op>
struct WorldPlan {
  int world;
  int nvariants;  // smallest messages first
  const Variant<Op>* variants;
};

// The call's scale, in the launch parameters of premul-sum ops only (an empty base elsewhere).
template <bool kPreMul>
struct ScaleParam {};
template <>
struct ScaleParam<true> {
  float scale;
};

template <class Op>
struct Params : ScaleParam<Op::kReduceOp == dev::kReducePreMulSum>, epi::Param<Op::kEpilogue> {
  const char* in;
  char* out;                          // this rank's output
  char* scr;                          // this rank's scratch (symmetric)
  char* stage;                        // this rank's staging (symmetric), kStageBytes per CTA
  char* out_peer[Op::kMaxWorld];      // peers' outputs through NVLink, or null -> NVSHMEM
  char* scr_peer[Op::kMaxWorld];
  uint64_t* sig;                      // this rank's signal block (symmetric)
  uint64_t* sig_peer[Op::kMaxWorld];  // peers' signal blocks through NVLink, or null -> NVSHMEM
  char* ll;                           // LL schedules: this rank's LL scratch (symmetric, two parity halves)
  char* ll_peer[Op::kMaxWorld];       // peers' LL scratch through NVLink
  uint64_t* state;                    // local: [0] epoch of the last finished call, [1] exit counter, [2 + s] step counters
  const uint64_t* epoch_src;          // null: the device's count (state[0] + 1); GEMM ops: the call's epoch word
  const typename Op::Step* steps;     // this rank's program, in device memory (small launch parameters)
  int64_t in_bytes, shard, part, tile;
  int32_t parts, rank, world, root, nsteps, is_ll;  // rank and world: in the call's group
  int16_t pe[Op::kMaxWorld];          // group rank -> NVSHMEM PE (NVSHMEM calls address PEs)
  dev::WaitCtx wait;
};

template <class Op>
TILEGEN_HD constexpr layout::Signals signals() {
  return layout::Signals{Op::kMaxWorld, Op::kOutSlots, Op::kScrSlots, Op::kInSlots, Op::kMaxTiles};
}

// The op's reduction functor (ops that do not reduce carry code 0 and never instantiate it), for
// one step: a premul sum's carries the call's scale and the step's scaled sources.
template <class Op>
using Reduce = typename dev::ReduceOp<Op::kReduceOp>::type;
template <class Op, class St>
__device__ __forceinline__ Reduce<Op> reduce_fn(const Params<Op>& p, const St& st) {
  if constexpr (Op::kReduceOp == dev::kReducePreMulSum) return Reduce<Op>{p.scale, st.scaled};
  else return Reduce<Op>{};
}

// ------------------------------------------------------------------------------------------ device
template <class Op>
__device__ __forceinline__ int abs_rank(const Params<Op>& p, int rel) { return (rel + p.root) % p.world; }

// Address of a segment: local, the peer's through NVLink, or null (reach it through NVSHMEM).
template <class Op>
__device__ __forceinline__ char* seg_ptr(const Params<Op>& p, const Seg& g, int64_t off) {
  const int q = abs_rank(p, g.rank);
  char* base;
  if (g.buf == kIn) base = const_cast<char*>(p.in);
  else if (q == p.rank) base = g.buf == kOut ? p.out : p.scr;
  else base = g.buf == kOut ? p.out_peer[q] : p.scr_peer[q];
  return base ? base + layout::slot_offset(p.shard, p.part, p.parts, g.slot) + off : nullptr;
}
template <class Op>
__device__ __forceinline__ char* seg_sym(const Params<Op>& p, const Seg& g, int64_t off) {  // symmetric address
  return (g.buf == kOut ? p.out : p.scr) + layout::slot_offset(p.shard, p.part, p.parts, g.slot) + off;
}

// One thread waits for the flags of a step's waits at tile t; the block learns the outcome.
template <class Op>
__device__ __forceinline__ bool wait_flags(const Params<Op>& p, const typename Op::Step& st, int64_t tile, uint64_t epoch,
                                           int s) {
  __shared__ int ok;
  if (threadIdx.x == 0) {
    ok = 1;
    for (int i = 0; i < st.nwait && ok; ++i) {
      const int64_t idx = signals<Op>().flag(st.wait[i].buf, st.wait[i].slot, tile);
      ok = dev::wait_ge(p.sig + idx, epoch, p.wait, SignalKind::kTileFlag, idx, s);
    }
  }
  __syncthreads();
  return ok;
}

// After a tile's stores (one thread): set the flags of its remote destinations (and, for a fused
// ag_gemm, of this rank's own chunk). skip_nvshmem: NVSHMEM puts carried their own signal.
template <class Op>
__device__ __forceinline__ void signal_dests(const Params<Op>& p, const typename Op::Step& st, int64_t tile, uint64_t epoch,
                                             bool skip_nvshmem) {
  for (int i = 0; i < st.ndst; ++i) {
    const int q = abs_rank(p, st.dst[i].rank);
    const int64_t idx = signals<Op>().flag(st.dst[i].buf, st.dst[i].slot, tile);
    if (q == p.rank) {
      if (Op::kGemm == Gemm::kConsume && Op::kFused && st.dst[i].buf == kOut) {  // the plan's signal_self
        dev::fence_acq_rel_gpu();
        dev::st_release_gpu(p.sig + idx, epoch);
      }
      continue;
    }
    // Two explicit paths, not signal_peer_one(peer ? .. : nullptr): inlined with its NVSHMEM branch,
    // that made each tile's signal cost ~10 us (measured: gathers of 8-16 CTAs 20-40% slower).
    if (p.sig_peer[q] && seg_ptr(p, st.dst[i], 0)) {
      dev::fence_acq_rel_sys();
      dev::st_release_sys(p.sig_peer[q] + idx, epoch);
    } else if (!skip_nvshmem) {
      dev::signal_peer_one(nullptr, p.sig + idx, epoch, p.pe[q]);
    }
  }
}

// One tile of a move: copy (one source) or reduce (several) into every destination. Destinations a
// peer pointer reaches get one load and several vector stores; the others an NVSHMEM put.
template <class Op>
__device__ __forceinline__ void move_tile(const Params<Op>& p, const typename Op::Step& st, int64_t lo, int64_t n, int64_t t,
                                          uint64_t epoch) {
  constexpr bool kInProduced = Op::kGemm == Gemm::kProduce;  // gemm_rs: the input is written during the call
  const char* src[Op::kMaxSrc];
  bool ro[Op::kMaxSrc];
  for (int i = 0; i < Op::kMaxSrc; ++i) {
    src[i] = i < st.nsrc ? seg_ptr(p, st.src[i], lo) : nullptr;
    ro[i] = i < st.nsrc && st.src[i].buf == kIn && !kInProduced;  // read-only for the whole kernel
  }
  char* dst[Op::kMaxDst];
  int nd = 0;
  bool remote_nvshmem = false;
  for (int i = 0; i < st.ndst; ++i) {
    char* d = seg_ptr(p, st.dst[i], lo);
    if (d) dst[nd++] = d;
    else remote_nvshmem = true;
  }
  const char* from = src[0];
  if (st.nsrc == 1) {
    if (ro[0]) dev::copy_multi<Op::kMaxDst, true>(dst, nd, src[0], n, threadIdx.x, blockDim.x);
    else dev::copy_multi<Op::kMaxDst, false>(dst, nd, src[0], n, threadIdx.x, blockDim.x);
  } else if constexpr (Op::kReduces) {
    if (!remote_nvshmem) {
      dev::reduce_multi<typename Op::Elem, Reduce<Op>, Op::kMaxSrc, Op::kMaxDst>(dst, nd, src, st.nsrc, ro, n, threadIdx.x,
                                                                                 blockDim.x, reduce_fn(p, st));
      return;
    }
    // Some destination is reachable only through NVSHMEM: reduce into this CTA's staging first.
    char* stage = p.stage + static_cast<int64_t>(blockIdx.x) * Op::kStageBytes;
    char* const sdst[1] = {stage};
    dev::reduce_multi<typename Op::Elem, Reduce<Op>, Op::kMaxSrc, 1>(sdst, 1, src, st.nsrc, ro, n, threadIdx.x, blockDim.x,
                                                                      reduce_fn(p, st));
    __syncthreads();
    dev::copy_multi<Op::kMaxDst, false>(dst, nd, stage, n, threadIdx.x, blockDim.x);
    from = stage;
  }
  if (!remote_nvshmem) return;
  const bool staged = st.nsrc > 1;  // blocking puts: the staging is reused by the next tile
  for (int i = 0; i < st.ndst; ++i) {
    if (seg_ptr(p, st.dst[i], lo)) continue;
    const int q = p.pe[abs_rank(p, st.dst[i].rank)];  // (a PE from here on)
    char* sym = seg_sym(p, st.dst[i], lo);
    uint64_t* flag = p.sig + signals<Op>().flag(st.dst[i].buf, st.dst[i].slot, t);
    if (Op::kPerTile && staged) dev::put_signal_block<false>(nullptr, sym, from, n, nullptr, flag, epoch, q);
    else if (Op::kPerTile) dev::put_signal_block<true>(nullptr, sym, from, n, nullptr, flag, epoch, q);
    else if (staged) dev::put_block<false>(nullptr, sym, from, n, q);
    else dev::put_block<true>(nullptr, sym, from, n, q);
  }
  if (staged) __syncthreads();
}

// ------------------------------------------------------------------------------------------- LL
// Line `line` of scratch slot `slot` in the LL buffer `base` (one rank's), in this call's half.
template <class Op>
__device__ __forceinline__ char* ll_addr(const Params<Op>& p, char* base, int slot, int64_t line, uint64_t epoch) {
  const int64_t stride = 2 * ((p.part + 7) / 8 * 8);  // a slot: one 16-byte line per 8 bytes of a part
  return base + (epoch & 1) * (Op::kLLBytes / 2) + slot * stride + line * 16;
}

// One LL step. Line i of every unit goes to the same thread of the grid, so a thread that reads a
// unit's bytes in one step and writes the same bytes in a later one does so in program order.
template <class Op>
__device__ __forceinline__ bool ll_step(const Params<Op>& p, const typename Op::Step& st, int64_t len, uint64_t epoch,
                                        int s) {
  using T = typename Op::Elem;
  const uint32_t flag = static_cast<uint32_t>(epoch);
  const int64_t lines = (len + 7) / 8;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < lines;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t lo = i * 8;
    const int n = len - lo < 8 ? static_cast<int>(len - lo) : 8;
    uint64_t v = 0;
    typename dev::Acc<T>::type acc[8 / sizeof(T)];
    for (int k = 0; k < st.nsrc; ++k) {
      const Seg& g = st.src[k];
      uint64_t x;
      if (g.buf == kScr) {
        if (!dev::ll_load(ll_addr(p, p.ll, g.slot, i, epoch), flag, &x, p.wait, g.slot, s)) return false;
      } else {
        x = dev::load8<true>(seg_ptr(p, g, lo), n);  // the input: read-only during the call (LL reads no other)
      }
      if (st.nsrc == 1) v = x;
      else if constexpr (Op::kReduces) dev::combine8<T>(acc, x, k == 0, k, reduce_fn(p, st));
    }
    if constexpr (Op::kReduces)
      if (st.nsrc > 1) v = dev::pack8<T>(acc);
    for (int k = 0; k < st.ndst; ++k) {
      const Seg& d = st.dst[k];
      if (d.buf == kScr) {
        const int q = abs_rank(p, d.rank);
        dev::ll_store(ll_addr(p, q == p.rank ? p.ll : p.ll_peer[q], d.slot, i, epoch), v, flag);
      } else {
        dev::store8(seg_ptr(p, d, lo), v, n);  // this rank's out (the checker allows no other)
      }
    }
  }
  return true;
}

// The entry handshake: CTA 0 tells the ranks that write into this one that it entered the call;
// every CTA waits until the ranks it writes into have entered it.
template <class Op>
__device__ __forceinline__ bool enter_call(const Params<Op>& p, const typename Op::Step& st, uint64_t epoch, int s) {
  __shared__ int ok;
  if (blockIdx.x == 0 && threadIdx.x == 0)
    for (int q = 0; q < p.world; ++q)
      if (st.notify >> q & 1u) {
        const int a = abs_rank(p, q);
        if (p.sig_peer[a]) dev::st_release_sys(p.sig_peer[a] + p.rank, epoch);  // no data precedes it: no fence
        else dev::signal_peer_one(nullptr, p.sig + p.rank, epoch, p.pe[a]);
      }
  if (threadIdx.x == 0) {
    ok = 1;
    for (int q = 0; q < p.world && ok; ++q)
      if (st.await_mask >> q & 1u) {
        const int a = abs_rank(p, q);
        ok = dev::wait_ge(p.sig + a, epoch, p.wait, SignalKind::kEntry, a, s);
      }
  }
  __syncthreads();
  return ok;
}

// One tile of a non-LL step; false when a bounded wait gave up (the whole block returns).
template <class Op>
__device__ __forceinline__ bool run_tile(const Params<Op>& p, const typename Op::Step& st, int64_t len, int64_t t,
                                         uint64_t epoch, int s) {
  if (Op::kPerTile && st.nwait)
    if (!wait_flags(p, st, t, epoch, s)) return false;
  if (st.kind != kMove) return true;
  const int64_t lo = t * p.tile;
  move_tile(p, st, lo, len - lo < p.tile ? len - lo : p.tile, t, epoch);
  if (Op::kPerTile) {
    __syncthreads();
    if (threadIdx.x == 0) signal_dests(p, st, t, epoch, true);
  }
  return true;
}

// Tiles of a unit go to CTAs round-robin (tile t to CTA t % grid), the same rule on every rank.
// Collectives with per-tile flags go tile-major: round k runs tile k * grid + CTA of every step in
// turn (a step that waits for peers' data: the tile of round k - 1), so a later step (a reduction,
// a forward) works on tiles while earlier steps still send others (tilegen/collective/check.py simulates this
// order). GEMM ops and barrier mode go step by step.
template <class Op>
__global__ void __launch_bounds__(Op::kThreads) kernel(const __grid_constant__ Params<Op> p) {
  constexpr bool kTileMajor = Op::kPerTile && Op::kGemm == Gemm::kNone;
  __shared__ uint64_t s_epoch;
  __shared__ typename Op::Step s_steps[Op::kMaxSteps];  // the program, read once (not a global load per field)
  __shared__ int64_t s_len[Op::kMaxSteps];
  if (threadIdx.x == 0) s_epoch = p.epoch_src ? dev::ld_acquire_gpu(p.epoch_src) : dev::ld_acquire_gpu(p.state) + 1;
  {
    static_assert(sizeof(typename Op::Step) % 4 == 0, "steps are copied as words");
    const uint32_t* from = reinterpret_cast<const uint32_t*>(p.steps);
    uint32_t* to = reinterpret_cast<uint32_t*>(s_steps);
    const int words = p.nsteps * static_cast<int>(sizeof(typename Op::Step) / 4);
    for (int i = threadIdx.x; i < words; i += blockDim.x) to[i] = __ldg(from + i);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.nsteps; i += blockDim.x)
    s_len[i] = layout::unit_length(Op::kChunks, p.in_bytes, p.shard, p.part, p.parts, s_steps[i].unit);
  __syncthreads();
  const uint64_t epoch = s_epoch;  // calls on a stream are ordered: the previous one published its epoch
  if (p.is_ll) {
    bool ok = true;  // a thread whose wait timed out skips the rest (the block still exits together)
    for (int s = 0; s < p.nsteps && ok; ++s) ok = ll_step(p, s_steps[s], s_len[s], epoch, s);
  } else {
    int s0 = 0;
    for (; s0 < p.nsteps && s_steps[s0].kind == kEntry; ++s0)
      if (!enter_call(p, s_steps[s0], epoch, s0)) return;
    if (kTileMajor) {
      for (int64_t t0 = blockIdx.x;; t0 += gridDim.x) {
        bool any = false;
        for (int s = s0; s < p.nsteps; ++s) {
          // a step that waits for peers' data runs one round behind: its tile arrived while this
          // CTA sent the round's other tiles (software pipelining: the wait is rarely a wait)
          const int64_t t = s_steps[s].nwait ? t0 - gridDim.x : t0;
          if (t < 0) {
            any |= s_len[s] > 0;
            continue;
          }
          if (t * p.tile >= s_len[s]) continue;
          any = true;
          if (!run_tile(p, s_steps[s], s_len[s], t, epoch, s)) return;
        }
        if (!any) break;
      }
    } else {
      for (int s = s0; s < p.nsteps; ++s) {
        const typename Op::Step& st = s_steps[s];
        const int64_t len = s_len[s];
        const int64_t ntiles = (len + p.tile - 1) / p.tile;
        if (st.kind == kMove) {
          if (!Op::kPerTile && st.nwait && blockIdx.x < ntiles)
            if (!wait_flags(p, st, 0, epoch, s)) return;
          for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x)
            if (!run_tile(p, st, len, t, epoch, s)) return;
          if (!Op::kPerTile) {
            if (threadIdx.x == 0) nvshmem_quiet();  // NVSHMEM puts of this block are complete (no-op without any)
            if (dev::arrive_last(p.state + 2 + s, gridDim.x) && threadIdx.x == 0) signal_dests(p, st, 0, epoch, false);
          }
        } else if (Op::kPerTile) {  // kWait
          for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x)
            if (!wait_flags(p, st, t, epoch, s)) return;
        } else if (blockIdx.x == 0) {
          if (!wait_flags(p, st, 0, epoch, s)) return;
        }
      }
    }
  }
  if constexpr (Op::kEpilogue) {  // the reduced rows (p.out, the op's buffer) into the caller's output
    if (!epi::grid_sync(p.bar, epoch, p.wait, p.nsteps)) return;
    epi::rows<Op>(p, Op::kEps);
  }
  // The last block to leave resets the step counters and publishes the epoch for the next call
  // (gpu scope: only this device's next kernel reads them, and nothing remote is ordered by it).
  if (dev::arrive_last<false>(p.state + 1, gridDim.x) && threadIdx.x == 0) {
    for (int i = 0; i < Op::kMaxSteps; ++i) p.state[2 + i] = 0;
    p.state[1] = 0;
    dev::st_release_gpu(p.state, epoch);
  }
}

}  // namespace coll
}  // namespace tilegen
