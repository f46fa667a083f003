// Instantiates every primitive of the device library so that nvcc checks them all (CPU test:
// compile only). Each kernel is also a small usage example.
#include "tilegen/device.cuh"

namespace dev = tilegen::dev;

__global__ void loads_stores_fences(uint64_t* p, uint64_t* out) {
  out[0] = dev::ld_relaxed_sys(p) + dev::ld_acquire_sys(p) + dev::ld_acquire_gpu(p);
  dev::st_relaxed_sys(p + 1, 1);
  dev::st_release_sys(p + 2, 2);
  dev::st_release_gpu(p + 3, 3);
  out[1] = dev::atomic_add_acq_rel_gpu(p + 4, 1);
  dev::fence_acq_rel_sys();
  dev::fence_acq_rel_gpu();
  dev::fence_sc_sys();
  out[2] = dev::globaltimer_ns();
}

__global__ void waits(const uint64_t* sig, dev::WaitError* err, int* ok) {
  const dev::WaitCtx ctx{err, 1000000, 0, 7};
  ok[0] = dev::wait_eq(sig, 1, ctx, 1, 0, 0) + dev::wait_ne(sig, 0, ctx, 1, 0, 0) + dev::wait_ge(sig, 1, ctx, 1, 0, 0) +
          dev::wait_gt(sig, 0, ctx, 1, 0, 0) + dev::wait_le(sig, 1, ctx, 1, 0, 0) + dev::wait_lt(sig, 2, ctx, 1, 0, 0);
  ok[1] = dev::block_wait_ge(sig, 1, ctx, 1, 0, 0);
}

__global__ void votes(int* out) {
  out[threadIdx.x] = dev::warp_any(threadIdx.x == 3) + 2 * dev::warp_all(threadIdx.x < 64) + 4 * dev::elect_one_sync();
}

__global__ void moves(char* peer, char* sym, const char* src, char* dst, int64_t n, int pe) {
  dev::put_block(peer, sym, src, n, pe);
  dev::put_warp(peer, sym, src, n, pe);
  dev::get_block(dst, peer, sym, n, pe);
  dev::get_warp(dst, peer, sym, n, pe);
  char* const d[2] = {dst, peer};
  dev::copy_multi<2, false>(d, 2, src, n, threadIdx.x, blockDim.x);
}

__global__ void barriers(uint64_t* counter, uint64_t* flags, uint64_t* const* peer_flags, uint64_t epoch, int* ok) {
  const dev::WaitCtx ctx{nullptr, 0, 0, 0};
  ok[0] = dev::barrier_blocks(counter, gridDim.x, flags, peer_flags, flags, nvshmem_my_pe(), nvshmem_n_pes(), epoch, ctx);
  if (dev::arrive_last(counter + 1, gridDim.x)) ok[1] = 1;
  dev::signal_peer_one(peer_flags[0], flags, epoch, 0);
}
