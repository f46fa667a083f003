// tilegen binding library: an op's TVM-FFI functions. Any DLPack framework's tensors come in as
// TensorViews; every argument is checked before anything is launched. A generated <op>_binding.cc
// defines `struct BindingSpec` (the op's constants) and the TILEGEN_BINDING_* switches, then
// includes this header, which defines and exports the functions (one op per library).
#pragma once
#include <cstdint>
#include <string>
#include <vector>
#include "tilegen/binding/common.h"

extern "C" {  // the op library's C interface (tilegen/collective/op.cuh; the GEMM ones: overlap/op.cuh), beyond binding/common.h's
int tilegen_op_rank(void);
int tilegen_op_is_symmetric(const void* ptr, int64_t bytes);
int tilegen_op_run(const void* in, void* out, int64_t in_bytes, int dtype, int root, float scale, void* stream,
                   uint64_t timeout_ns, int defer, char* msg, int len);
int tilegen_op_launch_pending(void* stream, char* msg, int len);
int tilegen_op_run_epilogue(const void* in, void* y, void* residual, const void* weight, float* scales, int64_t in_bytes,
                            int64_t rows, int64_t hidden, int dtype, void* stream, uint64_t timeout_ns, char* msg, int len);
int tilegen_op_begin(void* stream, char* msg, int len);
int tilegen_op_wait_chunk(int chunk, void* stream, uint64_t timeout_ns, char* msg, int len);
int tilegen_op_signal_chunk(int chunk, void* stream, char* msg, int len);
int tilegen_op_compute_order(int* out);
int tilegen_op_allow_memops(int yes);
int tilegen_op_ce_begin(void* stream, uint64_t timeout_ns, char* msg, int len);
int tilegen_op_ce_put(const void* src, void* dst, int64_t bytes, int peer, int flag, void* stream, char* msg, int len);
int tilegen_op_ce_wait(int flag, void* stream, uint64_t timeout_ns, char* msg, int len);
int tilegen_op_join(void* waiter, void* producer, char* msg, int len);
int tilegen_op_ce_program(int64_t key, const int64_t* steps, int64_t n, char* msg, int len);
int tilegen_op_ce_run(int64_t key, char* const* ptr, const int64_t* rows, const int64_t* row_bytes, const void* b,
                      int64_t n, int64_t k, int b_kn, void* stream, uint64_t timeout_ns, char* msg, int len);
int tilegen_op_tune(int ctas, int64_t tile, char* msg, int len);
int tilegen_op_ce_words(uint64_t* out, int n, int* count, char* msg, int len);
int tilegen_op_fused_gemm(const void* a, const void* b, void* c, int64_t rows, int64_t n, int64_t k, int sms, void* stream,
                          uint64_t timeout_ns, char* msg, int len);
int tilegen_op_pinned_gemm(const void* x, int64_t rows, const void* b, int64_t n, int64_t k, int b_kn, void* out,
                           void* stream, char* msg, int len);
}

namespace tilegen_binding {
using tvm::ffi::TensorView;
using tilegen_ffi::call;
using tilegen_ffi::data;
using tilegen_ffi::ensure_ready;
using tilegen_ffi::kMsg;
using tilegen_ffi::shape_str;
using tilegen_ffi::stream_of;
using Spec = BindingSpec;
enum Alias : int { kNoAlias = 0, kWholeOutput = 1, kOwnChunk = 2 };  // what the input may be exactly

// The index of t's element type among the op's (Spec::kCodes), or -1.
inline int dtype_index(const TensorView& t) {
  for (int i = 0; i < Spec::kDtypes; ++i)
    if (t.dtype().code == Spec::kCodes[i] && t.dtype().bits == Spec::kBitsOf[i] && t.dtype().lanes == 1) return i;
  return -1;
}
inline bool has_dtype(const TensorView& t) { return dtype_index(t) == 0; }  // the first (GEMM ops' one)

// dtype (index `dtype` among the op's; -1: any of them), device, rank, inner dims (the spec's, up to
// their max where free, or exactly `like`'s), rows (when >= 0) and contiguity of a communicated tensor.
inline void check_tensor(const TensorView& t, const char* arg, int64_t rows, int dtype = -1,
                         const TensorView* like = nullptr) {
  const int i = dtype_index(t);
  if (i < 0 || (dtype >= 0 && i != dtype))
    TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " must have dtype "
                              << (dtype >= 0 ? "the input's (DLPack code " + std::to_string(Spec::kCodes[dtype]) + ", " +
                                                   std::to_string(Spec::kBitsOf[dtype]) + " bits)"
                                             : std::string(Spec::kDtype))
                              << ", got DLPack code " << int(t.dtype().code) << ", " << int(t.dtype().bits) << " bits";
  if (t.device().device_type != kDLCUDA)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " must be a CUDA tensor, got device type "
                              << int(t.device().device_type);
  if (t.ndim() != Spec::kNdim)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " must have " << Spec::kNdim << " dimensions, got shape "
                              << shape_str(t);
  for (int i = 1; i < Spec::kNdim; ++i) {
    const int64_t want = like ? like->size(i) : Spec::kShape[i];
    if (Spec::kFreeInner[i] && !like ? (t.size(i) < 1 || t.size(i) > want) : t.size(i) != want)
      TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " dim " << i << " must be "
                                << (Spec::kFreeInner[i] && !like ? "in [1, " + std::to_string(want) + "]"
                                                                  : std::to_string(want))
                                << (like ? " (the input's)" : "") << ", got shape " << shape_str(t);
  }
  if (rows >= 0 && t.size(0) != rows)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " dim 0 must be " << rows << ", got shape " << shape_str(t);
  if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " must be contiguous";
}

// m of an input, checked against the spec's rows (input rows = m or world * m).
inline int64_t rows_of(const TensorView& input, int world) {
  const int64_t in_rows = input.size(0);
  if (Spec::kInWorldRows && in_rows % world)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": input dim 0 must be a multiple of the world size " << world
                              << ", got shape " << shape_str(input);
  const int64_t m = Spec::kInWorldRows ? in_rows / world : in_rows;
  if (m < 1 || m > Spec::kShape[0])
    TVM_FFI_THROW(ValueError) << Spec::kName << ": input dim 0 must be " << (Spec::kInWorldRows ? "world * m with m" : "m")
                              << " in [1, " << Spec::kShape[0] << "]"
                              << (Spec::kDynamicRows ? std::string(" (dynamic dim ") + Spec::kRowsName + ")" : "")
                              << ", got shape " << shape_str(input);
  if (!Spec::kDynamicRows && m != Spec::kShape[0])
    TVM_FFI_THROW(ValueError) << Spec::kName << ": input dim 0 must be "
                              << (Spec::kInWorldRows ? world * Spec::kShape[0] : Spec::kShape[0]) << ", got shape "
                              << shape_str(input);
  return m;
}

// run(input, output, root, scale, stream or -1 for the framework's current one, timeout_ns, defer):
// scale multiplies each rank's input in a premul-sum op (others ignore it); defer prepares the call
// (checks, layout) and leaves the launch to launch_pending().
inline void run(TensorView input, TensorView output, int64_t root, double scale, int64_t stream, int64_t timeout_ns,
                bool defer) {
  ensure_ready();
  const int world = tilegen_op_world();
  check_tensor(input, "input", -1);
  const int dtype = dtype_index(input);
  const int64_t m = rows_of(input, world);
  check_tensor(output, "output", Spec::kOutWorldRows ? world * m : m, dtype, &input);
  if (input.device().device_id != output.device().device_id)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": input is on cuda:" << input.device().device_id
                              << " but output is on cuda:" << output.device().device_id;
  if (root < 0 || root >= world)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": root must be in [0, " << world << "), got " << root;
  const int64_t elem = Spec::kBitsOf[dtype] / 8, in_bytes = input.numel() * elem, out_bytes = output.numel() * elem;
  const char* in = data(input);
  char* out = data(output);
  if (Spec::kOutSymmetric && !tilegen_op_is_symmetric(out, out_bytes))
    TVM_FFI_THROW(ValueError) << Spec::kName << ": output must be allocated on the NVSHMEM symmetric heap "
                              << "(tilegen.empty(...) or op.empty_output(m)) with the same shape on every rank";
  const char* alias = Spec::kAlias == kOwnChunk ? out + in_bytes * tilegen_op_rank() : out;
  if (in < out + out_bytes && out < in + in_bytes && !(Spec::kAlias != kNoAlias && in == alias && in_bytes <= out_bytes))
    TVM_FFI_THROW(ValueError) << Spec::kName << ": input overlaps output"
                              << (Spec::kAlias == kOwnChunk    ? " other than exactly at this rank's chunk of the output"
                                  : Spec::kAlias == kWholeOutput ? " other than exactly at the output"
                                                                 : " (not supported by this op)");
  void* s = stream_of(stream, output.device().device_id);
  call([&](char* msg) {
    return tilegen_op_run(in, out, in_bytes, dtype, static_cast<int>(root), static_cast<float>(scale), s,
                          static_cast<uint64_t>(timeout_ns), defer ? 1 : 0, msg, kMsg);
  });
}

// Whether the byte ranges of two tensors overlap.
inline bool overlaps(const TensorView& a, const TensorView& b) {
  const char *pa = data(a), *pb = data(b);
  const int64_t na = a.numel() * ((a.dtype().bits + 7) / 8), nb = b.numel() * ((b.dtype().bits + 7) / 8);
  return pa < pb + nb && pb < pa + na;
}

// Epilogue ops (collective/epilogue.cuh): run_epilogue(input, output, residual, weight, scales, stream,
// timeout_ns). output: the rows (the op's output shape) in the input's element type, or fp8 e4m3 when
// quantising; residual: like a row block of the output in the input's type (read, then overwritten);
// weight: [hidden] of the input's type, hidden the product of the inner dims; scales: [rows] float32.
// Operands a stage does not use are not read (pass any tensor). The output may overlap the input: the
// kernel writes it after it has read all of the input (its grid barrier).
inline void run_epilogue(TensorView input, TensorView output, TensorView residual, TensorView weight, TensorView scales,
                         int64_t stream, int64_t timeout_ns) {
  if (!Spec::kEpilogue) TVM_FFI_THROW(ValueError) << Spec::kName << ": this op has no epilogue (call it with run)";
  ensure_ready();
  const int world = tilegen_op_world();
  check_tensor(input, "input", -1);
  const int dtype = dtype_index(input);
  const int64_t m = rows_of(input, world), rows = Spec::kOutWorldRows ? world * m : m;
  const int64_t hidden = input.numel() / input.size(0);
  const int device = input.device().device_id;
  const auto on_device = [&](const TensorView& t, const char* arg) {
    if (t.device().device_type != kDLCUDA || t.device().device_id != device)
      TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " must be on cuda:" << device << " (the input's)";
    if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " must be contiguous";
  };
  if (Spec::kQuant) {
    on_device(output, "output");
    const DLDataType d = output.dtype();
    bool same = output.ndim() == input.ndim() && output.size(0) == rows;
    for (int i = 1; same && i < input.ndim(); ++i) same = output.size(i) == input.size(i);
    if (d.code != kDLFloat8_e4m3fn || d.bits != 8 || d.lanes != 1 || !same)
      TVM_FFI_THROW(ValueError) << Spec::kName << ": output must be float8_e4m3fn of the output's shape (" << rows
                                << " rows, the input's inner dims), got " << shape_str(output);
    on_device(scales, "scales");
    if (scales.dtype().code != kDLFloat || scales.dtype().bits != 32 || scales.ndim() != 1 || scales.size(0) != rows)
      TVM_FFI_THROW(ValueError) << Spec::kName << ": scales must be float32 [" << rows << "], got " << shape_str(scales);
  } else {
    check_tensor(output, "output", rows, dtype, &input);
    on_device(output, "output");
  }
  if (Spec::kResidual) {
    check_tensor(residual, "residual", rows, dtype, &input);
    on_device(residual, "residual");
    if (overlaps(residual, input) || overlaps(residual, output))
      TVM_FFI_THROW(ValueError) << Spec::kName << ": residual overlaps the input or the output";
  }
  if (Spec::kRmsNorm) {
    on_device(weight, "weight");
    if (dtype_index(weight) != dtype || weight.ndim() != 1 || weight.size(0) != hidden)
      TVM_FFI_THROW(ValueError) << Spec::kName << ": weight must be [" << hidden << "] of the input's dtype, got "
                                << shape_str(weight) << " (DLPack code " << int(weight.dtype().code) << ", "
                                << int(weight.dtype().bits) << " bits)";
  }
  void* s = stream_of(stream, device);
  const int64_t in_bytes = input.numel() * (Spec::kBitsOf[dtype] / 8);
  call([&](char* msg) {
    return tilegen_op_run_epilogue(data(input), data(output), Spec::kResidual ? data(residual) : nullptr,
                                   Spec::kRmsNorm ? data(weight) : nullptr,
                                   Spec::kQuant ? reinterpret_cast<float*>(data(scales)) : nullptr, in_bytes, rows, hidden,
                                   dtype, s, static_cast<uint64_t>(timeout_ns), msg, kMsg);
  });
}

inline void launch_pending(int64_t stream) {
  call([&](char* msg) { return tilegen_op_launch_pending(reinterpret_cast<void*>(stream), msg, kMsg); });
}

inline bool is_symmetric(TensorView t) {
  ensure_ready();
  return tilegen_op_is_symmetric(data(t), t.numel() * (t.dtype().bits / 8));
}


// GEMM ops ------------------------------------------------------------------------------------------
// Before run(): on the caller's stream, start a call (advances the epoch all its kernels read).
inline void begin(int64_t stream) {
  ensure_ready();
  call([&](char* msg) { return tilegen_op_begin(reinterpret_cast<void*>(stream), msg, kMsg); });
}

// ag_gemm: after run(A, A_full, ...), a wait on `stream` for gathered chunk `chunk`.
inline void wait_chunk(int64_t chunk, int64_t stream, int64_t timeout_ns) {
  call([&](char* msg) {
    return tilegen_op_wait_chunk(static_cast<int>(chunk), reinterpret_cast<void*>(stream), static_cast<uint64_t>(timeout_ns),
                                 msg, kMsg);
  });
}

// gemm_rs: after the GEMM of chunk `chunk` on `stream`, hand it to the reduce-scatter kernel.
inline void signal_chunk(int64_t chunk, int64_t stream) {
  call([&](char* msg) {
    return tilegen_op_signal_chunk(static_cast<int>(chunk), reinterpret_cast<void*>(stream), msg, kMsg);
  });
}

// Copy-engine overlap (tilegen/overlap/runtime.py orchestrates): byte ranges of whole contiguous tensors,
// bounds-checked here; the symmetric side's address is this rank's (the library finds the peer's).
inline char* byte_range(const TensorView& t, const char* arg, int64_t offset, int64_t bytes, int device) {
  const int64_t size = t.numel() * ((t.dtype().bits * t.dtype().lanes + 7) / 8);
  if (t.device().device_type != kDLCUDA || t.device().device_id != device || !t.IsContiguous())
    TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " must be a contiguous tensor on cuda:" << device;
  if (offset < 0 || bytes <= 0 || offset > size || bytes > size - offset)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": " << arg << " bytes [" << offset << ", " << offset + bytes
                              << ") outside its " << size << " bytes";
  return data(t) + offset;
}

inline void ce_begin(int64_t stream, int64_t timeout_ns) {
  ensure_ready();
  call([&](char* msg) {
    return tilegen_op_ce_begin(reinterpret_cast<void*>(stream), static_cast<uint64_t>(timeout_ns), msg, kMsg);
  });
}

inline void ce_put(TensorView src, int64_t src_offset, TensorView dst, int64_t dst_offset, int64_t bytes, int64_t peer,
                   int64_t flag, int64_t stream) {
  const int device = src.device().device_id;
  const char* from = byte_range(src, "source", src_offset, bytes, device);
  char* to = byte_range(dst, "destination", dst_offset, bytes, device);
  call([&](char* msg) {
    return tilegen_op_ce_put(from, to, bytes, static_cast<int>(peer), static_cast<int>(flag),
                             reinterpret_cast<void*>(stream), msg, kMsg);
  });
}

inline void ce_wait(int64_t flag, int64_t stream, int64_t timeout_ns) {
  call([&](char* msg) {
    return tilegen_op_ce_wait(static_cast<int>(flag), reinterpret_cast<void*>(stream), static_cast<uint64_t>(timeout_ns),
                              msg, kMsg);
  });
}

// `waiter` runs what is queued on it from now on after the work queued on `producer` so far (an
// event from the op's pool: no allocation per call).
inline void join(int64_t waiter, int64_t producer) {
  call([&](char* msg) {
    return tilegen_op_join(reinterpret_cast<void*>(waiter), reinterpret_cast<void*>(producer), msg, kMsg);
  });
}

// Copy-engine overlap, the op library running the whole program (one call from Python): register
// program `key` (tilegen/overlap/runtime.py encodes tilegen/overlap/ce_program.py's steps, 15 numbers each) once ...
inline void ce_program(int64_t key, tvm::ffi::Array<int64_t> steps) {
  ensure_ready();
  constexpr size_t kFields = 15;
  std::vector<int64_t> v(steps.begin(), steps.end());
  if (v.size() % kFields)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": a copy-engine program has 15 numbers per step, got " << v.size();
  call([&](char* msg) { return tilegen_op_ce_program(key, v.data(), static_cast<int64_t>(v.size() / kFields), msg, kMsg); });
}

// ... then run it per call: a [m or world * m, k], b, c, sym (the symmetric buffer: ag_gemm's
// gathered A, gemm_rs's received sums), acc (gemm_rs's local sums; ag_gemm: any, unused).
inline void ce_run(int64_t key, TensorView a, TensorView b, TensorView c, TensorView sym, TensorView acc, int64_t stream,
                   int64_t timeout_ns) {
  const int device = a.device().device_id, world = tilegen_op_world();
  int64_t n = 0, k = 0;
  if (!Spec::gemm_nk(world, &n, &k)) TVM_FFI_THROW(ValueError) << Spec::kName << ": no GEMM shape for world " << world;
  const TensorView* ts[5] = {&a, &sym, &c, &acc, &b};
  const char* names[5] = {"a", "the symmetric buffer", "c", "acc", "b"};
  const int64_t cols[5] = {k, TILEGEN_BINDING_GEMM == 1 ? k : n, n, TILEGEN_BINDING_GEMM == 1 ? -1 : n,
                           Spec::kBLayoutKN ? n : k};
  char* ptr[4];
  int64_t rows[4], row_bytes[4];
  for (int i = 0; i < 5; ++i) {
    const TensorView& t = *ts[i];
    if (!has_dtype(t) || t.device().device_type != kDLCUDA || t.device().device_id != device || t.ndim() != 2 ||
        !t.IsContiguous() || (cols[i] >= 0 && t.size(1) != cols[i]))
      TVM_FFI_THROW(ValueError) << Spec::kName << ": " << names[i] << " must be a contiguous 2-d " << Spec::kDtype
                                << " tensor with " << cols[i] << " columns on cuda:" << device << ", got shape "
                                << shape_str(t);
    if (i < 4) ptr[i] = data(t), rows[i] = t.size(0), row_bytes[i] = t.size(1) * (Spec::kBits / 8);
  }
  if (b.size(0) != (Spec::kBLayoutKN ? k : n))
    TVM_FFI_THROW(ValueError) << Spec::kName << ": b must be [" << (Spec::kBLayoutKN ? k : n) << ", " << cols[4]
                              << "], got " << shape_str(b);
  call([&](char* msg) {
    void* s = stream_of(stream, device);
    return tilegen_op_ce_run(key, ptr, rows, row_bytes, data(b), n, k, Spec::kBLayoutKN ? 1 : 0, s,
                             static_cast<uint64_t>(timeout_ns), msg, kMsg);
  });
}

// Diagnostics (GEMM ops): the copy-engine words of this rank (entry epochs by rank, flags), then its epoch.
inline tvm::ffi::Array<int64_t> ce_words() {
  ensure_ready();
  uint64_t w[256];
  int count = 0;
  call([&](char* msg) { return tilegen_op_ce_words(w, 256, &count, msg, kMsg); });
  tvm::ffi::Array<int64_t> out;
  for (int i = 0; i < count; ++i) out.push_back(static_cast<int64_t>(w[i]));
  return out;
}

// tilegen tune: every later call runs with `ctas` CTAs and `tile_bytes` tiles (0: the plan's choice).
inline void tune(int64_t ctas, int64_t tile_bytes) {
  ensure_ready();
  call([&](char* msg) { return tilegen_op_tune(static_cast<int>(ctas), tile_bytes, msg, kMsg); });
}

// Before the op's first init: whether copy-engine flags may use stream memory operations (TILEGEN_CE_MEMOPS).
inline void allow_memops(bool yes) { tilegen_op_allow_memops(yes ? 1 : 0); }

inline tvm::ffi::Array<int64_t> compute_order() {
  int o[64];
  if (tilegen_op_compute_order(o)) TVM_FFI_THROW(RuntimeError) << Spec::kName << ": no call yet";
  tvm::ffi::Array<int64_t> out;
  for (int i = 0; i < tilegen_op_world(); ++i) out.push_back(o[i]);
  return out;
}

// The fused GEMM of the call run() just prepared: a [world * m, k], b [k, n] or [n, k], c [world * m, n]
// (ag_gemm: a is the gathered buffer run() fills; gemm_rs: c the partial products run() reduce-scatters);
// sms 0: the SMs this process may fill (host/sms.cuh) minus the communication's CTAs.
inline void fused_gemm(TensorView a, TensorView b, TensorView c, int64_t sms, int64_t stream, int64_t timeout_ns) {
  ensure_ready();
  const int world = tilegen_op_world();
  int64_t n = 0, k = 0;
  if (!Spec::gemm_nk(world, &n, &k)) TVM_FFI_THROW(ValueError) << Spec::kName << ": no GEMM shape for world " << world;
  const int64_t b_rows = Spec::kBLayoutKN ? k : n, b_cols = Spec::kBLayoutKN ? n : k;
  const TensorView* ts[3] = {&a, &b, &c};
  const char* names[3] = {"a", "b", "c"};
  for (int i = 0; i < 3; ++i) {
    const TensorView& t = *ts[i];
    if (!has_dtype(t) || t.device().device_type != kDLCUDA || t.ndim() != 2 || !t.IsContiguous())
      TVM_FFI_THROW(ValueError) << Spec::kName << ": " << names[i] << " must be a contiguous 2-d " << Spec::kDtype
                                << " CUDA tensor, got shape " << shape_str(t);
    if (t.device().device_id != a.device().device_id)
      TVM_FFI_THROW(ValueError) << Spec::kName << ": " << names[i] << " is on cuda:" << t.device().device_id
                                << " but a is on cuda:" << a.device().device_id;
  }
  if (a.size(1) != k || a.size(0) % world || a.size(0) / world < 1 || a.size(0) / world > Spec::kShape[0])
    TVM_FFI_THROW(ValueError) << Spec::kName << ": a must be [world * m, " << k << "] with 1 <= m <= " << Spec::kShape[0]
                              << ", got " << shape_str(a);
  if (b.size(0) != b_rows || b.size(1) != b_cols)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": b must be [" << b_rows << ", " << b_cols << "], got " << shape_str(b);
  if (c.size(0) != a.size(0) || c.size(1) != n)
    TVM_FFI_THROW(ValueError) << Spec::kName << ": c must be [" << a.size(0) << ", " << n << "], got " << shape_str(c);
  void* s = stream_of(stream, a.device().device_id);
  call([&](char* msg) {
    return tilegen_op_fused_gemm(data(a), data(b), data(c), a.size(0) / world, n, k, static_cast<int>(sms), s,
                                 static_cast<uint64_t>(timeout_ns), msg, kMsg);
  }, Spec::kName);
}

// A deterministic decomposed op's chunk GEMM: c [rows, n] = a [rows, k] @ b ([k, n] or [n, k], the op's
// layout) on `stream`, by the op's pinned cuBLASLt algorithm (the same for every row count).
inline void pinned_gemm(TensorView a, TensorView b, TensorView c, int64_t stream) {
  ensure_ready();
  int64_t n = 0, k = 0;
  if (!Spec::gemm_nk(tilegen_op_world(), &n, &k))
    TVM_FFI_THROW(ValueError) << Spec::kName << ": no GEMM shape for world " << tilegen_op_world();
  const TensorView* ts[3] = {&a, &b, &c};
  const char* names[3] = {"a", "b", "c"};
  const int64_t shapes[3][2] = {{a.size(0), k}, {Spec::kBLayoutKN ? k : n, Spec::kBLayoutKN ? n : k}, {a.size(0), n}};
  for (int i = 0; i < 3; ++i) {
    const TensorView& t = *ts[i];
    if (!has_dtype(t) || t.device().device_type != kDLCUDA || t.device().device_id != a.device().device_id ||
        t.ndim() != 2 || !t.IsContiguous() || t.size(0) != shapes[i][0] || t.size(1) != shapes[i][1] || a.size(0) < 1)
      TVM_FFI_THROW(ValueError) << Spec::kName << ": " << names[i] << " must be a contiguous [" << shapes[i][0] << ", "
                                << shapes[i][1] << "] " << Spec::kDtype << " tensor on a's CUDA device (a: at least "
                                << "one row), got shape " << shape_str(t);
  }
  void* s = stream_of(stream, a.device().device_id);
  call([&](char* msg) {
    return tilegen_op_pinned_gemm(data(a), a.size(0), data(b), n, k, Spec::kBLayoutKN ? 1 : 0, data(c), s, msg, kMsg);
  }, Spec::kName);
}
}  // namespace tilegen_binding

TVM_FFI_DLL_EXPORT_TYPED_FUNC(run, tilegen_binding::run);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(launch_pending, tilegen_binding::launch_pending);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(run_epilogue, tilegen_binding::run_epilogue);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(is_symmetric, tilegen_binding::is_symmetric);
TILEGEN_EXPORT_COMMON_FFI();
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tune, tilegen_binding::tune);
#if TILEGEN_BINDING_GEMM
TVM_FFI_DLL_EXPORT_TYPED_FUNC(begin, tilegen_binding::begin);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(compute_order, tilegen_binding::compute_order);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allow_memops, tilegen_binding::allow_memops);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(ce_begin, tilegen_binding::ce_begin);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(ce_put, tilegen_binding::ce_put);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(ce_wait, tilegen_binding::ce_wait);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(join, tilegen_binding::join);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(ce_program, tilegen_binding::ce_program);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(ce_run, tilegen_binding::ce_run);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(ce_words, tilegen_binding::ce_words);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(pinned_gemm, tilegen_binding::pinned_gemm);
#endif
#if TILEGEN_BINDING_GEMM == 1
TVM_FFI_DLL_EXPORT_TYPED_FUNC(wait_chunk, tilegen_binding::wait_chunk);
#endif
#if TILEGEN_BINDING_GEMM == 2
TVM_FFI_DLL_EXPORT_TYPED_FUNC(signal_chunk, tilegen_binding::signal_chunk);
#endif
#if TILEGEN_BINDING_FUSED
TVM_FFI_DLL_EXPORT_TYPED_FUNC(fused_gemm, tilegen_binding::fused_gemm);
#endif
