// Latency floor probe: what no small allreduce on these GPUs can beat, timed the way the collective
// benchmark times ops (back-to-back calls per GPU from a host thread of its own, as ranks do: eager,
// and `calls` calls captured in one CUDA graph; us per call, median over repeats, slowest GPU).
//   launch    an empty kernel: 1 CTA x 32 threads; the small allreduce's grid (16 and 33 CTAs x 512);
//             with a 512-byte parameter block (a collective kernel's Params)
//   nvlink    one-way latency of an 8-byte store to a peer GPU: half of a ping-pong's round trip
//             between GPU 0 and GPU 1 (one thread each, %globaltimer over 2000 round trips)
//   exchange  the least an LL one-shot allreduce does: each GPU stores its `bytes` as 16-byte LL lines
//             {lo, flag, hi, flag} into every peer, polls its own buffer for the peers' lines, sums into
//             its output; the flag is the device's call count (read at entry; the last CTA to leave
//             bumps it: graph replays need it on the device), scratch halves by call parity
// Every wait is bounded (2 s): a timeout is reported and the program exits 1. Not a test: a
// measurement for docs/measurements.md (python3 -m bench probe).
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -lpthread bench/scripts/probe_latency_floor.cu -o floor
//   ./floor [gpus] [repeats] [calls] [json file]
#include <cuda_runtime.h>
#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#include "probe_common.cuh"

constexpr int kThreads = 512;
constexpr unsigned long long kTimeoutNs = 2000000000ull;

// ------------------------------------------------------------------------------------------ launch
struct Big {
  char pad[512];
};
__global__ void empty() {}
__global__ void empty_big(Big) {}

// ------------------------------------------------------------------------------------------ nvlink
// GPU 0 sends i, GPU 1 answers i; `mine` is polled, `theirs` is the peer's word. stamps: [0] start,
// [1] end (GPU 0), [2] 1 on timeout.
__global__ void ping_pong(volatile unsigned* mine, volatile unsigned* theirs, int first, int rounds,
                          unsigned long long* stamps) {
  const unsigned long long t0 = now_ns();
  for (int i = 1; i <= rounds; ++i) {
    if (first) *theirs = i;
    while (*mine != static_cast<unsigned>(i))
      if (now_ns() - t0 > kTimeoutNs) {
        stamps[2] = 1;
        return;
      }
    if (!first) *theirs = i;
  }
  if (first) {
    stamps[0] = t0;
    stamps[1] = now_ns();
  }
}

// ---------------------------------------------------------------------------------------- exchange
struct Exchange {
  const float* in;  // `lines` x 2 floats (8 bytes a line)
  float* out;
  char* ll[kMaxGpus];  // each GPU's LL buffer: [parity][source][line] x 16 bytes
  int me, gpus;
  int64_t lines;
  unsigned* epoch;  // [0] calls finished, [1] CTAs out of this call
  unsigned* failed;
};

__device__ __forceinline__ char* ll_line(const Exchange& a, int gpu, unsigned parity, int src, int64_t i) {
  return a.ll[gpu] + ((static_cast<int64_t>(parity) * a.gpus + src) * a.lines + i) * 16;
}

__global__ void __launch_bounds__(kThreads) exchange(Exchange a) {
  if (*reinterpret_cast<volatile unsigned*>(a.failed)) return;  // (after a timeout: every later call at once)
  const unsigned flag = *reinterpret_cast<volatile unsigned*>(a.epoch) + 1, parity = flag & 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < a.lines; i += stride) {
    const uint2 v = reinterpret_cast<const uint2*>(a.in)[i];
    for (int d = 0; d < a.gpus; ++d)
      if (d != a.me)
        asm volatile("st.volatile.global.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(ll_line(a, d, parity, a.me, i)), "r"(v.x),
                     "r"(flag), "r"(v.y), "r"(flag)
                     : "memory");
  }
  const unsigned long long t0 = now_ns();
  bool ok = true;  // (a thread that gave up skips its other lines but still meets the block at the end)
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; ok && i < a.lines; i += stride) {
    float2 sum = reinterpret_cast<const float2*>(a.in)[i];
    for (int s = 0; ok && s < a.gpus; ++s) {
      if (s == a.me) continue;
      unsigned lo, f0, hi, f1;
      do {
        asm volatile("ld.volatile.global.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(lo), "=r"(f0), "=r"(hi), "=r"(f1)
                     : "l"(ll_line(a, a.me, parity, s, i))
                     : "memory");
        if ((f0 != flag || f1 != flag) && now_ns() - t0 > kTimeoutNs) {
          atomicExch(a.failed, 1);  // (every later call returns at once; the host reports it)
          ok = false;
        }
      } while (ok && (f0 != flag || f1 != flag));
      sum.x += __uint_as_float(lo);
      sum.y += __uint_as_float(hi);
    }
    if (ok) reinterpret_cast<float2*>(a.out)[i] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(a.epoch + 1, 1) + 1 == gridDim.x) {  // the last CTA out: the next call's flag
      a.epoch[1] = 0;
      __threadfence();
      atomicAdd(a.epoch, 1);
    }
  }
}

// -------------------------------------------------------------------------------------------- host
class Barrier {  // the GPUs' host threads meet here before each repeat (ranks: dist.barrier)
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> l(m_);
    const int gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(l, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0, gen_ = 0;
};

struct Timing {
  double eager, graph;
};

// us per call of `call` on this thread's GPU: eager (`calls` back to back between events) and replayed
// from a graph of `calls` calls; medians over `reps`.
Timing time_calls(const std::function<void(cudaStream_t)>& call, cudaStream_t s, int calls, int reps, Barrier& bar) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = 0; i < 20; ++i) call(s);
  CK(cudaStreamSynchronize(s));
  std::vector<double> eager, graph;
  for (int r = 0; r < reps; ++r) {
    bar.wait();
    CK(cudaEventRecord(e0, s));
    for (int i = 0; i < calls; ++i) call(s);
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    eager.push_back(ms * 1e3 / calls);
  }
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) call(s);
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  for (int i = 0; i < 2; ++i) CK(cudaGraphLaunch(ge, s));
  CK(cudaStreamSynchronize(s));
  for (int r = 0; r < reps; ++r) {
    bar.wait();
    CK(cudaEventRecord(e0, s));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    graph.push_back(ms * 1e3 / calls);
  }
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  std::sort(eager.begin(), eager.end());
  std::sort(graph.begin(), graph.end());
  return {eager[eager.size() / 2], graph[graph.size() / 2]};
}

struct Gpu {
  cudaStream_t s;
  float *in, *out;
  char* ll;
  unsigned *epoch, *failed, *word;
  unsigned long long* stamps;
};

// The result as JSON, printed as the last line and written to the optional file argument.
struct Json {
  std::string text;
  template <class... A>
  void add(const char* fmt, A... a) {
    char buf[256];
    std::snprintf(buf, sizeof buf, fmt, a...);
    text += buf;
  }
};

// Runs fn(gpu) on one host thread per GPU; the slowest GPU's timing.
Timing on_every_gpu(int gpus, const std::function<Timing(int)>& fn) {
  std::vector<Timing> t(gpus);
  std::vector<std::thread> th;
  for (int i = 0; i < gpus; ++i)
    th.emplace_back([&, i] {
      CK(cudaSetDevice(i));
      t[i] = fn(i);
    });
  for (auto& x : th) x.join();
  Timing worst{0, 0};
  for (const Timing& x : t) worst = {std::max(worst.eager, x.eager), std::max(worst.graph, x.graph)};
  return worst;
}

int main(int argc, char** argv) {
  int gpus = 0;
  CK(cudaGetDeviceCount(&gpus));
  if (argc > 1) gpus = std::min(gpus, std::atoi(argv[1]));
  const int reps = argc > 2 ? std::atoi(argv[2]) : 15, calls = argc > 3 ? std::atoi(argv[3]) : 50;
  if (gpus < 1 || gpus > kMaxGpus || reps < 1 || calls < 1) {
    std::fprintf(stderr, "usage: %s [gpus 1-%d] [repeats] [calls] [json file]\n", argv[0], kMaxGpus);
    return 2;
  }
  const int64_t kMaxLines = (int64_t(256) << 10) / 8;  // 256 KiB of input
  std::vector<Gpu> g(gpus);
  for (int i = 0; i < gpus; ++i) {
    CK(cudaSetDevice(i));
    for (int j = 0; j < gpus; ++j)
      if (j != i) CK(cudaDeviceEnablePeerAccess(j, 0));
    CK(cudaStreamCreateWithFlags(&g[i].s, cudaStreamNonBlocking));
    CK(cudaMalloc(&g[i].in, kMaxLines * 8));
    CK(cudaMalloc(&g[i].out, kMaxLines * 8));
    CK(cudaMalloc(&g[i].ll, 2 * gpus * kMaxLines * 16));
    CK(cudaMemset(g[i].ll, 0, 2 * gpus * kMaxLines * 16));
    std::vector<float> host(kMaxLines * 2, static_cast<float>(i + 1));
    CK(cudaMemcpy(g[i].in, host.data(), kMaxLines * 8, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&g[i].epoch, 8));
    CK(cudaMemset(g[i].epoch, 0, 8));
    CK(cudaMalloc(&g[i].failed, 4));
    CK(cudaMemset(g[i].failed, 0, 4));
    CK(cudaMalloc(&g[i].word, 4));
    CK(cudaMemset(g[i].word, 0, 4));
    CK(cudaMalloc(&g[i].stamps, 24));
    CK(cudaMemset(g[i].stamps, 0, 24));
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("latency floor probe: %d x %s, %d repeats of %d calls; us per call, median, slowest GPU\n", gpus,
              prop.name, reps, calls);
  Barrier bar(gpus);
  Json out;
  out.add("{\"gpus\": %d, \"device\": \"%s\", \"repeats\": %d, \"calls\": %d, \"launch\": [", gpus, prop.name, reps,
          calls);
  struct Grid {
    int ctas, threads;
    bool big;
  };
  const Grid grids[] = {{1, 32, false}, {16, kThreads, false}, {33, kThreads, false}, {16, kThreads, true}};
  for (size_t k = 0; k < sizeof grids / sizeof grids[0]; ++k) {
    const Grid gr = grids[k];
    const Timing t = on_every_gpu(gpus, [&](int i) {
      return time_calls([&](cudaStream_t s) {
        if (gr.big) empty_big<<<gr.ctas, gr.threads, 0, s>>>(Big{});
        else empty<<<gr.ctas, gr.threads, 0, s>>>();
      }, g[i].s, calls, reps, bar);
    });
    out.add("%s{\"ctas\": %d, \"threads\": %d, \"param_bytes\": %d, \"eager_us\": %.2f, \"graph_us\": %.2f}",
            k ? ", " : "", gr.ctas, gr.threads, gr.big ? 512 : 0, t.eager, t.graph);
  }
  out.add("]");
  if (gpus >= 2) {
    const int rounds = 2000;
    std::vector<double> one_way;
    for (int r = 0; r < reps; ++r) {
      for (int i = 0; i < 2; ++i) {
        CK(cudaSetDevice(i));
        CK(cudaMemset(g[i].word, 0, 4));
        CK(cudaDeviceSynchronize());
      }
      for (int i = 0; i < 2; ++i) {
        CK(cudaSetDevice(i));
        ping_pong<<<1, 1, 0, g[i].s>>>(g[i].word, g[1 - i].word, i == 0, rounds, g[i].stamps);
        CK(cudaGetLastError());
      }
      unsigned long long st[2][3];
      for (int i = 0; i < 2; ++i) {
        CK(cudaSetDevice(i));
        CK(cudaStreamSynchronize(g[i].s));
        CK(cudaMemcpy(st[i], g[i].stamps, 24, cudaMemcpyDeviceToHost));
      }
      if (st[0][2] || st[1][2]) {
        std::fprintf(stderr, "\nping-pong timed out (peer stores not seen within 2 s)\n");
        return 1;
      }
      one_way.push_back((st[0][1] - st[0][0]) / 1e3 / rounds / 2);
    }
    std::sort(one_way.begin(), one_way.end());
    out.add(", \"nvlink_one_way_us\": %.3f, \"exchange\": [", one_way[one_way.size() / 2]);
    const int64_t sizes[] = {256, 16 << 10, 64 << 10, 256 << 10};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; ++k) {
      const int64_t lines = sizes[k] / 8;
      const int ctas = static_cast<int>(std::min<int64_t>(33, (lines + kThreads - 1) / kThreads));
      const Timing t = on_every_gpu(gpus, [&](int i) {
        Exchange a{};
        a.in = g[i].in, a.out = g[i].out, a.me = i, a.gpus = gpus, a.lines = lines;
        a.epoch = g[i].epoch, a.failed = g[i].failed;
        for (int d = 0; d < gpus; ++d) a.ll[d] = g[d].ll;
        return time_calls([&](cudaStream_t s) { exchange<<<ctas, kThreads, 0, s>>>(a); }, g[i].s, calls, reps, bar);
      });
      bool ok = true;
      for (int i = 0; i < gpus; ++i) {
        CK(cudaSetDevice(i));
        unsigned failed = 0;
        float first = 0;
        CK(cudaMemcpy(&failed, g[i].failed, 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(&first, g[i].out, 4, cudaMemcpyDeviceToHost));
        ok = ok && !failed && first == gpus * (gpus + 1) / 2.0f;  // every GPU's (rank + 1)
      }
      if (!ok) {
        std::fprintf(stderr, "\nexchange of %lld bytes: timed out or wrong sum\n", static_cast<long long>(sizes[k]));
        return 1;
      }
      out.add("%s{\"bytes\": %lld, \"ctas\": %d, \"eager_us\": %.2f, \"graph_us\": %.2f}", k ? ", " : "",
              static_cast<long long>(sizes[k]), ctas, t.eager, t.graph);
    }
    out.add("]");
  }
  out.add("}");
  std::printf("%s\n", out.text.c_str());
  if (argc > 4) {
    FILE* f = std::fopen(argv[4], "w");
    if (!f || std::fprintf(f, "%s\n", out.text.c_str()) < 0 || std::fclose(f)) {
      std::fprintf(stderr, "cannot write %s\n", argv[4]);
      return 1;
    }
  }
  return 0;
}
