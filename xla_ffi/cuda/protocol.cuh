// Device-side building blocks shared by the dispatch and combine kernels: memory-model primitives, the bounded
// signal wait, error recording, the "last block out" state update, warp copies to a peer (direct stores or NVSHMEM
// puts) and small block scans.
#pragma once

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include <stdint.h>

#include "cuda/launch.h"
#include "jax_ll_ep/layout.h"

namespace jax_ll_ep {
namespace cuda {

inline constexpr int kWarp = 32;

// ---------------------------------------------------------------------------------------------------------------
// Memory-model primitives (PTX). Signals are the only words two ranks race on; data is plain stores/loads ordered
// by the release/acquire pair around the signal.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
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
__device__ __forceinline__ void fence_acquire_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }
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

__device__ __forceinline__ void record_error(RankState* state, uint32_t* flag, const ErrorInfo& e) {
  if (atomicCAS(&state->error_code, 0u, static_cast<uint32_t>(e.code)) == 0u) {
    state->error_kind = static_cast<uint32_t>(e.kind);
    state->error_seq = e.seq;
    state->error_detail = e.detail;
    state->error_token = e.token;
    state->error_topk_pos = e.topk_pos;
    state->error_signal = e.signal;
    // The details above are read by buf.check() after a device synchronisation; the flag only says "look".
    *reinterpret_cast<volatile uint32_t*>(flag) = static_cast<uint32_t>(e.code);
  }
  atomicAdd(&state->error_count, 1u);
}

// ---------------------------------------------------------------------------------------------------------------
// The call's sequence number as every block of a kernel sees it at entry. RankState is written only by this rank's
// kernels, and only by the last block of a kernel to finish (finish_kernel), so every block of a launch reads the
// same values.
// ---------------------------------------------------------------------------------------------------------------
struct CallState {
  uint64_t seq;       // last completed call
  uint64_t open_seq;  // open send half (0: none)
  uint32_t open_kind;
};
__device__ __forceinline__ CallState read_call_state(const RankState* state) {
  const volatile RankState* s = state;
  return CallState{s->seq, s->open_seq, s->open_kind};
}

// The split forms' ticket: the call's sequence number, low 31 bits (as the cpu backend).
__host__ __device__ __forceinline__ int32_t ticket_of(uint64_t seq) { return static_cast<int32_t>(seq & 0x7fffffffu); }

// Whether a receive half may complete the open call: one is open, of this kind, and (split form) the ticket matches.
__device__ __forceinline__ bool receive_matches(const CallState& cs, OpKind kind, const int32_t* ticket_in) {
  if (cs.open_seq == 0 || cs.open_kind != static_cast<uint32_t>(kind)) return false;
  return ticket_in == nullptr || *ticket_in == ticket_of(cs.open_seq);
}

// "Last block out": every block counts itself out after its work; the last one (which therefore runs after every
// block has read RankState at entry and has left its work loops) applies `update`, then re-arms the counter for
// the next launch.
template <typename Update>
__device__ __forceinline__ void finish_kernel(uint32_t* done, Update update) {
  __syncthreads();  // the whole block's work (and its reads of RankState) precede the count below
  if (threadIdx.x == 0) {
    __threadfence();  // release: this block's writes before its count
    const uint32_t prev = atomicAdd(done, 1u);
    if (prev == gridDim.x - 1) {
      __threadfence();  // acquire: every other block's writes are visible to the update
      update();
      *done = 0;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Waiting for one (local expert, rank) signal of call `seq`, bounded by the deadline. Returns the announced count,
// or -1 (never arrived: timeout; or the peer's call sequence disagrees), having recorded why.
// ---------------------------------------------------------------------------------------------------------------
struct WaitContext {
  RankState* state;
  uint32_t* error_flag;
  uint8_t* missing;  // [E_l][R]
  uint64_t seq;
  OpKind kind;
  uint64_t deadline_ns;
  int32_t max_count;  // a count above this is corrupt (T for dispatch, T for combine)
};

// `crossed` is the same pair's slot in the other op kind's signal array: a peer whose call `seq` is of the other
// kind signals there, which shows as a mismatch instead of a timeout.
__device__ __forceinline__ int32_t wait_signal(const WaitContext& w, const uint64_t* slot, const uint64_t* crossed,
                                               int local_expert, int rank, int pair_index) {
  for (;;) {
    uint64_t v = load_acquire_sys(slot);  // acquire: the data announced by this signal is visible after it
    SignalState s = classify_signal(v, w.seq, w.kind);
    if (s == SignalState::kPending) {
      const uint64_t other = load_acquire_sys(crossed);
      if (classify_signal(other, w.seq, w.kind) == SignalState::kMismatch) {
        v = other;
        s = SignalState::kMismatch;
      }
    }
    if (s == SignalState::kArrived) {
      const int32_t count = static_cast<int32_t>(signal_count(v));
      if (count <= w.max_count) return count;
      record_error(w.state, w.error_flag,
                   ErrorInfo{ErrorCode::kSequenceMismatch, w.kind, w.seq, 1, rank, local_expert, v});
      return -1;
    }
    if (s == SignalState::kMismatch) {
      record_error(w.state, w.error_flag,
                   ErrorInfo{ErrorCode::kSequenceMismatch, w.kind, w.seq, 1, rank, local_expert, v});
      return -1;
    }
    if (global_timer_ns() > w.deadline_ns) {
      w.missing[pair_index] = 1;
      record_error(w.state, w.error_flag, ErrorInfo{ErrorCode::kTimeout, w.kind, w.seq, -1, rank, local_expert, v});
      return -1;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Exclusive scan of n counts (shared memory) into base[0..n] by warp 0; base[n] is the total. Call from the whole
// block; returns after a block barrier.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ void block_exclusive_scan(const int32_t* counts, int32_t* base, int n) {
  __syncthreads();  // counts written by any thread are visible to warp 0
  if (threadIdx.x < kWarp) {
    const int lane = threadIdx.x;
    int32_t running = 0;
    for (int start = 0; start < n; start += kWarp) {
      const int i = start + lane;
      const int32_t v = i < n ? counts[i] : 0;
      int32_t inclusive = v;
#pragma unroll
      for (int d = 1; d < kWarp; d <<= 1) {
        const int32_t up = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += up;
      }
      if (i < n) base[i] = running + inclusive - v;
      running += __shfl_sync(0xffffffffu, inclusive, kWarp - 1);
    }
    if (lane == 0) base[n] = running;
  }
  __syncthreads();  // base visible to the block
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
// never depend on a block that is not yet resident (MPS shares, other streams), whatever the grid size. The last
// block out re-arms the counter.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t warp_claim(uint32_t* queue) {
  uint32_t item = 0;
  if (lane_id() == 0) item = atomicAdd(queue, 1u);  // relaxed: the claim orders no data
  return __shfl_sync(0xffffffffu, item, 0);
}

// Warp copy of n 16-byte words with kBatch loads in flight per lane before the first store. Plain loads (not the
// read-only path): the source may be symmetric memory that peers wrote during this kernel.
template <int kBatch = 8>
__device__ __forceinline__ void warp_copy16(int4* dst, const int4* src, int64_t n) {
  const int lane = lane_id();
  for (int64_t base = 0; base < n; base += kBatch * kWarp) {
    int4 v[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int64_t i = base + j * kWarp + lane;
      if (i < n) v[j] = src[i];
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

// Warp-wide copy of `bytes` (a multiple of 16, both pointers 16-byte aligned) to the peer's `dst_offset`.
__device__ __forceinline__ void warp_copy_to_peer(const PeerRef& peer, uint8_t* local_base, int64_t dst_offset,
                                                  const uint8_t* src, int64_t bytes) {
  if (peer.peer_base != nullptr) {
    warp_copy16(reinterpret_cast<int4*>(peer.peer_base + dst_offset), reinterpret_cast<const int4*>(src), bytes / 16);
  } else {
    nvshmemx_putmem_nbi_warp(local_base + dst_offset, src, static_cast<size_t>(bytes), peer.pe);
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
    uint64_t* d = reinterpret_cast<uint64_t*>(local_base + dst_offset);
    nvshmem_uint64_p(d, lo, peer.pe);
    nvshmem_uint64_p(d + 1, hi, peer.pe);
  }
}

// Publishes a signal after all data it announces. The caller has ordered that data before this thread (warp
// barrier, or the acquire side of a completion counter).
__device__ __forceinline__ void send_signal(const PeerRef& peer, uint8_t* local_base, int64_t slot_offset,
                                            uint64_t value) {
  if (peer.peer_base != nullptr) {
    // release (system scope): every store this thread has observed, the data included, is visible to a peer that
    // acquires this signal.
    store_release_sys(reinterpret_cast<uint64_t*>(peer.peer_base + slot_offset), value);
  } else {
    // quiet: the puts issued so far are complete (delivered) before the signal is issued.
    nvshmem_quiet();
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(local_base + slot_offset), value, NVSHMEM_SIGNAL_SET, peer.pe);
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
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(local_base + slot_offset), value, NVSHMEM_SIGNAL_SET, peer.pe);
  }
}

__device__ __forceinline__ PeerRef peer_of(const CudaGroup& g, int rank) {
  return PeerRef{g.group.regions[rank], g.peer_pes[rank]};
}

// Grid size: enough warps for the work, at most `max_blocks` (kernels stride over the rest).
inline int blocks_for(int64_t warps_of_work, int warps_per_block, int max_blocks) {
  const int64_t b = (warps_of_work + warps_per_block - 1) / warps_per_block;
  return static_cast<int>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

__device__ __forceinline__ uint64_t timeout_deadline(double timeout_s) {
  return global_timer_ns() + static_cast<uint64_t>(timeout_s * 1e9);
}

}  // namespace cuda
}  // namespace jax_ll_ep
