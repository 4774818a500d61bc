// Combine: send kernel (send half), receive-and-reduce kernel (receive half).
//
// The expert owner sends row `offset + i` of pair (local expert e, source rank r) of the dispatch layout back to
// rank r's combine_recv[parity][src_info][src_topk_pos]; the source rank waits for all E_l x R signals and reduces
// its own rows in float32 in k order.
#include <cuda_bf16.h>

#include "cuda/launch.h"
#include "cuda/protocol.cuh"

namespace jax_ll_ep {
namespace cuda {
namespace {

constexpr int kSendThreads = 256;
constexpr int kRecvThreads = 512;
constexpr int kRecvWarps = kRecvThreads / kWarp;

// Lanes k < K hold the row's ids; returns the mask of k that count: ids in [0, E), first occurrence only (the
// sanitisation dispatch applied, so exactly the rows that were dispatched are read back).
__device__ __forceinline__ uint32_t valid_topk_mask(const int32_t* row, int k_count, int num_experts, int32_t& id) {
  const int lane = lane_id();
  id = lane < k_count ? row[lane] : -1;
  const uint32_t same = __match_any_sync(0xffffffffu, id);
  const bool valid = id >= 0 && id < num_experts && (same & lanemask_lt()) == 0u;
  return __ballot_sync(0xffffffffu, valid);
}

// ---------------------------------------------------------------------------------------------------------------
// Send kernel: one warp per row (pair p = local expert * R + destination rank, row i of the pair's range) across
// the grid; the warp that completes a pair signals it; empty pairs are signalled directly.
// ---------------------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kSendThreads) combine_send_kernel(CudaGroup g, CombineArgs a) {
  extern __shared__ int32_t smem[];
  const Layout& l = g.group.layout;
  const int num_pairs = static_cast<int>(l.num_pairs());
  const int num_ranks = l.num_ranks;
  int32_t* count = smem;             // [P]
  int32_t* base = smem + num_pairs;  // [P + 1]
  const int lane = lane_id();
  uint8_t* local = g.local_region;
  RankState* state = l.state(local);
  const CallState cs = read_call_state(state);
  const bool misuse = cs.open_seq != 0;
  const uint64_t seq = cs.seq + 1;
  const int parity = parity_of(seq);
  const int64_t rows = static_cast<int64_t>(num_ranks) * l.max_tokens;

  if (!misuse) {
    for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) {
      const int32_t offset = a.layout_range[2 * p], c = a.layout_range[2 * p + 1];
      const bool ok = offset >= 0 && c >= 0 && c <= l.max_tokens && offset <= rows - c;
      if (!ok && blockIdx.x == 0) {
        record_error(state, g.error_flag,
                     ErrorInfo{ErrorCode::kInvalidHandle, OpKind::kCombine, seq, c, p % num_ranks, p / num_ranks, 0});
      }
      count[p] = ok ? c : 0;
    }
    block_exclusive_scan(count, base, num_pairs);
    const int32_t total = base[num_pairs];
    const int64_t row_bytes = 2 * static_cast<int64_t>(l.hidden);
    for (int32_t m = global_warp(); m < total; m += num_global_warps()) {
      const int p = find_bucket(base, num_pairs, m);
      const int e = p / num_ranks, r = p % num_ranks;
      const int64_t row = static_cast<int64_t>(e) * rows + a.layout_range[2 * p] + (m - base[p]);
      const int32_t t = a.src_info[row], k = a.src_topk_pos[row];
      const PeerRef peer = peer_of(g, r);
      if (t >= 0 && t < l.max_tokens && k >= 0 && k < kMaxTopk) {
        warp_copy_to_peer(peer, local, l.combine_row(local, parity, t, k) - local,
                          reinterpret_cast<const uint8_t*>(a.y + row * l.hidden), row_bytes);
      } else if (lane == 0) {  // a handle entry outside the receive layout: skipped, reported
        record_error(state, g.error_flag, ErrorInfo{ErrorCode::kInvalidHandle, OpKind::kCombine, seq, row, t, k, 0});
      }
      __syncwarp();  // the whole warp's stores precede lane 0's release below
      if (lane == 0) {
        // release (gpu) per row, acquire by the warp that completes the pair, then its system-scope release
        const uint32_t prev = atomic_add_release_gpu(&g.workspace.pair_sent[p], 1u);
        if (static_cast<int32_t>(prev) + 1 == count[p]) {
          fence_acquire_gpu();
          g.workspace.pair_sent[p] = 0;
          send_signal(peer, local, reinterpret_cast<uint8_t*>(l.combine_signal(local, parity, e, g.group.rank)) - local,
                      encode_signal(seq, OpKind::kCombine, static_cast<uint32_t>(count[p])));
        }
      }
    }
    for (int p = global_warp(); p < num_pairs; p += num_global_warps()) {
      if (lane != 0 || count[p] != 0) continue;
      const int e = p / num_ranks, r = p % num_ranks;
      // no rows: the signal alone says "0 rows from this expert owner for its local expert e in this call"
      send_signal(peer_of(g, r), local,
                  reinterpret_cast<uint8_t*>(l.combine_signal(local, parity, e, g.group.rank)) - local,
                  encode_signal(seq, OpKind::kCombine, 0u));
    }
  } else if (blockIdx.x == 0 && threadIdx.x == 0) {
    record_error(state, g.error_flag, ErrorInfo{ErrorCode::kSplitMisuse, OpKind::kCombine, cs.open_seq, 0, -1, -1, 0});
    if (g.group.ticket_out != nullptr) *g.group.ticket_out = -1;  // matches no call: its receive half reports misuse
  }
  finish_kernel(&g.workspace.done[kDoneCombineSend], [&] {
    if (misuse) return;
    state->open_seq = seq;
    state->open_kind = static_cast<uint32_t>(OpKind::kCombine);
    if (g.group.ticket_out != nullptr) *g.group.ticket_out = ticket_of(seq);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Receive kernel: every block waits for all E_l x R signals (bounded) and checks each pair's row count against
// this rank's own routing; then one warp per token reduces its rows, 8 channels per lane per step:
//   acc = 0; for k in order: if valid(k): acc = acc + (w[k] * y_k)   (products and sums rounded to float32)
// ---------------------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kRecvThreads) combine_recv_kernel(CudaGroup g, CombineArgs a) {
  extern __shared__ int32_t smem[];
  __shared__ float weights[kRecvWarps][kWarp];
  const Layout& l = g.group.layout;
  const int num_pairs = static_cast<int>(l.num_pairs());
  const int num_ranks = l.num_ranks, num_local = l.num_local_experts;
  const int num_experts = num_local * num_ranks;
  int32_t* count = smem;                 // [P] announced rows per pair (-1: never arrived)
  int32_t* expected = smem + num_pairs;  // [P] rows this rank's routing sent to each pair
  const int lane = lane_id(), warp = threadIdx.x / kWarp;
  uint8_t* local = g.local_region;
  RankState* state = l.state(local);
  const CallState cs = read_call_state(state);
  const bool open = receive_matches(cs, OpKind::kCombine, g.group.ticket_in);
  const uint64_t seq = cs.open_seq;
  const int parity = parity_of(seq);
  const int n = a.num_tokens, k_count = a.num_topk;

  if (open) {
    for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) expected[p] = 0;
    __syncthreads();  // zeroed before the counts below
    for (int t = warp; t < n; t += kRecvWarps) {
      int32_t id;
      const uint32_t valid = valid_topk_mask(a.topk_idx + static_cast<int64_t>(t) * k_count, k_count, num_experts, id);
      if ((valid >> lane) & 1u) atomicAdd(&expected[(id % num_local) * num_ranks + id / num_local], 1);
    }
    const WaitContext w{state,       g.error_flag,     l.missing(local),
                        seq,         OpKind::kCombine, timeout_deadline(g.group.timeout_s),
                        l.max_tokens};
    for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) {
      const int e = p / num_ranks, r = p % num_ranks;
      count[p] = wait_signal(w, l.combine_signal(local, parity, e, r), l.dispatch_signal(local, parity, e, r), e, r, p);
    }
    __syncthreads();  // the waits' acquires (and the expected counts) precede every read below
    if (blockIdx.x == 0) {
      for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) {
        if (count[p] >= 0 && count[p] != expected[p]) {
          record_error(
              state, g.error_flag,
              ErrorInfo{ErrorCode::kInvalidHandle, OpKind::kCombine, seq, count[p], p % num_ranks, p / num_ranks, 0});
        }
      }
    }
    const int chunks = l.hidden / 8;  // 8 bf16 = 16 bytes per lane per step
    for (int t = global_warp(); t < n; t += num_global_warps()) {
      int32_t id;
      const uint32_t valid = valid_topk_mask(a.topk_idx + static_cast<int64_t>(t) * k_count, k_count, num_experts, id);
      weights[warp][lane] = lane < k_count ? a.topk_weights[static_cast<int64_t>(t) * k_count + lane] : 0.0f;
      __syncwarp();  // weights visible to the whole warp
      for (int c = lane; c < chunks; c += kWarp) {
        float acc[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
        for (int k = 0; k < k_count; ++k) {
          if (!((valid >> k) & 1u)) continue;  // rows of invalid k are never read
          const float wk = weights[warp][k];
          const uint4 v = *reinterpret_cast<const uint4*>(l.combine_row(local, parity, t, k) + 16 * c);
          const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc[2 * j] = __fadd_rn(acc[2 * j], __fmul_rn(wk, __uint_as_float(words[j] << 16)));
            acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], __fmul_rn(wk, __uint_as_float(words[j] & 0xFFFF0000u)));
          }
        }
        uint32_t out[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * j]));
          const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * j + 1]));
          out[j] = lo | (hi << 16);
        }
        *reinterpret_cast<uint4*>(a.out + static_cast<int64_t>(t) * l.hidden + 8 * c) =
            make_uint4(out[0], out[1], out[2], out[3]);
      }
      __syncwarp();  // every lane is done with this token's weights before the next token overwrites them
    }
  } else if (blockIdx.x == 0 && threadIdx.x == 0) {
    record_error(state, g.error_flag, ErrorInfo{ErrorCode::kSplitMisuse, OpKind::kCombine, cs.open_seq, 0, -1, -1, 0});
  }
  finish_kernel(&g.workspace.done[kDoneCombineRecv], [&] {
    if (!open) return;
    state->seq = seq;
    state->open_seq = 0;
    state->open_kind = static_cast<uint32_t>(OpKind::kNone);
  });
}

}  // namespace
}  // namespace cuda

cudaError_t run_combine(const CudaGroup& g, const CombineArgs& args, cudaStream_t stream) {
  using namespace cuda;
  const Layout& l = g.group.layout;
  const int num_pairs = static_cast<int>(l.num_pairs());
  if (g.group.phases & kSendPhase) {
    const int blocks = blocks_for(static_cast<int64_t>(l.num_ranks) * l.max_tokens * l.num_local_experts + num_pairs,
                                  kSendThreads / kWarp, g.num_sms);
    const size_t smem = (2 * static_cast<size_t>(num_pairs) + 1) * sizeof(int32_t);
    combine_send_kernel<<<blocks, kSendThreads, smem, stream>>>(g, args);
  }
  if (g.group.phases & kRecvPhase) {
    const int blocks = blocks_for(args.num_tokens, kRecvWarps, g.num_sms);
    const size_t smem = 2 * static_cast<size_t>(num_pairs) * sizeof(int32_t);
    combine_recv_kernel<<<blocks, kRecvThreads, smem, stream>>>(g, args);
  }
  return cudaGetLastError();
}

}  // namespace jax_ll_ep
