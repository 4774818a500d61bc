// The operands, results and attributes of the six FFI targets, written once for both platforms (the table of
// jax_ll_ep/_ffi.py callers: jax_ll_ep/_native_ops.py). Each function extends a binding that already holds the
// platform's context (CPU: the device ordinal; CUDA: the stream and the device ordinal): the ordering token first,
// the operands, the results, the token result last, then the attributes.
#pragma once

#include <cstdint>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jax_ll_ep {
namespace signatures {

namespace ffi = xla::ffi;

template <typename B>
auto dispatch_outputs(B b) {
  return std::move(b)
      .template Ret<ffi::AnyBuffer>()   // recv_x
      .template Ret<ffi::AnyBuffer>()   // recv_scale
      .template Ret<ffi::AnyBuffer>()   // recv_count
      .template Ret<ffi::AnyBuffer>()   // src_info
      .template Ret<ffi::AnyBuffer>()   // layout_range
      .template Ret<ffi::AnyBuffer>();  // src_topk_pos
}

template <typename B>
auto with_dispatch_attrs(B b) {
  return std::move(b).template Ret<ffi::Token>().template Attr<int64_t>("buffer_id").template Attr<int32_t>("fp8_mode");
}

template <typename B>
auto with_combine_attrs(B b) {
  return std::move(b).template Ret<ffi::Token>().template Attr<int64_t>("buffer_id");
}

// jax_ll_ep_dispatch: x, topk_idx -> the six dispatch outputs
template <typename B>
auto dispatch(B b) {
  return with_dispatch_attrs(dispatch_outputs(
      std::move(b).template Arg<ffi::Token>().template Arg<ffi::AnyBuffer>().template Arg<ffi::AnyBuffer>()));
}

// jax_ll_ep_dispatch_send: x, topk_idx -> ticket
template <typename B>
auto dispatch_send(B b) {
  return with_dispatch_attrs(std::move(b)
                                 .template Arg<ffi::Token>()
                                 .template Arg<ffi::AnyBuffer>()
                                 .template Arg<ffi::AnyBuffer>()
                                 .template Ret<ffi::AnyBuffer>());
}

// jax_ll_ep_dispatch_recv: ticket -> the six dispatch outputs
template <typename B>
auto dispatch_recv(B b) {
  return with_dispatch_attrs(dispatch_outputs(std::move(b).template Arg<ffi::Token>().template Arg<ffi::AnyBuffer>()));
}

// The dispatch handle as combine's operands: src_info, layout_range, src_topk_pos.
template <typename B>
auto handle_operands(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>().template Arg<ffi::AnyBuffer>().template Arg<ffi::AnyBuffer>();
}

// jax_ll_ep_combine: y, the handle, topk_idx, topk_weights -> out
template <typename B>
auto combine(B b) {
  return with_combine_attrs(handle_operands(std::move(b).template Arg<ffi::Token>().template Arg<ffi::AnyBuffer>())
                                .template Arg<ffi::AnyBuffer>()
                                .template Arg<ffi::AnyBuffer>()
                                .template Ret<ffi::AnyBuffer>());
}

// jax_ll_ep_combine_send: y, the handle -> ticket
template <typename B>
auto combine_send(B b) {
  return with_combine_attrs(handle_operands(std::move(b).template Arg<ffi::Token>().template Arg<ffi::AnyBuffer>())
                                .template Ret<ffi::AnyBuffer>());
}

// jax_ll_ep_combine_recv: ticket, topk_idx, topk_weights -> out
template <typename B>
auto combine_recv(B b) {
  return with_combine_attrs(std::move(b)
                                .template Arg<ffi::Token>()
                                .template Arg<ffi::AnyBuffer>()
                                .template Arg<ffi::AnyBuffer>()
                                .template Arg<ffi::AnyBuffer>()
                                .template Ret<ffi::AnyBuffer>());
}

}  // namespace signatures
}  // namespace jax_ll_ep
