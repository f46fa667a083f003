// NVLink store-rate probe: every GPU of one process writes the same `bytes` of its source to each
// peer at once (the low-latency MoE push's traffic: a token row to every rank it goes to), in warp
// pieces, by SM stores of `width` bytes per lane or by TMA bulk stores, rows of 7168 bytes either
// contiguous or each in a segment of its own (the push's per-expert layout), then (like the push's
// end) the last CTA fences at system scope. Reports, per shape, the median over repeats of the slowest GPU's
// time from its first CTA's start to its last CTA's fence (%globaltimer), all GPUs released together by
// a host flag. Not a test: a measurement for docs/measurements.md (tools/gpu_check.sh probe).
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a bench/scripts/probe_nvlink_stores.cu -o probe
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "probe_common.cuh"

struct Args {
  const char* src;
  char* dst[kMaxGpus];  // region of this GPU at each peer
  int me, gpus, self;   // self: also store to this GPU's own region (the push writes its local rows too)
  int64_t bytes, piece;
  int64_t row, stride;  // rows of `row` bytes land `stride` bytes apart at the destination (the push's
                        // per-expert segments); stride == row: contiguous
  unsigned* counter;
  unsigned long long* stamps;  // [0] earliest start, [1] end
  volatile int* go;
  volatile int* dev_go;  // CTA 0 copies the host flag here
  int epoch;
};

__device__ __forceinline__ void begin(const Args& a) {
  if (threadIdx.x == 0) {  // CTA 0 polls the host flag (a PCIe read each), the others a device word
    volatile int* go = blockIdx.x == 0 ? a.go : a.dev_go;
    while (*go != a.epoch) {
    }
    if (blockIdx.x == 0) *a.dev_go = a.epoch;
    atomicMin(a.stamps, now_ns());
  }
  __syncthreads();
}
__device__ __forceinline__ void finish(const Args& a) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(a.counter, 1) + 1 == gridDim.x;
    if (last) {
      asm volatile("fence.acq_rel.sys;" ::: "memory");
      a.stamps[1] = now_ns();
      *a.counter = 0;
    }
  }
}

template <int W>
struct Vec;
template <>
struct Vec<8> { using T = uint2; };
template <>
struct Vec<16> { using T = uint4; };

// Warp per piece, W bytes per lane per store, the piece to every peer (and itself with a.self).
template <int W>
__global__ void __launch_bounds__(512) sm_stores(Args a) {
  using V = typename Vec<W>::T;
  begin(a);
  const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  const int64_t pieces = (a.bytes + a.piece - 1) / a.piece;
  for (int64_t it = blockIdx.x * wpb + (threadIdx.x >> 5); it < pieces; it += int64_t(gridDim.x) * wpb) {
    const int64_t lo = it * a.piece, hi = min(lo + a.piece, a.bytes);
    for (int64_t o = lo + lane * W; o < hi; o += 32 * W) {
      const V v = __ldg(reinterpret_cast<const V*>(a.src + o));
      for (int d = 0; d < a.gpus; ++d)
        if (d != a.me || a.self) *reinterpret_cast<V*>(a.dst[d] + o / a.row * a.stride + o % a.row) = v;
    }
  }
  finish(a);
}

// Warp per piece: the piece loaded into shared memory, then one TMA bulk store per destination by lane 0.
__global__ void __launch_bounds__(512) tma_stores(Args a) {
  extern __shared__ __align__(128) char smem[];
  begin(a);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
  char* buf = smem + warp * a.piece;
  const int64_t pieces = (a.bytes + a.piece - 1) / a.piece;
  for (int64_t it = blockIdx.x * wpb + warp; it < pieces; it += int64_t(gridDim.x) * wpb) {
    const int64_t lo = it * a.piece, n = min(a.piece, a.bytes - lo);
    if (lane == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");  // (buf free again)
    __syncwarp();
    for (int64_t o = lane * 16; o < n; o += 512)
      *reinterpret_cast<uint4*>(buf + o) = __ldg(reinterpret_cast<const uint4*>(a.src + lo + o));
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // (generic stores -> the async proxy)
    __syncwarp();
    if (lane == 0) {
      const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(buf));
      for (int d = 0; d < a.gpus; ++d)
        if (d != a.me || a.self)
          asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                       ::"l"(a.dst[d] + lo / a.row * a.stride + lo % a.row), "r"(s),
                       "r"(static_cast<unsigned>(n))
                       : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
  }
  if (lane == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  finish(a);
}

struct Gpu {
  char *src, *dst;
  unsigned* counter;
  unsigned long long* stamps;
  int* dev_go;
  cudaStream_t s;
};

int main(int argc, char** argv) {
  int gpus = 0;
  CK(cudaGetDeviceCount(&gpus));
  if (argc > 1) gpus = std::min(gpus, std::atoi(argv[1]));
  const int reps = argc > 2 ? std::atoi(argv[2]) : 15;
  if (gpus < 2) { std::printf("needs 2+ GPUs\n"); return 1; }
  const int64_t kMax = 4 << 20, kRow = 7168;  // source bytes, at most; a row
  const int64_t kRegion = (kMax / kRow + 1) * 4 * 128 * kRow;  // each source's region at a destination
  std::vector<Gpu> g(gpus);
  for (int i = 0; i < gpus; ++i) {
    CK(cudaSetDevice(i));
    for (int j = 0; j < gpus; ++j)
      if (j != i) CK(cudaDeviceEnablePeerAccess(j, 0));
    CK(cudaMalloc(&g[i].src, kMax));
    CK(cudaMemset(g[i].src, i + 1, kMax));
    CK(cudaMalloc(&g[i].dst, kRegion * gpus));
    CK(cudaMalloc(&g[i].counter, 4));
    CK(cudaMemset(g[i].counter, 0, 4));
    CK(cudaMalloc(&g[i].dev_go, 4));
    CK(cudaMemset(g[i].dev_go, 0, 4));
    CK(cudaMalloc(&g[i].stamps, 16));
    CK(cudaStreamCreateWithFlags(&g[i].s, cudaStreamNonBlocking));
    CK(cudaFuncSetAttribute(tma_stores, cudaFuncAttributeMaxDynamicSharedMemorySize, 16 * 4096));
  }
  int* go = nullptr;
  CK(cudaHostAlloc(&go, 4, cudaHostAllocMapped | cudaHostAllocPortable));
  int* go_dev = nullptr;
  CK(cudaHostGetDevicePointer(&go_dev, go, 0));

  struct Shape { const char* how; int width; int64_t bytes, piece; int ctas, threads, self; int64_t stride; };
  std::vector<Shape> shapes;
  // fp8 push at 128 tokens x 7168 B: ~0.85 MB to each peer; bf16: ~1.7 MB. Rows of 7168 B either
  // contiguous or each in its own segment (the push's layout: a segment of max_tokens rows per local
  // expert and source, 4 x 128 x 7168 B apart at 4 ranks)
  for (int64_t bytes : {int64_t(850) << 10, int64_t(1700) << 10})
    for (int64_t stride : {kRow, int64_t(64) << 10, int64_t(2) << 20, 4 * 128 * kRow}) {
      shapes.push_back({"sm", 8, bytes, 256, 264, 512, 1, stride});
      shapes.push_back({"sm", 16, bytes, 512, 132, 512, 1, stride});
      shapes.push_back({"tma", 16, bytes, 1024, 132, 512, 1, stride});
    }
  std::printf("NVLink store probe: %d GPUs, each writes `bytes` to every GPU (itself included), all at once; "
              "median of %d repeats of the slowest GPU, us\n", gpus, reps);
  std::printf("%-4s %5s %9s %6s %5s %9s %8s %10s\n", "how", "width", "bytes", "piece", "ctas", "rows at", "us", "GB/s/GPU");
  int epoch = 0;
  *const_cast<volatile int*>(go) = 0;
  for (const Shape& sh : shapes) {
    std::vector<double> t;
    for (int r = 0; r < reps + 2; ++r) {
      ++epoch;
      for (int i = 0; i < gpus; ++i) {
        CK(cudaSetDevice(i));
        const unsigned long long init[2] = {~0ull, 0};
        CK(cudaMemcpyAsync(g[i].stamps, init, 16, cudaMemcpyHostToDevice, g[i].s));
        Args a{};
        a.src = g[i].src;
        for (int d = 0; d < gpus; ++d) a.dst[d] = g[d].dst + i * kRegion;
        a.me = i, a.gpus = gpus, a.self = sh.self, a.bytes = sh.bytes, a.piece = sh.piece;
        a.row = kRow, a.stride = sh.stride;
        a.counter = g[i].counter, a.stamps = g[i].stamps, a.go = go_dev;
        a.dev_go = g[i].dev_go, a.epoch = epoch;
        if (sh.how[0] == 't')
          tma_stores<<<sh.ctas, sh.threads, (sh.threads / 32) * sh.piece, g[i].s>>>(a);
        else if (sh.width == 8)
          sm_stores<8><<<sh.ctas, sh.threads, 0, g[i].s>>>(a);
        else
          sm_stores<16><<<sh.ctas, sh.threads, 0, g[i].s>>>(a);
        CK(cudaGetLastError());
      }
      *const_cast<volatile int*>(go) = epoch;
      double worst = 0;
      for (int i = 0; i < gpus; ++i) {
        CK(cudaSetDevice(i));
        CK(cudaStreamSynchronize(g[i].s));
        unsigned long long st[2];
        CK(cudaMemcpy(st, g[i].stamps, 16, cudaMemcpyDeviceToHost));
        worst = std::max(worst, (st[1] - st[0]) / 1e3);
      }
      if (r >= 2) t.push_back(worst);
    }
    std::sort(t.begin(), t.end());
    const double med = t[t.size() / 2];
    const double out_bytes = double(sh.bytes) * (gpus - 1);  // over NVLink, per GPU
    std::printf("%-4s %5d %9lld %6lld %5d %9lld %8.1f %10.0f\n", sh.how, sh.width, (long long)sh.bytes,
                (long long)sh.piece, sh.ctas, (long long)sh.stride, med, out_bytes / med / 1e3);
  }
  return 0;
}
