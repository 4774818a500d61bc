// The protocol's errors: the codes a rank records in its RankState, the record read back from it, and the one table
// of texts that turns a record into a sentence. The CPU protocol's failed calls, the records both extension modules
// hand to buf.check() (jax_ll_ep/backends/native.py), the xla backend's routing errors and the CUDA handlers' "an
// earlier call failed" all take their words from here.
#pragma once

#include <stdint.h>

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "jax_ll_ep/layout.h"

namespace jax_ll_ep {

// Each code, with what the record's detail / token / topk_pos / signal hold for it.
enum class ErrorCode : uint32_t {
  kOk = 0,
  // Some (rank, local expert) signals never came within timeout_s (the missing table lists them). detail: the number
  // of missing pairs (CPU) or -1 (CUDA).
  kTimeout = 1,
  // A peer signalled another op kind or a newer call: the ranks' call sequences differ. token: the peer rank;
  // topk_pos: the local expert whose signal disagreed; signal: the word found.
  kSequenceMismatch = 2,
  // A topk_idx entry outside [-1, E); it was treated as -1. detail: the id; token, topk_pos: its place in topk_idx.
  kInvalidExpert = 3,
  // An expert repeated within one token's row; the repeat was treated as -1. Fields as for kInvalidExpert.
  kDuplicateExpert = 4,
  // A split half out of order: a send while a call is open, or a receive with no open call of its kind or with
  // another call's ticket. Nothing was written to peers. detail: a SplitMisuse (kUnknown where the CUDA kernels do
  // not say which); token: the open call's OpKind (kSendWhileOpen, kOtherKindOpen) or the ticket (kWrongTicket).
  kSplitMisuse = 5,
  // combine: the handle does not fit the receive layout or this rank's topk_idx. detail < 0: -1 - pair of a
  // layout_range entry outside the layout (token: its rank, topk_pos: its local expert; its rows were not sent);
  // detail >= 0: a pair whose row count disagrees with topk_idx (token: rank, topk_pos: local expert), or (a fused
  // cuda call) one of this rank's own rows whose src_info / src_topk_pos name another (token, k) (token, topk_pos:
  // that (token, k)). Rows go back by their slot, so src_info / src_topk_pos never address anything.
  kInvalidHandle = 6,
  // A send refused, nothing written, because an earlier call timed out or saw a sequence mismatch
  // (RankState::unusable): peers may be in another call. detail: that ErrorCode. buf.mask_ranks (collective) makes
  // the buffer usable again.
  kBufferUnusable = 7,
  // on_timeout="mask": some signals never came within timeout_s, and their ranks are masked from now on (the missing
  // table lists the pairs). Not a failure: the call completed without those ranks and the buffer stays usable; it is
  // recorded so that buf.check() reports it. detail: the number of missing pairs (CPU) or -1 (CUDA).
  kRanksMasked = 8,
};
inline constexpr int kNumErrorCodes = 9;

// kSplitMisuse: which rule a split half broke (the record's detail).
enum class SplitMisuse : int32_t {
  kUnknown = 0,
  kSendWhileOpen = 1,  // a send while another call's receive half is still due
  kNoOpenCall = 2,     // a receive half with no open call
  kOtherKindOpen = 3,  // a receive half while a call of the other kind is open
  kWrongTicket = 4,    // a receive half with a ticket of another call
};

// Per code: the name Python maps to an exception type (jax_ll_ep/backends/native.py), and a summary for places
// that know only the code.
struct ErrorName {
  const char* name;
  const char* summary;
};
inline constexpr ErrorName kErrorNames[kNumErrorCodes] = {
    {"ok", "no error"},
    {"timeout", "a wait for peers' signals timed out"},
    {"sequence_mismatch", "the ranks issued different sequences of calls"},
    {"invalid_expert", "a topk_idx entry outside [-1, num_experts)"},
    {"duplicate_expert", "an expert repeated within a token's topk_idx row"},
    {"split_misuse", "split send/recv used out of order"},
    {"invalid_handle", "the dispatch handle passed to combine does not match its dispatch"},
    {"buffer_unusable", "a send refused after an earlier timeout or sequence mismatch"},
    {"ranks_masked", "a wait timed out and the silent ranks were masked (on_timeout='mask')"},
};

inline const ErrorName& error_name(uint32_t code) {
  static constexpr ErrorName kUnknown = {"unknown", "unknown error"};
  return code < static_cast<uint32_t>(kNumErrorCodes) ? kErrorNames[code] : kUnknown;
}

inline const char* op_name(OpKind kind) {
  switch (kind) {
    case OpKind::kDispatch:
      return "dispatch";
    case OpKind::kCombine:
      return "combine";
    default:
      return "none";
  }
}

// One rank's error as buf.check() reports it: RankState's record plus where it happened and the missing pairs.
struct ErrorRecord {
  int32_t group = 0;  // -1: not known (the xla backend, with an axis of the mesh not bound)
  int32_t rank = 0;
  ErrorCode code = ErrorCode::kOk;
  OpKind kind = OpKind::kNone;
  uint64_t seq = 0;  // 0: not known (the xla backend counts no calls)
  int64_t detail = 0;
  int32_t token = -1;
  int32_t topk_pos = -1;
  uint64_t signal = 0;
  uint32_t count = 1;       // errors recorded since the last check (only this, the first, is described)
  int64_t num_experts = 0;  // E, for the text of kInvalidExpert
  std::vector<std::pair<int32_t, int32_t>> missing;  // kTimeout: (rank, local expert) pairs whose signal never came
};

// The record of a rank's RankState and missing table.
inline ErrorRecord read_record(const RankState& s, const uint8_t* missing, const Layout& layout, int32_t group,
                               int32_t rank) {
  ErrorRecord r;
  r.group = group;
  r.rank = rank;
  r.code = static_cast<ErrorCode>(s.error_code);
  r.kind = static_cast<OpKind>(s.error_kind);
  r.seq = s.error_seq;
  r.detail = s.error_detail;
  r.token = s.error_token;
  r.topk_pos = s.error_topk_pos;
  r.signal = s.error_signal;
  r.count = s.error_count;
  r.num_experts = layout.num_experts();
  if (r.code == ErrorCode::kTimeout || r.code == ErrorCode::kRanksMasked) {
    for (int32_t e = 0; e < layout.num_local_experts; ++e) {
      for (int32_t peer = 0; peer < layout.num_ranks; ++peer) {
        if (missing[layout.pair_index(e, peer)]) r.missing.emplace_back(peer, e);
      }
    }
  }
  return r;
}

namespace error_text {

template <typename... Args>
std::string format(const char* fmt, Args... args) {
  const int n = std::snprintf(nullptr, 0, fmt, args...);
  std::string out(static_cast<size_t>(n > 0 ? n : 0), '\0');
  std::snprintf(out.data(), out.size() + 1, fmt, args...);
  return out;
}

inline const char* kind_of(int64_t code) { return op_name(static_cast<OpKind>(code)); }

inline std::string missing_pairs(const ErrorRecord& r) {
  constexpr size_t kShown = 16;
  std::string out;
  for (size_t i = 0; i < r.missing.size() && i < kShown; ++i) {
    out += format("%s(rank %d, local expert %d)", i ? ", " : "", r.missing[i].first, r.missing[i].second);
  }
  if (r.missing.size() > kShown) out += format(" and %zu more", r.missing.size() - kShown);
  return out.empty() ? std::string("(not recorded)") : out;
}

// The distinct ranks of the missing pairs, "1, 3".
inline std::string missing_ranks(const ErrorRecord& r) {
  std::string out;
  std::vector<int32_t> seen;
  for (const auto& [rank, local_expert] : r.missing) {
    bool known = false;
    for (int32_t s : seen) known = known || s == rank;
    if (known) continue;
    seen.push_back(rank);
    out += format("%s%d", out.empty() ? "" : ", ", rank);
  }
  return out.empty() ? std::string("(not recorded)") : out;
}

inline std::string split_misuse(const ErrorRecord& r) {
  const char* kind = op_name(r.kind);
  switch (static_cast<SplitMisuse>(r.detail)) {
    case SplitMisuse::kSendWhileOpen:
      return format(
          "split send/recv used out of order: a send while call seq=%llu (%s) is still open; call its receive half "
          "before the next send on this buffer. Nothing was sent",
          static_cast<unsigned long long>(r.seq), kind_of(r.token));
    case SplitMisuse::kNoOpenCall:
      return format("split send/recv used out of order: no %s_send is open; call %s_send first (one receive per send)",
                    kind, kind);
    case SplitMisuse::kOtherKindOpen:
      return format("split send/recv used out of order: the open call is a %s, not a %s; finish it with %s_recv first",
                    kind_of(r.token), kind, kind_of(r.token));
    case SplitMisuse::kWrongTicket:
      return format(
          "split send/recv used out of order: the ticket is from call seq=%d but the open call is seq=%llu; pass "
          "the value returned by the matching send",
          r.token, static_cast<unsigned long long>(r.seq));
    default:
      return "split send/recv used out of order (a send while a call was open, or a receive without its send); "
             "nothing was sent";
  }
}

}  // namespace error_text

// What happened, in one sentence (without where).
inline std::string error_what(const ErrorRecord& r) {
  using error_text::format;
  const auto id = static_cast<long long>(r.detail);
  switch (r.code) {
    case ErrorCode::kTimeout:
      return "timed out; signals never came from " + error_text::missing_pairs(r) +
             ". A peer did not make this call or is more than timeout_s late; mask the ranks that are gone with "
             "buf.mask_ranks(...) on every live process, or close the buffer and create a new one";
    case ErrorCode::kSequenceMismatch:
      return format(
          "rank %d signalled local expert %d for its call seq=%u (%s); the ranks issued different sequences of calls "
          "on this buffer (every rank must make the same calls in the same order)",
          r.token, r.topk_pos, signal_seq(r.signal), op_name(signal_kind(r.signal)));
    case ErrorCode::kInvalidExpert:
      return format("topk_idx[%d, %d] = %lld is outside [-1, %lld); the entry was treated as -1", r.token, r.topk_pos,
                    id, static_cast<long long>(r.num_experts));
    case ErrorCode::kDuplicateExpert:
      return format("topk_idx[%d, %d] = %lld repeats an earlier expert of the token; the repeat was treated as -1",
                    r.token, r.topk_pos, id);
    case ErrorCode::kSplitMisuse:
      return error_text::split_misuse(r);
    case ErrorCode::kInvalidHandle:
      if (r.detail < 0) {
        return format(
            "handle.layout_range[%d, %d] (local expert, rank) is outside the receive layout and its rows were not "
            "sent; the dispatch handle passed to combine does not match its dispatch (pass it unchanged)",
            r.topk_pos, r.token);
      }
      return format(
          "the dispatch handle passed to combine does not match the receive layout or this rank's topk_idx (at "
          "handle row or pair %lld); the handle and topk_idx passed to combine must come from the same dispatch, "
          "unchanged",
          id);
    case ErrorCode::kRanksMasked:
      return "timed out; signals never came from " + error_text::missing_pairs(r) + ". on_timeout='mask': rank(s) " +
             error_text::missing_ranks(r) +
             " are masked on this buffer from this call on (the call completed without them; buf.masked_ranks lists "
             "them). Once every live process agrees, call buf.mask_ranks(...) with the same list everywhere, or "
             "buf.mask_ranks([]) when the ranks are back";
    case ErrorCode::kBufferUnusable:
      return format(
          "refused, nothing sent: an earlier call on this buffer %s, so the ranks' calls can no longer be matched; "
          "mask the ranks that are gone with buf.mask_ranks(...) on every live process (it re-aligns the calls), or "
          "close the buffer and create a new one",
          r.detail == static_cast<int64_t>(ErrorCode::kTimeout) ? "timed out" : "saw a sequence mismatch");
    default:
      return format("error code %u (%s)", static_cast<unsigned>(r.code),
                    error_name(static_cast<uint32_t>(r.code)).summary);
  }
}

// Where and what: "rank 2 of group 0, dispatch call seq=7: topk_idx[3, 1] = 40 is outside [-1, 32); ...". A group
// below 0 or a seq of 0 is not known (the xla backend) and left out.
inline std::string describe(const ErrorRecord& r) {
  std::string where = error_text::format("rank %d", r.rank);
  if (r.group >= 0) where += error_text::format(" of group %d", r.group);
  where += error_text::format(", %s call", op_name(r.kind));
  if (r.seq != 0) where += error_text::format(" seq=%llu", static_cast<unsigned long long>(r.seq));
  return where + ": " + error_what(r);
}

}  // namespace jax_ll_ep
