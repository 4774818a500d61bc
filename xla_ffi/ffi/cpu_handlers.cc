// XLA FFI handlers of the CPU backend: decode the call, check shapes against the buffer, fill GroupArgs /
// DispatchArgs / CombineArgs and run the protocol (xla_ffi/cpu/protocol.cc). The only CPU file that sees XLA.
//
// Every target takes the ordering token first and returns a token last (jax_ll_ep/_ffi.py); the attribute
// buffer_id names the buffer in cpu/registry.h and the device ordinal (on CPU: the global device id) names this
// rank's place in it. The handlers keep no per-call host state: the sequence number and the open split call live
// in the rank's RankState.
#include "ffi/cpu_handlers.h"

#include <string>
#include <vector>

#include "cpu/protocol.h"
#include "cpu/registry.h"
#include "jax_ll_ep/args.h"
#include "jax_ll_ep/layout.h"

namespace ffi = xla::ffi;

namespace jax_ll_ep::cpu {
namespace {

std::string shape_text(ffi::AnyBuffer::Dimensions dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + "]";
}

std::string shape_text(const std::vector<int64_t>& dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + "]";
}

// "" if `buffer` has this dtype and shape, else a message naming it. The Python ops validate first; this is the
// native side's guard against a mismatched lowering ever addressing out of bounds.
std::string check_buffer(const std::string& op, const char* name, const ffi::AnyBuffer& buffer, ffi::DataType dtype,
                         const std::vector<int64_t>& dims) {
  const auto actual = buffer.dimensions();
  bool same = buffer.element_type() == dtype && actual.size() == dims.size();
  for (size_t i = 0; same && i < dims.size(); ++i) same = actual[i] == dims[i];
  if (same) return "";
  return op + ": " + name + " has dtype code " + std::to_string(static_cast<int>(buffer.element_type())) +
         " and shape " + shape_text(actual) + "; the buffer expects dtype code " +
         std::to_string(static_cast<int>(dtype)) + " and shape " + shape_text(dims);
}

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

// The buffer and this device's place in it, for one call.
struct Bound {
  Registry::Resolved resolved;  // holds the entry (and its memory) alive for the call
  GroupArgs group = {};
  CallEnv env = {};
  int64_t rows = 0;        // R * T
  int64_t num_scales = 0;  // H / 128
};

std::string bind(const std::string& op, int64_t buffer_id, int32_t device, int32_t phases, Bound* out) {
  out->resolved = Registry::instance().resolve(buffer_id);
  const BufferEntry* entry = out->resolved.entry.get();
  if (entry == nullptr) {
    return op + ": buffer handle " + std::to_string(buffer_id) +
           " is not open in this process's cpu backend (closed, or created with another backend)";
  }
  const auto it = entry->devices.find(device);
  if (it == entry->devices.end()) {
    return op + ": device " + std::to_string(device) + " is not a device of buffer " + std::to_string(buffer_id) +
           "'s mesh in this process; use the buffer inside shard_map over the mesh it was created with";
  }
  const Layout& layout = entry->layout;
  out->group.layout = layout;
  out->group.rank = it->second.rank;
  out->group.regions = entry->regions[it->second.group].data();
  out->group.phases = phases;
  out->group.timeout_s = entry->timeout_s;
  out->env.group = it->second.group;
  out->env.record_lock = &out->resolved.entry->record_lock;
  out->env.hooks = out->resolved.hooks.get();
  out->rows = static_cast<int64_t>(layout.num_ranks) * layout.max_tokens;
  out->num_scales = (layout.hidden + kScaleBlock - 1) / kScaleBlock;
  return "";
}

// The split forms' ticket (int32[1]): written by a send-only call, read by a receive-only call (null: not this form).
std::string bind_tickets(const std::string& op, ffi::AnyBuffer* ticket_out, const ffi::AnyBuffer* ticket_in,
                         GroupArgs* group) {
  std::string error;
  if (ticket_out != nullptr) {
    error += check_buffer(op, "ticket", *ticket_out, ffi::DataType::S32, {1});
    group->ticket_out = static_cast<int32_t*>(ticket_out->untyped_data());
  }
  if (ticket_in != nullptr) {
    error += check_buffer(op, "ticket", *ticket_in, ffi::DataType::S32, {1});
    group->ticket_in = static_cast<const int32_t*>(ticket_in->untyped_data());
  }
  return error;
}

std::string op_label(const char* base, int32_t phases) {
  return std::string("jax_ll_ep_") + base + (phases == kSendPhase ? "_send" : phases == kRecvPhase ? "_recv" : "");
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch (fused, send half, receive half)
// ---------------------------------------------------------------------------------------------------------------
struct DispatchBuffers {
  const ffi::AnyBuffer* x = nullptr;          // send
  const ffi::AnyBuffer* topk_idx = nullptr;   // send
  const ffi::AnyBuffer* ticket_in = nullptr;  // receive-only
  ffi::AnyBuffer* ticket_out = nullptr;       // send-only
  ffi::AnyBuffer* outputs[6] = {};            // receive: recv_x, recv_scale, recv_count, src_info, layout_range,
                                              // src_topk_pos
};

ffi::Error dispatch(int32_t phases, int32_t device, int64_t buffer_id, int32_t fp8_mode, const DispatchBuffers& b) {
  const std::string op = op_label("dispatch", phases);
  Bound bound;
  if (std::string error = bind(op, buffer_id, device, phases, &bound); !error.empty()) {
    return ffi::Error::InvalidArgument(error);
  }
  const Layout& layout = bound.group.layout;
  const int64_t e_local = layout.num_local_experts;
  const int64_t hidden = layout.hidden;
  if (fp8_mode < 0 || fp8_mode > 3) return ffi::Error::InvalidArgument(op + ": fp8_mode must be 0..3");
  const auto mode = static_cast<Fp8Mode>(fp8_mode);
  if (mode != Fp8Mode::kNone && hidden % kScaleBlock != 0) {
    return ffi::Error::InvalidArgument(op + ": fp8 dispatch needs hidden to be a multiple of 128");
  }

  DispatchArgs args = {};
  args.fp8_mode = mode;
  std::string error;
  if (phases & kSendPhase) {
    const auto x_dims = b.x->dimensions();
    const auto k_dims = b.topk_idx->dimensions();
    const int64_t n = x_dims.size() == 2 ? x_dims[0] : -1;
    const int64_t k = k_dims.size() == 2 ? k_dims[1] : -1;
    if (n < 0 || n > layout.max_tokens) {
      return ffi::Error::InvalidArgument(op + ": x must be [n <= " + std::to_string(layout.max_tokens) + ", " +
                                         std::to_string(hidden) + "], got " + shape_text(x_dims));
    }
    if (k < 1 || k > kMaxTopk) {
      return ffi::Error::InvalidArgument(op + ": topk_idx must be [n, 1 <= K <= 32], got " + shape_text(k_dims));
    }
    error += check_buffer(op, "x", *b.x, ffi::DataType::BF16, {n, hidden});
    error += check_buffer(op, "topk_idx", *b.topk_idx, ffi::DataType::S32, {n, k});
    args.x = static_cast<const uint16_t*>(b.x->untyped_data());
    args.topk_idx = static_cast<const int32_t*>(b.topk_idx->untyped_data());
    args.num_tokens = static_cast<int32_t>(n);
    args.num_topk = static_cast<int32_t>(k);
  }
  if (phases & kRecvPhase) {
    const int64_t rows = bound.rows;
    const bool fp8 = mode != Fp8Mode::kNone;
    error += check_buffer(op, "recv_x", *b.outputs[0], fp8 ? ffi::DataType::F8E4M3FN : ffi::DataType::BF16,
                          {e_local, rows, hidden});
    if (fp8) {
      error += check_buffer(op, "recv_scale", *b.outputs[1],
                            mode == Fp8Mode::kUe8m0Scale ? ffi::DataType::F8E8M0FNU : ffi::DataType::F32,
                            {e_local, rows, bound.num_scales});
    }
    error += check_buffer(op, "recv_count", *b.outputs[2], ffi::DataType::S32, {e_local});
    error += check_buffer(op, "src_info", *b.outputs[3], ffi::DataType::S32, {e_local, rows});
    error += check_buffer(op, "layout_range", *b.outputs[4], ffi::DataType::S32, {e_local, layout.num_ranks, 2});
    error += check_buffer(op, "src_topk_pos", *b.outputs[5], ffi::DataType::S32, {e_local, rows});
    args.recv_x = b.outputs[0]->untyped_data();
    args.recv_scale = fp8 ? b.outputs[1]->untyped_data() : nullptr;
    args.recv_count = static_cast<int32_t*>(b.outputs[2]->untyped_data());
    args.src_info = static_cast<int32_t*>(b.outputs[3]->untyped_data());
    args.layout_range = static_cast<int32_t*>(b.outputs[4]->untyped_data());
    args.src_topk_pos = static_cast<int32_t*>(b.outputs[5]->untyped_data());
  }
  error += bind_tickets(op, b.ticket_out, b.ticket_in, &bound.group);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  return to_ffi_error(run_dispatch(bound.group, args, bound.env));
}

ffi::Error DispatchImpl(int32_t device, ffi::Token, ffi::AnyBuffer x, ffi::AnyBuffer topk_idx,
                        ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::AnyBuffer> recv_scale,
                        ffi::Result<ffi::AnyBuffer> recv_count, ffi::Result<ffi::AnyBuffer> src_info,
                        ffi::Result<ffi::AnyBuffer> layout_range, ffi::Result<ffi::AnyBuffer> src_topk_pos,
                        ffi::Result<ffi::Token>, int64_t buffer_id, int32_t fp8_mode) {
  DispatchBuffers b;
  b.x = &x;
  b.topk_idx = &topk_idx;
  ffi::AnyBuffer* outs[6] = {&*recv_x, &*recv_scale, &*recv_count, &*src_info, &*layout_range, &*src_topk_pos};
  std::copy(outs, outs + 6, b.outputs);
  return dispatch(kBothPhases, device, buffer_id, fp8_mode, b);
}

ffi::Error DispatchSendImpl(int32_t device, ffi::Token, ffi::AnyBuffer x, ffi::AnyBuffer topk_idx,
                            ffi::Result<ffi::AnyBuffer> ticket, ffi::Result<ffi::Token>, int64_t buffer_id,
                            int32_t fp8_mode) {
  DispatchBuffers b;
  b.x = &x;
  b.topk_idx = &topk_idx;
  b.ticket_out = &*ticket;
  return dispatch(kSendPhase, device, buffer_id, fp8_mode, b);
}

ffi::Error DispatchRecvImpl(int32_t device, ffi::Token, ffi::AnyBuffer ticket, ffi::Result<ffi::AnyBuffer> recv_x,
                            ffi::Result<ffi::AnyBuffer> recv_scale, ffi::Result<ffi::AnyBuffer> recv_count,
                            ffi::Result<ffi::AnyBuffer> src_info, ffi::Result<ffi::AnyBuffer> layout_range,
                            ffi::Result<ffi::AnyBuffer> src_topk_pos, ffi::Result<ffi::Token>, int64_t buffer_id,
                            int32_t fp8_mode) {
  DispatchBuffers b;
  b.ticket_in = &ticket;
  ffi::AnyBuffer* outs[6] = {&*recv_x, &*recv_scale, &*recv_count, &*src_info, &*layout_range, &*src_topk_pos};
  std::copy(outs, outs + 6, b.outputs);
  return dispatch(kRecvPhase, device, buffer_id, fp8_mode, b);
}

// ---------------------------------------------------------------------------------------------------------------
// Combine (fused, send half, receive half)
// ---------------------------------------------------------------------------------------------------------------
struct CombineBuffers {
  const ffi::AnyBuffer* y = nullptr;  // send: y and the dispatch handle
  const ffi::AnyBuffer* src_info = nullptr;
  const ffi::AnyBuffer* layout_range = nullptr;
  const ffi::AnyBuffer* src_topk_pos = nullptr;
  const ffi::AnyBuffer* topk_idx = nullptr;  // receive: routing, weights, output
  const ffi::AnyBuffer* topk_weights = nullptr;
  ffi::AnyBuffer* out = nullptr;
  const ffi::AnyBuffer* ticket_in = nullptr;
  ffi::AnyBuffer* ticket_out = nullptr;
};

ffi::Error combine(int32_t phases, int32_t device, int64_t buffer_id, const CombineBuffers& b) {
  const std::string op = op_label("combine", phases);
  Bound bound;
  if (std::string error = bind(op, buffer_id, device, phases, &bound); !error.empty()) {
    return ffi::Error::InvalidArgument(error);
  }
  const Layout& layout = bound.group.layout;
  const int64_t e_local = layout.num_local_experts;
  const int64_t hidden = layout.hidden;
  CombineArgs args = {};
  std::string error;
  if (phases & kSendPhase) {
    error += check_buffer(op, "y", *b.y, ffi::DataType::BF16, {e_local, bound.rows, hidden});
    error += check_buffer(op, "src_info", *b.src_info, ffi::DataType::S32, {e_local, bound.rows});
    error += check_buffer(op, "layout_range", *b.layout_range, ffi::DataType::S32, {e_local, layout.num_ranks, 2});
    error += check_buffer(op, "src_topk_pos", *b.src_topk_pos, ffi::DataType::S32, {e_local, bound.rows});
    args.y = static_cast<const uint16_t*>(b.y->untyped_data());
    args.src_info = static_cast<const int32_t*>(b.src_info->untyped_data());
    args.layout_range = static_cast<const int32_t*>(b.layout_range->untyped_data());
    args.src_topk_pos = static_cast<const int32_t*>(b.src_topk_pos->untyped_data());
  }
  if (phases & kRecvPhase) {
    const auto k_dims = b.topk_idx->dimensions();
    const int64_t n = k_dims.size() == 2 ? k_dims[0] : -1;
    const int64_t k = k_dims.size() == 2 ? k_dims[1] : -1;
    if (n < 0 || n > layout.max_tokens || k < 1 || k > kMaxTopk) {
      return ffi::Error::InvalidArgument(op + ": topk_idx must be [n <= " + std::to_string(layout.max_tokens) +
                                         ", 1 <= K <= 32], got " + shape_text(k_dims));
    }
    error += check_buffer(op, "topk_idx", *b.topk_idx, ffi::DataType::S32, {n, k});
    error += check_buffer(op, "topk_weights", *b.topk_weights, ffi::DataType::F32, {n, k});
    error += check_buffer(op, "out", *b.out, ffi::DataType::BF16, {n, hidden});
    args.topk_idx = static_cast<const int32_t*>(b.topk_idx->untyped_data());
    args.topk_weights = static_cast<const float*>(b.topk_weights->untyped_data());
    args.out = static_cast<uint16_t*>(b.out->untyped_data());
    args.num_tokens = static_cast<int32_t>(n);
    args.num_topk = static_cast<int32_t>(k);
  }
  error += bind_tickets(op, b.ticket_out, b.ticket_in, &bound.group);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  return to_ffi_error(run_combine(bound.group, args, bound.env));
}

ffi::Error CombineImpl(int32_t device, ffi::Token, ffi::AnyBuffer y, ffi::AnyBuffer src_info,
                       ffi::AnyBuffer layout_range, ffi::AnyBuffer src_topk_pos, ffi::AnyBuffer topk_idx,
                       ffi::AnyBuffer topk_weights, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Token>,
                       int64_t buffer_id) {
  CombineBuffers b;
  b.y = &y;
  b.src_info = &src_info;
  b.layout_range = &layout_range;
  b.src_topk_pos = &src_topk_pos;
  b.topk_idx = &topk_idx;
  b.topk_weights = &topk_weights;
  b.out = &*out;
  return combine(kBothPhases, device, buffer_id, b);
}

ffi::Error CombineSendImpl(int32_t device, ffi::Token, ffi::AnyBuffer y, ffi::AnyBuffer src_info,
                           ffi::AnyBuffer layout_range, ffi::AnyBuffer src_topk_pos, ffi::Result<ffi::AnyBuffer> ticket,
                           ffi::Result<ffi::Token>, int64_t buffer_id) {
  CombineBuffers b;
  b.y = &y;
  b.src_info = &src_info;
  b.layout_range = &layout_range;
  b.src_topk_pos = &src_topk_pos;
  b.ticket_out = &*ticket;
  return combine(kSendPhase, device, buffer_id, b);
}

ffi::Error CombineRecvImpl(int32_t device, ffi::Token, ffi::AnyBuffer ticket, ffi::AnyBuffer topk_idx,
                           ffi::AnyBuffer topk_weights, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Token>,
                           int64_t buffer_id) {
  CombineBuffers b;
  b.ticket_in = &ticket;
  b.topk_idx = &topk_idx;
  b.topk_weights = &topk_weights;
  b.out = &*out;
  return combine(kRecvPhase, device, buffer_id, b);
}

}  // namespace
}  // namespace jax_ll_ep::cpu

using jax_ll_ep::cpu::CombineImpl;
using jax_ll_ep::cpu::CombineRecvImpl;
using jax_ll_ep::cpu::CombineSendImpl;
using jax_ll_ep::cpu::DispatchImpl;
using jax_ll_ep::cpu::DispatchRecvImpl;
using jax_ll_ep::cpu::DispatchSendImpl;

// One binding per target: the device ordinal, the ordering token, the operands of the brief's table, the results,
// the token result, then the attributes.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxLlEpCpuDispatch, DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Token>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // topk_idx
                                  .Ret<ffi::AnyBuffer>()  // recv_x
                                  .Ret<ffi::AnyBuffer>()  // recv_scale
                                  .Ret<ffi::AnyBuffer>()  // recv_count
                                  .Ret<ffi::AnyBuffer>()  // src_info
                                  .Ret<ffi::AnyBuffer>()  // layout_range
                                  .Ret<ffi::AnyBuffer>()  // src_topk_pos
                                  .Ret<ffi::Token>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int32_t>("fp8_mode"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxLlEpCpuDispatchSend, DispatchSendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Token>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // topk_idx
                                  .Ret<ffi::AnyBuffer>()  // ticket
                                  .Ret<ffi::Token>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int32_t>("fp8_mode"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxLlEpCpuDispatchRecv, DispatchRecvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Token>()
                                  .Arg<ffi::AnyBuffer>()  // ticket
                                  .Ret<ffi::AnyBuffer>()  // recv_x
                                  .Ret<ffi::AnyBuffer>()  // recv_scale
                                  .Ret<ffi::AnyBuffer>()  // recv_count
                                  .Ret<ffi::AnyBuffer>()  // src_info
                                  .Ret<ffi::AnyBuffer>()  // layout_range
                                  .Ret<ffi::AnyBuffer>()  // src_topk_pos
                                  .Ret<ffi::Token>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int32_t>("fp8_mode"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxLlEpCpuCombine, CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Token>()
                                  .Arg<ffi::AnyBuffer>()  // y
                                  .Arg<ffi::AnyBuffer>()  // src_info
                                  .Arg<ffi::AnyBuffer>()  // layout_range
                                  .Arg<ffi::AnyBuffer>()  // src_topk_pos
                                  .Arg<ffi::AnyBuffer>()  // topk_idx
                                  .Arg<ffi::AnyBuffer>()  // topk_weights
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::Token>()
                                  .Attr<int64_t>("buffer_id"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxLlEpCpuCombineSend, CombineSendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Token>()
                                  .Arg<ffi::AnyBuffer>()  // y
                                  .Arg<ffi::AnyBuffer>()  // src_info
                                  .Arg<ffi::AnyBuffer>()  // layout_range
                                  .Arg<ffi::AnyBuffer>()  // src_topk_pos
                                  .Ret<ffi::AnyBuffer>()  // ticket
                                  .Ret<ffi::Token>()
                                  .Attr<int64_t>("buffer_id"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxLlEpCpuCombineRecv, CombineRecvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Token>()
                                  .Arg<ffi::AnyBuffer>()  // ticket
                                  .Arg<ffi::AnyBuffer>()  // topk_idx
                                  .Arg<ffi::AnyBuffer>()  // topk_weights
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::Token>()
                                  .Attr<int64_t>("buffer_id"));
