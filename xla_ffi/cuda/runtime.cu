// Per-buffer workspace carving and this module's NVSHMEM device state.
#include <nvshmem.h>
#include <nvshmemx.h>

#include "cuda/launch.h"

namespace jax_ll_ep {
int64_t workspace_bytes(const Layout& l) {
  return align_up(4, kRegionAlign) + align_up(kNumParities * 4, kRegionAlign) +
         align_up(l.num_experts() * 4, kRegionAlign) + align_up(kTraceRows * kTraceMarks * 8, kRegionAlign);
}

CudaWorkspace carve_workspace(void* base, const Layout& l) {
  uint8_t* p = static_cast<uint8_t*>(base);
  CudaWorkspace w;
  w.entered = reinterpret_cast<uint32_t*>(p);
  p += align_up(4, kRegionAlign);
  w.queue = reinterpret_cast<uint32_t*>(p);
  p += align_up(kNumParities * 4, kRegionAlign);
  w.pair_sent = reinterpret_cast<uint32_t*>(p);
  p += align_up(l.num_experts() * 4, kRegionAlign);
  w.trace = reinterpret_cast<uint64_t*>(p);
  return w;
}

cudaError_t prepare_kernels(const Layout& l, int device, int blocks_per_sm[kNumOps]) {
  int limit = 0;
  cudaError_t e = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return e;
  // The kernels use no static shared memory, so the whole per-block allowance may be dynamic.
  if (dispatch_smem_bytes(l) > static_cast<size_t>(limit) || combine_smem_bytes(l) > static_cast<size_t>(limit)) {
    return cudaErrorInvalidValue;
  }
  e = prepare_dispatch_kernel(limit, dispatch_smem_bytes(l), &blocks_per_sm[kOpDispatch]);
  if (e != cudaSuccess) return e;
  return prepare_combine_kernel(limit, combine_smem_bytes(l), &blocks_per_sm[kOpCombine]);
}

int nvshmem_module_init() {
  // The host library is already initialized (nvshmem4py, UID mode): this call is reference counted, skips the
  // bootstrap and registers this module's device state (nvshmemi_device_state_d) with the host library.
  nvshmemx_init_attr_t attr = {};
  return nvshmemx_init_attr(0, &attr);
}

void nvshmem_module_finalize() { nvshmem_finalize(); }

}  // namespace jax_ll_ep
