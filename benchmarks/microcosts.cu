// Micro-costs behind the performance notes (docs/performance.md): a kernel node inside a CUDA graph, and each memory
// operation the protocol kernels chain (releases, acquires, atomics, fences), timed as a dependent sequence of 64 in
// one thread. Not part of the library.
//
//   nvcc -O3 -std=c++17 --generate-code=arch=compute_90a,code=sm_90a benchmarks/microcosts.cu -o /tmp/microcosts
//   /tmp/microcosts
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

enum Op : int {
  kReleaseSys,
  kReleaseGpu,
  kRelaxedSys,
  kAcquireSys,
  kAcquireGpu,
  kAtomic,
  kFenceAcqRel,
  kFenceSc,
  kTimer
};
constexpr const char* kNames[] = {"st.release.sys",    "st.release.gpu", "st.relaxed.sys",
                                  "ld.acquire.sys",    "ld.acquire.gpu", "atomicAdd (returning)",
                                  "fence.acq_rel.gpu", "fence.sc.gpu",   "read %globaltimer"};

__global__ void empty_kernel() {}

template <int kOp>
__global__ void chain_kernel(uint64_t* p, uint32_t* c, int n) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) {  // each step depends on the previous one through v or through the memory clobber
    if (kOp == kReleaseSys) asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v + i) : "memory");
    if (kOp == kReleaseGpu) asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v + i) : "memory");
    if (kOp == kRelaxedSys) asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v + i) : "memory");
    if (kOp == kAcquireSys || kOp == kAcquireGpu) {
      uint64_t t;
      if (kOp == kAcquireSys)
        asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(t) : "l"(p + (v & 1)) : "memory");
      if (kOp == kAcquireGpu)
        asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(t) : "l"(p + (v & 1)) : "memory");
      v += t;
    }
    if (kOp == kAtomic) v += atomicAdd(c + (v & 1), 1u);
    if (kOp == kFenceAcqRel) asm volatile("fence.acq_rel.gpu;" ::: "memory");
    if (kOp == kFenceSc) asm volatile("fence.sc.gpu;" ::: "memory");
    if (kOp == kTimer) {
      uint64_t t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      v += t & 1;
    }
  }
  if (v == 12345) p[2] = v;  // keeps v alive
}

// The "last block out" pattern of the protocol kernels (protocol.cuh: finish_kernel).
__global__ void finish_kernel(uint32_t* done) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(done, 1u) == gridDim.x - 1) {
      __threadfence();
      *done = 0;
    }
  }
}

// Microseconds per launch: `per_graph` launches captured in one graph, best of 5 replays.
template <typename Launch>
float graph_us(Launch launch, int per_graph) {
  cudaStream_t s;
  cudaGraph_t g;
  cudaGraphExec_t exec;
  cudaEvent_t a, b;
  cudaStreamCreate(&s);
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
  for (int i = 0; i < per_graph; ++i) launch(s);
  cudaStreamEndCapture(s, &g);
  cudaGraphInstantiate(&exec, g, 0);
  cudaGraphLaunch(exec, s);  // warm-up
  cudaStreamSynchronize(s);
  float best = 1e30f;
  for (int r = 0; r < 5; ++r) {
    float ms = 0.0f;
    cudaEventRecord(a, s);
    cudaGraphLaunch(exec, s);
    cudaEventRecord(b, s);
    cudaEventSynchronize(b);
    cudaEventElapsedTime(&ms, a, b);
    best = ms < best ? ms : best;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
  return best * 1000.0f / per_graph;
}

template <int kOp>
void report_chain(uint64_t* p, uint32_t* c, float base_us, int n) {
  const float t = graph_us([&](cudaStream_t s) { chain_kernel<kOp><<<1, 32, 0, s>>>(p, c, n); }, 50);
  std::printf("%-24s %.3f us each\n", kNames[kOp], (t - base_us) / n);
}

int main() {
  uint64_t* p = nullptr;
  uint32_t* c = nullptr;
  if (cudaMalloc(&p, 64) != cudaSuccess || cudaMalloc(&c, 64) != cudaSuccess) {
    std::printf("cudaMalloc failed\n");
    return 1;
  }
  cudaMemset(p, 0, 64);
  cudaMemset(c, 0, 64);
  std::printf("graph kernel node: <<<1,32>>> %.2f us, <<<1,512>>> %.2f us, <<<132,512>>> %.2f us\n",
              graph_us([](cudaStream_t s) { empty_kernel<<<1, 32, 0, s>>>(); }, 200),
              graph_us([](cudaStream_t s) { empty_kernel<<<1, 512, 0, s>>>(); }, 200),
              graph_us([](cudaStream_t s) { empty_kernel<<<132, 512, 0, s>>>(); }, 200));
  constexpr int kSteps = 64;
  const float base = graph_us([&](cudaStream_t s) { chain_kernel<kReleaseSys><<<1, 32, 0, s>>>(p, c, 0); }, 50);
  report_chain<kReleaseSys>(p, c, base, kSteps);
  report_chain<kReleaseGpu>(p, c, base, kSteps);
  report_chain<kRelaxedSys>(p, c, base, kSteps);
  report_chain<kAcquireSys>(p, c, base, kSteps);
  report_chain<kAcquireGpu>(p, c, base, kSteps);
  report_chain<kAtomic>(p, c, base, kSteps);
  report_chain<kFenceAcqRel>(p, c, base, kSteps);
  report_chain<kFenceSc>(p, c, base, kSteps);
  report_chain<kTimer>(p, c, base, kSteps);
  for (int blocks : {1, 16, 132}) {
    std::printf("last-block-out kernel, %d blocks of 512: %.2f us\n", blocks,
                graph_us([&](cudaStream_t s) { finish_kernel<<<blocks, 512, 0, s>>>(c + 4); }, 200));
  }
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) std::printf("error: %s\n", cudaGetErrorString(e));
  return e == cudaSuccess ? 0 : 1;
}
