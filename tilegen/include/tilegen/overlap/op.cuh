// tilegen GEMM op library: what a generated GEMM <op>.cu includes (ag_gemm, gemm_rs; decomposed,
// copy-engine or fused overlap): the collective kernel and host, plus the overlap's kernels, state and
// calls (copy-engine executor, cuBLASLt). The <op>.cu defines its traits struct Op, then exports the
// op with TILEGEN_EXPORT_COLLECTIVE(Op): the collective entry points and the GEMM ones, all on
// coll::GemmHost<Op>. (A fused op's CUTLASS GEMM is its own translation unit: fused_gemm_op.cuh.)
#pragma once
#include "tilegen/collective/host.cuh"
#include "tilegen/collective/kernel.cuh"
#include "tilegen/overlap/host.cuh"
#include "tilegen/overlap/kernels.cuh"

#define TILEGEN_EXPORT_COLLECTIVE(OP)                                                                                  \
  extern "C" {                                                                                                        \
  TILEGEN_EXPORT_COLLECTIVE_CALLS(tilegen::coll::GemmHost<OP>)                                                        \
  int tilegen_op_begin(void* stream, char* msg, int len) { return tilegen::coll::GemmHost<OP>::begin(stream, msg, len); } \
  int tilegen_op_signal_chunk(int chunk, void* stream, char* msg, int len) {                                          \
    return tilegen::coll::GemmHost<OP>::signal_chunk_after(chunk, stream, msg, len);                                  \
  }                                                                                                                   \
  int tilegen_op_wait_chunk(int chunk, void* stream, uint64_t timeout_ns, char* msg, int len) {                       \
    return tilegen::coll::GemmHost<OP>::wait_chunk_on(chunk, stream, timeout_ns, msg, len);                           \
  }                                                                                                                   \
  int tilegen_op_compute_order(int* out) { return tilegen::coll::GemmHost<OP>::compute_order(out); }                  \
  int tilegen_op_allow_memops(int yes) { return tilegen::coll::GemmHost<OP>::allow_memops(yes); }                     \
  int tilegen_op_ce_begin(void* stream, uint64_t timeout_ns, char* msg, int len) {                                    \
    return tilegen::coll::GemmHost<OP>::ce_begin_call(stream, timeout_ns, msg, len);                                  \
  }                                                                                                                   \
  int tilegen_op_ce_put(const void* src, void* dst, int64_t bytes, int peer, int flag, void* stream, char* msg, int len) { \
    return tilegen::coll::GemmHost<OP>::ce_put(src, dst, bytes, peer, flag, stream, msg, len);                        \
  }                                                                                                                   \
  int tilegen_op_join(void* waiter, void* producer, char* msg, int len) {                                             \
    return tilegen::coll::GemmHost<OP>::join(waiter, producer, msg, len);                                             \
  }                                                                                                                   \
  int tilegen_op_ce_wait(int flag, void* stream, uint64_t timeout_ns, char* msg, int len) {                          \
    return tilegen::coll::GemmHost<OP>::ce_wait_flag(flag, stream, timeout_ns, msg, len);                             \
  }                                                                                                                   \
  int tilegen_op_ce_program(int64_t key, const int64_t* steps, int64_t n, char* msg, int len) {                     \
    return tilegen::coll::GemmHost<OP>::ce_set_program(key, steps, n, msg, len);                                      \
  }                                                                                                                   \
  int tilegen_op_ce_run(int64_t key, char* const* ptr, const int64_t* rows, const int64_t* row_bytes, const void* b, \
                        int64_t n, int64_t k, int b_kn, void* stream, uint64_t timeout_ns, char* msg, int len) {      \
    return tilegen::coll::GemmHost<OP>::ce_run(key, ptr, rows, row_bytes, b, n, k, b_kn, stream, timeout_ns, msg, len); \
  }                                                                                                                   \
  int tilegen_op_pinned_gemm(const void* x, int64_t rows, const void* b, int64_t n, int64_t k, int b_kn, void* out,  \
                             void* stream, char* msg, int len) {                                                      \
    return tilegen::coll::GemmHost<OP>::pinned_gemm(x, rows, b, n, k, b_kn, out, stream, msg, len);                   \
  }                                                                                                                   \
  int tilegen_op_ce_words(uint64_t* out, int n, int* count, char* msg, int len) {                                   \
    return tilegen::coll::GemmHost<OP>::ce_words(out, n, count, msg, len);                                            \
  }                                                                                                                   \
  int tilegen_op_chunk_sync(tilegen::fused::ChunkSync* out, int64_t rows, int tile_m, int tiles_n, int64_t row_bytes, \
                            uint64_t timeout_ns, int* comm_ctas, char* msg, int len) {                                \
    return tilegen::coll::GemmHost<OP>::chunk_sync(out, rows, tile_m, tiles_n, row_bytes, timeout_ns, comm_ctas, msg, len); \
  }                                                                                                                   \
  }
