// tilegen MoE layer: phase stamps for profiling (tools/profile_moe.py --trace). The kernel ids and each
// kernel's phases are named on the Python side too (MoeOp.TRACE_KERNELS / TRACE_PHASES): keep them equal.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "tilegen/common/memory.cuh"

namespace tilegen {
namespace moe {

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

}  // namespace moe
}  // namespace tilegen
