// Instantiates every primitive of the device library (common/ and primitives/) so that nvcc checks
// them all (CPU test: compile only). Each kernel is also a small usage example.
#include "tilegen/common/memory.cuh"
#include "tilegen/common/wait.cuh"
#include "tilegen/primitives/ll.cuh"
#include "tilegen/primitives/reduce.cuh"
#include "tilegen/primitives/simple.cuh"

namespace dev = tilegen::dev;
using tilegen::SignalKind;

__global__ void loads_stores_fences(uint64_t* p, uint64_t* out, unsigned* flag) {
  __shared__ unsigned word;
  out[0] = dev::ld_acquire_sys(p) + dev::ld_acquire_gpu(p);
  dev::st_relaxed_sys(p + 1, 1);
  dev::st_release_sys(p + 2, 2);
  dev::st_release_gpu(p + 3, 3);
  out[1] = dev::atomic_add_acq_rel_gpu(p + 4, 1);
  dev::fence_acq_rel_sys();
  dev::fence_acq_rel_gpu();
  if (threadIdx.x == 0) dev::st_release_cta_shared(&word, 1);
  __syncthreads();
  flag[threadIdx.x] = dev::ld_acquire_cta_shared(&word);
  out[2] = dev::globaltimer_ns();
  dev::pdl_trigger();
}

__global__ void waits(const uint64_t* sig, dev::WaitError* err, int* ok) {
  const dev::WaitCtx ctx{err, 1000000, 0, 7};
  ok[0] = dev::wait_eq(sig, 1, ctx, SignalKind::kCeFlag, 0, 0) + dev::wait_ge(sig, 1, ctx, SignalKind::kTileFlag, 0, 0);
  ok[1] = dev::block_wait_all_ge(sig, 4, 1, ctx, SignalKind::kMoeCombineFlag, 0);
}

__global__ void votes(int* out) { out[threadIdx.x] = dev::elect_one_sync(); }

__global__ void moves(char* peer, char* sym, const char* src, char* dst, uint64_t* sig, int64_t n, int pe) {
  dev::put_block(peer, sym, src, n, pe);
  dev::put_block<false>(nullptr, sym, src, n, pe);
  dev::put_signal_block(peer, sym, src, n, sig, sig + 1, 1, pe);
  dev::put_signal_block<false>(nullptr, sym, src, n, nullptr, sig + 1, 1, pe);
  char* const d[2] = {dst, peer};
  dev::copy_multi<2, false>(d, 2, src, n, threadIdx.x, blockDim.x);
}

__global__ void ll_lines(char* line, const dev::WaitError* err, uint64_t* out, int n) {
  const dev::WaitCtx ctx{const_cast<dev::WaitError*>(err), 1000000, 0, 7};
  dev::ll_store(line, 42, 3);
  uint64_t v = 0;
  if (dev::ll_load(line, 3, &v, ctx, 0, 0)) dev::store8(reinterpret_cast<char*>(out), v + dev::load8<true>(line, n), n);
  uint64_t a, b;
  dev::st_volatile_v2(line + 16 * (threadIdx.x & 31), 1, 2);
  if (dev::ll128_load(line + 16 * (threadIdx.x & 31), true, 2, a, b, ctx, SignalKind::kMoeLL128Line, 0, 1, 0))
    out[1 + threadIdx.x] = a + b + dev::load8<false>(line, n);
}

// Every operator, through the integer codes the generated sources use and directly (FuncPreMulSum:
// an operand carried by the functor value).
template <int kCode, class T>
__device__ void reduce_by_code(char* const (&dst)[2], const char* const (&src)[3], const bool (&ro)[3], int64_t n) {
  dev::reduce_multi<T, typename dev::ReduceOp<kCode>::type, 3, 2>(dst, 2, src, 3, ro, n, threadIdx.x, blockDim.x);
}
template <class T>
__device__ void reduce_all(char* a, char* b, const char* c, int64_t n, uint64_t word, uint64_t* out) {
  char* const dst[2] = {a, b};
  const char* const src[3] = {a, b, c};
  const bool ro[3] = {false, false, true};
  reduce_by_code<0, T>(dst, src, ro, n);
  reduce_by_code<1, T>(dst, src, ro, n);
  reduce_by_code<2, T>(dst, src, ro, n);
  if constexpr (!std::is_same_v<T, int32_t>) reduce_by_code<dev::kReducePreMulSum, T>(dst, src, ro, n);
  using A = typename dev::Acc<T>::type;
  const dev::FuncPreMulSum<A> avg{A(1) / A(3), 0x5u};  // sources 0 and 2 scaled
  dev::reduce_multi<T, dev::FuncPreMulSum<A>, 3, 2>(dst, 2, src, 3, ro, n, threadIdx.x, blockDim.x, avg);
  A acc[8 / sizeof(T)];
  dev::combine8<T>(acc, word, true, 0, dev::FuncSum{});
  dev::combine8<T>(acc, word, false, 1, dev::FuncMax{});
  dev::combine8<T>(acc, word, false, 1, dev::FuncMin{});
  dev::combine8<T>(acc, word, false, 2, avg);
  out[threadIdx.x] = dev::pack8<T>(acc);
}
__global__ void reductions(char* a, char* b, const char* c, int64_t n, uint64_t word, uint64_t* out) {
  reduce_all<__nv_bfloat16>(a, b, c, n, word, out);
  reduce_all<__half>(a, b, c, n, word, out);
  reduce_all<float>(a, b, c, n, word, out);
  reduce_all<int32_t>(a, b, c, n, word, out);
}

__global__ void barriers(uint64_t* counter, uint64_t* flags, uint64_t* const* peer_flags, uint64_t epoch, int* ok) {
  if (dev::arrive_last(counter, gridDim.x)) ok[0] = 1;
  if (dev::arrive_last<false>(counter + 1, gridDim.x)) ok[1] = 1;
  dev::signal_peer_one(peer_flags[0], flags, epoch, 0);
}
