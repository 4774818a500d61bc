// The CUDA module: its buffer registry, the six FFI handlers for platform "CUDA", and the Python bindings used by
// jax_ll_ep/_cuda_backend.py (bootstrap, state read-back, teardown).
//
// The handlers keep no per-call host state: they look up the buffer's (fixed) pointers, fill the argument structs
// and enqueue the kernels, which read and advance the call sequence in device memory. They are therefore declared
// command-buffer compatible, and XLA may capture them into CUDA graphs and replay them.
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda/launch.h"
#include "jax_ll_ep/args.h"
#include "jax_ll_ep/layout.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;
namespace ffi = xla::ffi;

namespace jax_ll_ep {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Registry: handle -> one buffer's device resources. Entries are created and destroyed from Python (outside jit),
// looked up by handlers (possibly from several XLA threads).
// ---------------------------------------------------------------------------------------------------------------
struct BufferEntry {
  CudaGroup group;                // everything the launchers need (device pointers)
  int device = 0;                 // CUDA ordinal
  void* workspace = nullptr;      // cudaMalloc
  uint8_t** regions = nullptr;    // cudaMalloc [R]
  int32_t* peer_pes = nullptr;    // cudaMalloc [R]
  uint32_t* host_flag = nullptr;  // cudaHostAlloc (mapped)
};

// One entry per (buffer handle, CUDA device): a process driving several GPUs of a buffer's mesh (the peer-access
// transport) holds one rank per GPU, each its own entry; with NVSHMEM a process holds exactly one.
using EntryKey = std::pair<int64_t, int>;
std::mutex g_mutex;
std::map<EntryKey, std::unique_ptr<BufferEntry>> g_buffers;

const char* error_name(uint32_t code) {
  switch (static_cast<ErrorCode>(code)) {
    case ErrorCode::kOk:
      return "no error";
    case ErrorCode::kTimeout:
      return "timeout (some peers' signals never came)";
    case ErrorCode::kSequenceMismatch:
      return "call sequence mismatch between ranks";
    case ErrorCode::kInvalidExpert:
      return "topk_idx entry outside [-1, num_experts)";
    case ErrorCode::kDuplicateExpert:
      return "expert repeated within a token's topk_idx row";
    case ErrorCode::kSplitMisuse:
      return "split send/recv misuse";
    case ErrorCode::kInvalidHandle:
      return "combine handle inconsistent with the dispatch";
    case ErrorCode::kBufferUnusable:
      return "send refused: an earlier call timed out or saw a sequence mismatch";
  }
  return "unknown error";
}

// A copy of the entry's launch data and error flag for the device the call runs on, or an error naming the handle.
ffi::ErrorOr<BufferEntry> lookup(int64_t buffer_id, int32_t device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_buffers.find({buffer_id, device});
  if (it == g_buffers.end()) {
    // XLA's device ordinal should be the CUDA ordinal the buffer registered (local_hardware_id); a process with a
    // single entry for the handle (the NVSHMEM transport: one GPU per process) uses it whatever the numbering.
    auto first = g_buffers.lower_bound({buffer_id, INT32_MIN});
    if (first != g_buffers.end() && first->first.first == buffer_id) {
      auto next = std::next(first);
      if (next == g_buffers.end() || next->first.first != buffer_id) return *first->second;
    }
    return ffi::Error::InvalidArgument("jax_ll_ep: buffer handle " + std::to_string(buffer_id) +
                                       " is not an open cuda buffer on CUDA device " + std::to_string(device) +
                                       " in this process (closed, created for another backend, or for a mesh "
                                       "without this device)");
  }
  return *it->second;
}

// Enqueues the call's kernels, then reports a launch failure, or an error that an EARLIER call's kernels recorded
// (the flag is read before this call's kernels are enqueued, so a call never reports its own, still running,
// kernels; the call is enqueued even then, so that the ranks stay in step).
template <typename Launch>
ffi::Error launch_and_report(const BufferEntry& b, int64_t buffer_id, Launch launch) {
  const uint32_t earlier = *reinterpret_cast<volatile uint32_t*>(b.host_flag);
  const cudaError_t status = launch();
  if (status != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_ll_ep: kernel launch failed: ") + cudaGetErrorString(status));
  }
  if (earlier != 0) {
    return ffi::Error::Internal("jax_ll_ep: buffer " + std::to_string(buffer_id) +
                                " recorded an error in an earlier call: " + error_name(earlier) +
                                ". This call was still enqueued so that the ranks stay in step. Call buf.check() for "
                                "the details (it raises the typed error and clears it).");
  }
  return ffi::Error::Success();
}

ffi::Error check_dims(const char* what, ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> want) {
  bool ok = dims.size() == want.size();
  size_t i = 0;
  for (int64_t w : want) {
    if (!ok) break;
    ok = dims[i++] == w;
  }
  if (ok) return ffi::Error::Success();
  std::string got = "[", exp = "[";
  for (size_t j = 0; j < dims.size(); ++j) got += (j ? ", " : "") + std::to_string(dims[j]);
  i = 0;
  for (int64_t w : want) exp += (i++ ? ", " : "") + std::to_string(w);
  return ffi::Error::InvalidArgument(std::string("jax_ll_ep: ") + what + " has shape " + got + "], expected " + exp +
                                     "]");
}

ffi::Error check_type(const char* what, ffi::DataType got, ffi::DataType want) {
  if (got == want) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("jax_ll_ep: ") + what + " has the wrong element type");
}

#define JLE_RETURN_IF_ERROR(expr) \
  do {                            \
    ffi::Error _e = (expr);       \
    if (_e.failure()) return _e;  \
  } while (0)

// x [n, H] bf16 and topk_idx [n, K] s32.
ffi::Error fill_dispatch_inputs(const Layout& l, ffi::AnyBuffer x, ffi::AnyBuffer topk, int32_t fp8_mode,
                                DispatchArgs& a) {
  if (fp8_mode < 0 || fp8_mode > 3) return ffi::Error::InvalidArgument("jax_ll_ep: fp8_mode must be 0..3");
  if (fp8_mode != 0 && l.hidden % kScaleBlock != 0) {
    return ffi::Error::InvalidArgument("jax_ll_ep: fp8 dispatch needs hidden to be a multiple of 128");
  }
  const auto xd = x.dimensions(), td = topk.dimensions();
  if (xd.size() != 2 || td.size() != 2) return ffi::Error::InvalidArgument("jax_ll_ep: x and topk_idx must be 2-D");
  const int64_t n = xd[0], k = td[1];
  if (n > l.max_tokens) return ffi::Error::InvalidArgument("jax_ll_ep: more tokens than max_tokens_per_rank");
  if (k < 1 || k > kMaxTopk) return ffi::Error::InvalidArgument("jax_ll_ep: K must be in [1, 32]");
  JLE_RETURN_IF_ERROR(check_dims("x", xd, {n, l.hidden}));
  JLE_RETURN_IF_ERROR(check_dims("topk_idx", td, {n, k}));
  JLE_RETURN_IF_ERROR(check_type("x", x.element_type(), ffi::DataType::BF16));
  JLE_RETURN_IF_ERROR(check_type("topk_idx", topk.element_type(), ffi::DataType::S32));
  a.x = static_cast<const uint16_t*>(x.untyped_data());
  a.topk_idx = static_cast<const int32_t*>(topk.untyped_data());
  a.num_tokens = static_cast<int32_t>(n);
  a.num_topk = static_cast<int32_t>(k);
  a.fp8_mode = static_cast<Fp8Mode>(fp8_mode);
  return ffi::Error::Success();
}

ffi::Error fill_dispatch_outputs(const Layout& l, int32_t fp8_mode, ffi::AnyBuffer recv_x, ffi::AnyBuffer recv_scale,
                                 ffi::AnyBuffer recv_count, ffi::AnyBuffer src_info, ffi::AnyBuffer layout_range,
                                 ffi::AnyBuffer src_topk_pos, DispatchArgs& a) {
  const int64_t el = l.num_local_experts, rows = static_cast<int64_t>(l.num_ranks) * l.max_tokens;
  JLE_RETURN_IF_ERROR(check_dims("recv_x", recv_x.dimensions(), {el, rows, l.hidden}));
  JLE_RETURN_IF_ERROR(
      check_type("recv_x", recv_x.element_type(), fp8_mode ? ffi::DataType::F8E4M3FN : ffi::DataType::BF16));
  if (fp8_mode != 0) {
    JLE_RETURN_IF_ERROR(check_dims("recv_scale", recv_scale.dimensions(), {el, rows, l.hidden / kScaleBlock}));
    JLE_RETURN_IF_ERROR(check_type("recv_scale", recv_scale.element_type(),
                                   fp8_mode == 3 ? ffi::DataType::F8E8M0FNU : ffi::DataType::F32));
  }
  JLE_RETURN_IF_ERROR(check_dims("recv_count", recv_count.dimensions(), {el}));
  JLE_RETURN_IF_ERROR(check_dims("src_info", src_info.dimensions(), {el, rows}));
  JLE_RETURN_IF_ERROR(check_dims("layout_range", layout_range.dimensions(), {el, l.num_ranks, 2}));
  JLE_RETURN_IF_ERROR(check_dims("src_topk_pos", src_topk_pos.dimensions(), {el, rows}));
  a.recv_x = recv_x.untyped_data();
  a.recv_scale = recv_scale.untyped_data();
  a.recv_count = static_cast<int32_t*>(recv_count.untyped_data());
  a.src_info = static_cast<int32_t*>(src_info.untyped_data());
  a.layout_range = static_cast<int32_t*>(layout_range.untyped_data());
  a.src_topk_pos = static_cast<int32_t*>(src_topk_pos.untyped_data());
  return ffi::Error::Success();
}

// y [E_l, R*T, H] bf16 and the handle.
ffi::Error fill_combine_sends(const Layout& l, ffi::AnyBuffer y, ffi::AnyBuffer src_info, ffi::AnyBuffer layout_range,
                              ffi::AnyBuffer src_topk_pos, CombineArgs& a) {
  const int64_t el = l.num_local_experts, rows = static_cast<int64_t>(l.num_ranks) * l.max_tokens;
  JLE_RETURN_IF_ERROR(check_dims("y", y.dimensions(), {el, rows, l.hidden}));
  JLE_RETURN_IF_ERROR(check_type("y", y.element_type(), ffi::DataType::BF16));
  JLE_RETURN_IF_ERROR(check_dims("src_info", src_info.dimensions(), {el, rows}));
  JLE_RETURN_IF_ERROR(check_dims("layout_range", layout_range.dimensions(), {el, l.num_ranks, 2}));
  JLE_RETURN_IF_ERROR(check_dims("src_topk_pos", src_topk_pos.dimensions(), {el, rows}));
  a.y = static_cast<const uint16_t*>(y.untyped_data());
  a.src_info = static_cast<const int32_t*>(src_info.untyped_data());
  a.layout_range = static_cast<const int32_t*>(layout_range.untyped_data());
  a.src_topk_pos = static_cast<const int32_t*>(src_topk_pos.untyped_data());
  return ffi::Error::Success();
}

// topk_idx [n, K] s32, topk_weights [n, K] f32, out [n, H] bf16.
ffi::Error fill_combine_receives(const Layout& l, ffi::AnyBuffer topk, ffi::AnyBuffer weights, ffi::AnyBuffer out,
                                 CombineArgs& a) {
  const auto td = topk.dimensions();
  if (td.size() != 2) return ffi::Error::InvalidArgument("jax_ll_ep: topk_idx must be 2-D");
  const int64_t n = td[0], k = td[1];
  if (n > l.max_tokens) return ffi::Error::InvalidArgument("jax_ll_ep: more tokens than max_tokens_per_rank");
  if (k < 1 || k > kMaxTopk) return ffi::Error::InvalidArgument("jax_ll_ep: K must be in [1, 32]");
  JLE_RETURN_IF_ERROR(check_type("topk_idx", topk.element_type(), ffi::DataType::S32));
  JLE_RETURN_IF_ERROR(check_dims("topk_weights", weights.dimensions(), {n, k}));
  JLE_RETURN_IF_ERROR(check_type("topk_weights", weights.element_type(), ffi::DataType::F32));
  JLE_RETURN_IF_ERROR(check_dims("out", out.dimensions(), {n, l.hidden}));
  a.topk_idx = static_cast<const int32_t*>(topk.untyped_data());
  a.topk_weights = static_cast<const float*>(weights.untyped_data());
  a.num_tokens = static_cast<int32_t>(n);
  a.num_topk = static_cast<int32_t>(k);
  a.out = static_cast<uint16_t*>(out.untyped_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------------
// Handlers. Operands: the ordering token first; results: the token last (jax_ll_ep/_ffi.py).
// ---------------------------------------------------------------------------------------------------------------
using Out = ffi::Result<ffi::AnyBuffer>;

ffi::Error dispatch_impl(cudaStream_t stream, int32_t device, ffi::Token, ffi::AnyBuffer x, ffi::AnyBuffer topk,
                         Out recv_x, Out recv_scale, Out recv_count, Out src_info, Out layout_range, Out src_topk_pos,
                         ffi::Result<ffi::Token>, int64_t buffer_id, int32_t fp8_mode) {
  auto b = lookup(buffer_id, device);
  if (b.has_error()) return b.error();
  DispatchArgs a = {};
  const Layout& l = b->group.group.layout;
  JLE_RETURN_IF_ERROR(fill_dispatch_inputs(l, x, topk, fp8_mode, a));
  JLE_RETURN_IF_ERROR(fill_dispatch_outputs(l, fp8_mode, *recv_x, *recv_scale, *recv_count, *src_info, *layout_range,
                                            *src_topk_pos, a));
  CudaGroup g = b->group;
  g.group.phases = kBothPhases;
  return launch_and_report(*b, buffer_id, [&] { return run_dispatch(g, a, stream); });
}

ffi::Error dispatch_send_impl(cudaStream_t stream, int32_t device, ffi::Token, ffi::AnyBuffer x, ffi::AnyBuffer topk,
                              Out ticket, ffi::Result<ffi::Token>, int64_t buffer_id, int32_t fp8_mode) {
  auto b = lookup(buffer_id, device);
  if (b.has_error()) return b.error();
  DispatchArgs a = {};
  JLE_RETURN_IF_ERROR(fill_dispatch_inputs(b->group.group.layout, x, topk, fp8_mode, a));
  CudaGroup g = b->group;
  g.group.phases = kSendPhase;
  g.group.ticket_out = static_cast<int32_t*>(ticket->untyped_data());
  return launch_and_report(*b, buffer_id, [&] { return run_dispatch(g, a, stream); });
}

ffi::Error dispatch_recv_impl(cudaStream_t stream, int32_t device, ffi::Token, ffi::AnyBuffer ticket, Out recv_x,
                              Out recv_scale, Out recv_count, Out src_info, Out layout_range, Out src_topk_pos,
                              ffi::Result<ffi::Token>, int64_t buffer_id, int32_t fp8_mode) {
  auto b = lookup(buffer_id, device);
  if (b.has_error()) return b.error();
  DispatchArgs a = {};
  a.fp8_mode = static_cast<Fp8Mode>(fp8_mode);
  JLE_RETURN_IF_ERROR(fill_dispatch_outputs(b->group.group.layout, fp8_mode, *recv_x, *recv_scale, *recv_count,
                                            *src_info, *layout_range, *src_topk_pos, a));
  CudaGroup g = b->group;
  g.group.phases = kRecvPhase;
  g.group.ticket_in = static_cast<const int32_t*>(ticket.untyped_data());
  return launch_and_report(*b, buffer_id, [&] { return run_dispatch(g, a, stream); });
}

ffi::Error combine_impl(cudaStream_t stream, int32_t device, ffi::Token, ffi::AnyBuffer y, ffi::AnyBuffer src_info,
                        ffi::AnyBuffer layout_range, ffi::AnyBuffer src_topk_pos, ffi::AnyBuffer topk,
                        ffi::AnyBuffer weights, Out out, ffi::Result<ffi::Token>, int64_t buffer_id) {
  auto b = lookup(buffer_id, device);
  if (b.has_error()) return b.error();
  CombineArgs a = {};
  const Layout& l = b->group.group.layout;
  JLE_RETURN_IF_ERROR(fill_combine_sends(l, y, src_info, layout_range, src_topk_pos, a));
  JLE_RETURN_IF_ERROR(fill_combine_receives(l, topk, weights, *out, a));
  CudaGroup g = b->group;
  g.group.phases = kBothPhases;
  return launch_and_report(*b, buffer_id, [&] { return run_combine(g, a, stream); });
}

ffi::Error combine_send_impl(cudaStream_t stream, int32_t device, ffi::Token, ffi::AnyBuffer y, ffi::AnyBuffer src_info,
                             ffi::AnyBuffer layout_range, ffi::AnyBuffer src_topk_pos, Out ticket,
                             ffi::Result<ffi::Token>, int64_t buffer_id) {
  auto b = lookup(buffer_id, device);
  if (b.has_error()) return b.error();
  CombineArgs a = {};
  JLE_RETURN_IF_ERROR(fill_combine_sends(b->group.group.layout, y, src_info, layout_range, src_topk_pos, a));
  CudaGroup g = b->group;
  g.group.phases = kSendPhase;
  g.group.ticket_out = static_cast<int32_t*>(ticket->untyped_data());
  return launch_and_report(*b, buffer_id, [&] { return run_combine(g, a, stream); });
}

ffi::Error combine_recv_impl(cudaStream_t stream, int32_t device, ffi::Token, ffi::AnyBuffer ticket,
                             ffi::AnyBuffer topk, ffi::AnyBuffer weights, Out out, ffi::Result<ffi::Token>,
                             int64_t buffer_id) {
  auto b = lookup(buffer_id, device);
  if (b.has_error()) return b.error();
  CombineArgs a = {};
  JLE_RETURN_IF_ERROR(fill_combine_receives(b->group.group.layout, topk, weights, *out, a));
  CudaGroup g = b->group;
  g.group.phases = kRecvPhase;
  g.group.ticket_in = static_cast<const int32_t*>(ticket.untyped_data());
  return launch_and_report(*b, buffer_id, [&] { return run_combine(g, a, stream); });
}

// Benchmarks: the device time at this point of the buffer's call sequence. `dep` only orders the stamp after the
// values it is computed from (the benchmarks pass a scalar that depends on the previous call's results).
ffi::Error timestamp_impl(cudaStream_t stream, int32_t /*device*/, ffi::Token, ffi::AnyBuffer dep, Out stamp,
                          ffi::Result<ffi::Token>, int64_t buffer_id) {
  JLE_RETURN_IF_ERROR(check_dims("stamp", stamp->dimensions(), {2}));
  JLE_RETURN_IF_ERROR(check_type("stamp", stamp->element_type(), ffi::DataType::S32));
  const cudaError_t status = record_timestamp(static_cast<uint32_t*>(stamp->untyped_data()), stream);
  if (status != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_ll_ep: timestamp launch failed: ") + cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

#undef JLE_RETURN_IF_ERROR

auto bind() {
  return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>().Arg<ffi::Token>();
}
constexpr auto kTraits = ffi::Traits::kCmdBufferCompatible;

XLA_FFI_DEFINE_HANDLER(kDispatch, dispatch_impl,
                       bind()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::Token>()
                           .Attr<int64_t>("buffer_id")
                           .Attr<int32_t>("fp8_mode"),
                       {kTraits});
XLA_FFI_DEFINE_HANDLER(kDispatchSend, dispatch_send_impl,
                       bind()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::Token>()
                           .Attr<int64_t>("buffer_id")
                           .Attr<int32_t>("fp8_mode"),
                       {kTraits});
XLA_FFI_DEFINE_HANDLER(kDispatchRecv, dispatch_recv_impl,
                       bind()
                           .Arg<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::Token>()
                           .Attr<int64_t>("buffer_id")
                           .Attr<int32_t>("fp8_mode"),
                       {kTraits});
XLA_FFI_DEFINE_HANDLER(kCombine, combine_impl,
                       bind()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::Token>()
                           .Attr<int64_t>("buffer_id"),
                       {kTraits});
XLA_FFI_DEFINE_HANDLER(kCombineSend, combine_send_impl,
                       bind()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::Token>()
                           .Attr<int64_t>("buffer_id"),
                       {kTraits});
XLA_FFI_DEFINE_HANDLER(kCombineRecv, combine_recv_impl,
                       bind()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Ret<ffi::Token>()
                           .Attr<int64_t>("buffer_id"),
                       {kTraits});
XLA_FFI_DEFINE_HANDLER(kTimestamp, timestamp_impl,
                       bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::Token>().Attr<int64_t>("buffer_id"),
                       {kTraits});

// ---------------------------------------------------------------------------------------------------------------
// Python bindings
// ---------------------------------------------------------------------------------------------------------------
void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("jax_ll_ep: ") + what + ": " + cudaGetErrorString(e));
}

Layout layout_or_throw(int32_t num_ranks, int32_t num_experts, int32_t max_tokens, int32_t hidden) {
  const Layout l = make_layout(num_ranks, num_experts, max_tokens, hidden);
  if (l.region_bytes == 0) throw std::invalid_argument("jax_ll_ep: invalid buffer shape for make_layout");
  return l;
}

// The most experts (E_l * R signal pairs) the kernels' shared-memory tables hold.
constexpr int32_t kMaxPairs = 4096;

void register_buffer(int64_t handle, int device, int32_t num_ranks, int32_t num_experts, int32_t max_tokens,
                     int32_t hidden, int32_t rank, uintptr_t region, const std::vector<uintptr_t>& peer_regions,
                     const std::vector<int32_t>& peer_pes, double timeout_s) {
  const Layout l = layout_or_throw(num_ranks, num_experts, max_tokens, hidden);
  if (l.num_pairs() > kMaxPairs) {
    throw std::invalid_argument("jax_ll_ep: the cuda backend supports at most " + std::to_string(kMaxPairs) +
                                " experts; num_experts=" + std::to_string(num_experts));
  }
  if (static_cast<int32_t>(peer_regions.size()) != num_ranks || static_cast<int32_t>(peer_pes.size()) != num_ranks ||
      rank < 0 || rank >= num_ranks) {
    throw std::invalid_argument("jax_ll_ep: peer tables must have one entry per rank");
  }
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_buffers.count({handle, device})) {
      throw std::invalid_argument("jax_ll_ep: buffer handle registered twice for one device");
    }
  }
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  int blocks_per_sm[kNumOps] = {1, 1};
  const cudaError_t prepared = prepare_kernels(l, device, blocks_per_sm);
  if (prepared != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error of the failed call
    throw std::invalid_argument(
        "jax_ll_ep: cannot prepare the cuda kernels (" + std::string(cudaGetErrorString(prepared)) +
        "): for num_experts=" + std::to_string(num_experts) + " and max_tokens_per_rank=" + std::to_string(max_tokens) +
        " a block needs " + std::to_string(std::max(dispatch_smem_bytes(l), combine_smem_bytes(l))) +
        " bytes of shared memory; if that is more than this GPU allows, lower max_tokens_per_rank or num_experts");
  }
  auto b = std::make_unique<BufferEntry>();
  b->device = device;
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check_cuda(cudaMalloc(&b->workspace, workspace_bytes(l)), "workspace allocation");
  check_cuda(cudaMemset(b->workspace, 0, workspace_bytes(l)), "workspace zeroing");
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&b->regions), sizeof(uint8_t*) * num_ranks), "peer table");
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&b->peer_pes), sizeof(int32_t) * num_ranks), "peer table");
  std::vector<uint8_t*> regions(num_ranks);
  bool use_put = false;
  for (int r = 0; r < num_ranks; ++r) {
    regions[r] = reinterpret_cast<uint8_t*>(peer_regions[r]);
    use_put = use_put || regions[r] == nullptr;
  }
  check_cuda(cudaMemcpy(b->regions, regions.data(), sizeof(uint8_t*) * num_ranks, cudaMemcpyHostToDevice), "copy");
  check_cuda(cudaMemcpy(b->peer_pes, peer_pes.data(), sizeof(int32_t) * num_ranks, cudaMemcpyHostToDevice), "copy");
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&b->host_flag), sizeof(uint32_t), cudaHostAllocMapped),
             "host-mapped error flag");
  *b->host_flag = 0;
  uint32_t* device_flag = nullptr;
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_flag), b->host_flag, 0), "error flag");
  // Zeroed signals hold sequence number 0, which no call uses: nothing in the region can pass for a signal.
  check_cuda(cudaMemset(reinterpret_cast<void*>(region), 0, static_cast<size_t>(l.region_bytes)), "region zeroing");
  check_cuda(cudaDeviceSynchronize(), "region zeroing");

  CudaGroup& g = b->group;
  g.group.layout = l;
  g.group.rank = rank;
  g.group.regions = b->regions;
  g.group.phases = kBothPhases;
  g.group.timeout_s = timeout_s;
  g.peer_pes = b->peer_pes;
  g.local_region = reinterpret_cast<uint8_t*>(region);
  g.workspace = carve_workspace(b->workspace, l);
  g.error_flag = device_flag;
  g.num_sms = sms;
  for (int op = 0; op < kNumOps; ++op) g.max_blocks[op] = sms * (blocks_per_sm[op] > 0 ? blocks_per_sm[op] : 1);
  g.use_put = use_put ? 1 : 0;
  const char* trace = std::getenv("JAX_LL_EP_TRACE");
  g.trace = trace != nullptr && std::strcmp(trace, "1") == 0 ? 1 : 0;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_buffers[{handle, device}] = std::move(b);
}

std::unique_ptr<BufferEntry> take(int64_t handle, int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_buffers.find({handle, device});
  if (it == g_buffers.end()) return nullptr;
  auto b = std::move(it->second);
  g_buffers.erase(it);
  return b;
}

BufferEntry& entry(int64_t handle, int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_buffers.find({handle, device});
  if (it == g_buffers.end()) throw std::invalid_argument("jax_ll_ep: unknown cuda buffer handle for this device");
  return *it->second;
}

// Frees the buffer's private resources after all of this process's work on the device has finished. The
// symmetric region itself is freed collectively by Python (nvshmem4py).
void unregister_buffer(int64_t handle, int device) {
  std::unique_ptr<BufferEntry> b = take(handle, device);
  if (!b) return;
  cudaSetDevice(b->device);
  cudaDeviceSynchronize();
  cudaFree(b->workspace);
  cudaFree(b->regions);
  cudaFree(b->peer_pes);
  cudaFreeHost(b->host_flag);
}

// The rank's RankState and missing table, after a device synchronisation (every enqueued call has finished).
nb::dict read_state(int64_t handle, int device) {
  BufferEntry& b = entry(handle, device);
  const Layout& l = b.group.group.layout;
  check_cuda(cudaSetDevice(b.device), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "synchronize before reading the error record");
  RankState s;
  check_cuda(cudaMemcpy(&s, l.state(b.group.local_region), sizeof(s), cudaMemcpyDeviceToHost), "read RankState");
  std::string missing(static_cast<size_t>(l.num_pairs()), '\0');
  check_cuda(cudaMemcpy(missing.data(), l.missing(b.group.local_region), missing.size(), cudaMemcpyDeviceToHost),
             "read missing table");
  nb::dict d;
  d["seq"] = s.seq;
  d["open_seq"] = s.open_seq;
  d["open_kind"] = s.open_kind;
  d["error_code"] = s.error_code;
  d["error_kind"] = s.error_kind;
  d["error_seq"] = s.error_seq;
  d["error_detail"] = s.error_detail;
  d["error_count"] = s.error_count;
  d["error_token"] = s.error_token;
  d["error_topk_pos"] = s.error_topk_pos;
  d["error_signal"] = s.error_signal;
  d["missing"] = nb::bytes(missing.data(), missing.size());
  d["num_ranks"] = l.num_ranks;
  d["num_local_experts"] = l.num_local_experts;
  return d;
}

// Clears the error record, the missing table and the host flag (after a device synchronisation).
void clear_error(int64_t handle, int device) {
  BufferEntry& b = entry(handle, device);
  const Layout& l = b.group.group.layout;
  check_cuda(cudaSetDevice(b.device), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "synchronize before clearing the error record");
  RankState s;
  RankState* dev = l.state(b.group.local_region);
  check_cuda(cudaMemcpy(&s, dev, sizeof(s), cudaMemcpyDeviceToHost), "read RankState");
  s.error_code = 0;
  s.error_kind = 0;
  s.error_seq = 0;
  s.error_detail = 0;
  s.error_count = 0;
  s.error_token = 0;
  s.error_topk_pos = 0;
  s.error_signal = 0;
  s.open_error = 0;
  check_cuda(cudaMemcpy(dev, &s, sizeof(s), cudaMemcpyHostToDevice), "write RankState");
  check_cuda(cudaMemset(l.missing(b.group.local_region), 0, static_cast<size_t>(l.num_pairs())), "clear missing");
  check_cuda(cudaDeviceSynchronize(), "clear error record");
  *reinterpret_cast<volatile uint32_t*>(b.host_flag) = 0;
}

// The phase trace (launch.h) of the buffer's recent calls, after a device synchronisation: kTraceRows rows of
// kTraceMarks uint64 words as bytes (all zero unless the buffer was created with JAX_LL_EP_TRACE=1).
nb::bytes read_trace(int64_t handle, int device) {
  BufferEntry& b = entry(handle, device);
  check_cuda(cudaSetDevice(b.device), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "synchronize before reading the trace");
  std::string rows(sizeof(uint64_t) * kTraceRows * kTraceMarks, '\0');
  check_cuda(cudaMemcpy(rows.data(), b.group.workspace.trace, rows.size(), cudaMemcpyDeviceToHost), "read trace");
  return nb::bytes(rows.data(), rows.size());
}

// The peer-access transport (one process, several GPUs): each rank's region is a plain device allocation on its GPU,
// and every GPU of the group maps every other's through peer access, so the kernels' peer pointers are the
// allocations themselves.
uintptr_t alloc_region(int device, int64_t bytes) {
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  void* p = nullptr;
  check_cuda(cudaMalloc(&p, static_cast<size_t>(bytes)), "region allocation");
  return reinterpret_cast<uintptr_t>(p);
}

void free_region(int device, uintptr_t region) {
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "synchronize before freeing a region");
  check_cuda(cudaFree(reinterpret_cast<void*>(region)), "region free");
}

void enable_peer_access(const std::vector<int>& devices) {
  for (int from : devices) {
    for (int to : devices) {
      if (from == to) continue;
      int can = 0;
      check_cuda(cudaDeviceCanAccessPeer(&can, from, to), "cudaDeviceCanAccessPeer");
      if (!can) {
        throw std::runtime_error("jax_ll_ep: CUDA device " + std::to_string(from) + " cannot access device " +
                                 std::to_string(to) +
                                 " as a peer; one process driving several GPUs needs peer access between all of "
                                 "them (NVLink or PCIe P2P), else run one process per GPU (NVSHMEM)");
      }
      check_cuda(cudaSetDevice(from), "cudaSetDevice");
      const cudaError_t e = cudaDeviceEnablePeerAccess(to, 0);
      if (e == cudaErrorPeerAccessAlreadyEnabled) {
        cudaGetLastError();  // (not sticky) clear it
      } else {
        check_cuda(e, "cudaDeviceEnablePeerAccess");
      }
    }
  }
}

nb::capsule handler_capsule(XLA_FFI_Handler* h) { return nb::capsule(reinterpret_cast<void*>(h)); }

}  // namespace
}  // namespace jax_ll_ep

NB_MODULE(_jax_ll_ep_cuda, m) {
  using namespace jax_ll_ep;
  m.doc() = "jax_ll_ep CUDA backend: NVSHMEM-based dispatch/combine kernels as XLA FFI handlers";
  m.def("ffi_handlers", []() {
    nb::dict d;
    d["jax_ll_ep_dispatch"] = handler_capsule(kDispatch);
    d["jax_ll_ep_dispatch_send"] = handler_capsule(kDispatchSend);
    d["jax_ll_ep_dispatch_recv"] = handler_capsule(kDispatchRecv);
    d["jax_ll_ep_combine"] = handler_capsule(kCombine);
    d["jax_ll_ep_combine_send"] = handler_capsule(kCombineSend);
    d["jax_ll_ep_combine_recv"] = handler_capsule(kCombineRecv);
    d["jax_ll_ep_timestamp"] = handler_capsule(kTimestamp);  // benchmarks/ only
    return d;
  });
  m.def(
      "region_bytes",
      [](int32_t num_ranks, int32_t num_experts, int32_t max_tokens, int32_t hidden) {
        return layout_or_throw(num_ranks, num_experts, max_tokens, hidden).region_bytes;
      },
      nb::arg("num_ranks"), nb::arg("num_experts"), nb::arg("max_tokens"), nb::arg("hidden"));
  m.def("max_experts", []() { return kMaxPairs; });
  m.def("nvshmem_init", &nvshmem_module_init, "Registers this module's NVSHMEM device state (returns 0 on success).");
  m.def("nvshmem_finalize", &nvshmem_module_finalize);
  m.def("register_buffer", &register_buffer, nb::arg("handle"), nb::arg("device"), nb::arg("num_ranks"),
        nb::arg("num_experts"), nb::arg("max_tokens"), nb::arg("hidden"), nb::arg("rank"), nb::arg("region"),
        nb::arg("peer_regions"), nb::arg("peer_pes"), nb::arg("timeout_s"));
  m.def("unregister_buffer", &unregister_buffer, nb::arg("handle"), nb::arg("device"));
  m.def("read_state", &read_state, nb::arg("handle"), nb::arg("device"));
  m.def("clear_error", &clear_error, nb::arg("handle"), nb::arg("device"));
  m.def("read_trace", &read_trace, nb::arg("handle"), nb::arg("device"));
  m.def("alloc_region", &alloc_region, nb::arg("device"), nb::arg("bytes"));
  m.def("free_region", &free_region, nb::arg("device"), nb::arg("region"));
  m.def("enable_peer_access", &enable_peer_access, nb::arg("devices"));
  m.def("trace_shape", []() { return nb::make_tuple(kTraceRows, kTraceMarks); });
  m.def(
      "mem_get_info",
      [](int device) {
        check_cuda(cudaSetDevice(device), "cudaSetDevice");
        size_t free_bytes = 0, total = 0;
        check_cuda(cudaMemGetInfo(&free_bytes, &total), "cudaMemGetInfo");
        return nb::make_tuple(free_bytes, total);
      },
      nb::arg("device"));
  m.def(
      "multiprocessor_count",
      [](int device) {
        int sms = 0;
        check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
        return sms;
      },
      nb::arg("device"));
}
