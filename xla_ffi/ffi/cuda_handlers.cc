// The CUDA platform of the FFI targets (ffi/targets.h): how a call finds its rank's entry in cuda/registry.h and
// enqueues the kernels (cuda/launch.h); plus jax_ll_ep_timestamp, a target of the benchmarks only.
//
// The handlers keep no per-call host state: they take the entry's (fixed) pointers, fill the argument structs and
// enqueue the kernels, which read and advance the call sequence in device memory. They are therefore declared
// command-buffer compatible, and XLA may capture them into CUDA graphs and replay them.
#include "ffi/cuda_handlers.h"

#include <cuda_runtime.h>

#include <memory>
#include <string>

#include "cuda/launch.h"
#include "cuda/registry.h"
#include "jax_ll_ep/args.h"
#include "jax_ll_ep/errors.h"

namespace jax_ll_ep::cuda {
namespace {

// The execution context of a CUDA call: XLA's stream and the device it runs on.
struct CallMembers {
  cudaStream_t stream;
  int32_t device;
};
using Context = PlatformContext<CallMembers, ffi::PlatformStream<cudaStream_t>, ffi::DeviceOrdinal>;

struct Platform {
  using Context = cuda::Context;
  static constexpr bool kCommandBufferCompatible = true;

  struct Bound {
    std::shared_ptr<const BufferEntry> entry;
    const Layout& layout() const { return entry->layout(); }
  };

  static ffi::ErrorOr<Bound> bind(Context ctx, int64_t buffer_id, const std::string& op) {
    bool known = false;
    std::shared_ptr<const BufferEntry> entry = Registry::instance().find(buffer_id, ctx.device, &known);
    if (entry == nullptr) {
      return known ? device_not_in_buffer(op, buffer_id, ctx.device) : buffer_not_open(op, buffer_id, "cuda");
    }
    return Bound{std::move(entry)};
  }

  static CudaGroup call_args(const Bound& b, int32_t phases, const Tickets& tickets) {
    CudaGroup g = b.entry->kernel_args;
    g.group.phases = phases;
    g.group.ticket_out = tickets.out;
    g.group.ticket_in = tickets.in;
    return g;
  }

  // Enqueues the call's kernels, then reports a launch failure, or an error that an EARLIER call's kernels recorded
  // (the flag is read before this call's kernels are enqueued, so a call never reports its own, still running,
  // kernels; the call is enqueued even then, so that the ranks stay in step).
  template <typename Launch>
  static ffi::Error launch_and_report(const BufferEntry& b, Launch launch) {
    const uint32_t earlier = b.recorded_error();
    const cudaError_t status = launch();
    if (status != cudaSuccess) {
      return ffi::Error::Internal(std::string("jax_ll_ep: kernel launch failed: ") + cudaGetErrorString(status));
    }
    if (earlier != 0) {
      return ffi::Error::Internal("jax_ll_ep: buffer " + std::to_string(b.handle) +
                                  " recorded an error in an earlier call: " + error_name(earlier).summary +
                                  ". This call was still enqueued so that the ranks stay in step. Call buf.check() "
                                  "for the details (it raises the typed error and clears it).");
    }
    return ffi::Error::Success();
  }

  static ffi::Error dispatch(Context ctx, const Bound& b, int32_t phases, const Tickets& tickets,
                             const DispatchArgs& a) {
    const CudaGroup g = call_args(b, phases, tickets);
    return launch_and_report(*b.entry, [&] { return run_dispatch(g, a, ctx.stream); });
  }

  static ffi::Error combine(Context ctx, const Bound& b, int32_t phases, const Tickets& tickets, const CombineArgs& a) {
    const CudaGroup g = call_args(b, phases, tickets);
    return launch_and_report(*b.entry, [&] { return run_combine(g, a, ctx.stream); });
  }
};

// jax_ll_ep_timestamp (benchmarks only): dep -> stamp int32[2], the device time at this point of the buffer's call
// sequence. `dep` only orders the stamp after the values it is computed from (the benchmarks pass a scalar that
// depends on the previous call's results); the buffer's ordering token orders it among the buffer's calls.
ffi::Error timestamp(Context ctx, ffi::Token, ffi::AnyBuffer dep, Out stamp, TokenOut, BufferId) {
  OperandCheck check("jax_ll_ep_timestamp");
  check.expect("stamp", *stamp, ffi::DataType::S32, {2});
  if (!check.ok()) return check.result();
  const cudaError_t status = record_timestamp(static_cast<uint32_t*>(stamp->untyped_data()), ctx.stream);
  if (status != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_ll_ep: timestamp launch failed: ") + cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

}  // namespace

std::array<TargetHandler, kNumTargets> cuda_target_handlers() { return target_handlers<Platform>(); }

TargetHandler cuda_timestamp_handler() { return {"jax_ll_ep_timestamp", bound_handler<Platform, &timestamp>}; }

}  // namespace jax_ll_ep::cuda
