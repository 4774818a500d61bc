// The low-latency protocol over host memory. Read with protocol.h and docs/protocol.md; the CUDA kernels implement
// the same steps in the same order (xla_ffi/cuda/), so the two can be compared function by function:
//   dispatch_send / dispatch_recv / combine_send / combine_recv, wait_for_signals, and the call lifecycle
//   (open_call / close_call) on RankState.
#include "cpu/protocol.h"

#include <string.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "cpu/numerics.h"

namespace jax_ll_ep::cpu {
namespace {

using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------------------------------------------
// Memory ordering. Regions are plain host memory shared by threads (one process) or by processes (one shared
// mapping); GCC's atomic builtins give C++11 release/acquire semantics on any 8-byte-aligned word of it.
// ---------------------------------------------------------------------------------------------------------------

// Release store of a signal: every write this thread made before it (the messages it announces) is visible to any
// thread that acquire-loads the stored value.
inline void store_release(uint64_t* slot, uint64_t value) { __atomic_store_n(slot, value, __ATOMIC_RELEASE); }

// Acquire load of a signal: once it returns a peer's signal, the messages that signal announces are visible here.
inline uint64_t load_acquire(const uint64_t* slot) { return __atomic_load_n(slot, __ATOMIC_ACQUIRE); }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Pause between polls. The first polls spin (a running peer is microseconds away); then, for the first 2 ms of
// waiting, the waiter yields its core at every poll; after that it sleeps between polls. CI runs 8 device threads
// on 2 cores: a spinning waiter would starve the very ranks it is waiting for, while a sleeping one adds the
// timer's latency (tens of microseconds) to every call.
class Backoff {
 public:
  explicit Backoff(Clock::time_point start) : start_(start) {}

  void wait(Clock::time_point now) {
    ++polls_;
    if (polls_ <= 64) {
      cpu_relax();
    } else if (now - start_ < std::chrono::milliseconds(2)) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  Clock::time_point start_;
  int64_t polls_ = 0;
};

// ---------------------------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------------------------
uint64_t* signal_slot(const Layout& layout, uint8_t* region, OpKind kind, int parity, int local_expert, int rank) {
  return kind == OpKind::kDispatch ? layout.dispatch_signal(region, parity, local_expert, rank)
                                   : layout.combine_signal(region, parity, local_expert, rank);
}

// ---------------------------------------------------------------------------------------------------------------
// Errors: the first problem of a call, recorded in the rank's RankState (first error since the last check). What
// each field holds for each code is written beside ErrorCode (errors.h), which also words the message.
// ---------------------------------------------------------------------------------------------------------------
struct Fault {
  ErrorCode code = ErrorCode::kOk;
  int64_t detail = 0;
  int32_t token = -1;
  int32_t topk_pos = -1;
  uint64_t signal = 0;

  bool any() const { return code != ErrorCode::kOk; }
  // Keeps the first fault of a call.
  void note(ErrorCode c, int64_t d, int32_t t, int32_t k) {
    if (any()) return;
    code = c;
    detail = d;
    token = t;
    topk_pos = k;
  }
};

class Call {
 public:
  Call(const GroupArgs& g, const CallEnv& env, OpKind kind)
      : g_(g),
        env_(env),
        kind_(kind),
        layout_(g.layout),
        mine_(g.regions[g.rank]),
        state_(g.layout.state(g.regions[g.rank])) {}

  const Layout& layout() const { return layout_; }
  uint8_t* mine() const { return mine_; }
  RankState* state() const { return state_; }

  // ---- masking (docs/protocol.md): the rank's mask is its own device state, read at every use ----

  // Whether this rank treats `rank` as masked: sends nothing to it, waits on nothing from it, reads none of its
  // slots, and drops the (token, expert) pairs routed to its experts.
  bool masked(int rank) const { return state_->masked_count != 0 && rank_in(layout_.rank_mask(mine_), rank); }
  // This rank is masked in its own view (mask_ranks named it): its calls return at once, nothing sent or awaited.
  bool self_masked() const { return masked(g_.rank); }
  // The (token, expert) pairs this call dropped because their expert's rank is masked.
  void count_dropped(uint32_t dropped) const {
    state_->dropped_last = dropped;
    state_->dropped_total += dropped;
  }

  void pause(HookPoint point, uint64_t seq) const {
    if (env_.hooks != nullptr) env_.hooks->pause(env_.group, g_.rank, point, seq);
  }
  void stamp(Stamp which) const {
    if (env_.hooks != nullptr) env_.hooks->stamp(env_.group, g_.rank, kind_ == OpKind::kDispatch ? 0 : 1, which);
  }

  // `fault` of call `seq` as a Status, worded by errors.h. `missing_pairs` (pair indices) are a timeout's.
  Status status(uint64_t seq, const Fault& fault, const std::vector<int32_t>* missing_pairs = nullptr) const {
    if (!fault.any()) return {};
    ErrorRecord record;
    record.group = env_.group;
    record.rank = g_.rank;
    record.code = fault.code;
    record.kind = kind_;
    record.seq = seq;
    record.detail = fault.detail;
    record.token = fault.token;
    record.topk_pos = fault.topk_pos;
    record.signal = fault.signal;
    record.num_experts = layout_.num_experts();
    if (missing_pairs != nullptr) {
      for (int32_t pair : *missing_pairs)
        record.missing.emplace_back(pair % layout_.num_ranks, pair / layout_.num_ranks);
    }
    return Status{fault.code, describe(record)};
  }

  // Records `fault` as the rank's error (if it is the first since the last check) and returns it as a Status.
  // `missing_pairs` (pair indices) fills the missing table of a timeout.
  Status fail(uint64_t seq, const Fault& fault, const std::vector<int32_t>* missing_pairs = nullptr) const {
    {
      std::lock_guard<std::mutex> guard(*env_.record_lock);
      if (state_->error_code == static_cast<uint32_t>(ErrorCode::kOk)) {
        state_->error_code = static_cast<uint32_t>(fault.code);
        state_->error_kind = static_cast<uint32_t>(kind_);
        state_->error_seq = seq;
        state_->error_detail = fault.detail;
        state_->error_token = fault.token;
        state_->error_topk_pos = fault.topk_pos;
        state_->error_signal = fault.signal;
        uint8_t* missing = layout_.missing(mine_);
        memset(missing, 0, static_cast<size_t>(layout_.num_experts()));
        if (missing_pairs != nullptr) {
          for (int32_t pair : *missing_pairs) missing[pair] = 1;
        }
      }
      state_->error_count += 1;
      if (fault.code == ErrorCode::kTimeout || fault.code == ErrorCode::kSequenceMismatch) {
        state_->unusable = static_cast<uint32_t>(fault.code);  // sticky: see RankState::unusable
      }
      // (kRanksMasked is not: the masked ranks' slots are never read again, so their late writes cannot reach a
      // later call, and the live ranks' calls still match)
    }
    return status(seq, fault, missing_pairs);
  }

  // A split form used out of order (`token`: see SplitMisuse). Nothing has been written to any peer.
  Status misuse(uint64_t seq, SplitMisuse why, int32_t token) const {
    Fault fault;
    fault.note(ErrorCode::kSplitMisuse, static_cast<int64_t>(why), token, -1);
    return fail(seq, fault);
  }

  // ---- call lifecycle on RankState (owned by this rank; only this rank's calls touch it) ----

  // Send half: sets *seq to the call's sequence number, or refuses before anything is written to a peer: when a
  // call is still open (split misuse), or when an earlier timeout or sequence mismatch left this rank's call
  // sequence out of step with its peers' (RankState::unusable).
  Status begin_send(uint64_t* seq) const {
    if (state_->unusable != 0) {
      Fault fault;
      fault.note(ErrorCode::kBufferUnusable, state_->unusable, -1, -1);
      return fail(state_->seq + 1, fault);
    }
    if (state_->open_seq != 0) {
      return misuse(state_->open_seq, SplitMisuse::kSendWhileOpen, static_cast<int32_t>(state_->open_kind));
    }
    *seq = state_->seq + 1;
    return {};
  }

  // After the send half: the call is open until its receive half closes it. A fault found while sending (routing,
  // handle) is kept for the receive half to report once the protocol has completed.
  void open_call(uint64_t seq, const Fault& fault) const {
    state_->open_seq = seq;
    state_->open_kind = static_cast<uint32_t>(kind_);
    state_->open_error = static_cast<uint32_t>(fault.code);
    state_->open_error_detail = fault.detail;
    state_->open_error_token = fault.token;
    state_->open_error_topk_pos = fault.topk_pos;
    if (g_.ticket_out != nullptr) *g_.ticket_out = ticket_of(seq);
  }

  // Receive half: the open call's sequence number, or a misuse status if there is none of this kind or the ticket
  // belongs to another call.
  Status begin_recv(uint64_t* seq) const {
    const uint64_t open = state_->open_seq;
    if (open == 0) return misuse(state_->seq + 1, SplitMisuse::kNoOpenCall, -1);
    if (state_->open_kind != static_cast<uint32_t>(kind_)) {
      return misuse(open, SplitMisuse::kOtherKindOpen, static_cast<int32_t>(state_->open_kind));
    }
    if (g_.ticket_in != nullptr && *g_.ticket_in != ticket_of(open)) {
      return misuse(open, SplitMisuse::kWrongTicket, *g_.ticket_in);
    }
    *seq = open;
    return {};
  }

  // The send half's fault, as recorded by open_call (already in the error record).
  Fault open_fault() const {
    Fault fault;
    fault.note(static_cast<ErrorCode>(state_->open_error), state_->open_error_detail, state_->open_error_token,
               state_->open_error_topk_pos);
    return fault;
  }

  // The receive half is done with the receive region of this parity: the call is complete on this rank.
  void close_call(uint64_t seq) const {
    state_->seq = seq;
    state_->open_seq = 0;
    state_->open_kind = 0;
    state_->open_error = 0;
  }

  // ---- waiting ----

  // Waits until the signal of call `seq` has arrived in every (local expert, source rank) pair of this rank's
  // region (E_l x R of them) whose rank is not masked, bounded by timeout_s. counts[pair] receives each pair's
  // announced count (0 for a masked rank's pairs: they are never read). With on_timeout="mask", a deadline that
  // passes masks the ranks still silent and the call goes on without them.
  Status wait_for_signals(uint64_t seq, std::vector<uint32_t>* counts) const {
    const int parity = parity_of(seq);
    const int32_t num_ranks = layout_.num_ranks;
    const OpKind other = kind_ == OpKind::kDispatch ? OpKind::kCombine : OpKind::kDispatch;
    std::vector<int32_t> pending;
    pending.reserve(static_cast<size_t>(layout_.num_experts()));
    for (int32_t pair = 0; pair < static_cast<int32_t>(layout_.num_experts()); ++pair) {
      if (!masked(pair % num_ranks)) pending.push_back(pair);  // a masked rank's pairs are never waited for
    }
    counts->assign(static_cast<size_t>(layout_.num_experts()), 0);
    const auto start = Clock::now();
    const auto deadline =
        start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(g_.timeout_s));
    Backoff backoff(start);
    while (true) {
      size_t still = 0;
      for (const int32_t pair : pending) {
        const int local_expert = pair / num_ranks;
        const int rank = pair % num_ranks;
        // Acquire: pairs with the sender's release store; once the signal is seen, so are its messages.
        uint64_t signal = load_acquire(signal_slot(layout_, mine_, kind_, parity, local_expert, rank));
        SignalState seen = classify_signal(signal, seq, kind_);
        if (seen == SignalState::kPending) {
          // A peer that made a call of the other kind as its call `seq` signalled the other array: the ranks'
          // call sequences differ. (Relaxed would do; acquire keeps every signal load alike.)
          const uint64_t crossed = load_acquire(signal_slot(layout_, mine_, other, parity, local_expert, rank));
          if (classify_signal(crossed, seq, kind_) == SignalState::kMismatch) {
            signal = crossed;
            seen = SignalState::kMismatch;
          }
        }
        if (seen == SignalState::kArrived) {
          (*counts)[pair] = signal_count(signal);
          continue;
        }
        if (seen == SignalState::kMismatch) return mismatch(seq, rank, local_expert, signal);
        pending[still++] = pair;
      }
      pending.resize(still);
      if (pending.empty()) return {};
      const auto now = Clock::now();
      if (now >= deadline) return g_.on_timeout_mask ? mask_silent(seq, pending, counts) : timeout(seq, pending);
      backoff.wait(now);
    }
  }

 private:
  Status mismatch(uint64_t seq, int rank, int local_expert, uint64_t signal) const {
    Fault fault;
    fault.note(ErrorCode::kSequenceMismatch, 1, rank, local_expert);
    fault.signal = signal;
    return fail(seq, fault);
  }

  Status timeout(uint64_t seq, const std::vector<int32_t>& pending) const {
    Fault fault;
    fault.note(ErrorCode::kTimeout, static_cast<int64_t>(pending.size()), -1, -1);
    return fail(seq, fault, &pending);
  }

  // on_timeout="mask": the ranks of the pending pairs join this rank's mask, their pairs count 0 in this call (those
  // that did arrive too: a rank is masked for the whole call), the event is recorded for buf.check(), and the call
  // goes on. Their slots are not read again while they stay masked, so whatever they write late cannot reach a call.
  Status mask_silent(uint64_t seq, const std::vector<int32_t>& pending, std::vector<uint32_t>* counts) const {
    uint32_t* mask = layout_.rank_mask(mine_);
    for (const int32_t pair : pending) {
      const int rank = pair % layout_.num_ranks;
      if (rank_in(mask, rank)) continue;
      mask[rank >> 5] |= 1u << (rank & 31);
      state_->masked_count += 1;
    }
    for (int32_t pair = 0; pair < static_cast<int32_t>(counts->size()); ++pair) {
      if (masked(pair % layout_.num_ranks)) (*counts)[pair] = 0;
    }
    Fault fault;
    fault.note(ErrorCode::kRanksMasked, static_cast<int64_t>(pending.size()), -1, -1);
    fail(seq, fault, &pending);
    return {};
  }

  const GroupArgs& g_;
  const CallEnv& env_;
  OpKind kind_;
  const Layout& layout_;
  uint8_t* mine_;
  RankState* state_;
};

// The expert chosen by entry (token, k), or -1 for "no expert": -1 itself, an id outside [-1, E) (an error), or an
// expert already chosen earlier in the row (an error; the first occurrence is kept). Never an out-of-range id.
int32_t routed_expert(const int32_t* row, int32_t k, int32_t num_experts, int32_t token, Fault* fault) {
  const int32_t expert = row[k];
  if (expert == -1) return -1;
  if (expert < -1 || expert >= num_experts) {
    fault->note(ErrorCode::kInvalidExpert, expert, token, k);
    return -1;
  }
  for (int32_t j = 0; j < k; ++j) {
    if (row[j] == expert) {
      fault->note(ErrorCode::kDuplicateExpert, expert, token, k);
      return -1;
    }
  }
  return expert;
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------------------------

// Writes token t's message (header + payload, cast once) into this rank's staging slot.
void stage_message(const Layout& layout, const DispatchArgs& a, int32_t token, uint64_t seq, uint8_t* message) {
  MessageHeader* header = Layout::header(message);
  header->src_token = token;
  header->topk_pos = -1;  // set per destination
  header->seq = static_cast<uint32_t>(seq);
  header->reserved = 0;
  const uint16_t* x = a.x + static_cast<int64_t>(token) * layout.hidden;
  if (a.fp8_mode == Fp8Mode::kNone) {
    memcpy(Layout::payload(message), x, static_cast<size_t>(layout.hidden) * 2);
  } else {
    quantize_fp8_token(x, layout.hidden, a.fp8_mode, Layout::payload(message), layout.fp8_scales(message));
  }
}

Status dispatch_send(const Call& call, const GroupArgs& g, const DispatchArgs& a) {
  const Layout& layout = call.layout();
  uint64_t seq = 0;
  if (Status refused = call.begin_send(&seq); !refused.ok()) return refused;
  const int parity = parity_of(seq);
  const int32_t e_local = layout.num_local_experts;
  const int32_t num_experts = static_cast<int32_t>(layout.num_experts());
  const int64_t bytes = layout.wire_bytes(a.fp8_mode);
  if (call.self_masked()) {  // a masked rank's call returns at once: nothing sent
    call.open_call(seq, Fault{});
    return {};
  }
  call.stamp(Stamp::kEnter);
  call.pause(HookPoint::kBeforeSend, seq);

  // Data: message (t, k) goes to slot sent[e] of pair (local expert e % E_l, my rank) on rank e / E_l, where sent[e]
  // counts my earlier tokens that chose e (token order, hence the deterministic receive order). A pair whose expert's
  // rank is masked is dropped as if its id were -1.
  std::vector<int32_t> sent(static_cast<size_t>(num_experts), 0);
  Fault fault;
  uint32_t dropped = 0;
  for (int32_t t = 0; t < a.num_tokens; ++t) {
    uint8_t* staged = layout.send_message(call.mine(), t);
    stage_message(layout, a, t, seq, staged);
    const int32_t* row = a.topk_idx + static_cast<int64_t>(t) * a.num_topk;
    for (int32_t k = 0; k < a.num_topk; ++k) {
      const int32_t expert = routed_expert(row, k, num_experts, t, &fault);
      if (expert < 0) continue;
      if (call.masked(expert / e_local)) {
        ++dropped;
        continue;
      }
      const int32_t slot = sent[expert]++;  // < num_tokens <= T
      uint8_t* message = layout.message(g.regions[expert / e_local], parity, expert % e_local, g.rank, slot);
      memcpy(message, staged, static_cast<size_t>(bytes));
      Layout::header(message)->topk_pos = k;
    }
  }
  call.count_dropped(dropped);
  call.pause(HookPoint::kBeforeSignal, seq);
  call.stamp(Stamp::kSignalling);

  // Signals: every (destination rank, local expert) pair, zero-token pairs included (completeness); none to a masked
  // rank (nothing is written to it at all).
  for (int32_t dst = 0; dst < layout.num_ranks; ++dst) {
    if (call.masked(dst)) continue;
    for (int32_t e = 0; e < e_local; ++e) {
      // Release: the messages written above for this pair happen-before the owner's acquire of this signal.
      store_release(layout.dispatch_signal(g.regions[dst], parity, e, g.rank),
                    encode_signal(seq, OpKind::kDispatch, static_cast<uint32_t>(sent[dst * e_local + e])));
    }
  }
  if (fault.any()) call.fail(seq, fault);  // recorded now; the receive half reports it once the call completed
  call.open_call(seq, fault);
  return {};
}

void write_dispatch_outputs(const Call& call, const DispatchArgs& a, int parity, const std::vector<uint32_t>& counts) {
  const Layout& layout = call.layout();
  const int32_t num_ranks = layout.num_ranks;
  const int64_t h = layout.hidden;
  const int64_t rows = layout.recv_rows();
  const int64_t num_scales = layout.num_scales();
  for (int32_t e = 0; e < layout.num_local_experts; ++e) {
    int32_t offset = 0;
    // Rows by source rank, then by slot = the source's token order: the deterministic layout.
    for (int32_t r = 0; r < num_ranks; ++r) {
      // A sender never announces more than T tokens; the clamp keeps a corrupted count from addressing past T.
      const uint32_t announced = counts[layout.pair_index(e, r)];
      const int32_t count =
          announced > static_cast<uint32_t>(layout.max_tokens) ? layout.max_tokens : static_cast<int32_t>(announced);
      a.layout_range[(static_cast<int64_t>(e) * num_ranks + r) * 2 + 0] = offset;
      a.layout_range[(static_cast<int64_t>(e) * num_ranks + r) * 2 + 1] = count;
      for (int32_t slot = 0; slot < count; ++slot) {
        uint8_t* message = layout.message(call.mine(), parity, e, r, slot);
        const int64_t row = e * rows + offset + slot;
        const MessageHeader* header = Layout::header(message);
        a.src_info[row] = header->src_token;
        a.src_topk_pos[row] = header->topk_pos;
        if (a.fp8_mode == Fp8Mode::kNone) {
          memcpy(static_cast<uint16_t*>(a.recv_x) + row * h, Layout::payload(message), static_cast<size_t>(h) * 2);
          continue;
        }
        memcpy(static_cast<uint8_t*>(a.recv_x) + row * h, Layout::payload(message), static_cast<size_t>(h));
        const float* scales = layout.fp8_scales(message);
        if (a.fp8_mode == Fp8Mode::kUe8m0Scale) {
          uint8_t* out = static_cast<uint8_t*>(a.recv_scale) + row * num_scales;
          for (int64_t b = 0; b < num_scales; ++b) out[b] = ue8m0_of(scales[b]);
        } else {
          memcpy(static_cast<float*>(a.recv_scale) + row * num_scales, scales, static_cast<size_t>(num_scales) * 4);
        }
      }
      offset += count;
    }
    a.recv_count[e] = offset;
  }
}

// A masked rank's receive half: nothing received (every count 0), the rest of the outputs unspecified.
void write_empty_layout(const Layout& layout, const DispatchArgs& a) {
  for (int64_t i = 0; i < layout.num_experts(); ++i) a.layout_range[2 * i] = a.layout_range[2 * i + 1] = 0;
  for (int32_t e = 0; e < layout.num_local_experts; ++e) a.recv_count[e] = 0;
}

// The receive half's wait for every peer's signal (after the tests' pause point). A failed wait still closes the
// call: the buffer is unusable now (the status says why), and its state stays consistent anyway.
Status await_signals(const Call& call, uint64_t seq, std::vector<uint32_t>* counts) {
  call.pause(HookPoint::kBeforeRecv, seq);
  Status waited = call.wait_for_signals(seq, counts);
  if (!waited.ok()) call.close_call(seq);
  return waited;
}

Status dispatch_recv(const Call& call, const DispatchArgs& a) {
  uint64_t seq = 0;
  if (Status open = call.begin_recv(&seq); !open.ok()) return open;
  if (call.self_masked()) {  // nothing awaited
    write_empty_layout(call.layout(), a);
    call.close_call(seq);
    return {};
  }
  std::vector<uint32_t> counts;
  if (Status waited = await_signals(call, seq, &counts); !waited.ok()) return waited;
  write_dispatch_outputs(call, a, parity_of(seq), counts);
  call.stamp(Stamp::kReturned);
  const Fault fault = call.open_fault();
  call.close_call(seq);
  return call.status(seq, fault);
}

// ---------------------------------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------------------------------
Status combine_send(const Call& call, const GroupArgs& g, const CombineArgs& a) {
  const Layout& layout = call.layout();
  uint64_t seq = 0;
  if (Status refused = call.begin_send(&seq); !refused.ok()) return refused;
  const int parity = parity_of(seq);
  const int32_t num_ranks = layout.num_ranks;
  const int32_t max_tokens = layout.max_tokens;
  const int64_t rows = layout.recv_rows();
  const int64_t row_bytes = 2 * static_cast<int64_t>(layout.hidden);
  if (call.self_masked()) {  // a masked rank's call returns at once: nothing sent
    call.open_call(seq, Fault{});
    return {};
  }
  call.stamp(Stamp::kEnter);
  call.pause(HookPoint::kBeforeSend, seq);

  // Data: the rows of pair (local expert e, source rank r) (layout_range) are source rank r's tokens that chose my
  // expert e, in r's token order, so row offset + s goes back to slot s of pair (e, my rank) in r's region: the slot
  // r's combine_recv finds for its s-th token that chose this expert. Entries outside the layout are skipped, and
  // nothing goes to a masked rank.
  std::vector<int32_t> sent(static_cast<size_t>(layout.num_experts()), 0);
  Fault fault;
  for (int32_t e = 0; e < layout.num_local_experts; ++e) {
    for (int32_t r = 0; r < num_ranks; ++r) {
      const int32_t* range = a.layout_range + (static_cast<int64_t>(e) * num_ranks + r) * 2;
      const int32_t offset = range[0];
      const int32_t count = range[1];
      if (offset < 0 || count < 0 || count > max_tokens || offset > rows - count) {
        fault.note(ErrorCode::kInvalidHandle, -1 - layout.pair_index(e, r), r, e);
        continue;
      }
      if (call.masked(r)) continue;
      for (int32_t slot = 0; slot < count; ++slot) {
        const int64_t row = e * rows + offset + slot;
        memcpy(Layout::payload(layout.message(g.regions[r], parity, e, g.rank, slot)), a.y + row * layout.hidden,
               static_cast<size_t>(row_bytes));
        ++sent[layout.pair_index(e, r)];
      }
    }
  }
  call.pause(HookPoint::kBeforeSignal, seq);
  call.stamp(Stamp::kSignalling);

  // Signals: every (source rank, local expert) pair, zero-row pairs included (completeness); none to a masked rank.
  for (int32_t r = 0; r < num_ranks; ++r) {
    if (call.masked(r)) continue;
    for (int32_t e = 0; e < layout.num_local_experts; ++e) {
      // Release: the rows written above for this pair happen-before the source rank's acquire of this signal.
      store_release(layout.combine_signal(g.regions[r], parity, e, g.rank),
                    encode_signal(seq, OpKind::kCombine, static_cast<uint32_t>(sent[layout.pair_index(e, r)])));
    }
  }
  if (fault.any()) call.fail(seq, fault);  // recorded now; the receive half reports it
  call.open_call(seq, fault);
  return {};
}

Status combine_recv(const Call& call, const CombineArgs& a) {
  const Layout& layout = call.layout();
  uint64_t seq = 0;
  if (Status open = call.begin_recv(&seq); !open.ok()) return open;
  const int parity = parity_of(seq);
  if (call.self_masked()) {  // nothing awaited; the output is unspecified (zero here)
    std::fill(a.out, a.out + static_cast<int64_t>(a.num_tokens) * layout.hidden, uint16_t{0});
    call.close_call(seq);
    return {};
  }
  std::vector<uint32_t> counts;
  if (Status waited = await_signals(call, seq, &counts); !waited.ok()) return waited;

  // The valid choices of each token (routing errors treated as -1, exactly as dispatch did; a masked rank's experts
  // dropped), each one's receive slot (the token's slot in its dispatch: how many earlier tokens chose the expert),
  // and how many rows each (local expert, owner rank) pair must therefore have sent back.
  const int32_t e_local = layout.num_local_experts;
  const int32_t num_experts = static_cast<int32_t>(layout.num_experts());
  std::vector<int32_t> experts(static_cast<size_t>(a.num_tokens) * a.num_topk);
  std::vector<int32_t> slots(experts.size());
  std::vector<uint32_t> expected(counts.size(), 0);
  std::vector<int32_t> chosen(static_cast<size_t>(num_experts), 0);
  Fault routing;
  uint32_t dropped = 0;
  for (int32_t t = 0; t < a.num_tokens; ++t) {
    const int32_t* row = a.topk_idx + static_cast<int64_t>(t) * a.num_topk;
    for (int32_t k = 0; k < a.num_topk; ++k) {
      int32_t expert = routed_expert(row, k, num_experts, t, &routing);
      if (expert >= 0 && call.masked(expert / e_local)) {
        ++dropped;
        expert = -1;
      }
      experts[static_cast<size_t>(t) * a.num_topk + k] = expert;
      if (expert < 0) continue;
      slots[static_cast<size_t>(t) * a.num_topk + k] = chosen[expert]++;  // < num_tokens <= T
      ++expected[layout.pair_index(expert % e_local, expert / e_local)];
    }
  }
  call.count_dropped(dropped);

  // Reduce in float32, in k order, one rounding per multiply and per add (built with -ffp-contract=off).
  const int64_t h = layout.hidden;
  std::vector<float> acc(static_cast<size_t>(h));
  for (int32_t t = 0; t < a.num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int32_t k = 0; k < a.num_topk; ++k) {
      const size_t entry = static_cast<size_t>(t) * a.num_topk + k;
      const int32_t expert = experts[entry];
      if (expert < 0) continue;
      const float w = a.topk_weights[static_cast<int64_t>(t) * a.num_topk + k];
      const uint16_t* y = reinterpret_cast<const uint16_t*>(
          Layout::payload(layout.message(call.mine(), parity, expert % e_local, expert / e_local, slots[entry])));
      for (int64_t i = 0; i < h; ++i) acc[i] = acc[i] + w * bf16_to_float(y[i]);
    }
    uint16_t* out = a.out + t * h;
    for (int64_t i = 0; i < h; ++i) out[i] = float_to_bf16(acc[i]);
  }
  call.stamp(Stamp::kReturned);

  // Report, in order of cause: the send half's fault, a routing error, then rows that did not match topk_idx.
  Fault fault = call.open_fault();
  if (routing.any()) {
    call.fail(seq, routing);
    if (!fault.any()) fault = routing;
  }
  if (!fault.any()) {
    // A pair whose owner returned another number of rows than this rank's topk_idx chose: the handle and topk_idx
    // are not from the same dispatch.
    for (int32_t pair = 0; pair < static_cast<int32_t>(counts.size()); ++pair) {
      if (counts[pair] == expected[pair]) continue;
      fault.note(ErrorCode::kInvalidHandle, pair, pair % layout.num_ranks, pair / layout.num_ranks);
      call.fail(seq, fault);
      break;
    }
  }
  call.close_call(seq);
  return call.status(seq, fault);
}

template <typename Args, typename Send, typename Recv>
Status run(const GroupArgs& g, const Args& a, const CallEnv& env, OpKind kind, Send send, Recv recv) {
  // Test hook: this rank behaves as one that never made the call (no state change, nothing sent).
  if (env.hooks != nullptr && env.hooks->skips(g.rank)) return {};
  const Call call(g, env, kind);
  if (g.phases & kSendPhase) {
    if (Status sent = send(call, g, a); !sent.ok()) return sent;
  }
  if (g.phases & kRecvPhase) return recv(call, a);
  return {};
}

}  // namespace

Status run_dispatch(const GroupArgs& group, const DispatchArgs& args, const CallEnv& env) {
  return run(group, args, env, OpKind::kDispatch, dispatch_send, dispatch_recv);
}

Status run_combine(const GroupArgs& group, const CombineArgs& args, const CallEnv& env) {
  return run(group, args, env, OpKind::kCombine, combine_send, combine_recv);
}

}  // namespace jax_ll_ep::cpu
