// tilegen overlap layer, host side: the copy-engine overlap's program (as tilegen/overlap/runtime.py encodes
// tilegen/overlap/ce_program.py's steps) and the stream memory operations its flags use. No kernels here.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <cuda.h>  // driver API types only: its functions come through the runtime's entry points (no -lcuda)
#include <cuda_runtime.h>

namespace tilegen {
namespace coll {

// Stream memory operations (cuStreamWaitValue64 / cuStreamWriteValue64): a stream waits for or
// writes a word in the GPU's front end, without a kernel. TILEGEN_CE_MEMOPS=0 uses kernels instead.
struct StreamMemOps {
  using ValueFn = CUresult (*)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
  using AttrFn = CUresult (*)(int*, CUdevice_attribute, CUdevice);
  ValueFn wait = nullptr, write = nullptr;
  bool ok = false;

  static void* entry(const char* name) {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    return cudaGetDriverEntryPointByVersion(name, &f, 12000, cudaEnableDefault, &q) == cudaSuccess &&
                   q == cudaDriverEntryPointSuccess
               ? f
               : nullptr;
  }

  void load(int device, bool allowed) {  // allowed: TILEGEN_CE_MEMOPS (tilegen.settings), passed by the runtime
    if (!allowed) return;
    wait = reinterpret_cast<ValueFn>(entry("cuStreamWaitValue64"));
    write = reinterpret_cast<ValueFn>(entry("cuStreamWriteValue64"));
    auto attr = reinterpret_cast<AttrFn>(entry("cuDeviceGetAttribute"));
    int yes = 0;
    ok = wait && write && attr && attr(&yes, CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, device) == CUDA_SUCCESS && yes;
  }
};

// One step of a copy-engine program: what, on which stream, with whom, and rows [lo, hi) of buffers
// (0 a, 1 the symmetric one, 2 c, 3 acc). The kinds' numbers are the encoding the Python side writes
// (tilegen/overlap/runtime.py's CE_KINDS, in this order): change both together. A put copies into a peer's
// symmetric buffer and then sets the peer's flag; a wait holds its stream until this rank's flag is set.
struct CeStep {
  enum Kind : int8_t { kBegin = 0, kFork = 1, kJoin = 2, kPut = 3, kWait = 4, kGemm = 5, kReduce = 6, kKinds };
  static constexpr int kFields = 15, kBuffers = 4;
  int8_t kind, stream;  // stream 0: the caller's, 1 + i: copy stream i
  int16_t peer;
  int32_t flag;
  int32_t count;   // reduce: terms, each `stride` rows after the previous
  int64_t stride;
  int8_t dst, src, addend;  // buffer ids, -1: none
  int64_t dlo, dhi, slo, shi, alo, ahi;
};
struct CeProgram {
  std::vector<CeStep> steps;
  int64_t max_row[CeStep::kBuffers] = {};  // rows each buffer must have
  int copies = 0;                          // copy streams it uses: 1 .. copies
};

}  // namespace coll
}  // namespace tilegen
