// The nanobind module _jax_ll_ep_cpu: the FFI registration table of the CPU backend and the registry functions that
// jax_ll_ep/_cpu_backend.py calls (create/destroy buffers, sizes, shared memory, error records, test hooks).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/registry.h"
#include "cpu/test_hooks.h"
#include "ffi/cpu_handlers.h"
#include "jax_ll_ep/layout.h"

namespace nb = nanobind;
using namespace jax_ll_ep;
using namespace jax_ll_ep::cpu;

namespace {

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

void raise_if(const std::string& error) {
  if (!error.empty()) throw std::runtime_error(error);
}

}  // namespace

NB_MODULE(_jax_ll_ep_cpu, m) {
  m.doc() = "jax_ll_ep CPU backend: the low-latency protocol over host memory, as XLA FFI handlers";

  // The one registration table: target name -> handler (the same names the CUDA module registers for "CUDA").
  m.def("ffi_handlers", []() {
    nb::dict handlers;
    handlers["jax_ll_ep_dispatch"] = handler_capsule(JaxLlEpCpuDispatch);
    handlers["jax_ll_ep_dispatch_send"] = handler_capsule(JaxLlEpCpuDispatchSend);
    handlers["jax_ll_ep_dispatch_recv"] = handler_capsule(JaxLlEpCpuDispatchRecv);
    handlers["jax_ll_ep_combine"] = handler_capsule(JaxLlEpCpuCombine);
    handlers["jax_ll_ep_combine_send"] = handler_capsule(JaxLlEpCpuCombineSend);
    handlers["jax_ll_ep_combine_recv"] = handler_capsule(JaxLlEpCpuCombineRecv);
    return handlers;
  });

  m.def(
      "region_bytes",
      [](int32_t num_ranks, int32_t num_experts, int32_t max_tokens, int32_t hidden) {
        const Layout layout = make_layout(num_ranks, num_experts, max_tokens, hidden);
        if (layout.region_bytes == 0) {
          throw nb::value_error("invalid buffer configuration (num_ranks, num_experts, max_tokens, hidden)");
        }
        return layout.region_bytes;
      },
      nb::arg("num_ranks"), nb::arg("num_experts"), nb::arg("max_tokens"), nb::arg("hidden"),
      "Bytes of one rank's region (make_layout in layout.h).");

  m.def(
      "create_buffer",
      [](int64_t handle, int32_t num_ranks, int32_t num_experts, int32_t max_tokens, int32_t hidden, double timeout_s,
         int32_t num_groups, const std::vector<std::tuple<int32_t, int32_t, int32_t>>& devices,
         const std::string& shm_name) {
        CreateArgs args{handle, num_ranks, num_experts, max_tokens, hidden, timeout_s, num_groups, {}, shm_name};
        for (const auto& [device, group, rank] : devices) args.devices.push_back({device, DeviceRank{group, rank}});
        raise_if(Registry::instance().create(args));
      },
      nb::arg("handle"), nb::arg("num_ranks"), nb::arg("num_experts"), nb::arg("max_tokens"), nb::arg("hidden"),
      nb::arg("timeout_s"), nb::arg("num_groups"), nb::arg("devices"), nb::arg("shm_name"),
      "Registers a buffer: devices are this process's (global device id, group, rank); shm_name '' allocates "
      "private memory, else maps that segment (created by shm_create).");

  m.def("destroy_buffer", [](int64_t handle) { return Registry::instance().destroy(handle); }, nb::arg("handle"));

  m.def(
      "shm_create", [](const std::string& name, int64_t bytes) { raise_if(shm_create(name, bytes)); }, nb::arg("name"),
      nb::arg("bytes"));
  m.def("shm_unlink", [](const std::string& name) { raise_if(shm_unlink(name)); }, nb::arg("name"));

  m.def(
      "errors",
      [](int64_t handle, bool clear) {
        nb::list out;
        for (const ErrorRecord& rec : Registry::instance().errors(handle, clear)) {
          nb::dict d;
          d["group"] = rec.group;
          d["rank"] = rec.rank;
          d["code"] = rec.code;
          d["kind"] = rec.kind;
          d["seq"] = rec.seq;
          d["detail"] = rec.detail;
          d["count"] = rec.count;
          d["token"] = rec.token;
          d["topk_pos"] = rec.topk_pos;
          d["signal"] = rec.signal;
          nb::list missing;
          for (const auto& [rank, expert] : rec.missing) missing.append(nb::make_tuple(rank, expert));
          d["missing"] = missing;
          out.append(d);
        }
        return out;
      },
      nb::arg("handle"), nb::arg("clear"),
      "The error records of this process's ranks that hold one (first error since the last check).");

  m.def(
      "sequence_numbers", [](int64_t handle) { return Registry::instance().sequence_numbers(handle); },
      nb::arg("handle"), "(group, rank, seq, open_seq) of this process's ranks: the calls each has completed.");

  // Test hooks. delays: (rank, point, min_s, max_s) with point 0 before sending, 1 between data and signals,
  // 2 before receiving; skip_ranks: ranks whose calls return at once without taking part (a rank that never calls).
  m.def(
      "set_test_hooks",
      [](int64_t handle, int32_t num_groups, int32_t num_ranks, uint64_t seed,
         const std::vector<std::tuple<int32_t, int32_t, double, double>>& delays,
         const std::vector<int32_t>& skip_ranks) {
        auto hooks = std::make_shared<TestHooks>(num_groups, num_ranks, seed);
        for (const auto& [rank, point, min_s, max_s] : delays) {
          if (rank < 0 || rank >= num_ranks || point < 0 || point >= kNumHookPoints) {
            throw nb::value_error("test delay: rank or point out of range");
          }
          hooks->set_delay(rank, static_cast<HookPoint>(point), min_s, max_s);
        }
        for (int32_t rank : skip_ranks) {
          if (rank < 0 || rank >= num_ranks) throw nb::value_error("test skip: rank out of range");
          hooks->set_skip(rank);
        }
        if (!Registry::instance().set_hooks(handle, hooks)) throw nb::value_error("unknown buffer handle");
      },
      nb::arg("handle"), nb::arg("num_groups"), nb::arg("num_ranks"), nb::arg("seed"), nb::arg("delays"),
      nb::arg("skip_ranks"));
  m.def(
      "clear_test_hooks", [](int64_t handle) { return Registry::instance().set_hooks(handle, nullptr); },
      nb::arg("handle"));
  m.def(
      "test_stamps",
      [](int64_t handle, int32_t num_groups, int32_t num_ranks) {
        auto hooks = Registry::instance().resolve(handle).hooks;
        if (!hooks) throw nb::value_error("no test hooks installed on this buffer");
        nb::list out;  // [group][rank][kind: dispatch, combine] -> (enter, signalling, returned), steady-clock ns
        for (int32_t g = 0; g < num_groups; ++g) {
          nb::list ranks;
          for (int32_t r = 0; r < num_ranks; ++r) {
            nb::list kinds;
            for (int32_t kind = 0; kind < 2; ++kind) {
              kinds.append(nb::make_tuple(hooks->stamp_ns(g, r, kind, Stamp::kEnter),
                                          hooks->stamp_ns(g, r, kind, Stamp::kSignalling),
                                          hooks->stamp_ns(g, r, kind, Stamp::kReturned)));
            }
            ranks.append(kinds);
          }
          out.append(ranks);
        }
        return out;
      },
      nb::arg("handle"), nb::arg("num_groups"), nb::arg("num_ranks"));

  m.attr("MAX_TOPK") = kMaxTopk;
}
