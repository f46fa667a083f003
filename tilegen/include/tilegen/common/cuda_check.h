// tilegen common layer, host side: CUDA runtime calls checked where they are made. A chain of calls
// (an op's init) that only kept the last cudaError_t lost which call failed; TILEGEN_CUDA_CHECK
// writes "<who>: <file>:<line>: <call>: <error string>" into the caller's message buffer and
// returns 1 from the enclosing function (host_msg.h's 0 / 1 contract), so the report names the call.
#pragma once
#include <cuda_runtime.h>
#include "tilegen/common/host_msg.h"

namespace tilegen {
inline int cuda_fail(char* msg, int len, const char* who, const char* file, int line, const char* call, cudaError_t e) {
  return fail(msg, len, "%s: %s:%d: %s: %s", who, file, line, call, cudaGetErrorString(e));
}
}  // namespace tilegen

// In a function returning int that reports into (msg, len): evaluates `call` once; on an error,
// writes the report and returns 1. `who` names the op (its kName).
#define TILEGEN_CUDA_CHECK(who, msg, len, call)                                                      \
  do {                                                                                               \
    const cudaError_t tilegen_check_e_ = (call);                                                     \
    if (tilegen_check_e_ != cudaSuccess)                                                             \
      return ::tilegen::cuda_fail(msg, len, who, __FILE__, __LINE__, #call, tilegen_check_e_);       \
  } while (0)
