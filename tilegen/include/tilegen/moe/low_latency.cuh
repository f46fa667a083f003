// tilegen MoE layer, low-latency mode's dispatch (decode sizes, CUDA-graph capturable): ll_push routes
// in shared memory and sends each token as LL128 line rows that carry the call's epoch; ll_expand,
// launched early, copies them into the item rows as they land.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "tilegen/common/memory.cuh"
#include "tilegen/common/wait.cuh"
#include "tilegen/moe/copy.cuh"
#include "tilegen/moe/flags.cuh"
#include "tilegen/moe/layout.cuh"
#include "tilegen/moe/trace.cuh"
#include "tilegen/primitives/ll.cuh"
#include "tilegen/primitives/simple.cuh"

namespace tilegen {
namespace moe {

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
// push: no fence and no flag between a store and its copy. tilegen/moe/check.py's _simulate_low_latency runs
// the same layout; moe_program's tagged put and read its protocol.

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
  // the spinning expansion cannot hold one off): they copy each line row as it lands (docs/log/2026-11.md:
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
                         SignalKind::kMoeLL128Line, s0, 1, -1))  // (a line per source)
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
      if (!dev::ll128_load(heads + s * LN::kHeadBytes + line_byte_at(u, lane), live, epoch, a, b, p.wait, SignalKind::kMoeLL128Line, s, 0, -1))
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
    if (!dev::ll128_load(row + line_byte_at(0, lane), line_of(0, lane) < LN::kLines, epoch, a, b, p.wait,
                         SignalKind::kMoeLL128Line, s, 0, static_cast<int>(srow)))
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
      if (u != 0 && !dev::ll128_load(row + line_byte_at(u, lane), live, epoch, a, b, p.wait,
                                     SignalKind::kMoeLL128Line, s, 0, static_cast<int>(srow)))
        return false;
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
    if (counted && lane == 0) dev::wait_ge(p.own_flag, ll_flag(epoch, 0), p.wait, SignalKind::kMoeDispatchFlag, p.me, 0);
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

}  // namespace moe
}  // namespace tilegen
