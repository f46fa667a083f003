// tilegen MoE binding: a MoE op's TVM-FFI functions (tilegen/moe/runtime.py's MoeOp orchestrates them). A
// generated <op>_binding.cc defines `struct BindingSpec` (the op's constants) and includes this header.
// Every tensor is checked (dtype, device, shape, contiguity, alignment) before anything is launched.
#pragma once
#include <cstdint>
#include <string>
#include <vector>
#include "tilegen/binding/common.h"

extern "C" {  // the op library's C interface (tilegen/moe/op.cuh), beyond binding/common.h's
int tilegen_moe_dispatch_send(const void* x, const void* idx, int idx64, const float* w, int64_t m, void* stream,
                              uint64_t timeout_ns, int64_t* out, char* msg, int len);
int tilegen_moe_dispatch_recv(void* out, float* scales, int32_t* handle, int32_t* slot_rows, int32_t* stage_src,
                              float* stage_w, int32_t* counts, int64_t rows, int64_t stage_rows, void* stream, char* msg,
                              int len);
int tilegen_moe_ll_outputs(int64_t* out, char* msg, int len);
int tilegen_moe_ll_dispatch(const void* x, const void* idx, int idx64, const float* w, int64_t m, void* stream,
                            uint64_t timeout_ns, char* msg, int len);
int tilegen_moe_ll_combine(const void* y, const void* idx, int idx64, int64_t m, void* out, void* stream,
                           uint64_t timeout_ns, char* msg, int len);
int tilegen_moe_combine(const void* y, const int32_t* slot_rows, const int32_t* stage_src, const float* stage_w,
                        int64_t stage_rows, const void* idx, int idx64, int64_t m, void* out, void* stream,
                        uint64_t timeout_ns, char* msg, int len);
int tilegen_moe_trace(int on, char* msg, int len);
int tilegen_moe_trace_read(uint64_t* out, char* msg, int len);
void tilegen_moe_trace_shape(int* kernels, int* phases, int* ctas);
}

namespace tilegen_moe_binding {
using tvm::ffi::TensorView;
using tilegen_ffi::call;
using tilegen_ffi::data;
using tilegen_ffi::ensure_ready;
using tilegen_ffi::kMsg;
using tilegen_ffi::shape_str;
using tilegen_ffi::stream_of;
using Spec = BindingSpec;

enum Kind { kElem, kI32, kI64, kF32, kIndex, kU8 };  // kIndex: int32 or int64; kU8: fp8 bytes
inline bool dtype_is(const TensorView& t, Kind k) {
  const DLDataType d = t.dtype();
  if (d.lanes != 1) return false;
  switch (k) {
    case kElem: return d.code == Spec::kCode && d.bits == Spec::kBits;
    case kI32: return d.code == kDLInt && d.bits == 32;
    case kI64: return d.code == kDLInt && d.bits == 64;
    case kF32: return d.code == kDLFloat && d.bits == 32;
    case kU8: return d.code == kDLUInt && d.bits == 8;
    default: return d.code == kDLInt && (d.bits == 32 || d.bits == 64);
  }
}

// A contiguous 2-d CUDA tensor on `device` of the kind's dtype, [rows, cols] (rows < 0: any), 16-byte aligned.
inline void check(const TensorView& t, const char* arg, Kind kind, int64_t rows, int64_t cols, int device) {
  static const char* names[] = {Spec::kDtype, "int32", "int64", "float32", "int32 or int64",
                                "uint8 (a view of the float8_e4m3fn output)"};
  if (!dtype_is(t, kind))
    TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " must be " << names[kind] << ", got DLPack code "
                              << int(t.dtype().code) << ", " << int(t.dtype().bits) << " bits";
  if (t.device().device_type != kDLCUDA || (device >= 0 && t.device().device_id != device))
    TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " must be a CUDA tensor"
                              << (device >= 0 ? " on cuda:" + std::to_string(device) : std::string());
  if (t.ndim() != 2 || (rows >= 0 && t.size(0) != rows) || t.size(1) != cols)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " must be [" << (rows >= 0 ? std::to_string(rows) : "m")
                              << ", " << cols << "], got " << shape_str(t);
  if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " must be contiguous";
  if (reinterpret_cast<uintptr_t>(data(t)) % 16)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " must be 16-byte aligned";
}

// A received-rows output: the op's dtype, or (fp8 dispatch) e4m3 bytes as uint8 with fp32 scales [rows, groups].
inline float* check_received(const TensorView& out, const TensorView& scales, int64_t rows, int device) {
  check(out, "out", Spec::kFp8Groups ? kU8 : kElem, rows, Spec::kHidden, device);
  if (!Spec::kFp8Groups) return nullptr;
  check(scales, "scales", kF32, out.size(0), Spec::kFp8Groups, device);
  return reinterpret_cast<float*>(data(scales));
}

// A dispatch's inputs: x [m, hidden] with m <= max_tokens, topk_idx [m, k] (int32/int64; ids checked by
// the caller), topk_weights [m, k] fp32. Returns m.
inline int64_t check_inputs(const TensorView& x, const TensorView& idx, const TensorView& w, int device) {
  check(x, "x", kElem, -1, Spec::kHidden, device);
  const int64_t m = x.size(0);
  if (m > Spec::kMaxTokens)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": x has " << m << " tokens, more than max_tokens " << Spec::kMaxTokens;
  check(idx, "topk_idx", kIndex, m, Spec::kTopk, device);
  check(w, "topk_weights", kF32, m, Spec::kTopk, device);
  return m;
}

// What combine needs from its dispatch, per staging row: slot_rows [rows, k] int32, stage_src [rows, 2]
// int32, stage_w [rows, k] fp32.
inline void check_state(const TensorView& slot_rows, const TensorView& stage_src, const TensorView& stage_w,
                        int64_t rows, int device) {
  check(slot_rows, "slot_rows", kI32, rows, Spec::kTopk, device);
  check(stage_src, "stage_src", kI32, rows, 2, device);
  check(stage_w, "stage_w", kF32, rows, Spec::kTopk, device);
}

// combine's output out [m, hidden] and this rank's routing topk_idx [m, k].
inline void check_combined(const TensorView& out, const TensorView& idx, int device) {
  check(out, "out", kElem, -1, Spec::kHidden, device);
  check(idx, "topk_idx", kIndex, out.size(0), Spec::kTopk, device);
}

// x, topk_idx, topk_weights as check_inputs says:
// pushes the tokens and fills counts (a CPU int64 tensor of world * (local experts + 1)) with every
// rank's counts for this rank: per source rank, its items per local expert, then its tokens.
inline void dispatch_send(TensorView x, TensorView idx, TensorView w, TensorView counts, int64_t stream,
                          int64_t timeout_ns) {
  ensure_ready();
  const int device = x.device().device_id;
  const int64_t m = check_inputs(x, idx, w, device);
  const int world = tilegen_op_world();
  const int64_t n = world * (Spec::kExperts / world + 1);
  if (counts.device().device_type != kDLCPU || !dtype_is(counts, kI64) || counts.ndim() != 1 || counts.size(0) != n ||
      !counts.IsContiguous())
    TVM_FFI_THROW(ValueError) << Spec::kName << ": counts must be a contiguous CPU int64 tensor of " << n
                              << " elements, got " << shape_str(counts);
  call([&](char* msg) {
    return tilegen_moe_dispatch_send(data(x), data(idx), idx.dtype().bits == 64, reinterpret_cast<const float*>(data(w)),
                                     m, stream_of(stream, device), static_cast<uint64_t>(timeout_ns),
                                     reinterpret_cast<int64_t*>(data(counts)), msg, kMsg);
  });
}

// The last dispatch_send's rows into out [rows, hidden], handle [rows, 3] int32, and its state for
// combine: slot_rows [staging rows, k] int32, stage_src [staging rows, 2] int32, stage_w [staging rows, k]
// fp32; counts [1, local experts] int32.
inline void dispatch_recv(TensorView out, TensorView scales, TensorView handle, TensorView slot_rows,
                          TensorView stage_src, TensorView stage_w, TensorView counts, int64_t stream) {
  ensure_ready();
  const int device = out.device().device_id;
  float* sc = check_received(out, scales, -1, device);
  const int64_t rows = out.size(0), stage_rows = slot_rows.size(0);
  check(handle, "handle", kI32, rows, 3, device);
  check_state(slot_rows, stage_src, stage_w, stage_rows, device);
  check(counts, "counts", kI32, 1, Spec::kExperts / tilegen_op_world(), device);
  call([&](char* msg) {
    return tilegen_moe_dispatch_recv(data(out), sc, reinterpret_cast<int32_t*>(data(handle)),
                                     reinterpret_cast<int32_t*>(data(slot_rows)), reinterpret_cast<int32_t*>(data(stage_src)),
                                     reinterpret_cast<float*>(data(stage_w)), reinterpret_cast<int32_t*>(data(counts)), rows,
                                     stage_rows, stream_of(stream, device), msg, kMsg);
  });
}

// y [rows, hidden] (expert outputs in dispatch's layout) with dispatch's state -> out [m, hidden]
// (topk_idx: the routing of this rank's dispatch).
inline void combine(TensorView y, TensorView slot_rows, TensorView stage_src, TensorView stage_w, TensorView idx,
                    TensorView out, int64_t stream, int64_t timeout_ns) {
  ensure_ready();
  const int device = y.device().device_id;
  check(y, "y", kElem, -1, Spec::kHidden, device);
  const int64_t stage_rows = slot_rows.size(0);
  check_state(slot_rows, stage_src, stage_w, stage_rows, device);
  check_combined(out, idx, device);
  call([&](char* msg) {
    return tilegen_moe_combine(data(y), reinterpret_cast<int32_t*>(data(slot_rows)),
                               reinterpret_cast<int32_t*>(data(stage_src)), reinterpret_cast<float*>(data(stage_w)),
                               stage_rows, data(idx), idx.dtype().bits == 64, out.size(0), data(out),
                               stream_of(stream, device), static_cast<uint64_t>(timeout_ns), msg, kMsg);
  });
}

// Low-latency mode: the op's own outputs, in symmetric memory (every source writes its rows there; MoeOp
// wraps them as tensors): the device addresses of recv rows [local * world * max_tokens, hidden] (segments
// of max_tokens rows per (local expert, source)), scales (fp8 dispatch; else 0), handle [rows, 3],
// slot_rows / stage_src / stage_w [world * max_tokens, ...], counts [local, world] int32.
inline tvm::ffi::Array<int64_t> ll_outputs() {
  ensure_ready();
  int64_t ptrs[7] = {};
  call([&](char* msg) { return tilegen_moe_ll_outputs(ptrs, msg, kMsg); });
  return {ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], ptrs[5], ptrs[6]};
}

// Low-latency dispatch into the op's outputs. Nothing comes back to the host: a CUDA graph can hold it.
inline void ll_dispatch(TensorView x, TensorView idx, TensorView w, int64_t stream, int64_t timeout_ns) {
  ensure_ready();
  const int device = x.device().device_id;
  const int64_t m = check_inputs(x, idx, w, device);
  call([&](char* msg) {
    return tilegen_moe_ll_dispatch(data(x), data(idx), idx.dtype().bits == 64, reinterpret_cast<const float*>(data(w)), m,
                                   stream_of(stream, device), static_cast<uint64_t>(timeout_ns), msg, kMsg);
  });
}

// y [local * world * max_tokens, hidden] (expert outputs in the received layout) -> out [m, hidden]
// (topk_idx: the routing of this rank's dispatch); combine's state is the op's, from its dispatch.
inline void ll_combine(TensorView y, TensorView idx, TensorView out, int64_t stream, int64_t timeout_ns) {
  ensure_ready();
  const int device = y.device().device_id, world = tilegen_op_world();
  const int64_t L = Spec::kExperts / world, seg = world * Spec::kMaxTokens;
  check(y, "y", kElem, L * seg, Spec::kHidden, device);
  check_combined(out, idx, device);
  call([&](char* msg) {
    return tilegen_moe_ll_combine(data(y), data(idx), idx.dtype().bits == 64, out.size(0), data(out),
                                  stream_of(stream, device), static_cast<uint64_t>(timeout_ns), msg, kMsg);
  });
}

// Profiling: phase stamps on (1) or off (0) for the calls launched from now on (tilegen/moe/trace.cuh's stamp).
inline void trace(int64_t on) {
  ensure_ready();
  call([&](char* msg) { return tilegen_moe_trace(on != 0, msg, kMsg); });
}

// The stamps' layout: kernels, phases, CTAs (tilegen/moe/trace.cuh's kTrace*).
inline tvm::ffi::Array<int64_t> trace_shape() {
  int kernels = 0, phases = 0, ctas = 0;
  tilegen_moe_trace_shape(&kernels, &phases, &ctas);
  return {kernels, phases, ctas};
}

// The stamps so far into out (MoeOp.read_trace: a contiguous CPU int64 tensor of trace_shape's product
// elements), then cleared.
inline void trace_read(TensorView out) {
  ensure_ready();
  const tvm::ffi::Array<int64_t> shape = trace_shape();
  const int64_t n = shape[0] * shape[1] * shape[2];
  if (out.device().device_type != kDLCPU || !dtype_is(out, kI64) || out.ndim() != 1 || out.size(0) != n ||
      !out.IsContiguous())
    TVM_FFI_THROW(ValueError) << Spec::kName << ": trace_read needs a contiguous CPU int64 tensor of " << n
                              << " elements, got " << shape_str(out);
  call([&](char* msg) { return tilegen_moe_trace_read(reinterpret_cast<uint64_t*>(data(out)), msg, kMsg); });
}
}  // namespace tilegen_moe_binding

TVM_FFI_DLL_EXPORT_TYPED_FUNC(dispatch_send, tilegen_moe_binding::dispatch_send);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(dispatch_recv, tilegen_moe_binding::dispatch_recv);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(combine, tilegen_moe_binding::combine);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(ll_outputs, tilegen_moe_binding::ll_outputs);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(ll_dispatch, tilegen_moe_binding::ll_dispatch);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(ll_combine, tilegen_moe_binding::ll_combine);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(trace, tilegen_moe_binding::trace);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(trace_read, tilegen_moe_binding::trace_read);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(trace_shape, tilegen_moe_binding::trace_shape);
TILEGEN_EXPORT_COMMON_FFI();
