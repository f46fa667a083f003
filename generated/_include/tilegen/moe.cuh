// tilegen MoE library: expert-parallel token dispatch and combine over NVLink (one node). The layout and
// protocol are tilegen/moe.py's, checked there before any op is generated. Normal mode:
//
// dispatch  route (per block of 32 tokens: each item's rank among the block's items of its expert,
//           each token's rank among the block's tokens to each rank) -> scan (prefix over blocks,
//           totals) -> push: every token once per destination rank, into its staging row there
//           (this rank's segment of max_tokens rows), with a meta row (token, experts, each item's
//           index among this rank's items of its expert, weights); block 0 first writes this rank's
//           counts (per expert of the destination, tokens) there; the last block sets its flag ->
//           wait for every rank's flag, counts to the host (the caller sizes the outputs) -> expand:
//           each staging row copied to its items' final rows (per local expert, source, token, slot).
// combine   per staging row, the weighted sum of its local items' expert outputs (fp32, slot order),
//           rounded to the token dtype and pushed into the source rank's receive rows (one per sending
//           rank: half the NVLink bytes of fp32) -> flags -> each source sums the rows of the ranks its
//           token went to, in fp32, in rank order, rounded once.
// Buffers alternate between two halves by call parity: a rank writes a peer's half of call n + 2
// only after that peer's flag of call n + 1, which it set after it finished reading call n's.
// Low-latency mode (decode sizes, CUDA-graph capturable) has a dispatch of its own (ll_push, ll_expand
// below: each source sends its tokens as lines that carry the call's epoch, which each destination copies
// into the outputs as they land) and the same combine. Each half's second kernel (ll_expand,
// combine_reduce) launches early and reads only tagged lines or what flags publish, so its start
// overlaps the first kernel (launch_early).
#pragma once
#include <cstdint>
#include <cstring>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include "tilegen/device.cuh"
#include "tilegen/host_msg.h"

namespace tilegen {
namespace moe {

constexpr int kBlockTokens = 32;  // tokens per routing block
constexpr int kWarps = 16;        // warps per CTA of the copy kernels
enum CopyKernel { kPush, kExpand, kSend, kReduce, kLLPush, kLLExpand, kKernels };

// Pieces of a row in a large call: at most ~4 KiB each.
constexpr int pieces_of(int64_t bytes) { return static_cast<int>((bytes + 4095) / 4096); }

template <class Op>
struct Dims {
  static constexpr int kMeta = 1 + 3 * Op::kTopk;  // meta row: token, experts[k], indices[k], weight bits[k]
  static constexpr int64_t kRowBytes = Op::kHidden * static_cast<int64_t>(sizeof(typename Op::Elem));  // x, y
  static constexpr int kVec = 16 / sizeof(typename Op::Elem);  // elements per 16-byte vector
  // fp8 dispatch (Op::kFp8Group > 0): staging and received rows hold e4m3 bytes (x / scale per group
  // of kFp8Group channels, scale = amax / 448), the staging row then its fp32 scales.
  static constexpr bool kFp8 = Op::kFp8Group > 0;
  static constexpr int64_t kGroups = kFp8 ? Op::kHidden / Op::kFp8Group : 0;
  static constexpr int64_t kScaleBytes = (kGroups * 4 + 15) / 16 * 16;
  static constexpr int64_t kOutRowBytes = kFp8 ? Op::kHidden : kRowBytes;  // a received row's payload
  static constexpr int64_t kStageRowBytes = kOutRowBytes + kScaleBytes;     // a staging row
  // What each kernel walks per row (Host::*_cut cut it into pieces, a warp each): the push 16-byte
  // payload vectors or (fp8) steps of 8 channels; the expansion the payload's 16-byte vectors; combine
  // rows of the token dtype, twice an fp8 payload row.
  static constexpr int64_t kPushUnits = kFp8 ? Op::kHidden / 8 : kOutRowBytes / 16;
  static constexpr int64_t kExpandUnits = kOutRowBytes / 16, kCombineUnits = kRowBytes / 16;
  // Pieces of a row in a large call (fp8 push: whole tokens, per-token scales)
  static constexpr int kPushPieces = kFp8 ? 1 : pieces_of(kOutRowBytes);
  static constexpr int kExpandPieces = pieces_of(kOutRowBytes), kCombinePieces = pieces_of(kRowBytes);
};

// A row of `units` work units in pieces of `per` units, one warp each, sized on the host per call
// (Host::cut_for): a decode-sized call is latency-bound and wants every warp's stores in flight.
struct Cut {
  int pieces;
  int64_t per, units;
  __host__ __device__ int64_t lo(int ch) const { return ch * per; }
  __host__ __device__ int64_t hi(int ch) const { return (ch + 1) * per < units ? (ch + 1) * per : units; }
};

// Phase stamps, for profiling (Host::set_trace; tools/profile_moe.py --trace): with a trace buffer set,
// thread 0 of each CTA writes %globaltimer (ns) when its CTA reaches each phase of each kernel, into
// trace[(kernel * kTracePhases + phase) * kTraceCtas + cta]. Off (null buffer): one branch per phase.
constexpr int kTraceKernels = 7, kTracePhases = 6, kTraceCtas = 1024;
enum TraceKernel { kTraceRoute, kTracePush, kTraceExpand, kTraceSend, kTraceReduce, kTraceLLPush, kTraceLLExpand };
__device__ __forceinline__ uint64_t* trace_slot(uint64_t* trace, int kernel, int phase) {  // (this CTA's)
  return trace + (kernel * kTracePhases + phase) * kTraceCtas + blockIdx.x;
}
__device__ __forceinline__ void stamp(uint64_t* trace, int kernel, int phase) {
  if (trace && threadIdx.x == 0 && blockIdx.x < kTraceCtas) *trace_slot(trace, kernel, phase) = dev::globaltimer_ns();
}
// A warp's stamp (lane 0), kept where it is its CTA's latest: phases that every warp reaches on its own.
// `after`: a loaded value the stamp waits for (a branch on it comes first).
__device__ __forceinline__ void stamp_latest(uint64_t* trace, int kernel, int phase, int lane, int64_t after = 0) {
  if (trace && lane == 0 && blockIdx.x < kTraceCtas && after != INT64_MIN)
    atomicMax(reinterpret_cast<unsigned long long*>(trace_slot(trace, kernel, phase)),
              static_cast<unsigned long long>(dev::globaltimer_ns()));
}

// fp8: a group's scale (amax / 448; 1 where the group is all zero), and 8 values x / scale as e4m3 bytes,
// rounded to nearest even, saturating (the same arithmetic as tilegen.moe_nccl.quantize).
__device__ __forceinline__ float fp8_scale(float amax) { return amax > 0.f ? amax / 448.f : 1.f; }
__device__ __forceinline__ uint2 quantize8(const float (&f)[8], float scale) {
  uint32_t packed[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(make_float2(f[4 * h] / scale, f[4 * h + 1] / scale),
                                                              __NV_SATFINITE, __NV_E4M3);
    const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(make_float2(f[4 * h + 2] / scale, f[4 * h + 3] / scale),
                                                              __NV_SATFINITE, __NV_E4M3);
    packed[h] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  return make_uint2(packed[0], packed[1]);
}
// Channels [8v, 8v + 8) of a 16-bit token row as floats.
template <class T>
__device__ __forceinline__ void load8_channels(const T* x, int64_t v, float (&f)[8]) {
  const int4 raw = __ldg(reinterpret_cast<const int4*>(x) + v);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int q = 0; q < 8; ++q) f[q] = dev::to_acc(e[q]);
}

// fp8 dispatch: one warp quantizes steps [vlo, vhi) (8 channels each) of token row x into every
// destination row dst[d] (e4m3 bytes) and its scales sdst[d] (one fp32 per group). Per-128 pieces start
// at a group; per-token scales take the row's amax from the caller (round_amax: the CTA read each row once).
template <class Op, int N>
__device__ __forceinline__ void quantize_row(char* const (&dst)[N], float* const (&sdst)[N], int nd,
                                             const typename Op::Elem* x, int lane, int64_t vlo, int64_t vhi,
                                             float row_amax) {
  using T = typename Op::Elem;
  constexpr int64_t H = Op::kHidden, G = Op::kFp8Group;
  static_assert(sizeof(T) == 2 && (G == H || G == 128), "fp8 dispatch quantizes 16-bit tokens per token or 128 channels");
  for (int64_t base = vlo; base < vhi; base += 32) {
    const int64_t v = base + lane;
    const bool active = v < vhi;
    float f[8] = {};
    if (active) load8_channels(x, v, f);
    float amax = row_amax;
    if constexpr (G != H) {  // 128 channels: 16 lanes
      amax = 0.f;
#pragma unroll
      for (int q = 0; q < 8; ++q) amax = fmaxf(amax, fabsf(f[q]));
#pragma unroll
      for (int off = 8; off >= 1; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    }
    const float scale = fp8_scale(amax);
    const uint2 packed = quantize8(f, scale);
    if (!active) continue;
    const int64_t g = v * 8 / G;
    for (int d = 0; d < nd; ++d) {
      *reinterpret_cast<uint2*>(dst[d] + v * 8) = packed;
      if (v * 8 % G == 0) sdst[d][g] = scale;
    }
  }
}

// fp8 scales: the amax of each scale group of every token a CTA's round of items [base, base + kWarps)
// touches (at most kWarps tokens), each row read once by all the CTA's threads into
// amax_bits[(t - base / pieces) * groups + group] (float bits: non-negative floats order as unsigned ints).
// A warp per piece reading its whole row re-read each row once per piece: 28 times per token at 128
// tokens, ~10 us of a decode-sized push. Every thread of the CTA calls it (barriers).
template <class Op>
__device__ __forceinline__ void round_amax(const typename Op::Elem* x, int64_t base, int64_t items, int pieces,
                                           unsigned* amax_bits) {
  using T = typename Op::Elem;
  constexpr int64_t nvec = Op::kHidden / 8;            // 16-byte vectors per row
  constexpr int64_t gvec = Op::kFp8Group / 8;          // ... per scale group
  constexpr int kSlots = kWarps * (Op::kHidden / Op::kFp8Group);
  constexpr int U = 4;                                 // loads in flight per thread
  const int64_t t0 = base / pieces, t1 = ((base + kWarps < items ? base + kWarps : items) - 1) / pieces;
  const int64_t n = (t1 - t0 + 1) * nvec;
  const int4* row0 = reinterpret_cast<const int4*>(x + t0 * Op::kHidden);
  __syncthreads();  // (every warp took the last round's amax)
  for (int i = threadIdx.x; i < kSlots; i += blockDim.x) amax_bits[i] = 0;
  __syncthreads();
  for (int64_t v0 = threadIdx.x; v0 < n; v0 += U * blockDim.x) {
    int4 raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + u * blockDim.x;
      raw[u] = v < n ? __ldg(row0 + v) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + u * blockDim.x;
      if (v >= n) break;
      const T* e = reinterpret_cast<const T*>(&raw[u]);
      float a = 0.f;
#pragma unroll
      for (int q = 0; q < 8; ++q) a = fmaxf(a, fabsf(dev::to_acc(e[q])));
      atomicMax(amax_bits + v / gvec, __float_as_uint(a));
    }
  }
  __syncthreads();
}

// One warp: piece ch (cut) of a row of 16-byte units from src into rows dst[0, nd), each pointer advanced
// to the piece (SRC_READ_ONLY: src is not written while the kernel runs, so loads may go through L1).
template <bool SRC_READ_ONLY, int N>
__device__ __forceinline__ void copy_piece(char* (&dst)[N], int nd, const char* src, const Cut& cut, int ch, int lane) {
  const int64_t lo = cut.lo(ch) * 16, bytes = cut.hi(ch) * 16 - lo;
#pragma unroll
  for (int d = 0; d < N; ++d)
    if (d < nd) dst[d] += lo;
  dev::copy_multi<N, SRC_READ_ONLY>(dst, nd, src + lo, bytes, lane, 32);
}

// Both pushes' item loop: each warp takes pieces of token rows of x (the cut's items, CTA-uniform
// rounds), `dests(t, dst, sdst)` names token t's destination rows (and, fp8, their scales) and returns
// how many (at most N), the piece is copied (or quantized) into all of them, and `bookkeep(t, nd, lane)`
// follows on each token's first piece.
template <class Op, int N, class Dests, class Bookkeep>
__device__ __forceinline__ void push_pieces(const char* x, int64_t m, const Cut& cut, Dests dests, Bookkeep bookkeep) {
  using D = Dims<Op>;
  using T = typename Op::Elem;
  constexpr bool kTokenScales = D::kFp8 && Op::kFp8Group == Op::kHidden;
  __shared__ unsigned amax_bits[kWarps];
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps, items = m * cut.pieces;
  for (int64_t round = blockIdx.x * kWarps; round < items; round += nwarps) {  // (uniform over the CTA)
    if constexpr (kTokenScales) round_amax<Op>(reinterpret_cast<const T*>(x), round, items, cut.pieces, amax_bits);
    const int64_t item = round + (threadIdx.x >> 5);
    if (item >= items) continue;
    const int64_t t = item / cut.pieces;
    const int ch = static_cast<int>(item % cut.pieces);
    char* dst[N];
    float* sdst[N];
    const int nd = dests(t, dst, sdst);
    if constexpr (D::kFp8) {
      const float row_amax = kTokenScales ? __uint_as_float(amax_bits[t - round / cut.pieces]) : 0.f;
      quantize_row<Op>(dst, sdst, nd, reinterpret_cast<const T*>(x) + t * Op::kHidden, lane, cut.lo(ch), cut.hi(ch),
                       row_amax);
    } else {
      copy_piece<true>(dst, nd, x + t * D::kRowBytes, cut, ch, lane);  // (x: the caller's input)
    }
    if (ch == 0) bookkeep(t, nd, lane);
  }
}

// Expert id of routing entry i; ids outside [0, experts) count as dropped (-1) everywhere, so a bad
// routing that skipped the caller's check cannot write outside any buffer.
__device__ __forceinline__ int load_expert(const void* idx, int64_t i, int idx64, int experts) {
  const int64_t e = idx64 ? static_cast<const int64_t*>(idx)[i] : static_cast<const int32_t*>(idx)[i];
  return e >= 0 && e < experts ? static_cast<int>(e) : -1;
}

// ------------------------------------------------------------------------------------- dispatch
struct RouteParams {
  const void* idx;
  int idx64;
  int64_t m;
  int world, local;  // ranks, experts per rank
  int32_t* hist;     // [blocks][experts + world]: counts per block, then (scan) exclusive prefixes
  int32_t* rib;      // [m][k]: rank of each item among its block's items of the same expert (-1: dropped)
  int32_t* ribd;     // [m][world]: rank of each token among its block's tokens to that rank (-1: none)
  int32_t* totals;   // [experts + world]: items per expert, tokens per destination rank
  uint64_t* counter;  // blocks arrived (the last scans, then resets it)
  uint64_t* trace;    // phase stamps (null: off): start, counts stored, done
};

// The last block of route_block: per column (expert, then destination), the exclusive prefix over
// blocks, and the totals.
template <class Op>
__device__ __forceinline__ void scan_blocks(const RouteParams& p, int blocks) {
  const int C = Op::kExperts + p.world;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    int32_t run = 0;
    for (int b = 0; b < blocks; ++b) {
      const int32_t v = __ldcg(p.hist + b * C + c);  // (other blocks wrote it: past this SM's L1)
      p.hist[b * C + c] = run;
      run += v;
    }
    p.totals[c] = run;
  }
}

template <class Op>
__global__ void route_block(RouteParams p) {
  constexpr int K = Op::kTopk, E = Op::kExperts;
  __shared__ int32_t e_s[kBlockTokens * K];
  __shared__ int32_t hist[E + Op::kMaxWorld];
  stamp(p.trace, kTraceRoute, 0);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kBlockTokens;
  const int nt = static_cast<int>(p.m - t0 < kBlockTokens ? p.m - t0 : kBlockTokens);
  const int C = E + p.world, lane = threadIdx.x & 31;
  for (int i = threadIdx.x; i < C; i += blockDim.x) hist[i] = 0;
  for (int i = threadIdx.x; i < kBlockTokens * K; i += blockDim.x)
    e_s[i] = i / K < nt ? load_expert(p.idx, t0 * K + i, p.idx64, E) : -1;
  __syncthreads();
  if (threadIdx.x < 32) {  // warp 0: each item's rank among the block's items of its expert, 32 at a time
    for (int i0 = 0; i0 < nt * K; i0 += 32) {  // (token, slot) order
      const int i = i0 + lane, e = i < nt * K ? e_s[i] : -1;
      const unsigned same = __match_any_sync(0xffffffffu, e);
      const int before = __popc(same & ((1u << lane) - 1));
      const int r = e >= 0 ? hist[e] + before : -1;
      __syncwarp();  // every lane read its expert's count before the group's first lane adds the group
      if (e >= 0 && before == 0) hist[e] += __popc(same);
      __syncwarp();
      if (i < nt * K) p.rib[t0 * K + i] = r;
    }
  } else if (threadIdx.x < 64) {  // warp 1: each token's rank among the block's tokens to each rank
    static_assert(kBlockTokens == 32, "a routing block's tokens are one warp's lanes");
    uint32_t mask = 0;
    for (int j = 0; j < K && lane < nt; ++j)
      if (e_s[lane * K + j] >= 0) mask |= 1u << (e_s[lane * K + j] / p.local);
    for (int d = 0; d < p.world; ++d) {
      const unsigned to_d = __ballot_sync(0xffffffffu, mask >> d & 1);
      if (lane < nt) p.ribd[(t0 + lane) * p.world + d] = mask >> d & 1 ? __popc(to_d & ((1u << lane) - 1)) : -1;
      if (lane == 0) hist[E + d] = __popc(to_d);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < C; i += blockDim.x) p.hist[blockIdx.x * C + i] = hist[i];
  stamp(p.trace, kTraceRoute, 1);
  if (dev::arrive_last<false>(p.counter, gridDim.x)) {  // every block's counts precede the scan
    if (threadIdx.x == 0) *p.counter = 0;  // for the next call (a CUDA graph replays the same target)
    scan_blocks<Op>(p, gridDim.x);
  }
  stamp(p.trace, kTraceRoute, 2);
}

template <class Op>
struct PushParams {
  const char* x;
  const void* idx;
  int idx64;
  const float* w;
  int64_t m;
  const int32_t* prefix;  // RouteParams::hist after the scan
  const int32_t* rib;
  const int32_t* ribd;
  const int32_t* totals;
  char* stage[Op::kMaxWorld];     // at each rank: this rank's staging segment of the call's half
  int32_t* meta[Op::kMaxWorld];   // ... its meta rows
  int32_t* info[Op::kMaxWorld];   // ... its counts row (the destination's local experts, then tokens)
  uint64_t* flag[Op::kMaxWorld];  // ... its dispatch flag
  uint64_t* counter;  // blocks arrived (the last resets it)
  uint64_t epoch;
  int me, world, local;
  Cut cut;  // of a token row (Dims::kPushUnits)
  uint64_t* trace;  // phase stamps (null: off): start, rows pushed, arrived (last CTA: flags set)
};

// Low-latency flags. Each half's epoch is one more than the other half's last, read from this rank's own
// flag of that half here (dispatch: its combine flag, combine: its dispatch flag): only this rank sets
// that word, in the half before, so it holds still while this half runs (MoeOp makes calls alternate),
// and no kernel of the half writes anything its other kernels must read before their flags. The
// dispatch flag (set by ll_push here, for this rank only: the other ranks read lines) also carries the
// rows it kept.
constexpr int kLLCountBits = 20;
__host__ __device__ constexpr uint64_t ll_flag(uint64_t epoch, int64_t rows) {
  return epoch << kLLCountBits | static_cast<uint64_t>(rows);
}
__host__ __device__ constexpr uint64_t ll_epoch(uint64_t flag) { return flag >> kLLCountBits; }

// The call's epoch: the host's (normal mode), or (low-latency combine) the one in this rank's own
// dispatch flag here.
__device__ __forceinline__ uint64_t call_epoch(uint64_t host, const uint64_t* own_dispatch_flag) {
  return own_dispatch_flag ? ll_epoch(dev::ld_acquire_gpu(own_dispatch_flag)) : host;
}
// The low-latency dispatch's epoch: one more than this rank's own combine flag here (the last combine's
// epoch; only this rank sets it, in the half before, so it holds still while the dispatch runs).
__device__ __forceinline__ uint64_t ll_dispatch_epoch(const uint64_t* own_combine_flag) {
  return dev::ld_acquire_gpu(own_combine_flag) + 1;
}

// The copy kernels' end: the last block to arrive resets the arrival counter and sets each rank's flag
// (flag[d]: this rank's word at rank d) to the call's epoch; true in that block. Blocks arrive by a
// gpu-scope acq_rel atomic (after the block barrier: it releases every warp's stores, the peers' too),
// and only the last block fences at system scope, before its flag stores: causality is transitive across
// the two scopes (PTX memory model), so a peer that acquires the flag sees every block's stores. A system
// fence in every block (each waiting for its own stores to reach the peers) cost 3-4 us of a decode-sized
// dispatch on 4 x H100, and a fence then a release store per flag (two system fences each) 1.5-2 us of the
// low-latency push and combine's send: one thread fences once, then stores every flag relaxed (a
// release pattern each: fence, then a strong store of the same thread; docs/measurements.md).
// value(d): rank d's flag.
template <class Value>
__device__ __forceinline__ void set_flags(uint64_t* counter, uint64_t* const* flag, int world, Value value) {
  if (threadIdx.x != 0) return;
  *counter = 0;  // for the next call (a CUDA graph replays the same target)
  dev::fence_acq_rel_sys();
  for (int d = 0; d < world; ++d) dev::st_relaxed_sys(flag[d], value(d));
}
__device__ __forceinline__ bool signal_when_last(uint64_t* counter, uint64_t* const* flag, int world, uint64_t epoch,
                                                 const uint64_t* own_dispatch_flag) {
  if (!dev::arrive_last<false>(counter, gridDim.x)) return false;
  const uint64_t v = threadIdx.x == 0 ? call_epoch(epoch, own_dispatch_flag) : 0;
  set_flags(counter, flag, world, [v](int) { return v; });
  return true;
}

template <class Op>
__global__ void __launch_bounds__(kWarps * 32, 2) push_tokens(PushParams<Op> p) {
  using D = Dims<Op>;
  constexpr int K = Op::kTopk, E = Op::kExperts;
  stamp(p.trace, kTracePush, 0);
  const int C = E + p.world;
  // Every destination's counts row (its local experts, then tokens), first and by block 0, an entry per
  // thread: the routing knows them, and the last block then only fences and signals (a tail that wrote
  // them after every push kept one CTA running long after the others).
  const int row = p.local + 1;
  for (int i = threadIdx.x; blockIdx.x == 0 && i < p.world * row; i += blockDim.x) {
    const int d = i / row, l = i % row;
    p.info[d][l] = l < p.local ? p.totals[d * p.local + l] : p.totals[E + d];
  }
  int32_t* mdst[Op::kMaxWorld];  // each destination's meta row of the token
  const auto dests = [&](int64_t t, char** dst, float** sdst) {
    const int64_t b = t / kBlockTokens;
    int nd = 0;
    for (int d = 0; d < p.world; ++d) {
      const int r = p.ribd[t * p.world + d];
      if (r < 0) continue;
      const int64_t row = p.prefix[b * C + E + d] + r;
      dst[nd] = p.stage[d] + row * D::kStageRowBytes;
      sdst[nd] = reinterpret_cast<float*>(dst[nd] + D::kOutRowBytes);  // (fp8: a staging row's scales follow it)
      mdst[nd++] = p.meta[d] + row * D::kMeta;
    }
    return nd;
  };
  const auto meta = [&](int64_t t, int nd, int lane) {  // the same meta row to every destination
    const int64_t b = t / kBlockTokens;
    for (int f = lane; f < D::kMeta; f += 32) {
      int32_t v;
      if (f == 0) {
        v = static_cast<int32_t>(t);
      } else if (f <= K) {
        v = load_expert(p.idx, t * K + f - 1, p.idx64, E);
      } else if (f <= 2 * K) {
        const int j = f - 1 - K, e = load_expert(p.idx, t * K + j, p.idx64, E);
        v = e >= 0 ? p.prefix[b * C + e] + p.rib[t * K + j] : -1;
      } else {
        v = __float_as_int(p.w[t * K + f - 1 - 2 * K]);
      }
      for (int d = 0; d < nd; ++d) mdst[d][f] = v;
    }
  };
  push_pieces<Op, Op::kMaxWorld>(p.x, p.m, p.cut, dests, meta);
  stamp(p.trace, kTracePush, 1);
  signal_when_last(p.counter, p.flag, p.world, p.epoch, nullptr);
  stamp(p.trace, kTracePush, 2);
}

// One warp: every rank's flag of this call, then its counts row, into host-mapped memory.
template <class Op>
__global__ void wait_counts(const uint64_t* flags, const int32_t* info, int32_t* out, int world, int local,
                            uint64_t epoch, dev::WaitCtx ctx) {
  const int lane = threadIdx.x, row = local + 1;
  if (!dev::block_wait_all_ge(flags, world, epoch, ctx, /*kind=*/5, /*step=*/0)) return;  // (a lane per rank)
  // An entry per lane (one lane per source walked its row, a load then a store to host memory per
  // entry: the pattern that kept the push's last CTA running long after the others)
  for (int i = lane; i < world * row; i += 32) out[i] = __ldcg(info + (i / row) * (Op::kExperts + 1) + i % row);
  __threadfence_system();
}

// Inclusive prefix sum of v over the warp's lanes (every lane calls).
__device__ __forceinline__ int32_t warp_inclusive_sum(int32_t v, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int32_t u = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += u;
  }
  return v;
}

// Exclusive prefix sum, in place, of v[0], v[stride], ... v[(n - 1) * stride] by one warp (every lane
// calls): each lane sums a run of ceil(n / 32) entries, the lanes' sums are scanned, then each run.
__device__ __forceinline__ void warp_exclusive_scan(int32_t* v, int n, int stride, int lane) {
  const int per = (n + 31) / 32, l0 = lane * per, l1 = l0 + per < n ? l0 + per : n;
  int32_t sum = 0;
  for (int l = l0; l < l1; ++l) sum += v[l * stride];
  int32_t run = warp_inclusive_sum(sum, lane) - sum;
  for (int l = l0; l < l1; ++l) {
    const int32_t t = v[l * stride];
    v[l * stride] = run;
    run += t;
  }
}

// The source of filled staging row r, the sources' rows being consecutive from first[s] (first[world]: all).
__device__ __forceinline__ int source_of(const int64_t* first, int world, int64_t r) {
  int s = 0;
  while (s + 1 < world && r >= first[s + 1]) ++s;
  return s;
}

// Both expansions' copy, one warp: piece ch of a payload row (src; fp8: its scales at src_scales) into
// output rows dst[0, nd) (dst_row[d] of out; fp8: and their scales, on the first piece).
template <class Op, int K>
__device__ __forceinline__ void copy_to_rows(char* (&dst)[K], const int64_t (&dst_row)[K], int nd, float* scales,
                                             const char* src, const float* src_scales, const Cut& cut, int ch,
                                             int lane) {
  using D = Dims<Op>;
  constexpr int G = D::kFp8 ? (D::kGroups + 31) / 32 : 1;  // scales per lane (piece 0 copies them)
  float sc[G];
  if constexpr (D::kFp8) {  // (loaded beside the payload: one round trip for both, not one after the other)
#pragma unroll
    for (int q = 0; q < G; ++q)
      if (ch == 0 && lane + 32 * q < D::kGroups) sc[q] = __ldcg(src_scales + lane + 32 * q);
  }
  copy_piece<false>(dst, nd, src, cut, ch, lane);  // (src: rows other ranks wrote during this call)
  if constexpr (D::kFp8) {
#pragma unroll
    for (int q = 0; q < G; ++q)
      if (ch == 0 && lane + 32 * q < D::kGroups)
        for (int d = 0; d < nd; ++d) scales[dst_row[d] * D::kGroups + lane + 32 * q] = sc[q];
  }
}

template <class Op>
struct ExpandParams {
  const char* stage;   // this rank's half: [world sources][max_tokens rows]
  const int32_t* meta;
  const int32_t* info;  // [world sources][experts + 1]
  char* out;            // [rows, hidden] (fp8 dispatch: e4m3 bytes)
  float* scales;        // fp8 dispatch: [rows, groups]
  int32_t* handle;      // [rows, 3]: source rank, token, slot
  int32_t* slot_rows;   // [staging rows, k]: each slot's row in out (-1: not here)
  int32_t* stage_src;   // [staging rows, 2]: source rank, token
  float* stage_w;       // [staging rows, k]: the slots' weights (0: not here)
  int32_t* counts;      // [local experts]
  int64_t stage_rows, rows;
  int me, world, local;
  Cut cut;  // of a payload row (Dims::kExpandUnits)
  uint64_t* trace;  // phase stamps (null: off): start, set up, rows copied
};

template <class Op>
__global__ void __launch_bounds__(kWarps * 32, 2) expand_rows(ExpandParams<Op> p) {
  using D = Dims<Op>;
  constexpr int K = Op::kTopk, E = Op::kExperts, W = Op::kMaxWorld;
  __shared__ int32_t base[E];         // [local expert][source]: first row of that source's items
  __shared__ int64_t first[W + 1];    // compact staging row of each source's first
  const int lane = threadIdx.x & 31, L = p.local;
  const int32_t* cnt = p.info;  // cnt[s * (E + 1) + l]
  stamp(p.trace, kTraceExpand, 0);
  for (int l = threadIdx.x; l < L; l += blockDim.x) {  // rows per local expert, then per source in it
    int32_t tot = 0;
    for (int s = 0; s < p.world; ++s) tot += __ldcg(cnt + s * (E + 1) + l);
    base[l * p.world] = tot;
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // one warp scans (one thread walked the experts and sources one by one)
    warp_exclusive_scan(base, L, p.world, lane);
    const int32_t c = lane < p.world ? __ldcg(cnt + lane * (E + 1) + L) : 0;  // each source's staging rows
    const int32_t incl = warp_inclusive_sum(c, lane);
    if (lane < p.world) first[lane] = incl - c;
    if (lane == p.world - 1) first[p.world] = incl;
  }
  __syncthreads();
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    int32_t run = base[l * p.world], tot = 0;
    for (int s = 0; s < p.world; ++s) {
      const int32_t c = __ldcg(cnt + s * (E + 1) + l);
      base[l * p.world + s] = run;
      run += c;
      tot += c;
    }
    if (blockIdx.x == 0) p.counts[l] = tot;
  }
  __syncthreads();
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int P = p.cut.pieces;
  stamp(p.trace, kTraceExpand, 1);
  for (int64_t item = blockIdx.x * kWarps + (threadIdx.x >> 5); item < p.stage_rows * P; item += nwarps) {
    const int64_t r = item / P;
    const int ch = static_cast<int>(item % P);
    const int s = source_of(first, p.world, r);
    const int64_t i = r - first[s];
    const int32_t* mrow = p.meta + (static_cast<int64_t>(s) * Op::kMaxTokens + i) * D::kMeta;
    const int32_t t = __ldcg(mrow);
    char* dst[K];
    int64_t dst_row[K];
    int nd = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int e = __ldcg(mrow + 1 + j);
      int64_t row = -1;
      const int32_t index = e >= 0 ? __ldcg(mrow + 1 + K + j) : -1;
      if (e >= 0 && e / L == p.me) {
        row = base[(e - p.me * L) * p.world + s] + index;
        dst_row[nd] = row;
        dst[nd++] = p.out + row * D::kOutRowBytes;
      }
      if (ch == 0 && lane == j % 32) {
        p.slot_rows[r * K + j] = static_cast<int32_t>(row);
        p.stage_w[r * K + j] = row >= 0 ? __int_as_float(__ldcg(mrow + 1 + 2 * K + j)) : 0.f;
        if (row >= 0) {
          p.handle[row * 3] = s;
          p.handle[row * 3 + 1] = t;
          p.handle[row * 3 + 2] = j;
        }
      }
    }
    if (ch == 0 && lane == 0) p.stage_src[r * 2] = s, p.stage_src[r * 2 + 1] = t;
    const char* src = p.stage + (static_cast<int64_t>(s) * Op::kMaxTokens + i) * D::kStageRowBytes;
    copy_to_rows<Op>(dst, dst_row, nd, p.scales, src, reinterpret_cast<const float*>(src + D::kOutRowBytes), p.cut,
                     ch, lane);  // (fp8: a staging row's scales follow its bytes)
  }
  if (p.trace) __syncthreads();  // (the CTA's last copy, not thread 0's)
  stamp(p.trace, kTraceExpand, 2);
}

// ------------------------------------------------------------------------------------- low-latency dispatch
// Low-latency mode writes the outputs at every rank itself, in symmetric memory (Host::ll_layout: recv rows
// [L][world][max_tokens] (fp8: scales beside), the handle per row, combine's state per (source, token) in
// segments of max_tokens per source, counts [L][world], tokens from each source). One kernel per rank
// routes (every CTA the whole call, in shared memory: a decode call is at most max_tokens tokens) and
// sends each token once to each other rank it goes to, as a line row (LL128 lines, below: the token, its
// slot rows there and their weights, fp8 scales) in that rank's segment for the source (the token's rank
// among those sent there); the rows sent and the counts go first, as head lines. Its own rank's rows and
// state it writes directly, and its last CTA sets its own dispatch flag (this GPU only). The expansion
// (ll_expand) copies each line row into the token's item rows there as its lines land, overlapping the
// push: no fence and no flag between a store and its copy. tilegen/moe.py's _simulate_low_latency runs
// the same layout; moe_program's tagged put and read its protocol.
struct LLLayout {  // byte offsets in a rank's low-latency region
  int64_t out, scales, handle, slot_rows, stage_src, stage_w, counts, ntok, lines, heads, bytes;
};
template <class P>
__device__ __host__ __forceinline__ P* at(char* base, int64_t off) {
  return reinterpret_cast<P*>(base + off);
}

// A line row: the data bytes (meta: token, pad, slot rows there, weights, as int32 / fp32 (K rounded up
// to even); fp8 scales (groups rounded up to even); the payload row) in 128-byte lines of 120 data bytes
// and the call's epoch (dev::ll128_load), whole warp stores of 4 lines (the lines past the data are not
// sent). A head: rows sent, pad, counts per local expert (at most the experts), the same way.
constexpr int kLineBytes = 128, kLineData = 120;
template <class Op>
struct LLLines {
  using D = Dims<Op>;
  static constexpr int kK2 = (Op::kTopk + 1) / 2 * 2;
  static constexpr int64_t kMetaBytes = 4 * (2 + 2 * kK2);
  static constexpr int64_t kPayloadAt = kMetaBytes + 4 * ((D::kGroups + 1) / 2 * 2);
  static constexpr int64_t kData = kPayloadAt + D::kOutRowBytes;
  static constexpr int64_t kLines = (kData + kLineData - 1) / kLineData;
  static constexpr int64_t kUnits = (kLines + 3) / 4;  // warp stores
  static constexpr int64_t kRowBytes = kUnits * 4 * kLineBytes;
  static constexpr int64_t kHeadData = 4 * (2 + Op::kExperts);
  static constexpr int64_t kHeadLines = (kHeadData + kLineData - 1) / kLineData;
  static constexpr int64_t kHeadBytes = (kHeadLines + 3) / 4 * 4 * kLineBytes;
  static_assert(kMetaBytes <= 4 * kLineData, "a row's meta lies in its first warp store (every copying warp reads it)");
};
// Lane's 16 bytes of warp store u: line 4u + lane / 8, at data byte line * 120 + (lane % 8) * 16 (the
// line's last lane: 8 data bytes, then the epoch).
__device__ __forceinline__ int64_t line_of(int64_t u, int lane) { return u * 4 + (lane >> 3); }
__device__ __forceinline__ int64_t line_data_at(int64_t u, int lane) { return line_of(u, lane) * kLineData + (lane & 7) * 16; }
__device__ __forceinline__ int64_t line_byte_at(int64_t u, int lane) { return line_of(u, lane) * kLineBytes + (lane & 7) * 16; }
__device__ __forceinline__ bool epoch_lane(int lane) { return (lane & 7) == 7; }
// Int32 i of the data of a warp store 0 the warp loaded (a, b: each lane's 16 bytes), to every lane (i
// the same in every lane: a lane sends the word its own i names).
__device__ __forceinline__ int32_t line_int(uint64_t a, uint64_t b, int i) {
  const int byte = 4 * i, in_line = byte % kLineData, from = byte / kLineData * 8 + in_line / 16;
  const int word = in_line % 16 / 4;
  const uint64_t v = word < 2 ? a : b;
  return static_cast<int32_t>(__shfl_sync(0xffffffffu, static_cast<uint32_t>(word & 1 ? v >> 32 : v), from));
}

template <class Op>
struct LLRoute {  // shared memory: the call's routing
  static constexpr int kWords = static_cast<int>((Op::kMaxTokens + 31) / 32);
  int32_t e[Op::kMaxTokens * Op::kTopk];  // each item's expert (-1: dropped or out of range)
  uint32_t emask[Op::kExperts][kWords];   // the tokens routed to each expert
  uint32_t dmask[Op::kMaxWorld][kWords];  // ... sent to each rank
};

// Set bits of a token mask below token t: t's rank among the tokens of that mask.
__device__ __forceinline__ int32_t bits_below(const uint32_t* mask, int64_t t) {
  int32_t r = 0;
  for (int64_t i = 0; i < (t >> 5); ++i) r += __popc(mask[i]);
  return r + __popc(mask[t >> 5] & ((1u << (t & 31)) - 1));
}
__device__ __forceinline__ int32_t bits_all(const uint32_t* mask, int words) {
  int32_t r = 0;
  for (int i = 0; i < words; ++i) r += __popc(mask[i]);
  return r;
}

template <class Op>
__device__ __forceinline__ void ll_route(LLRoute<Op>& r, const void* idx, int idx64, int64_t m, int local) {
  constexpr int K = Op::kTopk, NW = LLRoute<Op>::kWords;
  for (int i = threadIdx.x; i < Op::kExperts * NW; i += blockDim.x) (&r.emask[0][0])[i] = 0;
  for (int i = threadIdx.x; i < Op::kMaxWorld * NW; i += blockDim.x) (&r.dmask[0][0])[i] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < m * K; i += blockDim.x) {
    const int e = load_expert(idx, i, idx64, Op::kExperts);
    r.e[i] = e;
    if (e >= 0) {
      const int64_t t = i / K;
      atomicOr(&r.emask[e][t >> 5], 1u << (t & 31));
      atomicOr(&r.dmask[e / local][t >> 5], 1u << (t & 31));
    }
  }
  __syncthreads();
}

template <class Op>
struct LLPushParams {
  const char* x;
  const void* idx;
  int idx64;
  const float* w;
  int64_t m;
  char* ll[Op::kMaxWorld];  // each rank's low-latency region
  LLLayout lay;
  uint64_t* own_flag;       // this rank's dispatch flag here (ll_flag: the epoch, the rows it kept)
  uint64_t* counter;        // CTAs arrived (the last resets it)
  const uint64_t* own_combine_flag;  // this rank's combine flag here: the last combine's epoch
  int me, world, local;
  Cut cut;          // of a line row (LLLines::kUnits warp stores)
  uint64_t* trace;  // phase stamps (null: off): start, routed, rows pushed (warp 0, every warp), arrived, own flag set
};

// Item (t, slot j) of expert e = d * L + l: its row at rank d, segment (l, this source), rank among this
// source's items of e (experts are distinct per token: a token's rank among e's tokens).
template <class Op>
__device__ __forceinline__ int64_t ll_row(const LLRoute<Op>& r, int e, int64_t t, int me, int world, int local) {
  return ((e % local) * static_cast<int64_t>(world) + me) * Op::kMaxTokens + bits_below(r.emask[e], t);
}
// Token t's slot j row at rank d (-1: its expert is elsewhere or the slot dropped).
template <class Op>
__device__ __forceinline__ int64_t ll_slot_row(const LLRoute<Op>& r, int64_t t, int j, int d, int me, int world,
                                               int local) {
  const int e = r.e[t * Op::kTopk + j];
  return e >= 0 && e / local == d ? ll_row<Op>(r, e, t, me, world, local) : -1;
}

// Warp: token t's bookkeeping on this rank: the handle (source, token, slot) of each item row, and
// combine's state in row (this source, token's rank among those kept here): source and token, each
// slot's row here (-1: elsewhere) and weight. (The other ranks' come in the line rows' meta.)
template <class Op>
__device__ __forceinline__ void ll_bookkeep_own(const LLPushParams<Op>& p, const LLRoute<Op>& r, int64_t t, int lane) {
  constexpr int K = Op::kTopk;
  char* base = p.ll[p.me];
  const int64_t srow = p.me * Op::kMaxTokens + bits_below(r.dmask[p.me], t);
  if (lane < K) {
    const int64_t row = ll_slot_row<Op>(r, t, lane, p.me, p.me, p.world, p.local);
    at<int32_t>(base, p.lay.slot_rows)[srow * K + lane] = static_cast<int32_t>(row);
    at<float>(base, p.lay.stage_w)[srow * K + lane] = row >= 0 ? p.w[t * K + lane] : 0.f;
    if (row >= 0) {
      int32_t* h = at<int32_t>(base, p.lay.handle) + row * 3;
      h[0] = p.me, h[1] = static_cast<int32_t>(t), h[2] = lane;
    }
  }
  if (lane == 0) {
    int32_t* src = at<int32_t>(base, p.lay.stage_src) + srow * 2;
    src[0] = p.me, src[1] = static_cast<int32_t>(t);
  }
}

// Int32 i of token t's meta for rank d: token, pad, slot rows there, weights (LLLines).
template <class Op>
__device__ __forceinline__ uint32_t ll_meta_int(const LLPushParams<Op>& p, const LLRoute<Op>& r, int64_t t, int d,
                                                int i) {
  constexpr int K = Op::kTopk, K2 = LLLines<Op>::kK2;
  if (i < 2) return i == 0 ? static_cast<uint32_t>(t) : 0u;
  const int j = i < 2 + K2 ? i - 2 : i - 2 - K2;
  const int64_t row = j < K ? ll_slot_row<Op>(r, t, j, d, p.me, p.world, p.local) : -1;
  if (i < 2 + K2) return static_cast<uint32_t>(static_cast<int32_t>(row));
  return row >= 0 ? __float_as_uint(p.w[t * K + j]) : 0u;
}
template <class Op>
__device__ __forceinline__ uint64_t ll_meta_word(const LLPushParams<Op>& p, const LLRoute<Op>& r, int64_t t, int d,
                                                 int64_t at_byte) {
  const int i = static_cast<int>(at_byte / 4);
  return ll_meta_int<Op>(p, r, t, d, i) | static_cast<uint64_t>(ll_meta_int<Op>(p, r, t, d, i + 1)) << 32;
}

// The 8 data bytes of token t's line row at data byte `at_byte` past the meta (the same at every rank):
// scales (fp8: from the round's group amax) or payload (fp8: 8 channels quantized), 0 past the data.
template <class Op>
__device__ __forceinline__ uint64_t ll_data_word(const LLPushParams<Op>& p, int64_t t, const unsigned* amax,
                                                 int64_t at_byte) {
  using D = Dims<Op>;
  using LN = LLLines<Op>;
  using T = typename Op::Elem;
  if (at_byte >= LN::kData) return 0;
  if (at_byte >= LN::kPayloadAt) {
    const int64_t c = at_byte - LN::kPayloadAt;
    if constexpr (D::kFp8) {
      float f[8];
      load8_channels(reinterpret_cast<const T*>(p.x) + t * Op::kHidden, c / 8, f);
      const uint2 q = quantize8(f, fp8_scale(__uint_as_float(amax[c / Op::kFp8Group])));
      return q.x | static_cast<uint64_t>(q.y) << 32;
    } else {
      return __ldg(reinterpret_cast<const unsigned long long*>(p.x + t * D::kRowBytes + c));
    }
  }
  uint64_t v = 0;
  if constexpr (D::kFp8) {
    const int64_t g = (at_byte - LN::kMetaBytes) / 4;
    const float s0 = fp8_scale(__uint_as_float(amax[g]));
    const float s1 = g + 1 < D::kGroups ? fp8_scale(__uint_as_float(amax[g + 1])) : 0.f;
    v = __float_as_uint(s0) | static_cast<uint64_t>(__float_as_uint(s1)) << 32;
  }
  return v;
}
// ... the same bytes written into this rank's own item rows (payload) or their scales.
template <class Op, int K>
__device__ __forceinline__ void ll_store_own(const LLPushParams<Op>& p, const int32_t (&rows)[K], int64_t at_byte,
                                             uint64_t v) {
  using D = Dims<Op>;
  using LN = LLLines<Op>;
  if (at_byte < LN::kMetaBytes || at_byte >= LN::kData) return;
  char* out = at<char>(p.ll[p.me], p.lay.out);
  float* scales = at<float>(p.ll[p.me], p.lay.scales);
  const int64_t c = at_byte - LN::kPayloadAt, g = (at_byte - LN::kMetaBytes) / 4;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    if (rows[j] < 0) continue;
    if (c >= 0) {
      *reinterpret_cast<uint64_t*>(out + rows[j] * D::kOutRowBytes + c) = v;
    } else {
      scales[rows[j] * D::kGroups + g] = __uint_as_float(static_cast<uint32_t>(v));
      if (g + 1 < D::kGroups) scales[rows[j] * D::kGroups + g + 1] = __uint_as_float(static_cast<uint32_t>(v >> 32));
    }
  }
}

// CTA 0: the counts. Here directly (kept rows, items per local expert); to each other rank d a head:
// rows sent there, pad, items per local expert of d (warp d writes it).
template <class Op>
__device__ __forceinline__ void ll_heads(const LLPushParams<Op>& p, const LLRoute<Op>& r, uint64_t epoch) {
  using LN = LLLines<Op>;
  const int L = p.local, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = threadIdx.x; i < L + 1; i += blockDim.x) {
    if (i < L) at<int32_t>(p.ll[p.me], p.lay.counts)[i * p.world + p.me] = bits_all(r.emask[p.me * L + i], r.kWords);
    else at<int32_t>(p.ll[p.me], p.lay.ntok)[p.me] = bits_all(r.dmask[p.me], r.kWords);
  }
  const int d = warp;
  if (d >= p.world || d == p.me) return;
  char* head = at<char>(p.ll[d], p.lay.heads) + p.me * LN::kHeadBytes;
  const auto head_int = [&](int64_t i) -> uint32_t {
    if (i == 0) return bits_all(r.dmask[d], r.kWords);
    return i >= 2 && i - 2 < L ? bits_all(r.emask[d * L + i - 2], r.kWords) : 0u;
  };
  for (int64_t u = 0; u * 4 < LN::kHeadLines; ++u) {
    if (line_of(u, lane) >= LN::kHeadLines) continue;
    const int64_t i = line_data_at(u, lane) / 4;
    const uint64_t a = head_int(i) | static_cast<uint64_t>(head_int(i + 1)) << 32;
    const uint64_t b = epoch_lane(lane) ? epoch : head_int(i + 2) | static_cast<uint64_t>(head_int(i + 3)) << 32;
    dev::st_volatile_v2(head + line_byte_at(u, lane), a, b);
  }
}

template <class Op>
__global__ void __launch_bounds__(kWarps * 32, 2) ll_push(LLPushParams<Op> p) {
  using D = Dims<Op>;
  using LN = LLLines<Op>;
  using T = typename Op::Elem;
  constexpr int K = Op::kTopk;
  static_assert(K <= 32, "a token's slots are one warp's lanes");
  static_assert(sizeof(LLRoute<Op>) <= (40 << 10), "a low-latency call's routing fits shared memory (spec.py's LL_ROUTE_SMEM)");
  __shared__ LLRoute<Op> r;
  __shared__ unsigned amax_bits[D::kFp8 ? kWarps * D::kGroups : 1];  // (fp8: the round's group amax)
  __shared__ uint64_t epoch;
  stamp(p.trace, kTraceLLPush, 0);
  if (threadIdx.x == 0) epoch = ll_dispatch_epoch(p.own_combine_flag);  // (ll_route's barriers publish it)
  ll_route<Op>(r, p.idx, p.idx64, p.m, p.local);
  stamp(p.trace, kTraceLLPush, 1);
  // ll_expand's CTAs may start now, beside the push's (every push CTA is resident once all triggered, so
  // the spinning expansion cannot hold one off): they copy each line row as it lands (docs/measurements.md:
  // 0.7 us sooner than a trigger after the pushes)
  dev::pdl_trigger();
  if (blockIdx.x == 0) ll_heads<Op>(p, r, epoch);
  // Items (token, piece, rank): a warp per piece of a token's line row and rank it goes to (its own rank:
  // the item rows here), so a decode call's stores spread over every warp of the GPU.
  const int lane = threadIdx.x & 31, P = p.cut.pieces, W = p.world;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps, items = p.m * P * W;
  for (int64_t round = blockIdx.x * kWarps; round < items; round += nwarps) {  // (uniform over the CTA)
    if constexpr (D::kFp8) round_amax<Op>(reinterpret_cast<const T*>(p.x), round, items, P * W, amax_bits);
    const int64_t item = round + (threadIdx.x >> 5);
    if (item >= items) continue;
    const int64_t t = item / (P * W);
    const int ch = static_cast<int>(item / W % P), d = static_cast<int>(item % W);
    if (!(r.dmask[d][t >> 5] >> (t & 31) & 1)) continue;  // (not routed there)
    const unsigned* amax = amax_bits + (D::kFp8 ? (t - round / (P * W)) * D::kGroups : 0);
    int32_t own[K];  // its item rows here (-1: none; only the item for this rank writes them)
#pragma unroll
    for (int j = 0; j < K; ++j) own[j] = d == p.me ? static_cast<int32_t>(ll_slot_row<Op>(r, t, j, p.me, p.me, W, p.local)) : -1;
    char* line_row = at<char>(p.ll[d], p.lay.lines) + (p.me * Op::kMaxTokens + bits_below(r.dmask[d], t)) * LN::kRowBytes;
    for (int64_t u = p.cut.lo(ch); u < p.cut.hi(ch); ++u) {
      if (line_of(u, lane) >= LN::kLines) continue;  // (past the data: not sent)
      const int64_t at0 = line_data_at(u, lane), at1 = at0 + 8;
      const bool last = epoch_lane(lane);
      const uint64_t w0 = at0 >= LN::kMetaBytes ? ll_data_word<Op>(p, t, amax, at0) : 0;
      const uint64_t w1 = !last && at1 >= LN::kMetaBytes ? ll_data_word<Op>(p, t, amax, at1) : 0;
      if (d == p.me) {
        ll_store_own<Op>(p, own, at0, w0);
        if (!last) ll_store_own<Op>(p, own, at1, w1);
      } else if (at0 < LN::kMetaBytes) {  // (a few lanes of the first warp store: the meta for rank d)
        dev::st_volatile_v2(line_row + line_byte_at(u, lane), ll_meta_word<Op>(p, r, t, d, at0),
                            last ? epoch : at1 < LN::kMetaBytes ? ll_meta_word<Op>(p, r, t, d, at1) : w1);
      } else {
        dev::st_volatile_v2(line_row + line_byte_at(u, lane), w0, last ? epoch : w1);
      }
    }
    if (ch == 0 && d == p.me) ll_bookkeep_own<Op>(p, r, t, lane);
  }
  stamp(p.trace, kTraceLLPush, 2);
  if (p.trace) __syncthreads();  // (the CTA's last warp, not warp 0)
  stamp(p.trace, kTraceLLPush, 3);
  const bool last = dev::arrive_last<false>(p.counter, gridDim.x);  // (its own rows stored: acq_rel, this GPU)
  stamp(p.trace, kTraceLLPush, 4);
  if (!last || threadIdx.x != 0) return;
  *p.counter = 0;  // for the next call (a CUDA graph replays the same target)
  dev::st_release_gpu(p.own_flag, ll_flag(epoch, bits_all(r.dmask[p.me], r.kWords)));
  stamp(p.trace, kTraceLLPush, 5);
}

// Low-latency staging rows live in segments of max_tokens per source, the first ntok[s] filled: one warp
// sets first[s] = the filled rows of the sources before s (sources with skip[s]: none), first[world] = all.
template <class Op>
__device__ __forceinline__ void ll_segments(const int32_t* ntok, int world, int skip, int64_t* first, int lane) {
  int32_t c = lane < world && lane != skip ? __ldcg(ntok + lane) : 0;
  c = c < 0 ? 0 : (c > Op::kMaxTokens ? static_cast<int32_t>(Op::kMaxTokens) : c);
  const int32_t incl = warp_inclusive_sum(c, lane);
  if (lane < world) first[lane] = incl - c;
  if (lane == world - 1) first[world] = incl;
}
// The staging row of filled row r (0 <= r < first[world]): segment s's row r - first[s].
__device__ __forceinline__ int64_t ll_stage_row(const int64_t* first, int world, int64_t r, int64_t max_tokens) {
  const int s = source_of(first, world, r);
  return s * max_tokens + (r - first[s]);
}

template <class Op>
struct LLExpandParams {
  char* ll;  // this rank's low-latency region
  LLLayout lay;
  const uint64_t* own_flag;          // this rank's dispatch flag here: its own rows stored (ll_push's last CTA)
  const uint64_t* own_combine_flag;  // this rank's combine flag here: the last combine's epoch
  int me, world, local;
  dev::WaitCtx wait;
  Cut cut;          // of a line row (LLLines::kUnits warp stores)
  uint64_t* trace;  // phase stamps (null: off): start, every head seen (warp 0), rows copied, item taken,
                    // meta loaded, piece stored (the latest copying warp)
};

// Warp 0 of each CTA: the rows each other source sent (line 0 of its head; lanes 8i..8i+7 load source
// i's, 4 at a time) into n[s]. False on timeout.
template <class Op>
__device__ __forceinline__ bool ll_read_heads(const LLExpandParams<Op>& p, uint64_t epoch, int32_t* n, int lane) {
  using LN = LLLines<Op>;
  const char* heads = at<char>(p.ll, p.lay.heads);
  for (int s0 = 0; s0 < p.world; s0 += 4) {
    const int s = s0 + (lane >> 3);
    const bool live = s < p.world && s != p.me;
    uint64_t a, b;
    if (!dev::ll128_load(heads + (live ? s : 0) * LN::kHeadBytes + (lane & 7) * 16, live, epoch, a, b, p.wait,
                         /*kind=*/7, s0, 1, -1))  // (a line per source)
      return false;
    const int32_t rows = static_cast<int32_t>(a);  // (lane 8i: the head's first int)
    if (live && (lane & 7) == 0) n[s] = rows < 0 ? 0 : (rows > Op::kMaxTokens ? static_cast<int32_t>(Op::kMaxTokens) : rows);
  }
  return true;
}
// Warp 0 of CTA 0, after ll_read_heads: the heads' rows sent and counts into the outputs. False on timeout.
template <class Op>
__device__ __forceinline__ bool ll_copy_counts(const LLExpandParams<Op>& p, uint64_t epoch, int lane) {
  using LN = LLLines<Op>;
  const char* heads = at<char>(p.ll, p.lay.heads);
  for (int s = 0; s < p.world; ++s) {
    if (s == p.me) continue;
    for (int64_t u = 0; u * 4 < LN::kHeadLines; ++u) {
      const bool live = line_of(u, lane) < LN::kHeadLines;
      uint64_t a, b;
      if (!dev::ll128_load(heads + s * LN::kHeadBytes + line_byte_at(u, lane), live, epoch, a, b, p.wait, 7, s, 0, -1))
        return false;
      const int64_t i0 = line_data_at(u, lane) / 4;
      for (int q = 0; q < (epoch_lane(lane) ? 2 : 4) && live; ++q) {
        const int64_t i = i0 + q;
        const int32_t v = static_cast<int32_t>((q < 2 ? a : b) >> (q & 1 ? 32 : 0));
        if (i == 0) at<int32_t>(p.ll, p.lay.ntok)[s] = v;
        else if (i >= 2 && i - 2 < p.local) at<int32_t>(p.ll, p.lay.counts)[(i - 2) * p.world + s] = v;
      }
    }
  }
  return true;
}

// Warp w of the copying warps (every CTA's but warp 0): its share of source s's n line rows (rows
// s * max_tokens + [0, n)), pieces of warp stores: each piece waits for the row's first warp store (its
// meta: the token's slot rows here) and its own, then stores the data into every item row of the token
// here; the first piece also writes combine's state and the handles. The other sources' items start
// evenly round the warps (the j-th after this rank at j / (world - 1) of the way), so a small call's
// sources fall on different warps instead of all on the first ones. False on timeout.
template <class Op>
__device__ __forceinline__ bool ll_expand_source(const LLExpandParams<Op>& p, uint64_t epoch, int s, int64_t n,
                                                 int64_t w, int64_t nwarps, int lane) {
  using D = Dims<Op>;
  using LN = LLLines<Op>;
  constexpr int K = Op::kTopk, K2 = LN::kK2;
  char* out = at<char>(p.ll, p.lay.out);
  float* scales = at<float>(p.ll, p.lay.scales);
  const int P = p.cut.pieces;
  const int j0 = (s - p.me - 1 + p.world) % p.world;  // (world >= 2 where there are other sources)
  for (int64_t item = (w + nwarps - j0 * nwarps / (p.world - 1)) % nwarps; item < n * P; item += nwarps) {
    const int64_t srow = s * Op::kMaxTokens + item / P;
    const int ch = static_cast<int>(item % P);
    const char* row = at<char>(p.ll, p.lay.lines) + srow * LN::kRowBytes;
    stamp_latest(p.trace, kTraceLLExpand, 3, lane);
    uint64_t a, b;
    if (!dev::ll128_load(row + line_byte_at(0, lane), line_of(0, lane) < LN::kLines, epoch, a, b, p.wait, 7, s, 0, static_cast<int>(srow)))
      return false;
    const int32_t t = line_int(a, b, 0);
    int64_t rows[K];  // (-1: elsewhere; a row outside the outputs, which no source sends, too)
#pragma unroll
    for (int j = 0; j < K; ++j) {
      rows[j] = line_int(a, b, 2 + j);
      rows[j] = rows[j] < static_cast<int64_t>(p.local) * p.world * Op::kMaxTokens ? rows[j] : -1;
    }
    stamp_latest(p.trace, kTraceLLExpand, 4, lane);
    if (ch == 0) {  // combine's state, the handles
      int64_t mine = rows[0];
      float wj = __int_as_float(line_int(a, b, 2 + K2));
#pragma unroll
      for (int j = 1; j < K; ++j) {  // (line_int's index must be the warp's: each lane's slot j in turn)
        const float wq = __int_as_float(line_int(a, b, 2 + K2 + j));
        mine = lane == j ? rows[j] : mine;
        wj = lane == j ? wq : wj;
      }
      if (lane < K) {
        at<int32_t>(p.ll, p.lay.slot_rows)[srow * K + lane] = static_cast<int32_t>(mine);
        at<float>(p.ll, p.lay.stage_w)[srow * K + lane] = wj;
        if (mine >= 0) {
          int32_t* h = at<int32_t>(p.ll, p.lay.handle) + mine * 3;
          h[0] = s, h[1] = t, h[2] = lane;
        }
      }
      if (lane == 0) {
        int32_t* src = at<int32_t>(p.ll, p.lay.stage_src) + srow * 2;
        src[0] = s, src[1] = t;
      }
    }
    for (int64_t u = p.cut.lo(ch); u < p.cut.hi(ch); ++u) {
      const bool live = line_of(u, lane) < LN::kLines;
      if (u != 0 && !dev::ll128_load(row + line_byte_at(u, lane), live, epoch, a, b, p.wait, 7, s, 0, static_cast<int>(srow))) return false;
      if (!live) continue;
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int64_t byte = line_data_at(u, lane) + 8 * q;
        if ((q == 1 && epoch_lane(lane)) || byte < LN::kMetaBytes || byte >= LN::kData) continue;
        const uint64_t v = q ? b : a;
        const int64_t c = byte - LN::kPayloadAt, g = (byte - LN::kMetaBytes) / 4;
#pragma unroll
        for (int j = 0; j < K; ++j) {
          if (rows[j] < 0) continue;
          if (c >= 0) {
            *reinterpret_cast<uint64_t*>(out + rows[j] * D::kOutRowBytes + c) = v;
          } else {
            scales[rows[j] * D::kGroups + g] = __uint_as_float(static_cast<uint32_t>(v));
            if (g + 1 < D::kGroups) scales[rows[j] * D::kGroups + g + 1] = __uint_as_float(static_cast<uint32_t>(v >> 32));
          }
        }
      }
    }
    stamp_latest(p.trace, kTraceLLExpand, 5, lane);
  }
  return true;
}

// Every other rank's tokens copied from their line rows into their item rows here, as the lines land: in
// every CTA warp 0 reads the heads (the rows each source sent) and publishes them in shared memory, the
// other warps take their items of each source (no block barrier between sources). Launched early (it
// starts once ll_push's CTAs routed): it reads only tagged lines, and warp 0 waits for this rank's own
// flag too, so every store of ll_push (its own rows) happens before this kernel ends (the kernels after
// it see them).
template <class Op>
__global__ void __launch_bounds__(kWarps * 32, 2) ll_expand(LLExpandParams<Op> p) {
  static_assert(Op::kMaxTokens < (int64_t{1} << kLLCountBits), "a dispatch flag's low bits count a source's rows");
  constexpr unsigned kGaveUp = 1u << 31;  // (in `arrived`: a wait timed out, recorded)
  __shared__ unsigned arrived;            // sources whose head warp 0 read (only warp 0 writes it; or kGaveUp)
  __shared__ int32_t n[Op::kMaxWorld];    // each source's rows, written before its bit
  __shared__ uint64_t epoch_s;
  stamp(p.trace, kTraceLLExpand, 0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) arrived = 0, epoch_s = ll_dispatch_epoch(p.own_combine_flag);
  __syncthreads();
  const uint64_t epoch = epoch_s;
  const unsigned others = ((1u << p.world) - 1) & ~(1u << p.me);  // (own tokens: ll_push wrote every row)
  if (warp == 0) {
    const bool ok = ll_read_heads<Op>(p, epoch, n, lane);
    __syncwarp();
    if (lane == 0) dev::st_release_cta_shared(&arrived, ok ? others : kGaveUp);
    stamp(p.trace, kTraceLLExpand, 1);
    const bool counted = ok && (blockIdx.x != 0 || ll_copy_counts<Op>(p, epoch, lane));  // (after publishing)
    if (counted && lane == 0) dev::wait_ge(p.own_flag, ll_flag(epoch, 0), p.wait, /*kind=*/5, p.me, 0);
  } else {
    const int64_t nwarps = static_cast<int64_t>(gridDim.x) * (kWarps - 1);
    const int64_t w = static_cast<int64_t>(blockIdx.x) * (kWarps - 1) + warp - 1;
    unsigned now = 0;
    while (!now) {
      now = __shfl_sync(0xffffffffu, lane == 0 ? dev::ld_acquire_cta_shared(&arrived) : 0, 0);
      if (!now) __nanosleep(32);
    }
    __syncwarp();  // (orders lane 0's acquire before every lane's reads)
    for (unsigned b = now & kGaveUp ? 0 : now; b; b &= b - 1) {
      const int s = __ffs(b) - 1;
      if (!ll_expand_source<Op>(p, epoch, s, n[s], w, nwarps, lane)) break;
    }
  }
  if (p.trace) __syncthreads();  // (the CTA's last copy, not thread 0's)
  stamp(p.trace, kTraceLLExpand, 2);
}

// ------------------------------------------------------------------------------------- combine
template <class Op>
struct CombineParams {
  const char* y;  // expert outputs [rows, hidden] in dispatch's layout
  const int32_t* slot_rows;
  const int32_t* stage_src;
  const float* stage_w;
  int64_t stage_rows;
  char* back[Op::kMaxWorld];      // at each rank: this rank's receive rows of the call's half [max_tokens, hidden]
  uint64_t* flag[Op::kMaxWorld];  // ... its combine flag
  uint64_t* counter;  // blocks arrived (the last resets it)
  uint64_t epoch;
  int world;
  const uint64_t* own_dispatch_flag;  // low-latency mode: this rank's dispatch flag here (the call's epoch)
  const int32_t* ntok;               // ... and the tokens each source sent (staging rows in segments)
  Cut cut;                           // of a row of the token dtype (Dims::kCombineUnits)
  uint64_t* trace;                   // phase stamps (null: off): start, rows sent, arrived (last: flags)
};

template <class Op>
__global__ void __launch_bounds__(kWarps * 32) combine_send(CombineParams<Op> p) {
  using D = Dims<Op>;
  using T = typename Op::Elem;
  constexpr int K = Op::kTopk, V = D::kVec;
  __shared__ int64_t first[Op::kMaxWorld + 1];
  stamp(p.trace, kTraceSend, 0);
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  if (p.ntok) {  // low-latency mode: every source's segment
    if (threadIdx.x < 32) ll_segments<Op>(p.ntok, p.world, -1, first, lane);
    __syncthreads();
  }
  const int64_t stage_rows = p.ntok ? first[p.world] : p.stage_rows;
  for (int64_t item = blockIdx.x * kWarps + (threadIdx.x >> 5); item < stage_rows * p.cut.pieces; item += nwarps) {
    const int64_t r = p.ntok ? ll_stage_row(first, p.world, item / p.cut.pieces, Op::kMaxTokens) : item / p.cut.pieces;
    const int ch = static_cast<int>(item % p.cut.pieces);
    const int s = p.stage_src[r * 2], t = p.stage_src[r * 2 + 1];
    int32_t row[K];
    float w[K];
#pragma unroll
    for (int j = 0; j < K; ++j) row[j] = p.slot_rows[r * K + j], w[j] = p.stage_w[r * K + j];
    int4* out = reinterpret_cast<int4*>(p.back[s] + static_cast<int64_t>(t) * D::kRowBytes);
    for (int64_t c = p.cut.lo(ch) + lane; c < p.cut.hi(ch); c += 32) {
      float acc[V] = {};
#pragma unroll
      for (int j = 0; j < K; ++j) {  // slot order
        if (row[j] >= 0) {
          const int4 v = __ldg(reinterpret_cast<const int4*>(p.y + row[j] * D::kRowBytes) + c);
          const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
          for (int q = 0; q < V; ++q) acc[q] += w[j] * dev::to_acc(e[q]);
        }
      }
      T o[V];
#pragma unroll
      for (int q = 0; q < V; ++q) o[q] = dev::from_acc<T>(acc[q]);
      out[c] = *reinterpret_cast<const int4*>(o);
    }
  }
  stamp(p.trace, kTraceSend, 1);
  dev::pdl_trigger();  // (combine_reduce's CTAs may start once every CTA sent its rows: as in ll_push)
  signal_when_last(p.counter, p.flag, p.world, p.epoch, p.own_dispatch_flag);
  stamp(p.trace, kTraceSend, 2);
}

template <class Op>
struct ReduceParams {
  const char* back;  // this rank's half: [world senders][max_tokens] rows
  const uint64_t* flags;
  const void* idx;
  int idx64;
  int64_t m;
  char* out;  // [m, hidden]
  uint64_t epoch;
  dev::WaitCtx wait;
  int world, local;
  const uint64_t* own_dispatch_flag;  // low-latency mode: this rank's dispatch flag here (the call's epoch)
  Cut cut;  // of an output row (Dims::kCombineUnits)
  uint64_t* trace;  // phase stamps (null: off): start, flags seen, rows summed
};

template <class Op>
__global__ void __launch_bounds__(kWarps * 32) combine_reduce(ReduceParams<Op> p) {
  using D = Dims<Op>;
  using T = typename Op::Elem;
  constexpr int K = Op::kTopk, V = D::kVec;
  stamp(p.trace, kTraceReduce, 0);
  // (Launched early: it reads only what the flags publish, every sender's, its own rank's too, so every
  // store of combine_send happens before this kernel ends.)
  if (!dev::block_wait_all_ge(p.flags, p.world, call_epoch(p.epoch, p.own_dispatch_flag), p.wait, /*kind=*/6, 0)) return;
  stamp(p.trace, kTraceReduce, 1);
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t item = blockIdx.x * kWarps + (threadIdx.x >> 5); item < p.m * p.cut.pieces; item += nwarps) {
    const int64_t t = item / p.cut.pieces;
    const int ch = static_cast<int>(item % p.cut.pieces);
    unsigned mask = 0;
    for (int j = lane; j < K; j += 32) {
      const int e = load_expert(p.idx, t * K + j, p.idx64, Op::kExperts);
      if (e >= 0) mask |= 1u << (e / p.local);
    }
    mask = __reduce_or_sync(0xffffffffu, mask);
    for (int64_t c = p.cut.lo(ch) + lane; c < p.cut.hi(ch); c += 32) {
      float acc[V] = {};
      for (int s = 0; s < p.world; ++s) {  // rank order: deterministic
        if (!(mask >> s & 1)) continue;
        const int4 v = __ldcg(reinterpret_cast<const int4*>(
            p.back + (static_cast<int64_t>(s) * Op::kMaxTokens + t) * D::kRowBytes) + c);
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] += dev::to_acc(e[q]);
      }
      T o[V];
#pragma unroll
      for (int q = 0; q < V; ++q) o[q] = dev::from_acc<T>(acc[q]);
      reinterpret_cast<int4*>(p.out + t * D::kRowBytes)[c] = *reinterpret_cast<const int4*>(o);
    }
  }
  if (p.trace) __syncthreads();  // (the CTA's last row, not thread 0's)
  stamp(p.trace, kTraceReduce, 2);
}

// ------------------------------------------------------------------------------------- host
template <class Op>
struct Host {
  using D = Dims<Op>;
  static constexpr int W = Op::kMaxWorld, E = Op::kExperts, K = Op::kTopk;
  static constexpr int64_t T = Op::kMaxTokens;
  struct Half {  // one call parity's symmetric buffers
    char* stage;
    int32_t* meta;
    int32_t* info;
    char* back;
  };
  struct State {
    bool ready = false, poisoned = false;
    int rank = -1, world = 0, local = 0;
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
    dev::WaitError* err_host = nullptr;
    dev::WaitError* err_dev = nullptr;
    cudaEvent_t done = nullptr;
    uint64_t* trace = nullptr;      // what launches pass for phase stamps: trace_buf while profiling, else null
    uint64_t* trace_buf = nullptr;  // allocated by the first set_trace(1), kept until release (a graph
                                    // captured while profiling keeps stamping into it)
  };
  static inline State g;

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
    const int64_t resident = static_cast<int64_t>(g.resident[k]) * kWarps;
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
    const int64_t want = (rows * pieces + kWarps - 1) / kWarps, cap = g.resident[k];
    return static_cast<int>(want < 1 ? 1 : (want < cap ? want : cap));
  }

  static bool supported_world(int world) {
    for (int w : Op::kWorlds)
      if (w == world) return true;
    return false;
  }

  static int init(char* msg, int len) {
    if (g.ready) return 0;
    nvshmem_init();  // refcounted: attaches this module's device state to the running NVSHMEM
    g.rank = nvshmem_my_pe();
    g.world = nvshmem_n_pes();
    if (!supported_world(g.world))
      return fail(msg, len, "%s: NVSHMEM has %d PEs; this op was generated for world sizes %s", Op::kName, g.world,
                  Op::kWorldSizes);
    g.local = E / g.world;
    const int64_t hb = half_bytes(g.world), flag_bytes = 2 * W * 8, total = symmetric_bytes(g.world);
    g.sym = static_cast<char*>(nvshmem_malloc(total));
    if (!g.sym)
      return fail(msg, len, "%s: nvshmem_malloc of %lld bytes (staging for %lld tokens of %lld bytes from %d ranks, "
                  "twice%s) failed: raise NVSHMEM_SYMMETRIC_SIZE", Op::kName, static_cast<long long>(total),
                  static_cast<long long>(T), static_cast<long long>(D::kStageRowBytes), g.world,
                  Op::kLowLatency ? ", and the received rows" : "");
    for (int h = 0; h < 2; ++h) {
      char* p = g.sym + h * hb;
      g.half[h].stage = p;
      p += align(g.world * T * D::kStageRowBytes);
      g.half[h].meta = reinterpret_cast<int32_t*>(p);
      p += align(g.world * T * D::kMeta * 4);
      g.half[h].info = reinterpret_cast<int32_t*>(p);
      p += align(g.world * (E + 1) * 4);
      g.half[h].back = p;
    }
    g.dflag = reinterpret_cast<uint64_t*>(g.sym + 2 * hb);
    g.cflag = g.dflag + W;
    g.lay = ll_layout(g.world);
    g.ll = Op::kLowLatency ? g.sym + align(2 * hb + flag_bytes) : nullptr;
    const int64_t scratch_ints = blocks(T) * (E + W) + T * K + T * W + (E + W);
    cudaError_t e = cudaMemset(g.dflag, 0, flag_bytes);
    if (e == cudaSuccess && g.ll) e = cudaMemset(g.ll + g.lay.handle, 0xff, g.lay.slot_rows - g.lay.handle);  // -1
    if (e == cudaSuccess && g.ll) e = cudaMemset(g.ll + g.lay.counts, 0, g.lay.bytes - g.lay.counts);
    if (e == cudaSuccess) e = cudaMalloc(&g.scratch, scratch_ints * 4);
    constexpr size_t counter_bytes = 3 * sizeof(uint64_t);  // 3 arrival counters
    if (e == cudaSuccess) e = cudaMalloc(&g.counters, counter_bytes);
    if (e == cudaSuccess) e = cudaMemset(g.counters, 0, counter_bytes);
    if (e == cudaSuccess) e = cudaHostAlloc(&g.counts_host, W * (E + 1) * 4, cudaHostAllocMapped);
    if (e == cudaSuccess) e = cudaHostGetDevicePointer(&g.counts_dev, g.counts_host, 0);
    if (e == cudaSuccess) e = cudaHostAlloc(&g.err_host, sizeof(dev::WaitError), cudaHostAllocMapped);
    if (e == cudaSuccess) {
      memset(g.err_host, 0, sizeof(dev::WaitError));
      e = cudaHostGetDevicePointer(&g.err_dev, g.err_host, 0);
    }
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&g.done, cudaEventDisableTiming);
    if (e == cudaSuccess) e = load_kernels();
    if (e == cudaSuccess) e = find_residency();
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e != cudaSuccess) return fail(msg, len, "%s: init: %s", Op::kName, cudaGetErrorString(e));
    nvshmem_barrier_all();  // every rank's flags are zero before anyone signals
    for (int q = 0; q < g.world; ++q)
      if (!nvshmem_ptr(g.sym, q))
        return fail(msg, len, "%s: rank %d is not load/store reachable from rank %d: MoE ops run over NVLink within "
                    "one node", Op::kName, q, g.rank);
    g.ready = true;
    return 0;
  }

  // Each copy kernel's resident CTAs on this GPU: its grid's cap and what its pieces are cut for; and
  // whether it launches kernels early.
  static cudaError_t find_residency() {
    int device = 0, sms = 0, major = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    g.early_launch = major >= 9;
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
      g.resident[k] = sms * (per_sm > 0 ? per_sm : 1);
    }
    return e;
  }

  // Loads every kernel now: a lazily loaded one could wait for a spinning kernel that waits for it.
  static cudaError_t load_kernels() {
    cudaFuncAttributes fa;
    cudaError_t e = cudaFuncGetAttributes(&fa, route_block<Op>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, push_tokens<Op>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, wait_counts<Op>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, expand_rows<Op>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, combine_send<Op>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, combine_reduce<Op>);
    if constexpr (Op::kLowLatency) {
      if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, ll_push<Op>);
      if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, ll_expand<Op>);
    }
    return e;
  }

  static int release(char*, int) {
    if (!g.ready) return 0;
    cudaDeviceSynchronize();
    nvshmem_free(g.sym);
    cudaFree(g.scratch);
    cudaFree(g.counters);
    cudaFreeHost(g.counts_host);
    cudaFreeHost(g.err_host);
    cudaEventDestroy(g.done);
    cudaFree(g.trace_buf);
    g = State{};
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
    if (e == cudaSuccess && on && !g.trace_buf) e = cudaMalloc(&g.trace_buf, kTraceBytes);
    if (e == cudaSuccess && on) e = cudaMemset(g.trace_buf, 0, kTraceBytes);
    if (e != cudaSuccess) return fail(msg, len, "%s: trace: %s", Op::kName, cudaGetErrorString(e));
    g.trace = on ? g.trace_buf : nullptr;
    return 0;
  }
  static int read_trace(uint64_t* out, char* msg, int len) {
    if (usable(msg, len)) return 1;
    if (!g.trace_buf) return fail(msg, len, "%s: read_trace before trace(True)", Op::kName);
    cudaError_t e = cudaDeviceSynchronize();
    if (e == cudaSuccess) e = cudaMemcpy(out, g.trace_buf, kTraceBytes, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess) e = cudaMemset(g.trace_buf, 0, kTraceBytes);
    return e == cudaSuccess ? 0 : fail(msg, len, "%s: read_trace: %s", Op::kName, cudaGetErrorString(e));
  }

  static int usable(char* msg, int len) {
    if (!g.ready) return fail(msg, len, "%s: not initialised (call tilegen.init() first)", Op::kName);
    if (g.poisoned)
      return fail(msg, len, "%s: an earlier call timed out; its flags are unreliable, restart the job", Op::kName);
    return 0;
  }

  static int launched(const char* what, char* msg, int len) { return launched(what, cudaGetLastError(), msg, len); }
  static int launched(const char* what, cudaError_t e, char* msg, int len) {
    return e == cudaSuccess ? 0 : fail(msg, len, "%s: %s launch failed: %s", Op::kName, what, cudaGetErrorString(e));
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
    cfg.numAttrs = g.early_launch ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, params);
  }

  template <class P>
  static P* peer(P* local_ptr, int q) {
    return static_cast<P*>(nvshmem_ptr(local_ptr, q));
  }

  static dev::WaitCtx wait_ctx(uint64_t timeout_ns) {
    return dev::WaitCtx{timeout_ns ? g.err_dev : nullptr, timeout_ns, g.rank, Op::kOpId};
  }

  // After a bounded call finished: 0, or the message of the wait that gave up (the op is then unusable).
  static int wait_error(char* msg, int len) {
    if (!g.err_host || !g.err_host->failed) return 0;
    const dev::WaitError& w = *g.err_host;
    g.poisoned = true;
    if (w.signal_kind == 7)  // (low-latency line rows or heads: the epoch in a line)
      return fail(msg, len, "%s: rank %d timed out waiting for rank %lld's dispatch lines of call %llu (a line held "
                  "%llu); a peer rank did not make the matching call", Op::kName, w.rank,
                  static_cast<long long>(w.signal_index), static_cast<unsigned long long>(w.expected),
                  static_cast<unsigned long long>(w.seen));
    const bool packed = Op::kLowLatency && w.signal_kind == 5;  // (a low-latency dispatch flag: ll_flag)
    return fail(msg, len, "%s: rank %d timed out waiting for rank %lld's %s flag of call %llu (saw %llu); a peer rank "
                "did not make the matching call", Op::kName, w.rank, static_cast<long long>(w.signal_index),
                w.signal_kind == 5 ? "dispatch" : "combine",
                static_cast<unsigned long long>(packed ? ll_epoch(w.expected) : w.expected),
                static_cast<unsigned long long>(packed ? ll_epoch(w.seen) : w.seen));
  }

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
    RouteParams rp{idx, idx64, m, g.world, g.local, g.scratch, nullptr, nullptr, nullptr, g.counters + 2};
    rp.trace = g.trace;
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
    for (int q = 0; q < g.world; ++q) {
      pp.stage[q] = peer(hf.stage, q) + g.rank * T * D::kStageRowBytes;
      pp.meta[q] = peer(hf.meta, q) + g.rank * T * D::kMeta;
      pp.info[q] = peer(hf.info, q) + g.rank * (E + 1);
      pp.flag[q] = peer(g.dflag, q) + g.rank;
    }
    pp.counter = g.counters;
    pp.epoch = epoch;
    pp.me = g.rank;
    pp.world = g.world;
    pp.local = g.local;
    pp.cut = push_cut(kPush, m);
    pp.trace = g.trace;
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
    for (int q = 0; q < g.world; ++q) {
      cp.back[q] = peer(hf.back, q) + g.rank * T * D::kRowBytes;
      cp.flag[q] = peer(g.cflag, q) + g.rank;
    }
    cp.counter = g.counters + 1;
    cp.epoch = epoch;
    cp.world = g.world;
    cp.own_dispatch_flag = own_dispatch_flag;
    cp.ntok = ntok;
    cp.cut = send_cut(stage_rows);
    cp.trace = g.trace;
    combine_send<Op><<<grid_for(kSend, stage_rows, cp.cut.pieces), kWarps * 32, 0, s>>>(cp);
    if (launched("combine send", msg, len)) return 1;
    ReduceParams<Op> rp{hf.back, g.cflag, idx, idx64, m, static_cast<char*>(out), epoch, wait_ctx(timeout_ns),
                        g.world, g.local, own_dispatch_flag, reduce_cut(m), g.trace};
    return launched("combine reduce", launch_early(combine_reduce<Op>, grid_for(kReduce, m, rp.cut.pieces), s, rp),
                    msg, len);
  }

  // Dispatch, first half: route, push, wait for every rank's counts; out[s * (local + 1) + l] =
  // items source s sent to local expert l, out[s * (local + 1) + local] = its tokens (staging rows).
  static int dispatch_send(const void* x, const void* idx, int idx64, const float* w, int64_t m, void* stream,
                           uint64_t timeout_ns, int64_t* out, char* msg, int len) {
    if (usable(msg, len) || check_tokens(m, msg, len)) return 1;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const uint64_t epoch = ++g.dispatch_epoch;
    const Half& hf = g.half[epoch & 1];
    if (route_and_push(x, idx, idx64, w, m, hf, epoch, s, msg, len)) return 1;
    wait_counts<Op><<<1, 32, 0, s>>>(g.dflag, hf.info, g.counts_dev, g.world, g.local, epoch, wait_ctx(timeout_ns));
    if (launched("wait", msg, len)) return 1;
    cudaError_t e = cudaEventRecord(g.done, s);
    if (e == cudaSuccess) e = cudaEventSynchronize(g.done);  // normal mode: the host sizes the outputs
    if (e != cudaSuccess) return fail(msg, len, "%s: dispatch: %s", Op::kName, cudaGetErrorString(e));
    if (wait_error(msg, len)) return 1;
    int64_t stage_rows = 0, rows = 0;
    for (int q = 0; q < g.world; ++q)
      for (int l = 0; l <= g.local; ++l) {
        out[q * (g.local + 1) + l] = g.counts_host[q * (g.local + 1) + l];
        (l < g.local ? rows : stage_rows) += g.counts_host[q * (g.local + 1) + l];
      }
    g.last_rows = rows;
    g.last_stage_rows = stage_rows;
    return 0;
  }

  // Dispatch, second half: the staging rows of the last dispatch_send into the caller's outputs.
  static int dispatch_recv(void* out, float* scales, int32_t* handle, int32_t* slot_rows, int32_t* stage_src, float* stage_w,
                           int32_t* counts, int64_t rows, int64_t stage_rows, void* stream, char* msg, int len) {
    if (usable(msg, len)) return 1;
    if (g.last_rows < 0) return fail(msg, len, "%s: dispatch_recv before dispatch_send", Op::kName);
    if (rows != g.last_rows || stage_rows != g.last_stage_rows)
      return fail(msg, len, "%s: outputs for %lld rows / %lld staging rows, but the last dispatch received %lld / %lld",
                  Op::kName, static_cast<long long>(rows), static_cast<long long>(stage_rows),
                  static_cast<long long>(g.last_rows), static_cast<long long>(g.last_stage_rows));
    const Half& hf = g.half[g.dispatch_epoch & 1];
    ExpandParams<Op> p{hf.stage, hf.meta, hf.info, static_cast<char*>(out), scales, handle, slot_rows, stage_src,
                       stage_w, counts, stage_rows, rows, g.rank, g.world, g.local};
    p.cut = expand_cut(stage_rows);
    p.trace = g.trace;
    expand_rows<Op><<<grid_for(kExpand, stage_rows, p.cut.pieces), kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
    g.last_rows = -1;  // one expansion per dispatch
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
    const uint64_t epoch = ++g.combine_epoch;
    return send_and_reduce(y, slot_rows, stage_src, stage_w, stage_rows, nullptr, idx, idx64, m, out,
                           g.half[epoch & 1], epoch, nullptr, timeout_ns, static_cast<cudaStream_t>(stream), msg, len);
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
    const LLLayout& l = g.lay;
    const int64_t offs[7] = {l.out, l.scales, l.handle, l.slot_rows, l.stage_src, l.stage_w, l.counts};
    for (int i = 0; i < 7; ++i) out[i] = reinterpret_cast<int64_t>(g.ll + offs[i]);
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
      for (int q = 0; q < g.world; ++q) pp.ll[q] = peer(g.ll, q);
      pp.lay = g.lay;
      pp.own_flag = g.dflag + g.rank;
      pp.counter = g.counters;
      pp.own_combine_flag = g.cflag + g.rank;
      pp.me = g.rank;
      pp.world = g.world;
      pp.local = g.local;
      pp.trace = g.trace;
      pp.cut = ll_cut(kLLPush, m * g.world);  // (a warp per piece and rank)
      ll_push<Op><<<grid_for(kLLPush, m * g.world, pp.cut.pieces), kWarps * 32, 0, s>>>(pp);
      if (launched("push", msg, len)) return 1;
      const int64_t rows = (g.world - 1) * T;  // a bound: tokens from the other ranks
      LLExpandParams<Op> ep{g.ll, g.lay, g.dflag + g.rank, g.cflag + g.rank, g.rank, g.world, g.local,
                            wait_ctx(timeout_ns), ll_cut(kLLExpand, rows), g.trace};
      return launched("expand", launch_early(ll_expand<Op>, grid_for(kLLExpand, rows, ep.cut.pieces), s, ep), msg, len);
    }
  }

  static int ll_combine(const void* y, const void* idx, int idx64, int64_t m, void* out, void* stream,
                        uint64_t timeout_ns, char* msg, int len) {
    if (usable(msg, len) || check_tokens(m, msg, len)) return 1;
    if (!Op::kLowLatency) return not_low_latency(msg, len);
    const LLLayout& l = g.lay;
    return send_and_reduce(y, at<int32_t>(g.ll, l.slot_rows), at<int32_t>(g.ll, l.stage_src), at<float>(g.ll, l.stage_w),
                           g.world * T, at<int32_t>(g.ll, l.ntok), idx, idx64, m, out, g.half[0], 0, g.dflag + g.rank,
                           timeout_ns, static_cast<cudaStream_t>(stream), msg, len);
  }
};

}  // namespace moe
}  // namespace tilegen

#define TILEGEN_EXPORT_MOE(OP)                                                                                        \
  extern "C" {                                                                                                       \
  int tilegen_op_init(char* msg, int len) { return tilegen::moe::Host<OP>::init(msg, len); }                         \
  int tilegen_op_release(char* msg, int len) { return tilegen::moe::Host<OP>::release(msg, len); }                   \
  int tilegen_op_world(void) { return tilegen::moe::Host<OP>::g.ready ? tilegen::moe::Host<OP>::g.world : 0; }        \
  int tilegen_op_rank(void) { return tilegen::moe::Host<OP>::g.ready ? tilegen::moe::Host<OP>::g.rank : -1; }         \
  int tilegen_op_wait_error(char* msg, int len) { return tilegen::moe::Host<OP>::wait_error(msg, len); }             \
  void tilegen_op_nvshmem_versions(int* compiled, int* runtime) {                                                    \
    *compiled = NVSHMEM_VENDOR_MAJOR_VERSION * 10000 + NVSHMEM_VENDOR_MINOR_VERSION * 100 + NVSHMEM_VENDOR_PATCH_VERSION; \
    int maj = 0, min = 0, patch = 0;                                                                                 \
    nvshmemx_vendor_get_version_info(&maj, &min, &patch);                                                            \
    *runtime = maj * 10000 + min * 100 + patch;                                                                      \
  }                                                                                                                  \
  int tilegen_moe_dispatch_send(const void* x, const void* idx, int idx64, const float* w, int64_t m, void* stream,  \
                                uint64_t timeout_ns, int64_t* out, char* msg, int len) {                             \
    return tilegen::moe::Host<OP>::dispatch_send(x, idx, idx64, w, m, stream, timeout_ns, out, msg, len);           \
  }                                                                                                                  \
  int tilegen_moe_dispatch_recv(void* out, float* scales, int32_t* handle, int32_t* slot_rows, int32_t* stage_src,   \
                                float* stage_w, int32_t* counts, int64_t rows, int64_t stage_rows, void* stream,     \
                                char* msg, int len) {                                                                \
    return tilegen::moe::Host<OP>::dispatch_recv(out, scales, handle, slot_rows, stage_src, stage_w, counts, rows, stage_rows, \
                                                 stream, msg, len);                                                  \
  }                                                                                                                  \
  int tilegen_moe_ll_outputs(int64_t* out, char* msg, int len) {                                                   \
    return tilegen::moe::Host<OP>::ll_outputs(out, msg, len);                                                        \
  }                                                                                                                  \
  int tilegen_moe_ll_dispatch(const void* x, const void* idx, int idx64, const float* w, int64_t m, void* stream,    \
                              uint64_t timeout_ns, char* msg, int len) {                                             \
    return tilegen::moe::Host<OP>::ll_dispatch(x, idx, idx64, w, m, stream, timeout_ns, msg, len);                   \
  }                                                                                                                  \
  int tilegen_moe_ll_combine(const void* y, const void* idx, int idx64, int64_t m, void* out, void* stream,          \
                             uint64_t timeout_ns, char* msg, int len) {                                              \
    return tilegen::moe::Host<OP>::ll_combine(y, idx, idx64, m, out, stream, timeout_ns, msg, len);                  \
  }                                                                                                                  \
  int tilegen_moe_trace(int on, char* msg, int len) { return tilegen::moe::Host<OP>::set_trace(on, msg, len); }    \
  int tilegen_moe_trace_read(uint64_t* out, char* msg, int len) {                                                   \
    return tilegen::moe::Host<OP>::read_trace(out, msg, len);                                                        \
  }                                                                                                                  \
  void tilegen_moe_trace_shape(int* kernels, int* phases, int* ctas) {                                             \
    *kernels = tilegen::moe::kTraceKernels, *phases = tilegen::moe::kTracePhases, *ctas = tilegen::moe::kTraceCtas; \
  }                                                                                                                  \
  int tilegen_moe_combine(const void* y, const int32_t* slot_rows, const int32_t* stage_src, const float* stage_w,  \
                          int64_t stage_rows, const void* idx, int idx64, int64_t m, void* out, void* stream,        \
                          uint64_t timeout_ns, char* msg, int len) {                                                 \
    return tilegen::moe::Host<OP>::combine(y, slot_rows, stage_src, stage_w, stage_rows, idx, idx64, m, out, stream,  \
                                           timeout_ns, msg, len);                                                    \
  }                                                                                                                  \
  }
