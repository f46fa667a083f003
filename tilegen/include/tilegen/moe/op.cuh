// tilegen MoE library: expert-parallel token dispatch and combine over NVLink (one node). The layout and
// protocol are tilegen/moe/'s (check.py), checked there before any op is generated. Normal mode:
//
// dispatch  route (per block of 32 tokens: each item's rank among the block's items of its expert,
//           each token's rank among the block's tokens to each rank) -> scan (prefix over blocks,
//           totals) -> push: every token once per destination rank, into its staging row there
//           (this rank's segment of max_tokens rows), with a meta row (token, experts, each item's
//           index among this rank's items of its expert, weights); block 0 first writes this rank's
//           counts (per expert of the destination, tokens) there; the last block sets its flag ->
//           wait for every rank's flag, counts to the host (the caller sizes the outputs) -> expand:
//           each staging row copied to its items' final rows (per local expert, source, token, slot).
// combine   per staging row, the weighted sum of its local items' expert outputs (fp32, slot order),
//           rounded to the token dtype and pushed into the source rank's receive rows (one per sending
//           rank: half the NVLink bytes of fp32) -> flags -> each source sums the rows of the ranks its
//           token went to, in fp32, in rank order, rounded once.
// Buffers alternate between two halves by call parity: a rank writes a peer's half of call n + 2
// only after that peer's flag of call n + 1, which it set after it finished reading call n's.
// Low-latency mode (decode sizes, CUDA-graph capturable) has a dispatch of its own (ll_push, ll_expand
// below: each source sends its tokens as lines that carry the call's epoch, which each destination copies
// into the outputs as they land) and the same combine. Each half's second kernel (ll_expand,
// combine_reduce) launches early and reads only tagged lines or what flags publish, so its start
// overlaps the first kernel (launch_early).
//
// What a generated MoE <op>.cu includes: the kernels (moe/normal, moe/low_latency, moe/combine) and
// the host code (moe/host.cuh); the <op>.cu defines its traits struct Op, then exports the op with
// TILEGEN_EXPORT_MOE(Op).
#pragma once
#include "tilegen/host/base.cuh"
#include "tilegen/moe/host.cuh"

#define TILEGEN_EXPORT_MOE(OP)                                                                                        \
  extern "C" {                                                                                                       \
  int tilegen_op_init(char* msg, int len) { return tilegen::moe::Host<OP>::init(msg, len); }                         \
  int tilegen_op_release(char* msg, int len) { return tilegen::moe::Host<OP>::release(msg, len); }                   \
  int tilegen_op_init_group(int slot, int alloc_world, int size, const int* pes, char* msg, int len) {                \
    return tilegen::moe::Host<OP>::init_group(slot, alloc_world, size, pes, msg, len);                               \
  }                                                                                                                  \
  int tilegen_op_select(int slot, char* msg, int len) { return tilegen::moe::Host<OP>::select(slot, msg, len); }    \
  int tilegen_op_world(void) { return tilegen::moe::Host<OP>::g->ready ? tilegen::moe::Host<OP>::g->world : 0; }      \
  int tilegen_op_rank(void) { return tilegen::moe::Host<OP>::g->ready ? tilegen::moe::Host<OP>::g->rank : -1; }       \
  int tilegen_op_wait_error(char* msg, int len) { return tilegen::moe::Host<OP>::wait_error(msg, len); }             \
  TILEGEN_EXPORT_NVSHMEM_VERSIONS()                                                                                \
  int tilegen_moe_dispatch_send(const void* x, const void* idx, int idx64, const float* w, int64_t m, void* stream,  \
                                uint64_t timeout_ns, int64_t* out, char* msg, int len) {                             \
    return tilegen::moe::Host<OP>::dispatch_send(x, idx, idx64, w, m, stream, timeout_ns, out, msg, len);           \
  }                                                                                                                  \
  int tilegen_moe_dispatch_recv(void* out, float* scales, int32_t* handle, int32_t* slot_rows, int32_t* stage_src,   \
                                float* stage_w, int32_t* counts, int64_t rows, int64_t stage_rows, void* stream,     \
                                char* msg, int len) {                                                                \
    return tilegen::moe::Host<OP>::dispatch_recv(out, scales, handle, slot_rows, stage_src, stage_w, counts, rows, stage_rows, \
                                                 stream, msg, len);                                                  \
  }                                                                                                                  \
  int tilegen_moe_ll_outputs(int64_t* out, char* msg, int len) {                                                   \
    return tilegen::moe::Host<OP>::ll_outputs(out, msg, len);                                                        \
  }                                                                                                                  \
  int tilegen_moe_ll_dispatch(const void* x, const void* idx, int idx64, const float* w, int64_t m, void* stream,    \
                              uint64_t timeout_ns, char* msg, int len) {                                             \
    return tilegen::moe::Host<OP>::ll_dispatch(x, idx, idx64, w, m, stream, timeout_ns, msg, len);                   \
  }                                                                                                                  \
  int tilegen_moe_ll_combine(const void* y, const void* idx, int idx64, int64_t m, void* out, void* stream,          \
                             uint64_t timeout_ns, char* msg, int len) {                                              \
    return tilegen::moe::Host<OP>::ll_combine(y, idx, idx64, m, out, stream, timeout_ns, msg, len);                  \
  }                                                                                                                  \
  int tilegen_moe_trace(int on, char* msg, int len) { return tilegen::moe::Host<OP>::set_trace(on, msg, len); }    \
  int tilegen_moe_trace_read(uint64_t* out, char* msg, int len) {                                                   \
    return tilegen::moe::Host<OP>::read_trace(out, msg, len);                                                        \
  }                                                                                                                  \
  void tilegen_moe_trace_shape(int* kernels, int* phases, int* ctas) {                                             \
    *kernels = tilegen::moe::kTraceKernels, *phases = tilegen::moe::kTracePhases, *ctas = tilegen::moe::kTraceCtas; \
  }                                                                                                                  \
  int tilegen_moe_combine(const void* y, const int32_t* slot_rows, const int32_t* stage_src, const float* stage_w,  \
                          int64_t stage_rows, const void* idx, int idx64, int64_t m, void* out, void* stream,        \
                          uint64_t timeout_ns, char* msg, int len) {                                                 \
    return tilegen::moe::Host<OP>::combine(y, slot_rows, stage_src, stage_w, stage_rows, idx, idx64, m, out, stream,  \
                                           timeout_ns, msg, len);                                                    \
  }                                                                                                                  \
  }
