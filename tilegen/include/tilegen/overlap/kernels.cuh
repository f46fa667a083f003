// tilegen overlap layer, device side: the GEMM ops' kernels beside the collective kernel. Decomposed
// overlap: the call's epoch (begin_call) and the compute stream's chunk hooks (signal_chunk, wait_chunk);
// copy-engine overlap: the entry handshake, flag kernels and the reduction of arrivals (ce_*). (In
// namespace coll, as the collective kernel whose flags they share.)
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "tilegen/collective/kernel.cuh"
#include "tilegen/common/memory.cuh"
#include "tilegen/common/wait.cuh"

namespace tilegen {
namespace coll {

// GEMM ops. Every kernel of a call reads its epoch from the op's epoch word, which begin_call
// advances on the caller's stream before the call forks: a CUDA graph replays the epochs right.
template <class Op>
__global__ void begin_call(uint64_t* epoch_dev) { dev::st_release_gpu(epoch_dev, *epoch_dev + 1); }

// gemm_rs, compute stream: after the GEMM of a chunk of partial C (same stream, so its stores are
// complete), publish the chunk to the communication kernel running beside it.
template <class Op>
__global__ void signal_chunk(uint64_t* sig, int chunk, int parts, const uint64_t* epoch_src) {
  const uint64_t epoch = dev::ld_acquire_gpu(epoch_src);
  for (int h = 0; h < parts; ++h) {
    dev::fence_acq_rel_gpu();
    dev::st_release_gpu(sig + signals<Op>().flag(kIn, chunk * parts + h, 0), epoch);
  }
}

// ag_gemm, compute stream: one thread waits until every tile of a gathered chunk has landed (the
// flags the copy kernel's waits use), so the GEMM queued after it reads complete data.
template <class Op>
__global__ void wait_chunk(const uint64_t* sig, int chunk, int parts, int64_t shard, int64_t part, int64_t tile,
                           const uint64_t* epoch_src, dev::WaitCtx w) {
  if (threadIdx.x != 0) return;
  const uint64_t epoch = dev::ld_acquire_gpu(epoch_src);
  for (int h = 0; h < parts; ++h) {
    const int64_t len = layout::unit_length(Chunks::kOne, shard, shard, part, parts, h);
    const int64_t nt = Op::kPerTile ? (len + tile - 1) / tile : 1;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t idx = signals<Op>().flag(kOut, chunk * parts + h, t);
      if (!dev::wait_ge(sig + idx, epoch, w, SignalKind::kTileFlag, idx, -1)) return;
    }
  }
}

// ---------------------------------------------------------------------- GEMM ops, copy-engine overlap
// The data moves by cudaMemcpyAsync between symmetric buffers (the DMA engines, no SMs). Chunk flags
// go 0 -> 1 (the producer, after its copy or GEMM) -> 0 (the consumer, after its wait), written and
// waited with stream memory operations (the GPU's front end, no SM: a waiting kernel would hold an
// SM the GEMM beside it needs); the kernels below are the fallback and the bounded (reporting) wait.
// Constant values: a CUDA graph replays them right. The entry handshake carries the call's epoch.
constexpr int kCeMaxSplits = 8;  // row splits of a chunk (a flag per source rank and split)

// Signal words of the copy-engine protocol: [0, kMaxWorld) entry (rank q entered epoch e), then one
// flag per (source rank, split).
template <class Op>
struct CeSignals {
  static constexpr int kEntry = 0, kFlags = Op::kMaxWorld;
  static constexpr int kWords = Op::kMaxWorld + Op::kMaxWorld * kCeMaxSplits;
  uint64_t* peer[Op::kMaxWorld];  // every rank's words through NVLink (this rank's own included)
};

// Caller's stream, before the call forks: advance the epoch, tell every peer this rank entered the
// call (its previous call's GEMMs and copies are done: the stream joined them), and wait until
// every peer entered it (so their buffers this call writes or reads are free).
template <class Op>
__global__ void ce_begin(uint64_t* epoch_dev, const __grid_constant__ CeSignals<Op> s, int rank, int world,
                         dev::WaitCtx w) {
  if (threadIdx.x != 0) return;
  const uint64_t epoch = *epoch_dev + 1;
  dev::st_release_gpu(epoch_dev, epoch);
  for (int q = 0; q < world; ++q)
    if (q != rank) dev::st_release_sys(s.peer[q] + CeSignals<Op>::kEntry + rank, epoch);
  for (int i = 1; i < world; ++i) {
    const int q = (rank + i) % world;
    if (!dev::wait_ge(s.peer[rank] + CeSignals<Op>::kEntry + q, epoch, w, SignalKind::kEntry, q, -1)) return;
  }
}

// After the copy or GEMM queued before it on this stream: set a (peer's) flag.
__global__ void ce_signal(uint64_t* flag) {
  dev::fence_acq_rel_sys();
  dev::st_release_sys(flag, 1);
}

// Holds this stream until this rank's flag `index` is set, then clears it for the next call.
__global__ void ce_wait(uint64_t* flag, int64_t index, dev::WaitCtx w) {
  if (threadIdx.x != 0) return;
  if (dev::wait_eq(flag, 1, w, SignalKind::kCeFlag, index, -1)) dev::st_relaxed_sys(flag, 0);
}
// dst[i] += sum over j < count of src[j * stride + i], in fp32, in j order (deterministic): the
// copy-engine gemm_rs adding the arrivals its own GEMM's epilogue did not take. 16-byte vectors
// where n, stride and both pointers allow, else elements.
template <class T>
__global__ void ce_reduce(T* dst, const T* src, int64_t stride, int count, int64_t n, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (vec) {
    for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < n / kVec; v += step) {
      uint4 d = reinterpret_cast<const uint4*>(dst)[v];
      T* de = reinterpret_cast<T*>(&d);
      float acc[kVec];
      for (int e = 0; e < kVec; ++e) acc[e] = static_cast<float>(de[e]);
      for (int j = 0; j < count; ++j) {
        const uint4 x = reinterpret_cast<const uint4*>(src + j * stride)[v];
        const T* xe = reinterpret_cast<const T*>(&x);
        for (int e = 0; e < kVec; ++e) acc[e] += static_cast<float>(xe[e]);
      }
      for (int e = 0; e < kVec; ++e) de[e] = static_cast<T>(acc[e]);
      reinterpret_cast<uint4*>(dst)[v] = d;
    }
    return;
  }
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += step) {
    float acc = static_cast<float>(dst[i]);
    for (int j = 0; j < count; ++j) acc += static_cast<float>(src[j * stride + i]);
    dst[i] = static_cast<T>(acc);
  }
}
}  // namespace coll
}  // namespace tilegen
