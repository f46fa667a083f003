// tilegen binding library, the part every op kind shares (binding/collective.h: collectives and GEMM
// ops; binding/moe.h: MoE ops): the op library's common C entry points, raising its messages
// as Python exceptions, tensor helpers, and the TVM-FFI functions every op exports.
#pragma once
#include <cstdint>
#include <string>
#include <vector>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

extern "C" {  // every op library has these (collective/host.cuh, moe/op.cuh)
int tilegen_op_init(char* msg, int len);
int tilegen_op_init_group(int slot, int alloc_world, int size, const int* pes, char* msg, int len);
int tilegen_op_select(int slot, char* msg, int len);
int tilegen_op_release(char* msg, int len);
int tilegen_op_world(void);
int tilegen_op_wait_error(char* msg, int len);
void tilegen_op_nvshmem_versions(int* compiled, int* runtime);
}

namespace tilegen_ffi {
using tvm::ffi::TensorView;
constexpr int kMsg = 1024;

// Calls f(msg) (a C function of the op library, 0 on success) and raises its message otherwise,
// after "prefix: " when given (for messages that do not name the op).
template <class F>
void call(F&& f, const char* prefix = nullptr) {
  char msg[kMsg] = {0};
  if (f(msg)) TVM_FFI_THROW(RuntimeError) << (prefix ? prefix : "") << (prefix ? ": " : "") << msg;
}

inline std::string shape_str(const TensorView& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

inline char* data(const TensorView& t) { return static_cast<char*>(t.data_ptr()) + t.byte_offset(); }

// The stream a call runs on: the caller's handle, or (-1) the framework's current one for the device.
inline void* stream_of(int64_t stream, int device) {
  return stream >= 0 ? reinterpret_cast<void*>(stream) : TVMFFIEnvGetStream(kDLCUDA, device);
}

inline void ensure_ready() { call([&](char* msg) { return tilegen_op_init(msg, kMsg); }); }

// After a bounded call has completed on its stream: raises TimeoutError naming rank and signal.
inline void check_wait_error() {
  char msg[kMsg] = {0};
  if (tilegen_op_wait_error(msg, kMsg)) TVM_FFI_THROW(TimeoutError) << msg;
}

inline int64_t world() {
  ensure_ready();
  return tilegen_op_world();
}

// Collective over every PE (tilegen.group): sets up group slot `slot`, this PE's group being `pes` (its
// PEs in rank order; empty: none of the slot's groups holds this PE); alloc_world: the slot's largest
// group. Then calls run on the world's slot 0 again.
inline void init_group(int64_t slot, int64_t alloc_world, tvm::ffi::Array<int64_t> pes) {
  ensure_ready();
  std::vector<int> v(pes.begin(), pes.end());
  call([&](char* msg) {
    return tilegen_op_init_group(static_cast<int>(slot), static_cast<int>(alloc_world), static_cast<int>(v.size()),
                                 v.data(), msg, kMsg);
  });
  call([&](char* msg) { return tilegen_op_select(0, msg, kMsg); });
}

// Later calls run on group slot `slot` (set up on this PE by init_group).
inline void select(int64_t slot) {
  call([&](char* msg) { return tilegen_op_select(static_cast<int>(slot), msg, kMsg); });
}

inline void release() { call([&](char* msg) { return tilegen_op_release(msg, kMsg); }); }

inline tvm::ffi::Array<int64_t> nvshmem_versions() {
  int compiled = 0, runtime = 0;
  tilegen_op_nvshmem_versions(&compiled, &runtime);
  return {compiled, runtime};
}
}  // namespace tilegen_ffi

// The TVM-FFI functions every op exports.
#define TILEGEN_EXPORT_COMMON_FFI()                                                   \
  TVM_FFI_DLL_EXPORT_TYPED_FUNC(check_wait_error, tilegen_ffi::check_wait_error);    \
  TVM_FFI_DLL_EXPORT_TYPED_FUNC(world, tilegen_ffi::world);                          \
  TVM_FFI_DLL_EXPORT_TYPED_FUNC(release, tilegen_ffi::release);                      \
  TVM_FFI_DLL_EXPORT_TYPED_FUNC(init_group, tilegen_ffi::init_group);                \
  TVM_FFI_DLL_EXPORT_TYPED_FUNC(select, tilegen_ffi::select);                        \
  TVM_FFI_DLL_EXPORT_TYPED_FUNC(nvshmem_versions, tilegen_ffi::nvshmem_versions)
