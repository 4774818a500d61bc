// Device timestamps for the benchmarks: one thread writes %globaltimer (nanoseconds) when the stream reaches it.
// The FFI glue orders it on the buffer's effect token, so a stamp sits exactly between two calls of a program.
#include "cuda/launch.h"

namespace jax_ll_ep {
namespace {

__global__ void timestamp_kernel(uint32_t* out) {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  out[0] = static_cast<uint32_t>(t);
  out[1] = static_cast<uint32_t>(t >> 32);
}

}  // namespace

cudaError_t record_timestamp(uint32_t* out, cudaStream_t stream) {
  timestamp_kernel<<<1, 1, 0, stream>>>(out);
  return cudaGetLastError();
}

}  // namespace jax_ll_ep
