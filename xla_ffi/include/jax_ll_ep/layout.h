// The one definition of the symmetric buffer layout, the message format and the signal encoding.
//
// Every backend that speaks the protocol (the CPU implementation over host shared memory and the CUDA kernels over
// NVSHMEM symmetric memory) includes this header; nobody re-derives an offset. Python asks the native module for the
// sizes (region_bytes) instead of computing them.
//
// One rank owns one *region* of region_bytes bytes. All regions have the same layout, so an offset computed on one
// rank addresses the same field in a peer's region (symmetric memory). A region holds:
//
//   state            RankState: the rank's call sequence number and its error record (device state, advanced by the
//                    protocol code itself; no host state per call).
//   missing          [E_l][R] uint8: which (rank, local expert) signals never came in the call that timed out.
//   rank_mask        [3][W] uint32 bit sets of ranks (W = ceil(R / 32)): [0] the ranks this rank treats as masked
//                    (sends nothing to, waits on nothing from, reads no slot of); [1 + parity] ranks a cuda launch's
//                    timeout masked, merged into [0] by the next launch (protocol.cuh).
//   dispatch_signal  [2][E_l][R] uint64: signal from source rank r for local expert e, by parity of the call.
//   combine_signal   [2][E_l][R] uint64: signal from expert-owner rank r for its local expert e, by parity.
//   send             [T] dispatch messages: the sender's staged copy of each token (cast once, sent to K experts).
//   recv             [2][E_l][R][T] messages, the receive slots of both ops. Pair (e, r), slot s: in a dispatch,
//                    source rank r's s-th token (in token order) that chose local expert e of this rank; in a
//                    combine, expert owner r's output row (in the payload) for this rank's s-th token that chose r's
//                    local expert e (the same slot that token had in r's dispatch).
//
// Every slot, data or signal, is indexed by the rank that writes it: a rank writes only the pairs (e, itself) of a
// peer's region, so a reader that ignores a rank's pairs can never be disturbed by that rank (masking,
// docs/protocol.md). Receive slots and signals are double-buffered by the parity of the call's sequence number (reuse
// safety); signals carry the sequence number itself (call identity), so they are never cleaned.
#pragma once

#include <stdint.h>

#include "jax_ll_ep/limits.h"

#if defined(__CUDACC__)
#define JLE_HD __host__ __device__ __forceinline__
#else
#define JLE_HD inline
#endif

namespace jax_ll_ep {

inline constexpr int kNumParities = 2;        // double buffering
inline constexpr int64_t kRegionAlign = 256;  // every sub-region starts on this boundary

// The payload format of a dispatch (the fp8_mode attribute of its custom call).
enum class Fp8Mode : int32_t {
  kNone = 0,        // bf16 payload
  kFloatScale = 1,  // e4m3 data, float32 scale = amax / 448
  kPow2Scale = 2,   // e4m3 data, float32 scale rounded up to a power of two
  kUe8m0Scale = 3,  // e4m3 data, power-of-two scale delivered as its UE8M0 exponent byte
};
inline constexpr int kNumFp8Modes = 4;
// Fp8Mode by code: the names Python's Fp8Options.scale_format uses ("none": no fp8).
inline constexpr const char* kFp8ModeNames[kNumFp8Modes] = {"none", "float", "pow2", "ue8m0"};

enum class OpKind : uint32_t { kNone = 0, kDispatch = 1, kCombine = 2 };

// Which halves of a call a handler runs: the fused ops run both, the split forms one each.
enum Phase : int32_t { kSendPhase = 1, kRecvPhase = 2, kBothPhases = 3 };

// ---------------------------------------------------------------------------------------------------------------
// Signals. One 64-bit word per (parity, local expert, rank), written with a single release store (or an NVSHMEM
// signal op with SET), read with acquire loads:
//   bits 63..32  the low 32 bits of the call's sequence number (sequence numbers start at 1, so zeroed memory
//                never matches a call)
//   bits 31..28  OpKind of the call
//   bits 27..0   the number of tokens announced (0 is a valid count: every pair is signalled on every call)
// ---------------------------------------------------------------------------------------------------------------
inline constexpr uint32_t kSignalCountBits = 28;
inline constexpr uint32_t kSignalCountMask = (1u << kSignalCountBits) - 1;

JLE_HD uint64_t encode_signal(uint64_t seq, OpKind kind, uint32_t count) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(seq)) << 32) |
         (static_cast<uint64_t>(static_cast<uint32_t>(kind) & 0xFu) << kSignalCountBits) |
         static_cast<uint64_t>(count & kSignalCountMask);
}
JLE_HD uint32_t signal_seq(uint64_t signal) { return static_cast<uint32_t>(signal >> 32); }
JLE_HD OpKind signal_kind(uint64_t signal) {
  return static_cast<OpKind>(static_cast<uint32_t>(signal >> kSignalCountBits) & 0xFu);
}
JLE_HD uint32_t signal_count(uint64_t signal) { return static_cast<uint32_t>(signal) & kSignalCountMask; }

// How a receiver reads a signal slot while waiting for call `seq` of kind `kind`.
enum class SignalState : int32_t {
  kPending = 0,   // an older call's signal (or none yet): keep waiting
  kArrived = 1,   // this call's signal
  kMismatch = 2,  // same sequence number but another op kind, or a newer call: the ranks' call sequences differ
};
JLE_HD SignalState classify_signal(uint64_t signal, uint64_t seq, OpKind kind) {
  const int32_t ahead = static_cast<int32_t>(signal_seq(signal) - static_cast<uint32_t>(seq));
  if (ahead < 0) return SignalState::kPending;
  if (ahead == 0 && signal_kind(signal) == kind) return SignalState::kArrived;
  if (ahead == 0 && signal_kind(signal) == OpKind::kNone) return SignalState::kPending;
  return SignalState::kMismatch;
}

JLE_HD int parity_of(uint64_t seq) { return static_cast<int>(seq & 1u); }

// Whether `rank` is in a bit set of ranks (Layout::rank_mask).
JLE_HD bool rank_in(const uint32_t* mask, int rank) { return ((mask[rank >> 5] >> (rank & 31)) & 1u) != 0u; }

// The split forms' ticket, handed from a send half to its receive half: the call's sequence number, low 31 bits.
JLE_HD int32_t ticket_of(uint64_t seq) { return static_cast<int32_t>(seq & 0x7fffffffu); }

// ---------------------------------------------------------------------------------------------------------------
// Dispatch message: a 16-byte header, then the payload.
//   bf16:  H bf16 values (2H bytes)
//   fp8:   H e4m3 bytes, then H/128 float32 scales (always float32 on the wire; the receiver converts to the
//          requested output format)
// ---------------------------------------------------------------------------------------------------------------
struct MessageHeader {
  int32_t src_token;  // token index at the source rank
  int32_t topk_pos;   // position k of this expert in the source token's top-k row
  uint32_t seq;       // low 32 bits of the call's sequence number (diagnostics only; the signal is authoritative)
  uint32_t reserved;
};
static_assert(sizeof(MessageHeader) == 16, "message header must stay 16 bytes");

// ---------------------------------------------------------------------------------------------------------------
// Per-rank state and error record (at state_offset of the rank's own region; written only by its owner).
// ---------------------------------------------------------------------------------------------------------------
// The error_* fields describe the first error recorded since the last check; what detail, token, topk_pos and signal
// hold for each ErrorCode is written beside ErrorCode (errors.h).
struct RankState {
  uint64_t seq;         // sequence number of the last call whose receive half completed (0 before the first call)
  uint64_t open_seq;    // sequence number of a call whose send half ran and whose receive half has not yet (0: none)
  uint32_t error_code;  // ErrorCode
  uint32_t error_kind;  // OpKind of the call it happened in
  uint64_t error_seq;   // sequence number of that call
  int64_t error_detail;
  uint32_t error_count;  // errors recorded since the last check (only the first is described)
  uint32_t open_kind;    // OpKind of the open call (meaningful while open_seq != 0)
  int32_t error_token;
  int32_t error_topk_pos;
  uint64_t error_signal;
  // A fault the open call's send half found (routing, handle), described like the record above; the receive half
  // reports it once the protocol has completed (checked behaviour), then clears it.
  uint32_t open_error;  // ErrorCode
  int32_t open_error_token;
  int64_t open_error_detail;
  int32_t open_error_topk_pos;
  // Sticky: the ErrorCode (kTimeout or kSequenceMismatch) after which this rank's call sequence can no longer be
  // trusted to match its peers'. Never cleared by check(): every later send is refused before writing to a peer,
  // because a peer still in an earlier call could otherwise read this rank's newer data as its own
  // (verification/: limit-retry-silent). Close the buffer and create a new one.
  uint32_t unusable;
  // Masking (docs/protocol.md): the number of ranks in rank_mask[0] (0: no rank masked, the kernels' fast path reads
  // only this word), the (token, expert) pairs dropped because their expert's rank was masked (the last call, and
  // every call since the buffer was created), and the number of ranks in each rank_mask[1 + parity] (cuda).
  uint32_t masked_count;
  uint32_t dropped_last;
  uint64_t dropped_total;
  uint32_t pending_count[2];
  uint64_t reserved[2];
};
static_assert(sizeof(RankState) == 128, "RankState must stay 128 bytes");

JLE_HD int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

// ---------------------------------------------------------------------------------------------------------------
// The layout of one rank's region. make_layout() is the only place that computes offsets.
// ---------------------------------------------------------------------------------------------------------------
struct Layout {
  int32_t num_ranks;          // R
  int32_t num_local_experts;  // E_l = E / R
  int32_t max_tokens;         // T
  int32_t hidden;             // H
  int64_t message_bytes;      // stride of one message (a dispatch message, or a combine row after a header's room)
  int64_t state_offset;
  int64_t missing_offset;
  int64_t rank_mask_offset;
  int64_t dispatch_signal_offset;
  int64_t combine_signal_offset;
  int64_t send_offset;
  int64_t recv_offset;
  int64_t region_bytes;

  // E = E_l x R: the experts of the exchange, and also the (local expert, rank) signal pairs of every region.
  JLE_HD int64_t num_experts() const { return static_cast<int64_t>(num_local_experts) * num_ranks; }
  // R x T: the rows of each local expert in the receive layout [E_l, R*T, ...].
  JLE_HD int64_t recv_rows() const { return static_cast<int64_t>(num_ranks) * max_tokens; }
  // H / 128 (rounded up): fp8 scales per token.
  JLE_HD int32_t num_scales() const { return (hidden + kScaleBlock - 1) / kScaleBlock; }
  // Bytes of a dispatch message that carry data: the header, then H bf16 values, or H e4m3 bytes and the float32
  // scales.
  JLE_HD int64_t wire_bytes(Fp8Mode mode) const {
    const int64_t payload = mode == Fp8Mode::kNone
                                ? 2 * static_cast<int64_t>(hidden)
                                : static_cast<int64_t>(hidden) + 4 * static_cast<int64_t>(num_scales());
    return static_cast<int64_t>(sizeof(MessageHeader)) + payload;
  }
  JLE_HD int64_t pair_index(int local_expert, int rank) const {
    return static_cast<int64_t>(local_expert) * num_ranks + rank;
  }
  // uint32 words of one bit set of ranks.
  JLE_HD int32_t mask_words() const { return (num_ranks + 31) / 32; }

  JLE_HD RankState* state(uint8_t* region) const { return reinterpret_cast<RankState*>(region + state_offset); }
  JLE_HD uint8_t* missing(uint8_t* region) const { return region + missing_offset; }
  // which = 0: the mask in force; 1 + parity: ranks a cuda launch of that call parity masked on timeout.
  JLE_HD uint32_t* rank_mask(uint8_t* region, int which = 0) const {
    return reinterpret_cast<uint32_t*>(region + rank_mask_offset) + which * mask_words();
  }
  JLE_HD uint64_t* dispatch_signal(uint8_t* region, int parity, int local_expert, int src_rank) const {
    return reinterpret_cast<uint64_t*>(region + dispatch_signal_offset) + parity * num_experts() +
           pair_index(local_expert, src_rank);
  }
  JLE_HD uint64_t* combine_signal(uint8_t* region, int parity, int local_expert, int owner_rank) const {
    return reinterpret_cast<uint64_t*>(region + combine_signal_offset) + parity * num_experts() +
           pair_index(local_expert, owner_rank);
  }
  JLE_HD uint8_t* send_message(uint8_t* region, int token) const {
    return region + send_offset + static_cast<int64_t>(token) * message_bytes;
  }
  // Receive slot `slot` of pair (local_expert, rank): written only by `rank` (see the region's description above).
  JLE_HD uint8_t* message(uint8_t* region, int parity, int local_expert, int rank, int slot) const {
    const int64_t index =
        (static_cast<int64_t>(parity) * num_experts() + pair_index(local_expert, rank)) * max_tokens + slot;
    return region + recv_offset + index * message_bytes;
  }

  // Payload pointers inside a message (a combine row is the payload of its slot).
  JLE_HD static MessageHeader* header(uint8_t* message) { return reinterpret_cast<MessageHeader*>(message); }
  JLE_HD static uint8_t* payload(uint8_t* message) { return message + sizeof(MessageHeader); }
  JLE_HD float* fp8_scales(uint8_t* message) const {
    return reinterpret_cast<float*>(message + sizeof(MessageHeader) + hidden);
  }
};

// Returns a layout with region_bytes == 0 if the arguments are invalid (the Python side validates first and says
// why; this is the native side's last line of defence).
JLE_HD Layout make_layout(int32_t num_ranks, int32_t num_experts, int32_t max_tokens, int32_t hidden) {
  Layout l = {};
  if (num_ranks <= 0 || num_ranks > kMaxRanks || num_experts <= 0 || num_experts % num_ranks != 0 || max_tokens <= 0 ||
      hidden <= 0 || hidden % kHiddenMultiple != 0) {
    return l;
  }
  l.num_ranks = num_ranks;
  l.num_local_experts = num_experts / num_ranks;
  l.max_tokens = max_tokens;
  l.hidden = hidden;
  const int64_t fp8_bytes = l.wire_bytes(Fp8Mode::kFloatScale);
  const int64_t bf16_bytes = l.wire_bytes(Fp8Mode::kNone);
  l.message_bytes = align_up(fp8_bytes > bf16_bytes ? fp8_bytes : bf16_bytes, 16);
  int64_t offset = 0;
  l.state_offset = offset;
  offset = align_up(offset + static_cast<int64_t>(sizeof(RankState)), kRegionAlign);
  l.missing_offset = offset;
  offset = align_up(offset + l.num_experts(), kRegionAlign);
  l.rank_mask_offset = offset;
  offset = align_up(offset + 3 * 4 * static_cast<int64_t>(l.mask_words()), kRegionAlign);
  l.dispatch_signal_offset = offset;
  offset = align_up(offset + kNumParities * l.num_experts() * 8, kRegionAlign);
  l.combine_signal_offset = offset;
  offset = align_up(offset + kNumParities * l.num_experts() * 8, kRegionAlign);
  l.send_offset = offset;
  offset = align_up(offset + static_cast<int64_t>(max_tokens) * l.message_bytes, kRegionAlign);
  l.recv_offset = offset;
  offset = align_up(offset + kNumParities * l.num_experts() * max_tokens * l.message_bytes, kRegionAlign);
  l.region_bytes = offset;
  return l;
}

// buf.mask_ranks on one rank, between calls (both backends): `sets`, the rank's rank_mask words ([3][mask_words]),
// become `ranks` (the mask in force) and two empty sets (no timed-out ranks pending); the call sequence continues
// from `seq`; the sticky refusal and the last call's dropped pairs are cleared. The caller has checked that every
// rank lies in [0, R).
inline void apply_rank_mask(const Layout& l, RankState& s, uint32_t* sets, const int32_t* ranks, int64_t num_ranks,
                            uint64_t seq) {
  for (int32_t w = 0; w < 3 * l.mask_words(); ++w) sets[w] = 0u;
  uint32_t count = 0;
  for (int64_t i = 0; i < num_ranks; ++i) {
    const int32_t r = ranks[i];
    if (rank_in(sets, r)) continue;
    sets[r >> 5] |= 1u << (r & 31);
    ++count;
  }
  s.masked_count = count;
  s.pending_count[0] = s.pending_count[1] = 0;
  s.dropped_last = 0;
  s.unusable = 0;
  s.seq = seq;
}

}  // namespace jax_ll_ep
