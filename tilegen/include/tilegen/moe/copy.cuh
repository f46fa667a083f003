// tilegen MoE layer: the pieces the copy kernels share: fp8 quantization, a row's pieces copied by a
// warp, both pushes' item loop, warp scans, the expansions' copy into item rows, and low-latency
// staging segments.
#pragma once
#include <cstdint>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include "tilegen/moe/layout.cuh"
#include "tilegen/primitives/reduce.cuh"
#include "tilegen/primitives/simple.cuh"

namespace tilegen {
namespace moe {

// fp8: a group's scale (amax / 448; 1 where the group is all zero), and 8 values x / scale as e4m3 bytes,
// rounded to nearest even, saturating (the same arithmetic as tilegen.moe.nccl.quantize).
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

}  // namespace moe
}  // namespace tilegen
