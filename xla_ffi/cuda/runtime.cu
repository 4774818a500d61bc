// Per-buffer workspace carving and this module's NVSHMEM device state.
#include <nvshmem.h>
#include <nvshmemx.h>

#include "cuda/launch.h"

namespace jax_ll_ep {
namespace {

int64_t pair_slots(const Layout& l) {
  const int64_t experts = static_cast<int64_t>(l.num_local_experts) * l.num_ranks;
  return experts > l.num_pairs() ? experts : l.num_pairs();
}

}  // namespace

int64_t workspace_bytes(const Layout& l) {
  const int64_t experts = static_cast<int64_t>(l.num_local_experts) * l.num_ranks;
  return align_up(kNumDoneCounters * 4, kRegionAlign) + align_up(experts * 4, kRegionAlign) +
         align_up(experts * l.max_tokens * 4, kRegionAlign) + align_up(pair_slots(l) * 4, kRegionAlign);
}

CudaWorkspace carve_workspace(void* base, const Layout& l) {
  const int64_t experts = static_cast<int64_t>(l.num_local_experts) * l.num_ranks;
  uint8_t* p = static_cast<uint8_t*>(base);
  CudaWorkspace w;
  w.done = reinterpret_cast<uint32_t*>(p);
  p += align_up(kNumDoneCounters * 4, kRegionAlign);
  w.expert_count = reinterpret_cast<int32_t*>(p);
  p += align_up(experts * 4, kRegionAlign);
  w.expert_list = reinterpret_cast<int32_t*>(p);
  p += align_up(experts * l.max_tokens * 4, kRegionAlign);
  w.pair_sent = reinterpret_cast<uint32_t*>(p);
  return w;
}

int nvshmem_module_init() {
  // The host library is already initialized (nvshmem4py, UID mode): this call is reference counted, skips the
  // bootstrap and registers this module's device state (nvshmemi_device_state_d) with the host library.
  nvshmemx_init_attr_t attr = {};
  return nvshmemx_init_attr(0, &attr);
}

void nvshmem_module_finalize() { nvshmem_finalize(); }

}  // namespace jax_ll_ep
