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

// Instruction fetch: one warp runs kInstr independent FMAs of straight-line code (16 bytes each) once. kSalt makes
// instantiations of equal size whose code differs (an "evictor" for another one's instruction cache lines).
template <int kInstr, int kSalt>
__global__ void code_kernel(float* out, float b) {
  float a[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) a[j] = threadIdx.x + j + kSalt;
#pragma unroll
  for (int i = 0; i < kInstr / 8; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) asm volatile("fma.rn.f32 %0, %0, %1, %1;" : "+f"(a[j]) : "f"(b));
  }
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) s += a[j];
  if (s == 12345.0f) out[0] = s;
}

// Address translation: one warp writes 1 KB to each of 8 places `stride` bytes apart (as a dispatch send item
// writes one chunk of a token to its 8 experts' rows), then reads it back; `touch_pages_kernel` touches one line of
// every 2 MB page of a large buffer (evicting translations between launches).
__global__ void scatter_kernel(uint8_t* buf, int64_t stride, int write) {
  const int lane = threadIdx.x;
  uint64_t acc = 0;
#pragma unroll 1
  for (int d = 0; d < 8; ++d) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      uint64_t* p = reinterpret_cast<uint64_t*>(buf + d * stride + r * 256 + lane * 8);
      if (write) {
        *p = d + r;
      } else {
        acc += *reinterpret_cast<volatile uint64_t*>(p);
      }
    }
  }
  if (acc == 12345) buf[0] = 1;
}
__global__ void touch_pages_kernel(uint8_t* buf, int64_t pages) {
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < pages; i += gridDim.x * blockDim.x) {
    buf[i * (int64_t{2} << 20) + 64] = 1;
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
  // Straight-line code run once per launch: alone (the same kernel back to back), and alternating with another
  // kernel of 128 KB of code (as the dispatch and combine kernels alternate). Time per launch of the measured kernel.
  float* f = reinterpret_cast<float*>(c + 8);
  const float empty = graph_us([](cudaStream_t s) { empty_kernel<<<1, 32, 0, s>>>(); }, 200);
  const float evictor = graph_us([&](cudaStream_t s) { code_kernel<8192, 7><<<1, 32, 0, s>>>(f, 1.0f); }, 100);
  auto code_probe = [&](const char* what, auto launch) {
    const float alone = graph_us(launch, 100);
    const float mixed = graph_us(
        [&](cudaStream_t s) {
          launch(s);
          code_kernel<8192, 7><<<1, 32, 0, s>>>(f, 1.0f);
        },
        100);
    std::printf("%-34s alone %.2f us, alternating with a 128 KB kernel %.2f us (empty kernel %.2f)\n", what, alone,
                mixed - evictor, empty);
  };
  code_probe("straight-line code 8 KB, 1 warp", [&](cudaStream_t s) { code_kernel<512, 1><<<1, 32, 0, s>>>(f, 1.0f); });
  code_probe("straight-line code 32 KB, 1 warp",
             [&](cudaStream_t s) { code_kernel<2048, 2><<<1, 32, 0, s>>>(f, 1.0f); });
  code_probe("straight-line code 128 KB, 1 warp",
             [&](cudaStream_t s) { code_kernel<8192, 3><<<1, 32, 0, s>>>(f, 1.0f); });
  code_probe("straight-line code 128 KB, 132 blocks",
             [&](cudaStream_t s) { code_kernel<8192, 4><<<132, 32, 0, s>>>(f, 1.0f); });
  // Scattered writes and reads of one warp, with and without a kernel between launches that touches 8 GB.
  uint8_t* big = nullptr;
  const int64_t big_bytes = int64_t{8} << 30;
  if (cudaMalloc(&big, big_bytes) == cudaSuccess) {
    const int64_t pages = big_bytes >> 21;
    const float toucher = graph_us([&](cudaStream_t s) { touch_pages_kernel<<<32, 128, 0, s>>>(big, pages); }, 20);
    for (int write = 1; write >= 0; --write) {
      for (int64_t stride : {int64_t{7168}, int64_t{1} << 21, int64_t{256} << 20}) {
        const float alone = graph_us([&](cudaStream_t s) { scatter_kernel<<<1, 32, 0, s>>>(big, stride, write); }, 100);
        const float mixed = graph_us(
            [&](cudaStream_t s) {
              scatter_kernel<<<1, 32, 0, s>>>(big, stride, write);
              touch_pages_kernel<<<32, 128, 0, s>>>(big, pages);
            },
            20);
        std::printf("%s 8 x 1 KB, %9lld B apart: alone %.2f us, after touching 8 GB %.2f us\n",
                    write ? "write" : "read ", static_cast<long long>(stride), alone, mixed - toucher);
      }
    }
    cudaFree(big);
  }
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) std::printf("error: %s\n", cudaGetErrorString(e));
  return e == cudaSuccess ? 0 : 1;
}
