// Plain argument structs, filled once by an FFI handler and handed unchanged to the CPU protocol code or to a CUDA
// launcher. Nothing here knows about XLA; nothing in cpu/ or cuda/ includes XLA headers.
#pragma once

#include <stdint.h>

#include "jax_ll_ep/layout.h"

namespace jax_ll_ep {

// What every call needs to find its own and its peers' regions.
struct GroupArgs {
  Layout layout;
  int32_t rank;             // this rank's index in its expert-parallel group, 0..R-1
  uint8_t* const* regions;  // regions[r]: rank r's region as this rank addresses it (peer pointers)
  int32_t phases;           // Phase bits: kSendPhase, kRecvPhase or both
  double timeout_s;         // bound on every wait
  int32_t on_timeout_mask;  // 1: a wait that times out masks the silent ranks and completes (Buffer on_timeout)
  // Split forms only (null in the fused ops). The ticket is the call's sequence number, low 31 bits: the send half
  // writes it, the receive half checks it against the open call (a mismatch is kSplitMisuse).
  int32_t* ticket_out;       // [1], written by a send-only call
  const int32_t* ticket_in;  // [1], read by a receive-only call
};

struct DispatchArgs {
  const uint16_t* x;        // [num_tokens, H] bf16 bits
  const int32_t* topk_idx;  // [num_tokens, num_topk], values in [-1, E)
  int32_t num_tokens;       // rows of x (<= layout.max_tokens)
  int32_t num_topk;         // K (<= kMaxTopk)
  Fp8Mode fp8_mode;
  // Outputs (receive half). recv_x is bf16 [E_l, R*T, H] or e4m3 bytes; recv_scale is float32 [E_l, R*T, H/128]
  // (kFloatScale, kPow2Scale) or uint8 UE8M0 exponents (kUe8m0Scale); unused with kNone.
  void* recv_x;
  void* recv_scale;
  int32_t* recv_count;    // [E_l]
  int32_t* src_info;      // [E_l, R*T]
  int32_t* layout_range;  // [E_l, R, 2] (offset, count)
  int32_t* src_topk_pos;  // [E_l, R*T]
};

struct CombineArgs {
  const uint16_t* y;        // [E_l, R*T, H] bf16 bits, the dispatch layout
  const int32_t* src_info;  // the dispatch handle
  const int32_t* layout_range;
  const int32_t* src_topk_pos;
  const int32_t* topk_idx;    // [num_tokens, num_topk] of this rank (receive half)
  const float* topk_weights;  // [num_tokens, num_topk]
  int32_t num_tokens;
  int32_t num_topk;
  uint16_t* out;  // [num_tokens, H] bf16 bits
};

}  // namespace jax_ll_ep
