// tilegen collective layer, device side: epilogues (a spec's `epilogue:`). An allreduce or
// reduce_scatter with an epilogue reduces into the op's own buffer (Params::out); after a grid barrier
// every reduced row becomes the caller's output in the same kernel:
//   h = row (+ residual: h is rounded to the element type and written back as the new residual)
//   y = RMSNorm(h) * weight, as Llama's: T(weight * T(h * rsqrt(mean(h^2) + eps)))   (rmsnorm)
//   q = fp8 e4m3 of y / s with s = max|y| / 448 per row, s written to scales       (quant)
// A CTA owns a row at a time and reduces it in one fixed order (thread t takes element groups t,
// t + threads, ...; a fixed shuffle tree; warps in order), so a row's bits depend on the row alone: not
// on the rows beside it, the grid, the schedule or the vector width (batch-invariant).
//
// Contract: every CTA of the grid is resident (the host launches at most its occupancy, as the
// schedules' spin waits need already), and reaches grid_sync() once per call unless its wait gave up.
#pragma once
#include <cstdint>
#include <cuda_fp8.h>
#include "tilegen/common/memory.cuh"
#include "tilegen/common/wait.cuh"
#include "tilegen/primitives/reduce.cuh"

namespace tilegen {
namespace coll {
namespace epi {

enum : int { kNoQuant = 0, kFp8E4M3 = 1 };
constexpr float kFp8E4M3Max = 448.f;

// The call's epilogue operands, in the launch parameters of epilogue ops only (an empty base elsewhere).
template <bool kOn>
struct Param {};
template <>
struct Param<true> {
  char* y;             // the caller's output: [rows, hidden] of the element type, or of fp8 e4m3 (quant)
  char* residual;      // [rows, hidden], read, then overwritten with h (null: none)
  const char* weight;  // [hidden] RMSNorm weight (null: no RMSNorm)
  float* scales;       // [rows] fp8 scales (quant)
  int64_t rows, hidden;
  uint64_t* bar;       // this op's grid-barrier words (local): [0] arrivals, [1] the last call that passed
};

// Every CTA of the grid waits for every other (one thread per CTA spins; bounded like every wait).
// Their stores before it, and what their acquires saw, are visible to every CTA after it.
__device__ __forceinline__ bool grid_sync(uint64_t* bar, uint64_t epoch, const dev::WaitCtx& ctx, int step) {
  __shared__ int ok;
  __syncthreads();
  if (threadIdx.x == 0) {
    ok = 1;
    dev::fence_acq_rel_gpu();
    if (dev::atomic_add_acq_rel_gpu(bar, 1) + 1 == gridDim.x) {
      bar[0] = 0;  // no CTA touches it again in this call; the next launch follows on the stream
      dev::st_release_gpu(bar + 1, epoch);
    } else {
      ok = dev::wait_ge(bar + 1, epoch, ctx, SignalKind::kGridBarrier, 0, step);
    }
  }
  __syncthreads();
  return ok;
}

// v summed (kMax: maximum) over the block in a fixed order; every thread gets the result.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v) {
  __shared__ float part[32];
  __shared__ float total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o; o >>= 1) {
    const float u = __shfl_down_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, u) : __fadd_rn(v, u);
  }
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? part[lane] : 0.f;
#pragma unroll
    for (int o = 16; o; o >>= 1) {
      const float u = __shfl_down_sync(0xffffffffu, v, o);
      v = kMax ? fmaxf(v, u) : __fadd_rn(v, u);
    }
    if (lane == 0) total = v;
  }
  __syncthreads();
  const float r = total;
  __syncthreads();  // part/total are free for the next reduction
  return r;
}

// G consecutive elements of type E at e[i, i + G) (n: how many exist): one 16-byte access when
// `vec`, else one by one; the arithmetic on them is the same either way.
template <class E, int G>
struct Group {
  E v[G];
  __device__ __forceinline__ void load(const E* e, int64_t i, int64_t n, bool vec, bool coherent) {
    if (vec && i + G <= n) {
      static_assert(sizeof(E) * G == 16, "a vector is 16 bytes");
      const int4 raw = coherent ? __ldcg(reinterpret_cast<const int4*>(e + i)) : __ldg(reinterpret_cast<const int4*>(e + i));
      memcpy(v, &raw, 16);
      return;
    }
#pragma unroll
    for (int k = 0; k < G; ++k) v[k] = i + k < n ? (coherent ? dev::load_elem(e + i + k, false) : e[i + k]) : E{};
  }
  __device__ __forceinline__ void store(E* e, int64_t i, int64_t n, bool vec) const {
    if (vec && i + G <= n) {
      int4 raw;
      memcpy(&raw, v, 16);
      *reinterpret_cast<int4*>(e + i) = raw;
      return;
    }
#pragma unroll
    for (int k = 0; k < G; ++k)
      if (i + k < n) e[i + k] = v[k];
  }
};

template <int G>
__device__ __forceinline__ void store_fp8(__nv_fp8_e4m3* q, int64_t i, int64_t n, const float (&x)[G], float inv_scale,
                                          bool vec) {
  __nv_fp8_e4m3 o[G];
#pragma unroll
  for (int k = 0; k < G; ++k) o[k] = __nv_fp8_e4m3(__fmul_rn(x[k], inv_scale));  // saturating conversion
  if (vec && i + G <= n) {
    if constexpr (G == 8) {
      uint64_t raw;
      memcpy(&raw, o, 8);
      *reinterpret_cast<uint64_t*>(q + i) = raw;
    } else {
      uint32_t raw;
      memcpy(&raw, o, 4);
      *reinterpret_cast<uint32_t*>(q + i) = raw;
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < G; ++k)
    if (i + k < n) q[i + k] = o[k];
}

inline __device__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// h of group i of a row: the reduced value, plus the residual (then rounded, and stored back on the
// first pass); the second pass reads it back from where the first left it.
template <class T, int G, bool kResidual>
__device__ __forceinline__ void load_h(float (&h)[G], const T* acc, T* res, int64_t i, int64_t n, bool vec, bool first) {
  Group<T, G> a;
  if (kResidual && !first) {
    a.load(res, i, n, vec, true);
  } else {
    a.load(acc, i, n, vec, true);  // written by peers and other CTAs in this call: past L1
    if constexpr (kResidual) {
      Group<T, G> r;
      r.load(res, i, n, vec, true);
#pragma unroll
      for (int k = 0; k < G; ++k) a.v[k] = dev::from_acc<T>(__fadd_rn(dev::to_acc(a.v[k]), dev::to_acc(r.v[k])));
      a.store(res, i, n, vec);
    }
  }
#pragma unroll
  for (int k = 0; k < G; ++k) h[k] = dev::to_acc(a.v[k]);
}

// y of group i from h: RMSNorm times the weight, or h itself.
template <class T, int G, bool kRmsNorm>
__device__ __forceinline__ void norm(float (&y)[G], const float (&h)[G], const T* weight, int64_t i, int64_t n, bool vec,
                                     float inv_rms) {
  if constexpr (kRmsNorm) {
    Group<T, G> w;
    w.load(weight, i, n, vec, false);
#pragma unroll
    for (int k = 0; k < G; ++k) {
      const float x = dev::to_acc(dev::from_acc<T>(__fmul_rn(h[k], inv_rms)));
      y[k] = dev::to_acc(dev::from_acc<T>(__fmul_rn(dev::to_acc(w.v[k]), x)));
    }
  } else {
#pragma unroll
    for (int k = 0; k < G; ++k) y[k] = h[k];
  }
}

// The rows of the op's buffer (p.out) into the caller's output, CTA b taking rows b, b + grid, ...
template <class Op, class P>
__device__ void rows(const P& p, float eps) {
  using T = typename Op::Elem;
  constexpr int G = 16 / sizeof(T);
  const int64_t H = p.hidden;
  const bool vec = H % G == 0 && aligned16(p.out) && aligned16(p.y) && (!p.residual || aligned16(p.residual)) &&
                   (!p.weight || aligned16(p.weight));
  const int64_t step = static_cast<int64_t>(blockDim.x) * G;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* acc = reinterpret_cast<const T*>(p.out) + r * H;
    T* res = Op::kResidual ? reinterpret_cast<T*>(p.residual) + r * H : nullptr;
    const T* w = reinterpret_cast<const T*>(p.weight);
    float inv_rms = 1.f;
    if constexpr (Op::kRmsNorm) {
      float ss = 0.f;
      for (int64_t i = threadIdx.x * G; i < H; i += step) {
        float h[G];
        load_h<T, G, Op::kResidual>(h, acc, res, i, H, vec, true);
#pragma unroll
        for (int k = 0; k < G; ++k) ss = __fmaf_rn(h[k], h[k], ss);  // (elements past H load as 0)
      }
      ss = block_reduce<false>(ss);
      inv_rms = rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(H)), eps));
    }
    float amax = 0.f;
    for (int64_t i = threadIdx.x * G; i < H; i += step) {
      float h[G], y[G];
      load_h<T, G, Op::kResidual>(h, acc, res, i, H, vec, !Op::kRmsNorm);
      norm<T, G, Op::kRmsNorm>(y, h, w, i, H, vec, inv_rms);
      if constexpr (Op::kQuant == kNoQuant) {
        Group<T, G> o;
#pragma unroll
        for (int k = 0; k < G; ++k) o.v[k] = dev::from_acc<T>(y[k]);
        o.store(reinterpret_cast<T*>(p.y) + r * H, i, H, vec);
      } else {
#pragma unroll
        for (int k = 0; k < G; ++k) amax = i + k < H ? fmaxf(amax, fabsf(dev::to_acc(dev::from_acc<T>(y[k])))) : amax;
      }
    }
    if constexpr (Op::kQuant == kFp8E4M3) {
      amax = block_reduce<true>(amax);
      const float scale = amax > 0.f ? __fdiv_rn(amax, kFp8E4M3Max) : 1.f;
      const float inv_scale = __fdiv_rn(1.f, scale);
      for (int64_t i = threadIdx.x * G; i < H; i += step) {
        float h[G], y[G];
        load_h<T, G, Op::kResidual>(h, acc, res, i, H, vec, false);
        norm<T, G, Op::kRmsNorm>(y, h, w, i, H, vec, inv_rms);
#pragma unroll
        for (int k = 0; k < G; ++k) y[k] = dev::to_acc(dev::from_acc<T>(y[k]));
        store_fp8<G>(reinterpret_cast<__nv_fp8_e4m3*>(p.y) + r * H, i, H, y, inv_scale, vec && H % 16 == 0);
      }
      if (threadIdx.x == 0) p.scales[r] = scale;
    }
  }
}

}  // namespace epi
}  // namespace coll
}  // namespace tilegen
