// tilegen overlap layer: the copy-engine overlap's GEMMs, by cuBLASLt (the library torch's matmuls use), opened at
// run time from the process (torch has loaded it; no link-time dependency, a clear error otherwise).
// Row-major out[rows, n] = x[rows, k] @ B (+ addend, in the epilogue: beta = 1), B [k, n] or [n, k]:
// cuBLASLt is column-major, so it computes out^T = B^T x^T on the same memory.
// Pinned (deterministic ops): cuBLASLt's heuristic picks a kernel, split-K among them, by shape, so a row's
// bits could change with the row count; pinned, one algorithm per (n, k, layout) serves every row count:
// chosen once at kPinnedRows rows and kPinnedAlign-byte alignment, split-K off, checked for each call's shape.
#pragma once
#include <dlfcn.h>
#include <cstdint>
#include <cstdio>
#include <map>
#include <tuple>
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace tilegen {
namespace coll {

template <class T>
struct BlasType;
template <>
struct BlasType<__nv_bfloat16> {
  static constexpr cudaDataType_t kType = CUDA_R_16BF;
};
template <>
struct BlasType<__half> {
  static constexpr cudaDataType_t kType = CUDA_R_16F;
};
template <>
struct BlasType<float> {
  static constexpr cudaDataType_t kType = CUDA_R_32F;
};

struct BlasLt {
#define TILEGEN_LT_FN(f) decltype(&::f) f = nullptr
  TILEGEN_LT_FN(cublasLtCreate);
  TILEGEN_LT_FN(cublasLtDestroy);
  TILEGEN_LT_FN(cublasLtGetVersion);
  TILEGEN_LT_FN(cublasLtGetStatusString);
  TILEGEN_LT_FN(cublasLtMatmulDescCreate);
  TILEGEN_LT_FN(cublasLtMatmulDescSetAttribute);
  TILEGEN_LT_FN(cublasLtMatrixLayoutCreate);
  TILEGEN_LT_FN(cublasLtMatmulPreferenceCreate);
  TILEGEN_LT_FN(cublasLtMatmulPreferenceSetAttribute);
  TILEGEN_LT_FN(cublasLtMatmulPreferenceDestroy);
  TILEGEN_LT_FN(cublasLtMatmulAlgoGetHeuristic);
  TILEGEN_LT_FN(cublasLtMatmul);
  TILEGEN_LT_FN(cublasLtMatmulAlgoCheck);
  TILEGEN_LT_FN(cublasLtMatmulAlgoConfigSetAttribute);
#undef TILEGEN_LT_FN
  static constexpr size_t kWorkspace = size_t(32) << 20;  // what torch gives cuBLAS on Hopper
  struct Plan {
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
  };
  // (rows, n, k, B is [k, n], has an addend, alignment of the pointers): a heuristic's choice, once
  using Key = std::tuple<int64_t, int64_t, int64_t, bool, bool, int>;
  std::map<Key, Plan> plans;
  bool pinned = false;                           // set before the first GEMM (GemmHost: Op::kDeterministic)
  static constexpr int64_t kPinnedRows = 4096;   // the shape the pinned algorithm is chosen at
  static constexpr int kPinnedAlign = 16;        // (n and k are multiples of 8 elements: every chunk has it)
  std::map<std::tuple<int64_t, int64_t, bool>, cublasLtMatmulAlgo_t> pins;  // (n, k, B is [k, n])
  void* lib = nullptr;
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;

  static int fail(char* msg, int len, const char* what, const char* detail) {
    snprintf(msg, len, "copy-engine GEMM: %s%s%s", what, detail ? ": " : "", detail ? detail : "");
    return 1;
  }

  // Opens cuBLASLt of the header's major version (outside a CUDA graph capture: it allocates).
  int load(char* msg, int len) {
    if (handle) return 0;
    char name[64];
    snprintf(name, sizeof name, "libcublasLt.so.%d", CUBLAS_VER_MAJOR);
    lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!lib) return fail(msg, len, "cannot open cuBLASLt (import torch first, or put it on LD_LIBRARY_PATH)", dlerror());
#define TILEGEN_LT_SYM(f) \
  if (!(f = reinterpret_cast<decltype(f)>(dlsym(lib, #f)))) return fail(msg, len, "cuBLASLt lacks " #f, nullptr)
    TILEGEN_LT_SYM(cublasLtCreate);
    TILEGEN_LT_SYM(cublasLtDestroy);
    TILEGEN_LT_SYM(cublasLtGetVersion);
    TILEGEN_LT_SYM(cublasLtGetStatusString);
    TILEGEN_LT_SYM(cublasLtMatmulDescCreate);
    TILEGEN_LT_SYM(cublasLtMatmulDescSetAttribute);
    TILEGEN_LT_SYM(cublasLtMatrixLayoutCreate);
    TILEGEN_LT_SYM(cublasLtMatmulPreferenceCreate);
    TILEGEN_LT_SYM(cublasLtMatmulPreferenceSetAttribute);
    TILEGEN_LT_SYM(cublasLtMatmulPreferenceDestroy);
    TILEGEN_LT_SYM(cublasLtMatmulAlgoGetHeuristic);
    TILEGEN_LT_SYM(cublasLtMatmul);
    TILEGEN_LT_SYM(cublasLtMatmulAlgoCheck);
    TILEGEN_LT_SYM(cublasLtMatmulAlgoConfigSetAttribute);
#undef TILEGEN_LT_SYM
    if (cublasLtGetVersion() / 10000 != CUBLAS_VER_MAJOR) {
      char v[96];
      snprintf(v, sizeof v, "built against %d.x, the process has %zu", CUBLAS_VER_MAJOR, cublasLtGetVersion());
      return fail(msg, len, "cuBLASLt version mismatch", v);
    }
    cudaError_t e = cudaMalloc(&workspace, kWorkspace);
    if (e != cudaSuccess) return fail(msg, len, "workspace", cudaGetErrorString(e));
    cublasStatus_t st = cublasLtCreate(&handle);
    if (st != CUBLAS_STATUS_SUCCESS) return fail(msg, len, "cublasLtCreate", cublasLtGetStatusString(st));
    return 0;
  }

  void release() {
    if (handle) cublasLtDestroy(handle);  // plans' descriptors are small and die with the process
    if (workspace) cudaFree(workspace);
    *this = BlasLt{};
  }

  static int alignment(const void* p) {
    const uintptr_t v = reinterpret_cast<uintptr_t>(p);
    int a = 256;
    while (a > 1 && v % a) a /= 2;
    return a;
  }

  // The descriptors of out[rows, n] = x[rows, k] @ B.
  int describe(Plan* p, cudaDataType_t type, int64_t rows, int64_t n, int64_t k, bool b_kn, char* msg, int len) {
    const cublasOperation_t ta = b_kn ? CUBLAS_OP_N : CUBLAS_OP_T, tb = CUBLAS_OP_N;
    cublasStatus_t st = cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    // B^T as cuBLAS's A: [k, n] row-major is n x k column-major (ld n); [n, k] is k x n (ld k), transposed
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatrixLayoutCreate(&p->a, type, b_kn ? n : k, b_kn ? k : n, b_kn ? n : k);
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatrixLayoutCreate(&p->b, type, k, rows, k);  // x^T: k x rows
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatrixLayoutCreate(&p->c, type, n, rows, n);  // out^T: n x rows
    return st == CUBLAS_STATUS_SUCCESS ? 0 : fail(msg, len, "descriptors", cublasLtGetStatusString(st));
  }

  // The heuristic's first algorithm for the plan's shape at pointer alignment `align`.
  int heuristic(cublasLtMatmulAlgo_t* algo, const Plan& p, int align, char* msg, int len) {
    cublasLtMatmulPreference_t pref = nullptr;
    cublasStatus_t st = cublasLtMatmulPreferenceCreate(&pref);
    const uint64_t ws = kWorkspace;
    const uint32_t al = static_cast<uint32_t>(align);
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatmulPreferenceSetAttribute(pref, attr, &al, sizeof al);
    cublasLtMatmulHeuristicResult_t r{};
    int found = 0;
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulAlgoGetHeuristic(handle, p.op, p.a, p.b, p.c, p.c, pref, 1, &r, &found);
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS) return fail(msg, len, "heuristic", cublasLtGetStatusString(st));
    if (!found) return fail(msg, len, "no cuBLASLt algorithm for this shape and alignment", nullptr);
    *algo = r.algo;
    return 0;
  }

  // Pinned: the (n, k, layout)'s one algorithm, split-K off, checked for this plan's shape.
  int pinned_algo(cublasLtMatmulAlgo_t* algo, const Plan& p, cudaDataType_t type, int64_t rows, int64_t n, int64_t k,
                  bool b_kn, int align, char* msg, int len) {
    if (align < kPinnedAlign)
      return fail(msg, len, "deterministic: operands must be 16-byte aligned (one algorithm serves every call)",
                  nullptr);
    const auto key = std::make_tuple(n, k, b_kn);
    auto it = pins.find(key);
    if (it == pins.end()) {
      Plan ref{};
      cublasLtMatmulAlgo_t a{};
      if (describe(&ref, type, kPinnedRows, n, k, b_kn, msg, len) || heuristic(&a, ref, kPinnedAlign, msg, len))
        return 1;
      const int32_t one = 1;
      const uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
      cublasStatus_t st = cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &one, sizeof one);
      if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &none, sizeof none);
      if (st != CUBLAS_STATUS_SUCCESS) return fail(msg, len, "deterministic: split-K off", cublasLtGetStatusString(st));
      it = pins.emplace(key, a).first;
    }
    cublasLtMatmulHeuristicResult_t r{};
    cublasStatus_t st = cublasLtMatmulAlgoCheck(handle, p.op, p.a, p.b, p.c, p.c, &it->second, &r);
    if (st != CUBLAS_STATUS_SUCCESS || r.workspaceSize > kWorkspace) {
      char what[128];
      snprintf(what, sizeof what, "deterministic: the pinned cuBLASLt algorithm does not take %lld rows",
               static_cast<long long>(rows));
      return fail(msg, len, what, st == CUBLAS_STATUS_SUCCESS ? "its workspace" : cublasLtGetStatusString(st));
    }
    *algo = it->second;
    return 0;
  }

  int plan(Plan* out, cudaDataType_t type, int64_t rows, int64_t n, int64_t k, bool b_kn, bool addend, int align,
           char* msg, int len) {
    const Key key{rows, n, k, b_kn, addend, align};
    auto it = plans.find(key);
    if (it != plans.end()) return *out = it->second, 0;
    Plan p{};
    if (describe(&p, type, rows, n, k, b_kn, msg, len)) return 1;
    if (pinned ? pinned_algo(&p.algo, p, type, rows, n, k, b_kn, align, msg, len)
               : heuristic(&p.algo, p, align, msg, len))
      return 1;
    plans.emplace(key, p);
    *out = p;
    return 0;
  }

  // On `s`: out = x @ B, plus addend (same shape as out) when it is not null.
  int gemm(cudaDataType_t type, const void* x, int64_t rows, const void* b, int64_t n, int64_t k, bool b_kn, void* out,
           const void* addend, cudaStream_t s, char* msg, int len) {
    int align = alignment(x);
    for (const void* p : {b, static_cast<const void*>(out), addend ? addend : static_cast<const void*>(out)})
      align = alignment(p) < align ? alignment(p) : align;
    Plan p;
    if (plan(&p, type, rows, n, k, b_kn, addend != nullptr, align, msg, len)) return 1;
    const float alpha = 1.f, beta = addend ? 1.f : 0.f;
    cublasStatus_t st = cublasLtMatmul(handle, p.op, &alpha, b, p.a, x, p.b, &beta, addend ? addend : out, p.c, out, p.c,
                                       &p.algo, workspace, kWorkspace, s);
    return st == CUBLAS_STATUS_SUCCESS ? 0 : fail(msg, len, "cublasLtMatmul", cublasLtGetStatusString(st));
  }
};

}  // namespace coll
}  // namespace tilegen
