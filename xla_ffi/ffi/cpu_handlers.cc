// The CPU platform of the FFI targets (ffi/targets.h): how a call finds its buffer in cpu/registry.h and runs the
// protocol (cpu/protocol.cc). The only CPU file that sees XLA.
//
// The device ordinal (on CPU: the global device id) names this rank's place in the buffer. The handlers keep no
// per-call host state: the sequence number and the open split call live in the rank's RankState.
#include "ffi/cpu_handlers.h"

#include <string>

#include "cpu/protocol.h"
#include "cpu/registry.h"
#include "jax_ll_ep/args.h"
#include "jax_ll_ep/errors.h"
#include "jax_ll_ep/layout.h"

namespace jax_ll_ep::cpu {
namespace {

// The execution context of a CPU call: the device it runs for.
struct CallMembers {
  int32_t device;
};
using Context = PlatformContext<CallMembers, ffi::DeviceOrdinal>;

ffi::Error to_ffi_error(const Status& status) {
  switch (status.code) {
    case ErrorCode::kOk:
      return ffi::Error::Success();
    case ErrorCode::kTimeout:
      return ffi::Error(ffi::ErrorCode::kDeadlineExceeded, "jax_ll_ep: " + status.message);
    case ErrorCode::kInvalidExpert:
    case ErrorCode::kDuplicateExpert:
    case ErrorCode::kInvalidHandle:
      return ffi::Error::InvalidArgument("jax_ll_ep: " + status.message);
    default:
      return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "jax_ll_ep: " + status.message);
  }
}

struct Platform {
  using Context = cpu::Context;
  static constexpr bool kCommandBufferCompatible = false;

  // The buffer and this device's place in it, for one call.
  struct Bound {
    Registry::Resolved resolved;  // holds the entry (and its memory) alive for the call
    GroupArgs group = {};
    CallEnv env = {};
    const Layout& layout() const { return group.layout; }
  };

  static ffi::ErrorOr<Bound> bind(Context ctx, int64_t buffer_id, const std::string& op) {
    Bound b;
    b.resolved = Registry::instance().resolve(buffer_id);
    const BufferEntry* entry = b.resolved.entry.get();
    if (entry == nullptr) return buffer_not_open(op, buffer_id, "cpu");
    const auto it = entry->devices.find(ctx.device);
    if (it == entry->devices.end()) return device_not_in_buffer(op, buffer_id, ctx.device);
    b.group.layout = entry->layout;
    b.group.rank = it->second.rank;
    b.group.regions = entry->regions[it->second.group].data();
    b.group.timeout_s = entry->timeout_s;
    b.group.on_timeout_mask = entry->on_timeout_mask ? 1 : 0;
    b.env.group = it->second.group;
    b.env.record_lock = &b.resolved.entry->record_lock;
    b.env.hooks = b.resolved.hooks.get();
    return b;
  }

  static GroupArgs call_group(const Bound& b, int32_t phases, const Tickets& tickets) {
    GroupArgs g = b.group;
    g.phases = phases;
    g.ticket_out = tickets.out;
    g.ticket_in = tickets.in;
    return g;
  }

  static ffi::Error dispatch(Context, const Bound& b, int32_t phases, const Tickets& tickets, const DispatchArgs& a) {
    return to_ffi_error(run_dispatch(call_group(b, phases, tickets), a, b.env));
  }

  static ffi::Error combine(Context, const Bound& b, int32_t phases, const Tickets& tickets, const CombineArgs& a) {
    return to_ffi_error(run_combine(call_group(b, phases, tickets), a, b.env));
  }
};

}  // namespace

std::array<TargetHandler, kNumTargets> cpu_target_handlers() { return target_handlers<Platform>(); }

}  // namespace jax_ll_ep::cpu
