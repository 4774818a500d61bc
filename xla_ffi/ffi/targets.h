// The six FFI targets, written once for both platforms: each target's C++ signature (XLA derives its binding from
// it, so the binding and the handler cannot disagree), the one validator of its operands, and the registration table
// both extension modules hand to Python (jax_ll_ep/_extension.py registers it for "cpu" or "CUDA").
//
// A platform (ffi/cpu_handlers.cc, ffi/cuda_handlers.cc) supplies only what differs between them, as a struct P:
//   Context                       its execution context: a PlatformContext of the members its calls need
//   kCommandBufferCompatible      whether XLA may capture its calls into command buffers (CUDA graphs)
//   Bound                         one call's buffer, with layout(); what bind() found for the handle
//   bind(ctx, buffer_id, op)      -> ffi::ErrorOr<Bound>
//   dispatch(ctx, bound, phases, tickets, args), combine(...)   run the call -> ffi::Error
//
// Every target takes the ordering token first and returns a token last (jax_ll_ep/_jax_internals.py: native_call);
// the attribute buffer_id names the buffer in the platform's registry, and dispatch's fp8_mode is an Fp8Mode.
#pragma once

#include <stdint.h>

#include <array>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>

#include "jax_ll_ep/args.h"
#include "jax_ll_ep/layout.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ll_ep {

namespace ffi = xla::ffi;

inline constexpr char kBufferIdAttr[] = "buffer_id";
inline constexpr char kFp8ModeAttr[] = "fp8_mode";
using BufferId = ffi::Attr<int64_t, kBufferIdAttr>;
using Fp8ModeAttr = ffi::Attr<int32_t, kFp8ModeAttr>;
using Out = ffi::Result<ffi::AnyBuffer>;
using TokenOut = ffi::Result<ffi::Token>;

// The operands of one call, by role; null where the target has none.
struct DispatchOperands {
  const ffi::AnyBuffer* x = nullptr;          // send half
  const ffi::AnyBuffer* topk_idx = nullptr;   // send half
  const ffi::AnyBuffer* ticket_in = nullptr;  // dispatch_recv
  ffi::AnyBuffer* ticket_out = nullptr;       // dispatch_send
  ffi::AnyBuffer* recv_x = nullptr;           // receive half: the six outputs
  ffi::AnyBuffer* recv_scale = nullptr;
  ffi::AnyBuffer* recv_count = nullptr;
  ffi::AnyBuffer* src_info = nullptr;
  ffi::AnyBuffer* layout_range = nullptr;
  ffi::AnyBuffer* src_topk_pos = nullptr;
};

struct CombineOperands {
  const ffi::AnyBuffer* y = nullptr;  // send half: y and the dispatch handle
  const ffi::AnyBuffer* src_info = nullptr;
  const ffi::AnyBuffer* layout_range = nullptr;
  const ffi::AnyBuffer* src_topk_pos = nullptr;
  const ffi::AnyBuffer* topk_idx = nullptr;  // receive half: routing, weights, output
  const ffi::AnyBuffer* topk_weights = nullptr;
  ffi::AnyBuffer* out = nullptr;
  const ffi::AnyBuffer* ticket_in = nullptr;  // combine_recv
  ffi::AnyBuffer* ticket_out = nullptr;       // combine_send
};

// The split forms' ticket (int32[1]) of one call; null where the call is not that form (GroupArgs::ticket_*).
struct Tickets {
  int32_t* out = nullptr;
  const int32_t* in = nullptr;
};

// "jax_ll_ep_dispatch", "jax_ll_ep_dispatch_send", ...: the target's name, which also opens its messages.
inline std::string target_name(const char* op, int32_t phases) {
  return std::string("jax_ll_ep_") + op + (phases == kSendPhase ? "_send" : phases == kRecvPhase ? "_recv" : "");
}

// ---------------------------------------------------------------------------------------------------------------
// The validator: every operand against the buffer's layout, in one message style ("<target>: <operand> must be
// <dtype> [<shape>], got <dtype> [<shape>]"). The Python ops check first and explain in their own terms; this is
// the native side's guard that a mismatched lowering can never address out of bounds.
// ---------------------------------------------------------------------------------------------------------------
class OperandCheck {
 public:
  explicit OperandCheck(std::string op) : op_(std::move(op)) {}

  // Keeps the first complaint.
  void fail(const std::string& why) {
    if (error_.empty()) error_ = op_ + ": " + why;
  }

  // `name` must have `dtype` and exactly `dims`.
  void expect(const char* name, const ffi::AnyBuffer& buffer, ffi::DataType dtype,
              std::initializer_list<int64_t> dims) {
    const auto actual = buffer.dimensions();
    bool same = buffer.element_type() == dtype && actual.size() == dims.size();
    size_t i = 0;
    for (int64_t d : dims) same = same && actual[i++] == d;
    if (!same)
      fail(std::string(name) + " must be " + dtype_name(dtype) + " " + dims_text(dims) + ", got " + got(buffer));
  }

  // The two dims of a 2-D operand, or a complaint ("<name> must be <what>, got ...") and {-1, -1}.
  std::array<int64_t, 2> matrix(const char* name, const ffi::AnyBuffer& buffer, const std::string& what) {
    const auto dims = buffer.dimensions();
    if (dims.size() == 2) return {dims[0], dims[1]};
    fail(std::string(name) + " must be " + what + ", got " + got(buffer));
    return {-1, -1};
  }

  bool ok() const { return error_.empty(); }
  ffi::Error result() const { return ok() ? ffi::Error::Success() : ffi::Error::InvalidArgument(error_); }

  static std::string got(const ffi::AnyBuffer& buffer) {
    const auto dims = buffer.dimensions();
    std::string text = "[";
    for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
    return dtype_name(buffer.element_type()) + " " + text + "]";
  }

  static std::string dims_text(std::initializer_list<int64_t> dims) {
    std::string text = "[";
    size_t i = 0;
    for (int64_t d : dims) text += (i++ ? ", " : "") + std::to_string(d);
    return text + "]";
  }

  static std::string dtype_name(ffi::DataType dtype) {
    switch (dtype) {
      case ffi::DataType::BF16:
        return "bfloat16";
      case ffi::DataType::F32:
        return "float32";
      case ffi::DataType::S32:
        return "int32";
      case ffi::DataType::F8E4M3FN:
        return "float8_e4m3fn";
      case ffi::DataType::F8E8M0FNU:
        return "float8_e8m0fnu";
      default:
        return "dtype code " + std::to_string(static_cast<int>(dtype));
    }
  }

 private:
  std::string op_;
  std::string error_;
};

// The ticket operands of a split form.
inline void check_tickets(OperandCheck& check, const ffi::AnyBuffer* out, const ffi::AnyBuffer* in, Tickets* tickets) {
  if (out != nullptr) {
    check.expect("ticket", *out, ffi::DataType::S32, {1});
    tickets->out = static_cast<int32_t*>(out->untyped_data());
  }
  if (in != nullptr) {
    check.expect("ticket", *in, ffi::DataType::S32, {1});
    tickets->in = static_cast<const int32_t*>(in->untyped_data());
  }
}

// Fills `args` and `tickets` for the halves in `phases`, or says which operand does not fit the buffer.
inline ffi::Error check_dispatch(const std::string& op, const Layout& l, int32_t phases, int32_t fp8_mode,
                                 const DispatchOperands& o, DispatchArgs* args, Tickets* tickets) {
  OperandCheck check(op);
  if (fp8_mode < 0 || fp8_mode >= kNumFp8Modes) {
    check.fail("fp8_mode=" + std::to_string(fp8_mode) + " is not an Fp8Mode (0.." + std::to_string(kNumFp8Modes - 1) +
               ")");
    return check.result();
  }
  const auto mode = static_cast<Fp8Mode>(fp8_mode);
  const bool fp8 = mode != Fp8Mode::kNone;
  if (fp8 && l.hidden % kScaleBlock != 0) {
    check.fail("fp8 dispatch needs hidden to be a multiple of " + std::to_string(kScaleBlock) +
               "; hidden=" + std::to_string(l.hidden));
  }
  args->fp8_mode = mode;
  const int64_t e_l = l.num_local_experts, rows = l.recv_rows(), h = l.hidden;
  if (phases & kSendPhase) {
    const std::string tokens =
        "[n, " + std::to_string(h) + "] with n <= max_tokens_per_rank=" + std::to_string(l.max_tokens);
    const int64_t n = check.matrix("x", *o.x, "bfloat16 " + tokens)[0];
    const int64_t k = check.matrix("topk_idx", *o.topk_idx, "int32 [n, K]")[1];
    if (n > l.max_tokens) check.fail("x must be bfloat16 " + tokens + ", got " + OperandCheck::got(*o.x));
    if (k < 1 || k > kMaxTopk) {
      check.fail("topk_idx must be int32 [n, K] with 1 <= K <= " + std::to_string(kMaxTopk) + ", got " +
                 OperandCheck::got(*o.topk_idx));
    }
    if (!check.ok()) return check.result();
    check.expect("x", *o.x, ffi::DataType::BF16, {n, h});
    check.expect("topk_idx", *o.topk_idx, ffi::DataType::S32, {n, k});
    args->x = static_cast<const uint16_t*>(o.x->untyped_data());
    args->topk_idx = static_cast<const int32_t*>(o.topk_idx->untyped_data());
    args->num_tokens = static_cast<int32_t>(n);
    args->num_topk = static_cast<int32_t>(k);
  }
  if (phases & kRecvPhase) {
    check.expect("recv_x", *o.recv_x, fp8 ? ffi::DataType::F8E4M3FN : ffi::DataType::BF16, {e_l, rows, h});
    if (fp8) {
      check.expect("recv_scale", *o.recv_scale,
                   mode == Fp8Mode::kUe8m0Scale ? ffi::DataType::F8E8M0FNU : ffi::DataType::F32,
                   {e_l, rows, l.num_scales()});
    }
    check.expect("recv_count", *o.recv_count, ffi::DataType::S32, {e_l});
    check.expect("src_info", *o.src_info, ffi::DataType::S32, {e_l, rows});
    check.expect("layout_range", *o.layout_range, ffi::DataType::S32, {e_l, l.num_ranks, 2});
    check.expect("src_topk_pos", *o.src_topk_pos, ffi::DataType::S32, {e_l, rows});
    args->recv_x = o.recv_x->untyped_data();
    args->recv_scale = fp8 ? o.recv_scale->untyped_data() : nullptr;
    args->recv_count = static_cast<int32_t*>(o.recv_count->untyped_data());
    args->src_info = static_cast<int32_t*>(o.src_info->untyped_data());
    args->layout_range = static_cast<int32_t*>(o.layout_range->untyped_data());
    args->src_topk_pos = static_cast<int32_t*>(o.src_topk_pos->untyped_data());
  }
  check_tickets(check, o.ticket_out, o.ticket_in, tickets);
  return check.result();
}

inline ffi::Error check_combine(const std::string& op, const Layout& l, int32_t phases, const CombineOperands& o,
                                CombineArgs* args, Tickets* tickets) {
  OperandCheck check(op);
  const int64_t e_l = l.num_local_experts, rows = l.recv_rows(), h = l.hidden;
  if (phases & kSendPhase) {
    check.expect("y", *o.y, ffi::DataType::BF16, {e_l, rows, h});
    check.expect("src_info", *o.src_info, ffi::DataType::S32, {e_l, rows});
    check.expect("layout_range", *o.layout_range, ffi::DataType::S32, {e_l, l.num_ranks, 2});
    check.expect("src_topk_pos", *o.src_topk_pos, ffi::DataType::S32, {e_l, rows});
    args->y = static_cast<const uint16_t*>(o.y->untyped_data());
    args->src_info = static_cast<const int32_t*>(o.src_info->untyped_data());
    args->layout_range = static_cast<const int32_t*>(o.layout_range->untyped_data());
    args->src_topk_pos = static_cast<const int32_t*>(o.src_topk_pos->untyped_data());
  }
  if (phases & kRecvPhase) {
    const std::string what = "int32 [n, K] with n <= max_tokens_per_rank=" + std::to_string(l.max_tokens) +
                             " and 1 <= K <= " + std::to_string(kMaxTopk);
    const auto [n, k] = check.matrix("topk_idx", *o.topk_idx, what);
    if (check.ok() && (n > l.max_tokens || k < 1 || k > kMaxTopk)) {
      check.fail("topk_idx must be " + what + ", got " + OperandCheck::got(*o.topk_idx));
    }
    if (!check.ok()) return check.result();
    check.expect("topk_idx", *o.topk_idx, ffi::DataType::S32, {n, k});
    check.expect("topk_weights", *o.topk_weights, ffi::DataType::F32, {n, k});
    check.expect("out", *o.out, ffi::DataType::BF16, {n, h});
    args->topk_idx = static_cast<const int32_t*>(o.topk_idx->untyped_data());
    args->topk_weights = static_cast<const float*>(o.topk_weights->untyped_data());
    args->out = static_cast<uint16_t*>(o.out->untyped_data());
    args->num_tokens = static_cast<int32_t>(n);
    args->num_topk = static_cast<int32_t>(k);
  }
  check_tickets(check, o.ticket_out, o.ticket_in, tickets);
  return check.result();
}

// What a platform's bind() says when the handle or the device is not one of its buffers'.
inline ffi::Error buffer_not_open(const std::string& op, int64_t buffer_id, const char* backend) {
  return ffi::Error::InvalidArgument(op + ": buffer handle " + std::to_string(buffer_id) + " is not open in this " +
                                     "process's " + backend + " backend (closed, or created with another backend)");
}

inline ffi::Error device_not_in_buffer(const std::string& op, int64_t buffer_id, int32_t device) {
  return ffi::Error::InvalidArgument(op + ": device " + std::to_string(device) + " is not a device of buffer " +
                                     std::to_string(buffer_id) + "'s mesh in this process; use the buffer inside " +
                                     "shard_map over the mesh it was created with");
}

// A platform's execution context: the struct `Members` (say {cudaStream_t stream; int32_t device;}), each member
// decoded from XLA's execution context by the matching one of `Parts` (say PlatformStream<cudaStream_t>,
// DeviceOrdinal). A handler names the whole context as one parameter (the specializations below the namespace).
template <typename Members, typename... Parts>
struct PlatformContext : Members {};

// ---------------------------------------------------------------------------------------------------------------
// The targets. Each handler packs its operands by role, then one body per op binds the buffer, checks the operands
// and lets the platform run the call.
// ---------------------------------------------------------------------------------------------------------------
// One call of target `op` (with the halves in `phases`): binds the buffer, lets `check(name, layout, &args,
// &tickets)` check the operands against it, then lets `run(bound, tickets, args)` run the call on the platform.
template <typename P, typename Args, typename Check, typename Run>
ffi::Error run_target(typename P::Context ctx, const char* op, int32_t phases, int64_t buffer_id, Check check,
                      Run run) {
  const std::string name = target_name(op, phases);
  auto bound = P::bind(ctx, buffer_id, name);
  if (bound.has_error()) return bound.error();
  Args args = {};
  Tickets tickets;
  if (ffi::Error e = check(name, bound->layout(), &args, &tickets); e.failure()) return e;
  return run(*bound, tickets, args);
}

template <typename P>
ffi::Error run_dispatch_target(typename P::Context ctx, int32_t phases, int64_t buffer_id, int32_t fp8_mode,
                               const DispatchOperands& o) {
  return run_target<P, DispatchArgs>(
      ctx, "dispatch", phases, buffer_id,
      [&](const std::string& name, const Layout& l, DispatchArgs* a, Tickets* t) {
        return check_dispatch(name, l, phases, fp8_mode, o, a, t);
      },
      [&](const auto& bound, const Tickets& t, const DispatchArgs& a) {
        return P::dispatch(ctx, bound, phases, t, a);
      });
}

template <typename P>
ffi::Error run_combine_target(typename P::Context ctx, int32_t phases, int64_t buffer_id, const CombineOperands& o) {
  return run_target<P, CombineArgs>(
      ctx, "combine", phases, buffer_id,
      [&](const std::string& name, const Layout& l, CombineArgs* a, Tickets* t) {
        return check_combine(name, l, phases, o, a, t);
      },
      [&](const auto& bound, const Tickets& t, const CombineArgs& a) { return P::combine(ctx, bound, phases, t, a); });
}

template <typename P>
struct Targets {
  using Context = typename P::Context;

  // jax_ll_ep_dispatch: x [n, H], topk_idx [n, K] -> recv_x, recv_scale, recv_count, src_info, layout_range,
  // src_topk_pos
  static ffi::Error dispatch(Context ctx, ffi::Token, ffi::AnyBuffer x, ffi::AnyBuffer topk_idx, Out recv_x,
                             Out recv_scale, Out recv_count, Out src_info, Out layout_range, Out src_topk_pos, TokenOut,
                             BufferId buffer_id, Fp8ModeAttr fp8_mode) {
    DispatchOperands o;
    o.x = &x;
    o.topk_idx = &topk_idx;
    set_dispatch_outputs(o, recv_x, recv_scale, recv_count, src_info, layout_range, src_topk_pos);
    return run_dispatch_target<P>(ctx, kBothPhases, *buffer_id, *fp8_mode, o);
  }

  // jax_ll_ep_dispatch_send: x, topk_idx -> ticket
  static ffi::Error dispatch_send(Context ctx, ffi::Token, ffi::AnyBuffer x, ffi::AnyBuffer topk_idx, Out ticket,
                                  TokenOut, BufferId buffer_id, Fp8ModeAttr fp8_mode) {
    DispatchOperands o;
    o.x = &x;
    o.topk_idx = &topk_idx;
    o.ticket_out = &*ticket;
    return run_dispatch_target<P>(ctx, kSendPhase, *buffer_id, *fp8_mode, o);
  }

  // jax_ll_ep_dispatch_recv: ticket -> the six outputs of jax_ll_ep_dispatch
  static ffi::Error dispatch_recv(Context ctx, ffi::Token, ffi::AnyBuffer ticket, Out recv_x, Out recv_scale,
                                  Out recv_count, Out src_info, Out layout_range, Out src_topk_pos, TokenOut,
                                  BufferId buffer_id, Fp8ModeAttr fp8_mode) {
    DispatchOperands o;
    o.ticket_in = &ticket;
    set_dispatch_outputs(o, recv_x, recv_scale, recv_count, src_info, layout_range, src_topk_pos);
    return run_dispatch_target<P>(ctx, kRecvPhase, *buffer_id, *fp8_mode, o);
  }

  // jax_ll_ep_combine: y [E_l, R*T, H], the handle (src_info, layout_range, src_topk_pos), topk_idx, topk_weights
  // -> out [n, H]
  static ffi::Error combine(Context ctx, ffi::Token, ffi::AnyBuffer y, ffi::AnyBuffer src_info,
                            ffi::AnyBuffer layout_range, ffi::AnyBuffer src_topk_pos, ffi::AnyBuffer topk_idx,
                            ffi::AnyBuffer topk_weights, Out out, TokenOut, BufferId buffer_id) {
    CombineOperands o;
    set_combine_sends(o, y, src_info, layout_range, src_topk_pos);
    set_combine_receives(o, topk_idx, topk_weights, out);
    return run_combine_target<P>(ctx, kBothPhases, *buffer_id, o);
  }

  // jax_ll_ep_combine_send: y and the handle -> ticket
  static ffi::Error combine_send(Context ctx, ffi::Token, ffi::AnyBuffer y, ffi::AnyBuffer src_info,
                                 ffi::AnyBuffer layout_range, ffi::AnyBuffer src_topk_pos, Out ticket, TokenOut,
                                 BufferId buffer_id) {
    CombineOperands o;
    set_combine_sends(o, y, src_info, layout_range, src_topk_pos);
    o.ticket_out = &*ticket;
    return run_combine_target<P>(ctx, kSendPhase, *buffer_id, o);
  }

  // jax_ll_ep_combine_recv: ticket, topk_idx, topk_weights -> out
  static ffi::Error combine_recv(Context ctx, ffi::Token, ffi::AnyBuffer ticket, ffi::AnyBuffer topk_idx,
                                 ffi::AnyBuffer topk_weights, Out out, TokenOut, BufferId buffer_id) {
    CombineOperands o;
    o.ticket_in = &ticket;
    set_combine_receives(o, topk_idx, topk_weights, out);
    return run_combine_target<P>(ctx, kRecvPhase, *buffer_id, o);
  }

 private:
  static void set_dispatch_outputs(DispatchOperands& o, Out& recv_x, Out& recv_scale, Out& recv_count, Out& src_info,
                                   Out& layout_range, Out& src_topk_pos) {
    o.recv_x = &*recv_x;
    o.recv_scale = &*recv_scale;
    o.recv_count = &*recv_count;
    o.src_info = &*src_info;
    o.layout_range = &*layout_range;
    o.src_topk_pos = &*src_topk_pos;
  }
  static void set_combine_sends(CombineOperands& o, const ffi::AnyBuffer& y, const ffi::AnyBuffer& src_info,
                                const ffi::AnyBuffer& layout_range, const ffi::AnyBuffer& src_topk_pos) {
    o.y = &y;
    o.src_info = &src_info;
    o.layout_range = &layout_range;
    o.src_topk_pos = &src_topk_pos;
  }
  static void set_combine_receives(CombineOperands& o, const ffi::AnyBuffer& topk_idx,
                                   const ffi::AnyBuffer& topk_weights, Out& out) {
    o.topk_idx = &topk_idx;
    o.topk_weights = &topk_weights;
    o.out = &*out;
  }
};

// An XLA FFI handler bound from a handler function's own signature.
template <typename P, auto kImpl>
XLA_FFI_Error* bound_handler(XLA_FFI_CallFrame* call_frame) {
  static auto* handler = P::kCommandBufferCompatible
                             ? ffi::Ffi::BindTo(kImpl, {ffi::Traits::kCmdBufferCompatible}).release()
                             : ffi::Ffi::BindTo(kImpl).release();
  return handler->Call(call_frame);
}

struct TargetHandler {
  const char* name;
  XLA_FFI_Handler* handler;
};
inline constexpr int kNumTargets = 6;

constexpr bool same_name(const char* a, const char* b) {
  while (*a != '\0' && *a == *b) ++a, ++b;
  return *a == *b;
}

// Every entry named and bound, and no name twice.
template <size_t N>
constexpr bool complete(const std::array<TargetHandler, N>& table) {
  for (size_t i = 0; i < N; ++i) {
    if (table[i].name == nullptr || table[i].handler == nullptr) return false;
    for (size_t j = 0; j < i; ++j) {
      if (same_name(table[i].name, table[j].name)) return false;
    }
  }
  return true;
}

// The registration table of a platform: the same names on both (a call lowers to one name whatever the platform).
template <typename P>
constexpr std::array<TargetHandler, kNumTargets> target_handlers() {
  using T = Targets<P>;
  constexpr std::array<TargetHandler, kNumTargets> table = {{
      {"jax_ll_ep_dispatch", bound_handler<P, &T::dispatch>},
      {"jax_ll_ep_dispatch_send", bound_handler<P, &T::dispatch_send>},
      {"jax_ll_ep_dispatch_recv", bound_handler<P, &T::dispatch_recv>},
      {"jax_ll_ep_combine", bound_handler<P, &T::combine>},
      {"jax_ll_ep_combine_send", bound_handler<P, &T::combine_send>},
      {"jax_ll_ep_combine_recv", bound_handler<P, &T::combine_recv>},
  }};
  static_assert(complete(table), "every target named once and bound");
  return table;
}

}  // namespace jax_ll_ep

namespace xla::ffi {

template <typename Members, typename... Parts>
struct CtxBinding<jax_ll_ep::PlatformContext<Members, Parts...>> {
  using Ctx = jax_ll_ep::PlatformContext<Members, Parts...>;
};

template <typename Members, typename... Parts>
struct CtxDecoding<jax_ll_ep::PlatformContext<Members, Parts...>> {
  using Type = jax_ll_ep::PlatformContext<Members, Parts...>;
  static std::optional<Type> Decode(const XLA_FFI_Api* api, XLA_FFI_InvokeContext* ctx, DiagnosticEngine& diagnostic) {
    const auto parts = std::make_tuple(CtxDecoding<Parts>::Decode(api, ctx, diagnostic)...);
    const bool decoded = std::apply([](const auto&... part) { return (part.has_value() && ...); }, parts);
    if (!decoded) return std::nullopt;
    return std::apply([](const auto&... part) { return Type{{*part...}}; }, parts);
  }
};

}  // namespace xla::ffi
