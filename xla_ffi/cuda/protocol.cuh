// Device-side building blocks shared by the dispatch and combine kernels: memory-model primitives, the bounded
// signal wait, error recording, the "last block in" state update, routing tables, warp copies to a peer (direct stores
// or NVSHMEM puts) and small block scans.
#pragma once

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include <stdint.h>

#include "cuda/launch.h"
#include "jax_ll_ep/errors.h"
#include "jax_ll_ep/layout.h"

namespace jax_ll_ep {
namespace cuda {

inline constexpr int kWarp = 32;
// Every kernel keeps its CallPlan (enter_call) at the start of its dynamic shared memory, then the launch's mask of
// ranks (plan_bytes: room for Layout::mask_words() words); its tables follow.
inline constexpr int kPlanBytes = 32;
__host__ __device__ __forceinline__ int64_t plan_bytes(const Layout& l) {
  return align_up(kPlanBytes + 4 * static_cast<int64_t>(l.mask_words()), 16);  // (the tables stay 16-byte aligned)
}

// ---------------------------------------------------------------------------------------------------------------
// Memory-model primitives (PTX). Signals are the only words two ranks race on; data is plain stores/loads ordered
// by the release/acquire pair around the signal.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void store_relaxed_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ uint32_t atomic_add_release_gpu(uint32_t* p, uint32_t v) {
  uint32_t old;
  asm volatile("atom.add.release.gpu.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
// old = *p; *p = old + 1 (atom.inc, which wraps to 0 only at 2^31 - 1, far beyond any queue). An increment that
// ptxas does not aggregate across the warp, so its result may be read long after it is issued (an add, or an inc
// bounded by 2^32 - 1, would be; see for_each_claimed_item).
__device__ __forceinline__ uint32_t atomic_increment_relaxed_gpu(uint32_t* p) {
  uint32_t old;
  asm volatile("atom.inc.relaxed.gpu.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(0x7fffffffu) : "memory");
  return old;
}
__device__ __forceinline__ uint32_t atomic_add_acq_rel_gpu(uint32_t* p, uint32_t v) {
  uint32_t old;
  asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
__device__ __forceinline__ void fence_acquire_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }
__device__ __forceinline__ void fence_acquire_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
// Polling loads: strong (never torn, never served from a stale L1 line) but without the per-load acquire cost; the
// poller issues one acquire fence once every signal it waits for has been observed.
__device__ __forceinline__ uint64_t load_relaxed_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_release_gpu(uint64_t* p, uint64_t v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ uint32_t lanemask_lt() {
  uint32_t m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}
__device__ __forceinline__ int lane_id() { return threadIdx.x & (kWarp - 1); }
__device__ __forceinline__ int global_warp() { return (blockIdx.x * blockDim.x + threadIdx.x) / kWarp; }
__device__ __forceinline__ int num_global_warps() { return gridDim.x * blockDim.x / kWarp; }

// ---------------------------------------------------------------------------------------------------------------
// Errors: the first one is described in RankState, every one is counted; the host-mapped flag lets the FFI handler
// of a later call raise without a device synchronisation.
// ---------------------------------------------------------------------------------------------------------------
struct ErrorInfo {
  ErrorCode code;
  OpKind kind;
  uint64_t seq;
  int64_t detail;
  int32_t token;
  int32_t topk_pos;
  uint64_t signal;
};

// Out of line: errors are rare, and the kernels' hot paths stay small. kRanksMasked (on_timeout="mask") is recorded
// for buf.check() but raises nothing in later calls: it does not set the host flag.
static __device__ __noinline__ void record_error(RankState* state, uint32_t* flag, const ErrorInfo& e) {
  if (atomicCAS(&state->error_code, 0u, static_cast<uint32_t>(e.code)) == 0u) {
    state->error_kind = static_cast<uint32_t>(e.kind);
    state->error_seq = e.seq;
    state->error_detail = e.detail;
    state->error_token = e.token;
    state->error_topk_pos = e.topk_pos;
    state->error_signal = e.signal;
  }
  if (e.code != ErrorCode::kRanksMasked) {
    // The details above are read by buf.check() after a device synchronisation; the flag only says "look".
    *reinterpret_cast<volatile uint32_t*>(flag) = static_cast<uint32_t>(e.code);
  }
  atomicAdd(&state->error_count, 1u);
  if (e.code == ErrorCode::kTimeout || e.code == ErrorCode::kSequenceMismatch) {
    // Sticky (RankState::unusable): this rank's call sequence may now differ from its peers', so every later send
    // is refused before it writes anything to a peer.
    atomicCAS(&state->unusable, 0u, static_cast<uint32_t>(e.code));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The call's state as every block of a kernel sees it at entry. RankState's call fields are written only by this
// rank's kernels, and only by the LAST BLOCK IN of a launch (enter_call): every other block has read them before it
// counted itself in, so every block of a launch decides on the same values, and no block waits for another at
// the end of the kernel (stream order hands the new state to the next launch). The one exception, the ranks a
// timeout masks, goes to the set of the other parity than the one a launch reads (see "Masking" below).
// ---------------------------------------------------------------------------------------------------------------
struct CallState {
  uint64_t seq;       // last completed call
  uint64_t open_seq;  // open send half (0: none)
  uint32_t open_kind;
  uint32_t unusable;  // RankState::unusable (sticky)
  uint32_t masked;    // ranks in the launch's mask: RankState::masked_count + the previous call's pending_count
};

// What a launch does, decided identically by every block from the state it read at entry.
struct CallPlan {
  uint64_t seq;          // the call's sequence number
  ErrorCode refuse;      // kOk: proceed; else why the call is refused (nothing is sent, no state changes)
  bool send, recv;       // the halves this launch runs (GroupArgs::phases)
  bool self_masked;      // this rank is in its own mask: the call returns at once (nothing sent, nothing awaited)
  const uint32_t* mask;  // the launch's mask of ranks in shared memory, or null when no rank is masked (fast path)
};
static_assert(sizeof(CallPlan) <= kPlanBytes, "CallPlan must fit its shared-memory slot");

// Whether a launch whose mask is `mask` (CallPlan::mask: null when no rank is masked) treats `rank` as masked.
__device__ __forceinline__ bool masked_rank(const uint32_t* mask, int rank) {
  return mask != nullptr && rank_in(mask, rank);
}

__device__ __forceinline__ CallPlan plan_call(const CallState& cs, OpKind kind, int32_t phases,
                                              const int32_t* ticket_in) {
  CallPlan p;
  p.send = (phases & kSendPhase) != 0;
  p.recv = (phases & kRecvPhase) != 0;
  p.seq = p.send ? cs.seq + 1 : cs.open_seq;
  p.refuse = ErrorCode::kOk;
  if (p.send) {
    // A send needs no open call, and a buffer whose call sequence may differ from its peers' sends nothing at all.
    if (cs.unusable != 0) {
      p.refuse = ErrorCode::kBufferUnusable;
    } else if (cs.open_seq != 0) {
      p.refuse = ErrorCode::kSplitMisuse;
    }
  } else if (cs.open_seq == 0 || cs.open_kind != static_cast<uint32_t>(kind) ||
             (ticket_in != nullptr && *ticket_in != ticket_of(cs.open_seq))) {
    p.refuse = ErrorCode::kSplitMisuse;  // a receive half alone completes the open call of its kind (its ticket)
  }
  return p;
}

// Masking (docs/protocol.md). The launch's mask is rank_mask[0] | rank_mask[1 + parity of the last completed call]:
// the second set holds the ranks whose wait timed out (on_timeout="mask") in the previous call's receive half, which
// finished before this launch (stream order). A timeout of THIS launch writes the other parity's set (its call's),
// so no block of a launch can see the mask change under it; the last block in merges the previous call's set into
// rank_mask[0] once every block has read both. Thread 0 copies the mask into shared memory only when a rank is
// masked: the fast path reads the two counters, which share RankState's cache line with seq.
__device__ __forceinline__ void read_mask(const Layout& l, uint8_t* region, int pending, uint32_t* out) {
  const volatile uint32_t* mask = l.rank_mask(region, 0);
  const volatile uint32_t* late = l.rank_mask(region, 1 + pending);
#pragma unroll 1
  for (int w = 0; w < l.mask_words(); ++w) out[w] = mask[w] | late[w];
}

// The last block in: the previous call's timed-out ranks join the mask for good. It runs after every block of the
// launch has read both sets (the acq_rel count of enter_call orders their reads before its writes).
__device__ __forceinline__ void merge_mask(const Layout& l, uint8_t* region, RankState* state, int pending) {
  if (state->pending_count[pending] == 0u) return;
  uint32_t* mask = l.rank_mask(region, 0);
  uint32_t* late = l.rank_mask(region, 1 + pending);
  uint32_t count = 0;
#pragma unroll 1
  for (int w = 0; w < l.mask_words(); ++w) {
    mask[w] |= late[w];
    late[w] = 0u;
    count += __popc(mask[w]);
  }
  state->masked_count = count;
  state->pending_count[pending] = 0u;
}

// Called by every thread at kernel entry. Thread 0 of each block reads the call state (and the mask) and counts the
// block in; the last block in re-arms the entry counter and the other parity's work queue (its last user, the
// previous call, has finished: stream order), then advances the state: a receive half closes the call, a send half
// alone opens it and hands its ticket to the receive half. Meanwhile the threads of warps 1.. run prologue(i, n)
// (thread i of n): work that needs no plan and no mask (staging inputs into the tables after the mask's words),
// overlapped with thread 0's round trips. Returns after a block barrier, with the plan, the mask and the prologue's
// stores visible to every thread.
template <typename Prologue>
__device__ __forceinline__ CallPlan enter_call(const CudaGroup& g, OpKind kind, CallPlan* shared_plan,
                                               Prologue prologue) {
  if (threadIdx.x == 0) {
    const Layout& l = g.group.layout;
    RankState* state = l.state(g.local_region);
    const volatile RankState* vs = state;
    const int pending = parity_of(vs->seq);  // the last completed call's timed-out ranks
    const CallState cs{vs->seq, vs->open_seq, vs->open_kind, vs->unusable,
                       vs->masked_count + vs->pending_count[pending]};
    CallPlan plan = plan_call(cs, kind, g.group.phases, g.group.ticket_in);
    plan.mask = nullptr;
    plan.self_masked = false;
    if (cs.masked != 0u) {
      uint32_t* mask = reinterpret_cast<uint32_t*>(reinterpret_cast<uint8_t*>(shared_plan) + kPlanBytes);
      read_mask(l, g.local_region, pending, mask);
      plan.mask = mask;
      plan.self_masked = rank_in(mask, g.group.rank);
    }
    *shared_plan = plan;
    // acq_rel: this block's reads of the state (and mask) above precede the count; the last block in sees every
    // block's count and therefore writes the state after all of them have read it.
    const uint32_t prev = atomic_add_acq_rel_gpu(g.workspace.entered, 1u);
    if (prev == gridDim.x - 1) {
      *g.workspace.entered = 0u;
      g.workspace.queue[parity_of(plan.seq + 1)] = 0u;
      merge_mask(l, g.local_region, state, pending);
      if (plan.refuse == ErrorCode::kOk) {
        if (plan.recv) {
          state->seq = plan.seq;
          state->open_seq = 0;
          state->open_kind = static_cast<uint32_t>(OpKind::kNone);
        } else {
          state->open_seq = plan.seq;
          state->open_kind = static_cast<uint32_t>(kind);
          if (g.group.ticket_out != nullptr) *g.group.ticket_out = ticket_of(plan.seq);
        }
      }
    }
  } else if (threadIdx.x >= kWarp) {
    prologue(static_cast<int>(threadIdx.x) - kWarp, static_cast<int>(blockDim.x) - kWarp);
  }
  __syncthreads();  // the plan, the mask and the prologue's stores are visible to the block
  return *shared_plan;
}

// The send half's work queue of this call (see "Work queues" below).
__device__ __forceinline__ uint32_t* call_queue(const CudaGroup& g, uint64_t seq) {
  return &g.workspace.queue[parity_of(seq)];
}

// A refused call: record why (block 0), and give a split send's receive half a ticket that can never match.
__device__ __forceinline__ void refuse_call(const CudaGroup& g, OpKind kind, const CallPlan& plan) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  RankState* state = g.group.layout.state(g.local_region);
  const int64_t detail = plan.refuse == ErrorCode::kBufferUnusable ? static_cast<int64_t>(state->unusable) : 0;
  record_error(state, g.error_flag, ErrorInfo{plan.refuse, kind, plan.seq, detail, -1, -1, 0});
  if (plan.send && g.group.ticket_out != nullptr) *g.group.ticket_out = -1;
}

// Phase trace: the latest time any warp (lane 0) or block (thread 0) reached `mark` (kMarkAllSent, kMarkExit).
__device__ __forceinline__ void trace_latest(const CudaGroup& g, uint64_t seq, TraceMark mark) {
  if (!g.trace || lane_id() != 0) return;
  atomicMax(reinterpret_cast<unsigned long long*>(g.workspace.trace + (seq % kTraceRows) * kTraceMarks + mark),
            static_cast<unsigned long long>(global_timer_ns()));
}

// Phase trace: the end of this block's work (the latest block's end is the call's exit).
__device__ __forceinline__ void trace_exit(const CudaGroup& g, uint64_t seq) {
  if (!g.trace) return;
  __syncthreads();  // the block's work is over
  if (threadIdx.x == 0) trace_latest(g, seq, kMarkExit);
}

// Phase trace (launch.h): block 0's thread 0 records the time of `mark` in the call's row.
__device__ __forceinline__ void trace_mark(const CudaGroup& g, uint64_t seq, OpKind kind, TraceMark mark) {
  if (!g.trace || blockIdx.x != 0 || threadIdx.x != 0) return;
  uint64_t* row = g.workspace.trace + (seq % kTraceRows) * kTraceMarks;
  if (mark == kMarkEntry) row[0] = (seq << 8) | static_cast<uint64_t>(kind);
  row[mark] = global_timer_ns();
}

// ---------------------------------------------------------------------------------------------------------------
// Waiting for the signals of call `seq`, bounded by the deadline.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint64_t timeout_deadline(double timeout_s) {
  return global_timer_ns() + static_cast<uint64_t>(timeout_s * 1e9);
}

struct WaitContext {
  RankState* state;
  uint32_t* error_flag;
  uint8_t* missing;  // [E_l][R]
  uint64_t seq;
  OpKind kind;
  uint64_t deadline_ns;
  int32_t max_count;     // a count above this is corrupt (T for dispatch, T for combine)
  int32_t num_ranks;     // pair p = local_expert * num_ranks + rank
  bool peers_remote;     // some peer is another GPU: the acquire must be system scope
  const uint32_t* mask;  // the launch's mask (null: none): a masked rank's pairs are not waited for (count 0)
  uint32_t* late_mask;   // on_timeout="mask": rank_mask[1 + parity of this call], where a timeout masks the rank
                         // from the next launch on (null: on_timeout="raise")
};

// The wait of call `seq` of `kind` on this rank's region, its deadline starting now.
__device__ __forceinline__ WaitContext wait_context(const CudaGroup& g, OpKind kind, uint64_t seq,
                                                    const uint32_t* ranks_masked) {
  const Layout& l = g.group.layout;
  uint8_t* local = g.local_region;
  return WaitContext{l.state(local),
                     g.error_flag,
                     l.missing(local),
                     seq,
                     kind,
                     timeout_deadline(g.group.timeout_s),
                     l.max_tokens,
                     l.num_ranks,
                     l.num_ranks > 1,
                     ranks_masked,
                     g.group.on_timeout_mask ? l.rank_mask(local, 1 + parity_of(seq)) : nullptr};
}

// One warp waits for pairs 0..n-1: lane l polls pairs l, l + 32, ..., kPollBatch of them per round with every load
// in flight, so a round costs one memory round trip whatever n is; the other warps of the block wait at a barrier
// instead of competing for the memory pipe. count[p] (shared memory) receives the announced count, or -1 when the
// pair never arrived (timeout) or a peer's call sequence disagrees (mismatch), both recorded. `slot(p)` is the
// pair's signal word; `crossed(p)` the same pair's word in the other op kind's array: a peer whose call `seq` is of
// the other kind signals there, which shows as a mismatch instead of a timeout.
// The rare outcomes of a poll, out of line (the polling loop stays small): pair p's signal disagrees with this
// call (another op kind or a newer call in either signal array, or a corrupt count), or it never came before the
// deadline. Both are recorded; count[p] = -1.
// With on_timeout="mask" a pair that times out masks its rank instead: from the next launch on (the outputs of this
// call are unspecified: its blocks decide on their own), recorded as kRanksMasked, and the buffer stays usable.
static __device__ __noinline__ void pair_failed(const WaitContext& w, int p, const uint64_t* slot,
                                                const uint64_t* crossed, bool timed_out, int32_t* count) {
  count[p] = -1;
  uint64_t seen = load_relaxed_sys(slot);
  if (timed_out) {
    w.missing[p] = 1;
  } else if (classify_signal(seen, w.seq, w.kind) == SignalState::kPending) {
    seen = load_relaxed_sys(crossed);  // the disagreement is in the other op kind's array
  }
  const bool mask = timed_out && w.late_mask != nullptr;
  if (mask) {
    const int rank = p % w.num_ranks;
    const uint32_t bit = 1u << (rank & 31);
    // relaxed: read by the next launch's entry, after this kernel (stream order)
    if ((atomicOr(&w.late_mask[rank >> 5], bit) & bit) == 0u) {
      atomicAdd(&w.state->pending_count[parity_of(w.seq)], 1u);
    }
  }
  record_error(
      w.state, w.error_flag,
      ErrorInfo{mask ? ErrorCode::kRanksMasked : (timed_out ? ErrorCode::kTimeout : ErrorCode::kSequenceMismatch),
                w.kind, w.seq, timed_out ? -1 : 1, p % w.num_ranks, p / w.num_ranks, seen});
}

// Signals of pairs 0..n-1 are slots[p] (crossed[p]: the same pair in the other op kind's array); pairs of source
// rank `skip_rank` (a fused call's own pairs, whose count the caller knows; -1: none) are not waited for, nor are the
// pairs of a masked rank (count 0).
static __device__ void warp_wait_signals(const WaitContext& w, int n, const uint64_t* slots, const uint64_t* crossed,
                                         int skip_rank, int32_t* count) {
  constexpr int kPollBatch = 8;
  const int lane = lane_id();
  const int step_rank = kWarp % w.num_ranks;  // the rank of pair p + 32, from the rank of pair p
  bool waited = false;
#pragma unroll 1
  for (int first = 0; first < n; first += kWarp * kPollBatch) {
    uint32_t pending = 0u;
    int r = (first + lane) % w.num_ranks;
#pragma unroll
    for (int j = 0; j < kPollBatch; ++j) {
      const int p = first + j * kWarp + lane;
      const bool skip = r == skip_rank || (w.mask != nullptr && rank_in(w.mask, r));
      if (p < n && skip && r != skip_rank) count[p] = 0;  // a masked rank's pair: never waited for, nothing read
      pending |= (p < n && !skip ? 1u : 0u) << j;
      r += step_rank;
      r -= r >= w.num_ranks ? w.num_ranks : 0;
    }
    waited = waited || pending != 0u;
    while (pending != 0u) {
      uint64_t v[kPollBatch], c[kPollBatch];
#pragma unroll
      for (int j = 0; j < kPollBatch; ++j) {
        const int p = first + j * kWarp + lane;
        if ((pending >> j) & 1u) {
          v[j] = load_relaxed_sys(slots + p);  // relaxed: the acquire fence below follows the last observation
          c[j] = load_relaxed_sys(crossed + p);
        }
      }
      uint32_t failed = 0u;
#pragma unroll
      for (int j = 0; j < kPollBatch; ++j) {
        if (!((pending >> j) & 1u)) continue;
        const SignalState st = classify_signal(v[j], w.seq, w.kind);
        const bool counted = st == SignalState::kArrived && signal_count(v[j]) <= static_cast<uint32_t>(w.max_count);
        if (counted) count[first + j * kWarp + lane] = static_cast<int32_t>(signal_count(v[j]));
        const bool bad =
            st == SignalState::kPending ? classify_signal(c[j], w.seq, w.kind) == SignalState::kMismatch : !counted;
        failed |= (bad ? 1u : 0u) << j;
        pending &= ~((counted || bad ? 1u : 0u) << j);
      }
      const uint32_t timed_out = pending != 0u && global_timer_ns() > w.deadline_ns ? pending : 0u;
      for (uint32_t rest = failed | timed_out; rest != 0u; rest &= rest - 1u) {
        const int p = first + (__ffs(rest) - 1) * kWarp + lane;
        pair_failed(w, p, slots + p, crossed + p, (timed_out & (rest & (0u - rest))) != 0u, count);
      }
      pending &= ~timed_out;
    }
  }
  // acquire: together with the relaxed observations above, the data announced by every signal is visible to this
  // warp, and to the rest of the block after the barrier that follows every call of this function.
  if (!waited) return;
  if (w.peers_remote) {
    fence_acquire_sys();
  } else {
    fence_acquire_gpu();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Routing tables. The whole block visits every entry of topk_idx [n][K], staged through shared memory in tiles of
// whole rows (coalesced loads); `first` is false for an id already seen earlier in its row (a repeat, treated as
// -1 by the protocol). With `first_staged` the first tile is already in `tile` (stage_first_topk_tile, before a
// block barrier). Returns after a block barrier.
// ---------------------------------------------------------------------------------------------------------------
inline constexpr int kTopkTile = 2048;  // entries staged at once (8 KB of shared memory)

// Copies entries [i, n) with stride `step` of `src` into `dst`, 4 loads in flight per thread.
template <typename T>
__device__ __forceinline__ void stage_words(T* dst, const T* src, int n, int i, int step) {
#pragma unroll 4
  for (; i < n; i += step) dst[i] = src[i];
}

// The entries of topk_idx's first tile (as for_each_topk_entry stages it), by thread i of n.
__device__ __forceinline__ void stage_first_topk_tile(const int32_t* topk, int n, int k_count, int32_t* tile, int i,
                                                      int step) {
  const int rows_per_tile = kTopkTile / k_count;
  stage_words(tile, topk, (n < rows_per_tile ? n : rows_per_tile) * k_count, i, step);
}

template <typename Visit>
__device__ void for_each_topk_entry(const int32_t* topk, int n, int k_count, int32_t* tile, bool first_staged,
                                    Visit visit) {
  const int rows_per_tile = kTopkTile / k_count;
  if (n <= 0) __syncthreads();  // (no tile: still a barrier, as promised)
#pragma unroll 1
  for (int t0 = 0; t0 < n; t0 += rows_per_tile) {
    const int entries = (n - t0 < rows_per_tile ? n - t0 : rows_per_tile) * k_count;
    const int32_t* src = topk + static_cast<int64_t>(t0) * k_count;
    if (t0 > 0 || !first_staged) stage_words(tile, src, entries, threadIdx.x, blockDim.x);
    __syncthreads();  // the tile is staged (and whatever the caller cleared before is visible)
#pragma unroll 1
    for (int i = threadIdx.x; i < entries; i += blockDim.x) {
      const int row = i / k_count, k = i % k_count;
      const int32_t id = tile[i];
      bool first = true;
#pragma unroll 1
      for (int j = 0; j < k; ++j) first = first && tile[row * k_count + j] != id;
      visit(t0 + row, k, id, first, tile + row * k_count);
    }
    __syncthreads();  // every entry visited before the tile is reused, and the visits' results are visible
  }
}

// Whether entry k of a staged row is the first bad one (outside [0, num_experts), or a repeat): a bad row is
// described once, by its first bad entry (as the cpu backend).
__device__ __forceinline__ bool first_bad_entry(const int32_t* row, int k, int num_experts) {
  for (int j = 0; j < k; ++j) {
    const int32_t id = row[j];
    if (id == -1) continue;
    if (id < 0 || id >= num_experts) return false;
    for (int i = 0; i < j; ++i) {
      if (row[i] == id) return false;
    }
  }
  return true;
}

__host__ __device__ __forceinline__ int words_per_expert(const Layout& l) { return (l.max_tokens + 31) / 32; }

// Bit i of mask word w: token 32w + i chose the expert. The slot of token t = the tokens before t that chose it.
__device__ __forceinline__ int32_t slot_of(const uint32_t* expert_mask, int t) {
  int32_t s = __popc(expert_mask[t / 32] & ((1u << (t % 32)) - 1u));
#pragma unroll 1
  for (int w = 0; w < t / 32; ++w) s += __popc(expert_mask[w]);
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Exclusive scan of value(0 .. n-1) into base[0..n] (base[n] is the total) by the whole block: each warp scans 32
// values in registers and adds the totals of the warps before it (`totals`: kWarp words of shared scratch), so no
// warp walks the n values alone while the others wait. value(i) is called once per i, by one thread, after a block
// barrier: it may read what any thread wrote before the call, and write entry i of the caller's own arrays. Call
// from the whole block; returns after a block barrier.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ int32_t warp_inclusive_scan(int32_t v) {
  const int lane = lane_id();
#pragma unroll
  for (int d = 1; d < kWarp; d <<= 1) {
    const int32_t up = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += up;
  }
  return v;
}

template <typename Value>
__device__ __forceinline__ void block_exclusive_scan(int n, int32_t* base, int32_t* totals, Value value) {
  const int lane = lane_id(), warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  __syncthreads();  // whatever value() reads, written by any thread before the call, is visible
  if (n <= 0 && threadIdx.x == 0) base[0] = 0;
  int32_t carry = 0;  // the sum of the values of the rounds before
#pragma unroll 1
  for (int start = 0; start < n; start += blockDim.x) {
    const int i = start + threadIdx.x;
    const int32_t v = i < n ? value(i) : 0;
    const int32_t inclusive = warp_inclusive_scan(v);
    if (lane == kWarp - 1) totals[warp] = inclusive;
    __syncthreads();  // every warp's total of this round is visible
    const int32_t w = lane < warps ? totals[lane] : 0;
    const int32_t w_inclusive = warp_inclusive_scan(w);
    const int32_t before = __shfl_sync(0xffffffffu, w_inclusive - w, warp);  // the warps before this one
    const int32_t round_total = __shfl_sync(0xffffffffu, w_inclusive, kWarp - 1);
    if (i < n) base[i] = carry + before + inclusive - v;
    carry += round_total;
    if (threadIdx.x == 0 && start + static_cast<int>(blockDim.x) >= n) base[n] = carry;
    __syncthreads();  // totals may be reused by the next round; after the last, base is visible to the block
  }
  if (n <= 0) __syncthreads();  // (no round: still a barrier, as promised)
}

// The index p with base[p] <= m < base[p + 1] (base non-decreasing, base[0] = 0 <= m < base[n]).
__device__ __forceinline__ int find_bucket(const int32_t* base, int n, int32_t m) {
  int lo = 0, hi = n;  // invariant: base[lo] <= m < base[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (base[mid] <= m) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------------------------
// Work queues. The send half's items are claimed from a counter in device memory instead of being assigned to
// blocks by index: a block that reaches the receive half (and spins there) has found the queue empty, so every send
// item is already owned by a running warp that finishes it without waiting on anything. The fused kernels therefore
// never depend on a block that is not yet resident (MPS shares, other streams), whatever the grid size. There is a
// counter per call parity (call_queue); the last block in of a call re-arms the other one for the next call.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t warp_claim(uint32_t* queue) {
  uint32_t item = 0;
  if (lane_id() == 0) item = atomicAdd(queue, 1u);  // relaxed: the claim orders no data
  return __shfl_sync(0xffffffffu, item, 0);
}

// Runs work(item) for every item this warp claims from `queue`, until the queue is empty (so a warp leaves only once
// every item is owned). With no more items than warps in the grid (one item per warp, as a rule) the next claim is
// issued before the current item's work and its round trip overlaps that work; with more items that would let
// early warps hold two items while late ones get none, so each claim then follows the work.
template <typename Work>
__device__ __forceinline__ void for_each_claimed_item(uint32_t* queue, uint32_t items, Work work) {
  const bool early = items <= static_cast<uint32_t>(num_global_warps());
  uint32_t item = warp_claim(queue);
#pragma unroll 1
  while (item < items) {
    // relaxed: the claim orders no data. (An increment: an add would be aggregated across the warp by ptxas, with
    // its result read at once, and the round trip would no longer overlap the work.)
    const uint32_t next = early && lane_id() == 0 ? atomic_increment_relaxed_gpu(queue) : 0u;
    work(item);
    item = early ? __shfl_sync(0xffffffffu, next, 0) : warp_claim(queue);
  }
}

// Warp copy of n 16-byte words with kBatch loads in flight per lane before the first store. Loads at L2 (ld.cg, not
// the read-only or L1 path): the source may be symmetric memory that peers wrote during this kernel.
template <int kBatch = 8>
__device__ __forceinline__ void warp_copy16(int4* dst, const int4* src, int64_t n) {
  const int lane = lane_id();
  for (int64_t base = 0; base < n; base += kBatch * kWarp) {
    int4 v[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int64_t i = base + j * kWarp + lane;
      if (i < n) v[j] = __ldcg(src + i);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int64_t i = base + j * kWarp + lane;
      if (i < n) dst[i] = v[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Moving bytes to a peer. `peer_base` is the peer's region as this process addresses it (nvshmem_ptr), or null when
// the peer is reached by NVSHMEM puts; `local_base` is this rank's region, whose offsets are symmetric addresses.
// ---------------------------------------------------------------------------------------------------------------
struct PeerRef {
  uint8_t* peer_base;  // null: put path
  int pe;
};

// The NVSHMEM calls of the put path, out of line: NVSHMEM's device functions are large, and inlined into every call
// site they would multiply the kernels' code (the direct-store path must stay small to stay in instruction cache).
static __device__ __noinline__ void put_warp(uint8_t* symmetric_dst, const uint8_t* src, int64_t bytes, int pe) {
  nvshmemx_putmem_nbi_warp(symmetric_dst, src, static_cast<size_t>(bytes), pe);
}
static __device__ __noinline__ void put_words(uint64_t* symmetric_dst, uint64_t lo, uint64_t hi, int pe) {
  nvshmem_uint64_p(symmetric_dst, lo, pe);
  nvshmem_uint64_p(symmetric_dst + 1, hi, pe);
}
// quiet first (with_quiet): the puts issued so far are complete (delivered) before the signal is issued.
static __device__ __noinline__ void put_signal(uint64_t* symmetric_slot, uint64_t value, int pe, bool with_quiet) {
  if (with_quiet) nvshmem_quiet();
  nvshmemx_signal_op(symmetric_slot, value, NVSHMEM_SIGNAL_SET, pe);
}

// Warp-wide copy of `bytes` (a multiple of 16, both pointers 16-byte aligned) to the peer's `dst_offset`.
__device__ __forceinline__ void warp_copy_to_peer(const PeerRef& peer, uint8_t* local_base, int64_t dst_offset,
                                                  const uint8_t* src, int64_t bytes) {
  if (peer.peer_base != nullptr) {
    warp_copy16(reinterpret_cast<int4*>(peer.peer_base + dst_offset), reinterpret_cast<const int4*>(src), bytes / 16);
  } else {
    put_warp(local_base + dst_offset, src, bytes, peer.pe);
  }
}

// One lane writes 16 bytes (two 64-bit words) to the peer's `dst_offset`.
__device__ __forceinline__ void put_16_bytes(const PeerRef& peer, uint8_t* local_base, int64_t dst_offset, uint64_t lo,
                                             uint64_t hi) {
  if (peer.peer_base != nullptr) {
    uint64_t* d = reinterpret_cast<uint64_t*>(peer.peer_base + dst_offset);
    d[0] = lo;
    d[1] = hi;
  } else {
    put_words(reinterpret_cast<uint64_t*>(local_base + dst_offset), lo, hi, peer.pe);
  }
}

// Publishes a signal after all data it announces. The caller has ordered that data before this thread (warp
// barrier, or the acquire side of a completion counter).
__device__ __forceinline__ void send_signal(const PeerRef& peer, uint8_t* local_base, int64_t slot_offset,
                                            uint64_t value) {
  if (peer.peer_base == local_base) {
    // release (gpu scope suffices: the receiver is this rank, on this GPU): every store this thread has observed,
    // the data included, is visible to a thread that acquires this signal.
    store_release_gpu(reinterpret_cast<uint64_t*>(peer.peer_base + slot_offset), value);
  } else if (peer.peer_base != nullptr) {
    // release (system scope): every store this thread has observed, the data included, is visible to a peer that
    // acquires this signal.
    store_release_sys(reinterpret_cast<uint64_t*>(peer.peer_base + slot_offset), value);
  } else {
    put_signal(reinterpret_cast<uint64_t*>(local_base + slot_offset), value, peer.pe, true);
  }
}

// A signal that announces no data ("0 tokens/rows from this rank in this call"): there is nothing to order before
// it, so a relaxed store (no fence, no quiet) suffices. Its call identity is the epoch inside the word; reuse safety
// needs no fence either, since the reads of the previous call on this buffer finished with that call's kernel.
__device__ __forceinline__ void send_empty_signal(const PeerRef& peer, uint8_t* local_base, int64_t slot_offset,
                                                  uint64_t value) {
  if (peer.peer_base != nullptr) {
    store_relaxed_sys(reinterpret_cast<uint64_t*>(peer.peer_base + slot_offset), value);
  } else {
    put_signal(reinterpret_cast<uint64_t*>(local_base + slot_offset), value, peer.pe, false);
  }
}

__device__ __forceinline__ PeerRef peer_of(const CudaGroup& g, int rank) {
  return PeerRef{g.group.regions[rank], g.peer_pes[rank]};
}

// Once per buffer, outside any stream capture: raises a kernel's dynamic shared-memory limit, and reports how many
// of its blocks fit on a multiprocessor with `smem` bytes each.
template <typename Kernel>
inline cudaError_t prepare_kernel(Kernel kernel, int threads, int max_dynamic_smem, size_t smem, int* blocks_per_sm) {
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_dynamic_smem);
  if (e != cudaSuccess) return e;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, kernel, threads, smem);
}

// Grid size: enough warps for the work, at most `max_blocks` (kernels stride over the rest).
inline int blocks_for(int64_t warps_of_work, int warps_per_block, int max_blocks) {
  const int64_t b = (warps_of_work + warps_per_block - 1) / warps_per_block;
  return static_cast<int>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

}  // namespace cuda
}  // namespace jax_ll_ep
