// The nanobind module _jax_ll_ep_cpu: the CPU backend's FFI targets, the registry functions that
// jax_ll_ep/backends/cpu.py calls (create/destroy buffers, sizes, shared memory, error records), the test hooks
// (jax_ll_ep/testing/cpu_hooks.py), and the constants and error texts every backend reads from here
// (jax_ll_ep/_extension.py): limits.h, Fp8Mode, errors.h.
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
#include "ffi/records.h"
#include "jax_ll_ep/errors.h"
#include "jax_ll_ep/layout.h"
#include "jax_ll_ep/limits.h"

namespace nb = nanobind;
using namespace jax_ll_ep;
using namespace jax_ll_ep::cpu;

namespace {

void raise_if(const std::string& error) {
  if (!error.empty()) throw std::runtime_error(error);
}

// The record the xla backend hands over for wording (it counts no calls: seq 0), as errors.h's.
ErrorRecord routing_record(const std::string& code, int32_t group, int32_t rank, int64_t expert, int32_t token,
                           int32_t topk_pos, int64_t num_experts) {
  if (code != "duplicate_expert" && code != "invalid_expert") {
    throw nb::value_error("describe_routing_error: code must be 'invalid_expert' or 'duplicate_expert'");
  }
  ErrorRecord r;
  r.code = code == "duplicate_expert" ? ErrorCode::kDuplicateExpert : ErrorCode::kInvalidExpert;
  r.kind = OpKind::kDispatch;
  r.group = group;
  r.rank = rank;
  r.detail = expert;
  r.token = token;
  r.topk_pos = topk_pos;
  r.num_experts = num_experts;
  return r;
}

}  // namespace

NB_MODULE(_jax_ll_ep_cpu, m) {
  m.doc() = "jax_ll_ep CPU backend: the low-latency protocol over host memory, as XLA FFI handlers";

  // The registration table (ffi/targets.h): target name -> handler, the same names the CUDA module registers.
  m.def("ffi_handlers", []() {
    nb::dict handlers;
    for (const TargetHandler& t : cpu_target_handlers()) {
      handlers[t.name] = nb::capsule(reinterpret_cast<void*>(t.handler));
    }
    return handlers;
  });

  // Constants (limits.h, layout.h, errors.h, test_hooks.h), so that Python keeps no copies.
  m.attr("MAX_TOPK") = kMaxTopk;
  m.attr("SCALE_BLOCK") = kScaleBlock;
  m.attr("HIDDEN_MULTIPLE") = kHiddenMultiple;
  m.attr("MAX_RANKS") = kMaxRanks;
  nb::dict fp8_modes;
  for (int code = 0; code < kNumFp8Modes; ++code) fp8_modes[kFp8ModeNames[code]] = code;
  m.attr("FP8_MODES") = fp8_modes;
  nb::list error_names;
  for (const ErrorName& e : kErrorNames) error_names.append(e.name);
  m.attr("ERROR_NAMES") = nb::tuple(error_names);
  nb::list hook_points;
  for (const char* name : kHookPointNames) hook_points.append(name);
  m.attr("HOOK_POINTS") = nb::tuple(hook_points);

  m.def(
      "describe_routing_error",
      [](const std::string& code, int32_t group, int32_t rank, int64_t expert, int32_t token, int32_t topk_pos,
         int64_t num_experts) {
        return describe(routing_record(code, group, rank, expert, token, topk_pos, num_experts));
      },
      nb::arg("code"), nb::arg("group"), nb::arg("rank"), nb::arg("expert"), nb::arg("token"), nb::arg("topk_pos"),
      nb::arg("num_experts"),
      "The sentence errors.h gives a routing error of the xla backend ('invalid_expert' or 'duplicate_expert').");

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
         bool on_timeout_mask, int32_t num_groups, const std::vector<std::tuple<int32_t, int32_t, int32_t>>& devices,
         const std::string& shm_name) {
        CreateArgs args{handle,    num_ranks,       num_experts, max_tokens, hidden,
                        timeout_s, on_timeout_mask, num_groups,  {},         shm_name};
        for (const auto& [device, group, rank] : devices) args.devices.push_back({device, DeviceRank{group, rank}});
        raise_if(Registry::instance().create(args));
      },
      nb::arg("handle"), nb::arg("num_ranks"), nb::arg("num_experts"), nb::arg("max_tokens"), nb::arg("hidden"),
      nb::arg("timeout_s"), nb::arg("on_timeout_mask"), nb::arg("num_groups"), nb::arg("devices"), nb::arg("shm_name"),
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
        for (const ErrorRecord& record : Registry::instance().errors(handle, clear)) {
          out.append(record_to_python(record));
        }
        return out;
      },
      nb::arg("handle"), nb::arg("clear"),
      "The error records of this process's ranks that hold one (first error since the last check).");

  m.def(
      "mask_states",
      [](int64_t handle) {
        nb::list out;
        for (const Registry::MaskState& m : Registry::instance().mask_states(handle)) {
          nb::dict d;
          d["group"] = m.group;
          d["rank"] = m.rank;
          d["masked"] = nb::cast(m.masked);
          d["dropped_last"] = m.dropped_last;
          d["dropped_total"] = m.dropped_total;
          d["seq"] = m.seq;
          d["open_seq"] = m.open_seq;
          out.append(d);
        }
        return out;
      },
      nb::arg("handle"),
      "Per local rank: group, rank, masked (the ranks its mask holds), dropped_last, dropped_total, seq, open_seq.");
  m.def(
      "set_mask",
      [](int64_t handle, const std::vector<int32_t>& ranks, uint64_t seq) {
        raise_if(Registry::instance().set_mask(handle, ranks, seq));
      },
      nb::arg("handle"), nb::arg("ranks"), nb::arg("seq"),
      "Every local rank: mask = ranks, call sequence = seq, sticky unusable state cleared (outside any call).");

  m.def(
      "sequence_numbers", [](int64_t handle) { return Registry::instance().sequence_numbers(handle); },
      nb::arg("handle"), "(group, rank, seq, open_seq) of this process's ranks: the calls each has completed.");

  // Test hooks. delays: (rank, point, min_s, max_s) with point a HookPoint (HOOK_POINTS names them); skip_ranks:
  // ranks whose calls return at once without taking part (a rank that never calls).
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
}
