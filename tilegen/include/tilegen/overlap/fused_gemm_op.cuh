// tilegen fused GEMM op: one CUTLASS 3 Hopper GEMM (TMA loads, wgmma, warp-specialized cooperative,
// persistent; bf16/f16 in, fp32 accumulation) whose tile scheduler is tilegen's ChunkScheduler
// (overlap/fused_gemm.cuh): it waits on the gather's flags before loading rows of A (ag_gemm) or
// publishes each part of partial C once its tiles are stored (gemm_rs). A generated <op>_gemm.cu
// picks the element type, B's layout, the tile and the stages, then exports the op's two entry points
// with TILEGEN_EXPORT_FUSED_GEMM. Compiled whole-program, without NVSHMEM (tilegen/core/toolchain.py).
#pragma once
#include <cstdint>
#include <type_traits>
#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "tilegen/common/host_msg.h"
#include "tilegen/host/sms.cuh"
#include "tilegen/overlap/fused_gemm.cuh"

// From the op's collective translation unit: the signal layout, epoch and chunk order of the call
// run() just prepared.
extern "C" int tilegen_op_chunk_sync(tilegen::fused::ChunkSync* out, int64_t rows, int tile_m, int tiles_n,
                                     int64_t row_bytes, uint64_t timeout_ns, int* comm_ctas, char* msg, int len);

namespace tilegen {
namespace fused {

// kGathersA: ag_gemm (the scheduler waits on rows of A) rather than gemm_rs (it publishes parts of C).
// kPingpong: each consumer warp group runs its own tile (CUTLASS's pingpong schedule: one's mainloop beside
// the other's epilogue; ag_gemm only, the spec checks it), else both share each tile (cooperative).
// Stages 0: as many as fit beside the epilogue. ClusterM x ClusterN CTAs share B (A) tiles by TMA
// multicast; the scheduler renumbers each CTA's row block alone, which keeps a cluster's CTAs on one
// column block (the B tile they share) and on one row block per cluster column (the A tile).
template <class Element, bool kBRowMajor, int TileM, int TileN, int TileK, int ClusterM, int ClusterN, int Stages,
          bool kGathersA, bool kPingpong = false>
struct FusedGemm {
  static_assert(kGathersA || !kPingpong, "the pingpong schedule runs ag_gemm only (gemm_rs publishes from the cooperative epilogue)");
  using KernelSchedule = std::conditional_t<kPingpong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                            cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
  using EpilogueSchedule = std::conditional_t<kPingpong, cutlass::epilogue::TmaWarpSpecialized,
                                              cutlass::epilogue::TmaWarpSpecializedCooperative>;
  using LayoutA = cutlass::layout::RowMajor;  // A [M, K]
  using LayoutB = std::conditional_t<kBRowMajor, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;  // [K, N] or [N, K]
  using LayoutD = cutlass::layout::RowMajor;  // C [M, N]
  static constexpr int kAlign = 16 / sizeof(Element);
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::Int<TileK>>;
  using ClusterShape = cute::Shape<cute::Int<ClusterM>, cute::Int<ClusterN>, cute::_1>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD, kAlign,  // no source C
      Element, LayoutD, kAlign, EpilogueSchedule>::CollectiveOp;
  using StageCount = std::conditional_t<
      Stages == 0,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::collective::StageCount<Stages == 0 ? 2 : Stages>>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, float,
      TileShape, ClusterShape, StageCount, KernelSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                          CollectiveEpilogue, ChunkSchedulerTag>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  static_assert(cute::is_same_v<typename GemmKernel::TileScheduler, ChunkScheduler>,
                "the fused GEMM must run tilegen's chunk scheduler");

  // C[M, N] = A[M, K] @ B with M = world * rows, beside the communication kernel of the same call.
  // sms: CTAs of the persistent GEMM (0: the SMs this process may fill minus the communication kernel's CTAs).
  static int run(const void* a, const void* b, void* c, int64_t rows, int64_t n, int64_t k, int sms, void* stream,
                 uint64_t timeout_ns, char* msg, int len) {
    const int N = static_cast<int>(n), K = static_cast<int>(k);
    typename GemmKernel::TileSchedulerArguments sched{};
    int comm_ctas = 0;
    const int64_t row_bytes = static_cast<int64_t>(kGathersA ? K : N) * sizeof(Element);
    if (tilegen_op_chunk_sync(&sched.sync, rows, TileM, (N + TileN - 1) / TileN, row_bytes, timeout_ns, &comm_ctas, msg, len))
      return 1;
    sched.raster_order = decltype(sched.raster_order)::AlongN;  // row blocks in the scheduler's order
    sched.max_swizzle_size = 1;
    const int m = static_cast<int>(rows * sched.sync.world);
    int device = 0, resident = 0;
    cudaGetDevice(&device);
    if (tilegen::host::resident_sms(&resident) != cudaSuccess)
      return fail(msg, len, "fused GEMM: the device's SMs: %s", cudaGetErrorString(cudaGetLastError()));
    if (sms <= 0) sms = resident - comm_ctas;  // both kernels spin on each other: leave the comm kernel its SMs
    if (sms < 1 || sms > resident)
      return fail(msg, len, "GEMM CTAs %d outside [1, %d] (this process may fill %d SMs, the communication kernel "
                  "uses %d)", sms, resident, resident, comm_ctas);
    cutlass::KernelHardwareInfo hw{device, sms};
    using StrideA = typename GemmKernel::StrideA;
    using StrideB = typename GemmKernel::StrideB;
    using StrideD = typename GemmKernel::StrideD;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, N, K, 1},
        {static_cast<const Element*>(a), cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(m, K, 1)),
         static_cast<const Element*>(b), cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1))},
        {{1.0f, 0.0f}, nullptr, StrideD{}, static_cast<Element*>(c),
         cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(m, N, 1))},
        hw,
        sched};
    Gemm gemm;
    cutlass::Status st = gemm.can_implement(args);
    if (st != cutlass::Status::kSuccess)
      return fail(msg, len, "CUTLASS cannot run this GEMM (m %d, n %d, k %d): %s", m, N, K, cutlassGetStatusString(st));
    st = gemm.initialize(args, nullptr, static_cast<cudaStream_t>(stream));
    if (st == cutlass::Status::kSuccess) st = gemm.run(static_cast<cudaStream_t>(stream));
    if (st != cutlass::Status::kSuccess)
      return fail(msg, len, "fused GEMM launch failed: %s (%s)", cutlassGetStatusString(st),
                       cudaGetErrorString(cudaGetLastError()));
    return 0;
  }

  // Loads the GEMM kernel now (spinning kernels and lazy module loading, see host/base.cuh load_kernels).
  static int load(char* msg, int len) {
    cudaFuncAttributes fa;
    cudaError_t e = cudaFuncGetAttributes(&fa, cutlass::device_kernel<GemmKernel>);
    if (e == cudaSuccess)
      e = cudaFuncSetAttribute(cutlass::device_kernel<GemmKernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               GemmKernel::SharedStorageSize);
    return e == cudaSuccess ? 0 : fail(msg, len, "loading the fused GEMM: %s", cudaGetErrorString(e));
  }
};

}  // namespace fused
}  // namespace tilegen

#define TILEGEN_EXPORT_FUSED_GEMM(GEMM)                                                                              \
  extern "C" {                                                                                                      \
  int tilegen_op_fused_gemm(const void* a, const void* b, void* c, int64_t rows, int64_t n, int64_t k, int sms,    \
                            void* stream, uint64_t timeout_ns, char* msg, int len) {                                \
    return GEMM::run(a, b, c, rows, n, k, sms, stream, timeout_ns, msg, len);                                        \
  }                                                                                                                 \
  int tilegen_op_fused_load(char* msg, int len) { return GEMM::load(msg, len); }                                    \
  }
