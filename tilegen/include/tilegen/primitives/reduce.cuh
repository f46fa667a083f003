// tilegen primitives, reductions: element-wise reduction of up to MAXS sources into up to MAXD
// destinations, accumulating in fp32 for bf16/f16 (int32 stays integer). Sources may be written by
// peers during the kernel (coherent loads); destinations may be peer pointers.
//
// The operator is a functor type, as NCCL's FuncSum / FuncMax / FuncMin / FuncPreMulSum: `fn(a, b)`
// combines two accumulator values and `fn.pre(v, s)` maps source s's input (as an accumulator value)
// before it is combined, the identity except for FuncPreMulSum, which multiplies the sources its mask
// names by its operand (reduce: avg is a sum of x / world). A functor is a value, so its operand
// travels with it into the kernel. The mask says which sources still hold a rank's raw input (the
// plan's Step.scaled, tilegen/collective/schedules.py with_premul): a partial sum is scaled already.
// Generated sources name the operator by an integer (Op::kReduceOp: 0 sum, 1 max, 2 min, 3 premul
// sum, tilegen/collective/render.py's REDUCE_CODE); ReduceOp<code>::type maps it to the functor.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include "tilegen/primitives/simple.cuh"

namespace tilegen {
namespace dev {

// ---------------------------------------------------------------- accumulator types
template <typename T> struct Acc { using type = float; };
template <> struct Acc<int32_t> { using type = int32_t; };
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ int32_t to_acc(int32_t v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ int32_t from_acc<int32_t>(int32_t v) { return v; }

// ---------------------------------------------------------------- operators
struct FuncSum {
  template <class A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
  template <class A> __device__ __forceinline__ A pre(A v, int) const { return v; }
};
struct FuncMax {
  template <class A> __device__ __forceinline__ A operator()(A a, A b) const { return a > b ? a : b; }
  template <class A> __device__ __forceinline__ A pre(A v, int) const { return v; }
};
struct FuncMin {
  template <class A> __device__ __forceinline__ A operator()(A a, A b) const { return a < b ? a : b; }
  template <class A> __device__ __forceinline__ A pre(A v, int) const { return v; }
};
// Sum of the sources, those `scaled` names (bit s: source s) multiplied by `scale` first; scale in
// the accumulator type (fp32 for bf16 / f16 / f32).
template <class S>
struct FuncPreMulSum {
  S scale;
  uint32_t scaled;
  template <class A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
  template <class A> __device__ __forceinline__ A pre(A v, int s) const {
    if (!((scaled >> s) & 1u)) return v;
    // rounded on its own: never contracted into an FMA with the sum, which one inlined copy of the
    // loop may get and another not (the LL and vector paths must give the same bits)
    if constexpr (std::is_same<A, float>::value) return __fmul_rn(v, scale);
    else return v * scale;
  }
};
constexpr int kReducePreMulSum = 3;

// The generated sources' integer reduce code -> the functor (no code: no operator, a compile error).
template <int kCode> struct ReduceOp;
template <> struct ReduceOp<0> { using type = FuncSum; };
template <> struct ReduceOp<1> { using type = FuncMax; };
template <> struct ReduceOp<2> { using type = FuncMin; };
template <> struct ReduceOp<kReducePreMulSum> { using type = FuncPreMulSum<float>; };

// ---------------------------------------------------------------- element access
// One element; data peers may have written in this kernel is read past L1 (ld.global.cg).
template <typename T>
__device__ __forceinline__ T load_elem(const T* p, bool read_only) {
  using R = typename std::conditional<sizeof(T) == 2, unsigned short, unsigned int>::type;
  R r = read_only ? __ldg(reinterpret_cast<const R*>(p)) : __ldcg(reinterpret_cast<const R*>(p));
  T v;
  memcpy(&v, &r, sizeof(T));
  return v;
}

// acc (8 bytes of T) = fn(acc, fn.pre(v, s)), element-wise in T's accumulator type, for source s;
// first (the first source): acc = fn.pre(v, s).
template <typename T, class Fn>
__device__ __forceinline__ void combine8(typename Acc<T>::type (&acc)[8 / sizeof(T)], uint64_t v, bool first, int s,
                                         Fn fn) {
  T e[8 / sizeof(T)];
  memcpy(e, &v, 8);
#pragma unroll
  for (int k = 0; k < int(8 / sizeof(T)); ++k)
    acc[k] = first ? fn.pre(to_acc(e[k]), s) : fn(acc[k], fn.pre(to_acc(e[k]), s));
}
template <typename T>
__device__ __forceinline__ uint64_t pack8(const typename Acc<T>::type (&acc)[8 / sizeof(T)]) {
  T e[8 / sizeof(T)];
#pragma unroll
  for (int k = 0; k < int(8 / sizeof(T)); ++k) e[k] = from_acc<T>(acc[k]);
  uint64_t v;
  memcpy(&v, e, 8);
  return v;
}

// src_ro[s]: source s is read-only for the whole kernel (non-coherent loads).
template <typename T, class Fn, int MAXS, int MAXD>
__device__ __forceinline__ void reduce_multi(char* const (&dst)[MAXD], int ndst, const char* const (&src)[MAXS], int nsrc,
                                             const bool (&src_ro)[MAXS], int64_t bytes, int lane, int width,
                                             Fn fn = Fn{}) {
  using A = typename Acc<T>::type;
  constexpr int V = 16 / sizeof(T);
  uintptr_t bits = static_cast<uintptr_t>(bytes);
#pragma unroll
  for (int s = 0; s < MAXS; ++s)
    if (s < nsrc) bits |= reinterpret_cast<uintptr_t>(src[s]);
#pragma unroll
  for (int d = 0; d < MAXD; ++d)
    if (d < ndst) bits |= reinterpret_cast<uintptr_t>(dst[d]);
  if ((bits & 15) == 0) {
    const int64_t n = bytes >> 4;
    for (int64_t i = lane; i < n; i += width) {
      A acc[V];
#pragma unroll
      for (int s = 0; s < MAXS; ++s) {
        if (s >= nsrc) break;
        const int4* p = reinterpret_cast<const int4*>(src[s]) + i;
        int4 raw = src_ro[s] ? load16<true>(p) : load16<false>(p);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = s == 0 ? fn.pre(to_acc(e[k]), s) : fn(acc[k], fn.pre(to_acc(e[k]), s));
      }
      int4 out;
      T* o = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int k = 0; k < V; ++k) o[k] = from_acc<T>(acc[k]);
#pragma unroll
      for (int d = 0; d < MAXD; ++d)
        if (d < ndst) reinterpret_cast<int4*>(dst[d])[i] = out;
    }
  } else {
    const int64_t n = bytes / static_cast<int64_t>(sizeof(T));
    for (int64_t i = lane; i < n; i += width) {
      A acc = fn.pre(to_acc(load_elem(reinterpret_cast<const T*>(src[0]) + i, src_ro[0])), 0);
      for (int s = 1; s < nsrc; ++s)
        acc = fn(acc, fn.pre(to_acc(load_elem(reinterpret_cast<const T*>(src[s]) + i, src_ro[s])), s));
      const T v = from_acc<T>(acc);
#pragma unroll
      for (int d = 0; d < MAXD; ++d)
        if (d < ndst) reinterpret_cast<T*>(dst[d])[i] = v;
    }
  }
}

}  // namespace dev
}  // namespace tilegen
