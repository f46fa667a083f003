// tilegen host layer: how many SMs a process's kernels may fill. Every kernel that needs all its CTAs
// resident at once (the collective kernel, whose schedules are proven deadlock-free with every CTA
// running; the epilogue's grid barrier; MoE waves; the fused GEMM beside its communication kernel) is
// sized from resident_sms, not from the device attribute: under CUDA MPS a client gets a share of the
// SMs, and a grid sized to the whole device left CTAs waiting for SMs their peers held.
// No NVSHMEM here: the fused GEMM's translation unit (built without it) includes this too.
#pragma once
#include <cstdlib>
#include <cuda.h>
#include <cuda_runtime.h>

namespace tilegen {
namespace host {

// The current device's SMs and, optionally, its compute capability's major version.
inline cudaError_t device_sms(int* sms, int* major = nullptr) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess && major) e = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
  return e;
}

// SMs the current context may use, as the driver reports them (under CUDA MPS: the client's share,
// whether CUDA_MPS_ACTIVE_THREAD_PERCENTAGE or the daemon's default set it); 0 where the driver
// has no answer. Reached through the runtime's driver entry point: the op libraries do not link libcuda.
inline int context_sms() {
  using GetExecAffinity = CUresult (*)(CUexecAffinityParam*, CUexecAffinityType);
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaGetDriverEntryPointByVersion("cuCtxGetExecAffinity", &fn, 11040, cudaEnableDefault, &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess || !fn)
    return 0;
  CUexecAffinityParam a{};
  if (reinterpret_cast<GetExecAffinity>(fn)(&a, CU_EXEC_AFFINITY_TYPE_SM_COUNT) != CUDA_SUCCESS) return 0;
  return static_cast<int>(a.param.smCount.val);
}

// The SMs one process's CTAs may fill: the device's `all`, capped by its context's count `context`
// (0: unknown) and by the share a CUDA_MPS_ACTIVE_THREAD_PERCENTAGE value `percentage` grants
// (null or not in (0, 100): none); at least one.
inline int sm_share(int all, int context, const char* percentage) {
  int sms = all;
  if (context > 0 && context < sms) sms = context;
  const double share = percentage ? all * atof(percentage) / 100.0 : 0.0;
  if (share > 0.0 && share < sms) sms = static_cast<int>(share);
  return sms > 1 ? sms : 1;
}

// SMs this process's CTAs can occupy at once. Under CUDA MPS the device attribute still reports the
// whole device, and a grid sized to it left CTAs of ranks sharing a GPU waiting for SMs their peers held.
inline cudaError_t resident_sms(int* sms) {
  int all = 0;
  const cudaError_t e = device_sms(&all);
  if (e == cudaSuccess) *sms = sm_share(all, context_sms(), getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"));
  return e;
}

}  // namespace host
}  // namespace tilegen
