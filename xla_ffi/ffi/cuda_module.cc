// The nanobind module _jax_ll_ep_cuda: the CUDA backend's FFI targets and the functions jax_ll_ep/backends/cuda.py
// calls outside jit (this module's NVSHMEM device state, buffer registration, error records, the peer-access
// transport's allocations, device queries).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cuda/launch.h"
#include "cuda/registry.h"
#include "ffi/cuda_handlers.h"
#include "ffi/records.h"
#include "jax_ll_ep/limits.h"

namespace nb = nanobind;

NB_MODULE(_jax_ll_ep_cuda, m) {
  using namespace jax_ll_ep;
  using namespace jax_ll_ep::cuda;
  m.doc() = "jax_ll_ep CUDA backend: the protocol's kernels over NVSHMEM or peer memory, as XLA FFI handlers";

  // The registration table (ffi/targets.h; the same names the CPU module registers) and the benchmarks' timestamp.
  m.def("ffi_handlers", []() {
    nb::dict handlers;
    for (const TargetHandler& t : cuda_target_handlers()) {
      handlers[t.name] = nb::capsule(reinterpret_cast<void*>(t.handler));
    }
    const TargetHandler stamp = cuda_timestamp_handler();
    handlers[stamp.name] = nb::capsule(reinterpret_cast<void*>(stamp.handler));
    return handlers;
  });
  m.attr("MAX_EXPERTS") = kMaxCudaExperts;

  m.def("nvshmem_init", &nvshmem_module_init, "Registers this module's NVSHMEM device state (returns 0 on success).");
  m.def("nvshmem_finalize", &nvshmem_module_finalize);

  m.def(
      "register_buffer",
      [](int64_t handle, int device, int32_t group, int32_t rank, int32_t num_ranks, int32_t num_experts,
         int32_t max_tokens, int32_t hidden, uintptr_t region, const std::vector<uintptr_t>& peer_regions,
         const std::vector<int32_t>& peer_pes, double timeout_s, bool on_timeout_mask, bool trace) {
        RegisterArgs a;
        a.handle = handle;
        a.device = device;
        a.group = group;
        a.rank = rank;
        a.num_ranks = num_ranks;
        a.num_experts = num_experts;
        a.max_tokens = max_tokens;
        a.hidden = hidden;
        a.region = region;
        a.peer_regions = peer_regions;
        a.peer_pes = peer_pes;
        a.timeout_s = timeout_s;
        a.on_timeout_mask = on_timeout_mask;
        a.trace = trace;
        Registry::instance().add(a);
      },
      nb::arg("handle"), nb::arg("device"), nb::arg("group"), nb::arg("rank"), nb::arg("num_ranks"),
      nb::arg("num_experts"), nb::arg("max_tokens"), nb::arg("hidden"), nb::arg("region"), nb::arg("peer_regions"),
      nb::arg("peer_pes"), nb::arg("timeout_s"), nb::arg("on_timeout_mask"), nb::arg("trace"),
      "Registers one rank of a buffer on its CUDA device (zeroes the region and waits for it).");
  m.def(
      "unregister_buffer", [](int64_t handle, int device) { Registry::instance().remove(handle, device); },
      nb::arg("handle"), nb::arg("device"), "Frees the rank's resources once its device's work has finished.");
  m.def(
      "take_error",
      [](int64_t handle, int device) -> std::optional<nb::dict> {
        const std::optional<ErrorRecord> record = Registry::instance().take_error(handle, device);
        if (!record) return std::nullopt;
        return record_to_python(*record);
      },
      nb::arg("handle"), nb::arg("device"),
      "The rank's error record (None if there is none), cleared, after a device synchronisation.");
  m.def(
      "sequence_number",
      [](int64_t handle, int device) { return Registry::instance().sequence_number(handle, device); },
      nb::arg("handle"), nb::arg("device"), "The rank's last completed call, after a device synchronisation.");
  m.def(
      "mask_state",
      [](int64_t handle, int device) {
        const Registry::MaskState m = Registry::instance().mask_state(handle, device);
        nb::dict d;
        d["masked"] = nb::cast(m.masked);
        d["dropped_last"] = m.dropped_last;
        d["dropped_total"] = m.dropped_total;
        d["seq"] = m.seq;
        d["open_seq"] = m.open_seq;
        return d;
      },
      nb::arg("handle"), nb::arg("device"),
      "The rank's mask state after a device synchronisation: masked, dropped_last, dropped_total, seq, open_seq.");
  m.def(
      "set_mask",
      [](int64_t handle, int device, const std::vector<int32_t>& ranks, uint64_t seq) {
        Registry::instance().set_mask(handle, device, ranks, seq);
      },
      nb::arg("handle"), nb::arg("device"), nb::arg("ranks"), nb::arg("seq"),
      "The rank's mask = ranks, last completed call = seq, the sticky refusal cleared (outside any call).");
  m.def(
      "read_trace",
      [](int64_t handle, int device) {
        const std::string rows = Registry::instance().read_trace(handle, device);
        return nb::bytes(rows.data(), rows.size());
      },
      nb::arg("handle"), nb::arg("device"),
      "The phase trace (launch.h): trace_shape() uint64 words as bytes, all zero unless the buffer records it.");

  m.def("trace_shape", []() { return nb::make_tuple(kTraceRows, kTraceMarks); }, "(rows, marks) of read_trace.");
  m.def("alloc_region", &alloc_region, nb::arg("device"), nb::arg("bytes"));
  m.def("free_region", &free_region, nb::arg("device"), nb::arg("region"));
  m.def("enable_peer_access", &enable_peer_access, nb::arg("devices"));
  m.def("mem_get_info", &mem_get_info, nb::arg("device"), "(free, total) bytes of the device.");
  m.def("multiprocessor_count", &multiprocessor_count, nb::arg("device"));
}
