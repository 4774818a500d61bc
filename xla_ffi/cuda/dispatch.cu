// Dispatch: stage kernel + send kernel (send half), receive kernel (receive half).
//
// Slot assignment is deterministic: the s-th token (in token order) of this rank that chose global expert e goes to
// slot s of pair (e % E_l, this rank) in the owner's receive region of the call's parity. The receiver therefore
// only concatenates the pairs of each local expert by source rank to get the contract's row order (by source rank,
// then by source token).
#include <cuda_fp8.h>

#include <climits>

#include "cuda/launch.h"
#include "cuda/protocol.cuh"

namespace jax_ll_ep {
namespace cuda {
namespace {

constexpr int kStageThreads = 256;
constexpr int kSendThreads = 256;
constexpr int kRecvThreads = 512;
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// Bytes of a message's payload that travel: bf16 rows, or e4m3 bytes followed by the float32 scales (rounded up to
// 16 bytes; the message stride leaves room for it).
__host__ __device__ __forceinline__ int64_t payload_bytes(const Layout& l, Fp8Mode mode) {
  return mode == Fp8Mode::kNone ? 2 * static_cast<int64_t>(l.hidden)
                                : align_up(l.hidden + l.hidden / kScaleBlock * 4, 16);
}

// Scale and its inverse for one 128-channel block (the brief's exact float32 semantics, no FMA).
__device__ __forceinline__ void fp8_scales(float amax, Fp8Mode mode, float& scale, float& inv) {
  if (mode == Fp8Mode::kFloatScale) {
    scale = __fdiv_rn(amax, kFp8Max);
    inv = __fdiv_rn(kFp8Max, amax);
    return;
  }
  // The smallest e with 2^e >= q = amax / 448, read off the bits of the float32 q (a positive normal number since
  // amax >= 1e-4): its exponent, plus one unless q is a power of two.
  const uint32_t q = __float_as_uint(__fdiv_rn(amax, kFp8Max));
  const int e = static_cast<int>((q >> 23) & 0xFFu) - 127 + ((q & 0x7FFFFFu) != 0u ? 1 : 0);
  scale = __uint_as_float(static_cast<uint32_t>(e + 127) << 23);
  inv = __uint_as_float(static_cast<uint32_t>(127 - e) << 23);
}

// One warp casts a bf16 row into e4m3 bytes + float32 scales: each half-warp takes one 128-channel block, each lane
// 8 channels (one 16-byte load).
__device__ void cast_row_fp8(const uint16_t* x_row, uint8_t* data, float* scales, int hidden, Fp8Mode mode) {
  const int lane = lane_id();
  const int half = lane >> 4;
  const int sub = lane & 15;
  const int num_blocks = hidden / kScaleBlock;
  for (int b0 = 0; b0 < num_blocks; b0 += 2) {
    const int b = b0 + half;
    const bool active = b < num_blocks;
    float v[8];
    float amax = 0.0f;
    if (active) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x_row + b * kScaleBlock + sub * 8));
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[2 * j] = bf16_bits_to_float(w[j] & 0xFFFFu);
        v[2 * j + 1] = bf16_bits_to_float(w[j] >> 16);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
    }
    // max over the 16 lanes of this half-warp (xor distances below 16 never cross halves); max is exact
#pragma unroll
    for (int d = 8; d >= 1; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
    if (!active) continue;
    amax = fmaxf(amax, kAmaxFloor);
    float scale, inv;
    fp8_scales(amax, mode, scale, inv);
    uint32_t packed[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float a = fminf(fmaxf(__fmul_rn(v[2 * j], inv), -kFp8Max), kFp8Max);
      const float c = fminf(fmaxf(__fmul_rn(v[2 * j + 1], inv), -kFp8Max), kFp8Max);
      // cvt.rn.satfinite: round to nearest even (the values are already inside the finite range)
      const uint32_t pair = __nv_cvt_float2_to_fp8x2(make_float2(a, c), __NV_SATFINITE, __NV_E4M3);
      packed[j / 2] |= pair << (16 * (j % 2));
    }
    *reinterpret_cast<uint2*>(data + b * kScaleBlock + sub * 8) = make_uint2(packed[0], packed[1]);
    if (sub == 0) scales[b] = scale;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Stage kernel: (a) one warp per global expert lists the tokens that chose it, in token order (their slots);
// (b) one warp per token checks its row for routing errors and stages its payload (fp8 cast, or a bf16 copy when
// some peer is reached by NVSHMEM puts, which need a symmetric source).
// ---------------------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kStageThreads) dispatch_stage_kernel(CudaGroup g, DispatchArgs a) {
  const Layout& l = g.group.layout;
  const int num_experts = l.num_local_experts * l.num_ranks;
  const int n = a.num_tokens, k_count = a.num_topk;
  const int lane = lane_id();
  RankState* state = l.state(g.local_region);

  for (int e = global_warp(); e < num_experts; e += num_global_warps()) {
    int32_t running = 0;
    for (int base = 0; base < n; base += kWarp) {
      const int t = base + lane;
      int found = -1;
      if (t < n) {
        const int32_t* row = a.topk_idx + static_cast<int64_t>(t) * k_count;
        for (int k = 0; k < k_count; ++k) {
          if (row[k] == e) {  // the first occurrence only: a repeat is treated as -1
            found = k;
            break;
          }
        }
      }
      const uint32_t hits = __ballot_sync(0xffffffffu, found >= 0);
      if (found >= 0) {
        g.workspace.expert_list[static_cast<int64_t>(e) * l.max_tokens + running + __popc(hits & lanemask_lt())] =
            t * kMaxTopk + found;
      }
      running += __popc(hits);
    }
    if (lane == 0) g.workspace.expert_count[e] = running;
  }

  const uint64_t seq = read_call_state(state).seq + 1;  // for error records only
  const bool stage = a.fp8_mode != Fp8Mode::kNone || g.use_put;
  for (int t = global_warp(); t < n; t += num_global_warps()) {
    const int32_t id = lane < k_count ? a.topk_idx[static_cast<int64_t>(t) * k_count + lane] : -1;
    const uint32_t same = __match_any_sync(0xffffffffu, id);  // called by the whole warp (convergent)
    const bool in_range = id >= 0 && id < num_experts;
    const bool repeated = in_range && (same & lanemask_lt()) != 0u;
    const bool invalid = lane < k_count && !in_range && id != -1;
    const uint32_t bad = __ballot_sync(0xffffffffu, invalid || repeated);
    if (bad != 0u && lane == __ffs(bad) - 1) {  // the first bad entry of the row describes the error
      record_error(state, g.error_flag,
                   ErrorInfo{invalid ? ErrorCode::kInvalidExpert : ErrorCode::kDuplicateExpert, OpKind::kDispatch, seq,
                             id, t, lane, 0});
    }
    if (!stage) continue;
    const uint16_t* x_row = a.x + static_cast<int64_t>(t) * l.hidden;
    uint8_t* payload = Layout::payload(l.send_message(g.local_region, t));
    if (a.fp8_mode != Fp8Mode::kNone) {
      cast_row_fp8(x_row, payload, l.fp8_scales(l.send_message(g.local_region, t)), l.hidden, a.fp8_mode);
    } else {
      const int4* src = reinterpret_cast<const int4*>(x_row);
      int4* dst = reinterpret_cast<int4*>(payload);
      for (int i = lane; i < l.hidden / 8; i += kWarp) dst[i] = __ldg(src + i);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Send kernel: one warp per message (expert e, slot s) across the grid; the warp that completes a pair's messages
// signals the pair; pairs with no tokens are signalled directly. Every pair is signalled on every call.
// ---------------------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kSendThreads) dispatch_send_kernel(CudaGroup g, DispatchArgs a) {
  extern __shared__ int32_t smem[];
  const Layout& l = g.group.layout;
  const int num_experts = l.num_local_experts * l.num_ranks;
  int32_t* count = smem;               // [E]
  int32_t* base = smem + num_experts;  // [E + 1]
  const int lane = lane_id();
  uint8_t* local = g.local_region;
  RankState* state = l.state(local);
  const CallState cs = read_call_state(state);
  const bool misuse = cs.open_seq != 0;  // a split send is open: this send must not run
  const uint64_t seq = cs.seq + 1;
  const int parity = parity_of(seq);

  if (!misuse) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) count[e] = g.workspace.expert_count[e];
    block_exclusive_scan(count, base, num_experts);
    const int32_t total = base[num_experts];
    const bool staged = a.fp8_mode != Fp8Mode::kNone || g.use_put;
    const int64_t bytes = payload_bytes(l, a.fp8_mode);
    for (int32_t m = global_warp(); m < total; m += num_global_warps()) {
      const int e = find_bucket(base, num_experts, m);
      const int slot = m - base[e];
      const int32_t entry = g.workspace.expert_list[static_cast<int64_t>(e) * l.max_tokens + slot];
      const int t = entry / kMaxTopk, k = entry % kMaxTopk;
      const int dst = e / l.num_local_experts, local_expert = e % l.num_local_experts;
      const PeerRef peer = peer_of(g, dst);
      const int64_t offset = l.dispatch_message(local, parity, local_expert, g.group.rank, slot) - local;
      if (lane == 0) {
        put_16_bytes(peer, local, offset, static_cast<uint32_t>(t) | (static_cast<uint64_t>(k) << 32),
                     static_cast<uint32_t>(seq));
      }
      const uint8_t* src = staged ? Layout::payload(l.send_message(local, t))
                                  : reinterpret_cast<const uint8_t*>(a.x + static_cast<int64_t>(t) * l.hidden);
      warp_copy_to_peer(peer, local, offset + static_cast<int64_t>(sizeof(MessageHeader)), src, bytes);
      __syncwarp();  // the whole warp's stores precede lane 0's release below
      if (lane == 0) {
        // release (gpu): this message's stores precede the count; the warp that completes the pair acquires
        // every other warp's messages through the same counter before its system-scope release of the signal.
        const uint32_t prev = atomic_add_release_gpu(&g.workspace.pair_sent[e], 1u);
        if (static_cast<int32_t>(prev) + 1 == count[e]) {
          fence_acquire_gpu();
          g.workspace.pair_sent[e] = 0;
          send_signal(peer, local,
                      reinterpret_cast<uint8_t*>(l.dispatch_signal(local, parity, local_expert, g.group.rank)) - local,
                      encode_signal(seq, OpKind::kDispatch, static_cast<uint32_t>(count[e])));
        }
      }
    }
    for (int e = global_warp(); e < num_experts; e += num_global_warps()) {
      if (lane != 0 || count[e] != 0) continue;
      const int dst = e / l.num_local_experts, local_expert = e % l.num_local_experts;
      // no data: the signal alone says "0 tokens from this rank for this expert in this call"
      send_signal(peer_of(g, dst), local,
                  reinterpret_cast<uint8_t*>(l.dispatch_signal(local, parity, local_expert, g.group.rank)) - local,
                  encode_signal(seq, OpKind::kDispatch, 0u));
    }
  } else if (blockIdx.x == 0 && threadIdx.x == 0) {
    record_error(state, g.error_flag, ErrorInfo{ErrorCode::kSplitMisuse, OpKind::kDispatch, cs.open_seq, 0, -1, -1, 0});
    if (g.group.ticket_out != nullptr) *g.group.ticket_out = -1;  // matches no call: its receive half reports misuse
  }
  finish_kernel(&g.workspace.done[kDoneDispatchSend], [&] {
    if (misuse) return;
    state->open_seq = seq;
    state->open_kind = static_cast<uint32_t>(OpKind::kDispatch);
    if (g.group.ticket_out != nullptr) *g.group.ticket_out = ticket_of(seq);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Receive kernel: every block waits for all E_l x R signals of the open call (bounded), derives the packed layout
// from the counts (one scan over pairs ordered (local expert, source rank)), then the grid copies one message per
// warp into the output buffers.
// ---------------------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kRecvThreads) dispatch_recv_kernel(CudaGroup g, DispatchArgs a) {
  extern __shared__ int32_t smem[];
  const Layout& l = g.group.layout;
  const int num_pairs = static_cast<int>(l.num_pairs());
  const int num_ranks = l.num_ranks;
  int32_t* count = smem;             // [P], pair p = local_expert * R + source rank
  int32_t* base = smem + num_pairs;  // [P + 1]
  const int lane = lane_id();
  uint8_t* local = g.local_region;
  RankState* state = l.state(local);
  const CallState cs = read_call_state(state);
  const bool open = receive_matches(cs, OpKind::kDispatch, g.group.ticket_in);
  const uint64_t seq = cs.open_seq;
  const int parity = parity_of(seq);
  const int64_t rows = static_cast<int64_t>(num_ranks) * l.max_tokens;

  if (open) {
    const WaitContext w{state,       g.error_flag,      l.missing(local),
                        seq,         OpKind::kDispatch, timeout_deadline(g.group.timeout_s),
                        l.max_tokens};
    for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) {
      const int e = p / num_ranks, r = p % num_ranks;
      const int32_t c =
          wait_signal(w, l.dispatch_signal(local, parity, e, r), l.combine_signal(local, parity, e, r), e, r, p);
      count[p] = c < 0 ? 0 : c;
    }
    block_exclusive_scan(count, base, num_pairs);  // its barrier orders the waits' acquires before the copies
    if (blockIdx.x == 0) {
      for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) {
        const int first = (p / num_ranks) * num_ranks;
        a.layout_range[2 * p] = base[p] - base[first];
        a.layout_range[2 * p + 1] = count[p];
      }
      for (int e = threadIdx.x; e < l.num_local_experts; e += blockDim.x) {
        a.recv_count[e] = base[(e + 1) * num_ranks] - base[e * num_ranks];
      }
    }
    const int32_t total = base[num_pairs];
    const bool fp8 = a.fp8_mode != Fp8Mode::kNone;
    const int64_t row_bytes = fp8 ? l.hidden : 2 * static_cast<int64_t>(l.hidden);
    const int num_scales = l.hidden / kScaleBlock;
    for (int32_t m = global_warp(); m < total; m += num_global_warps()) {
      const int p = find_bucket(base, num_pairs, m);
      const int slot = m - base[p];
      const int e = p / num_ranks, r = p % num_ranks;
      const int64_t out_row = static_cast<int64_t>(e) * rows + (base[p] - base[e * num_ranks]) + slot;
      uint8_t* msg = l.dispatch_message(local, parity, e, r, slot);
      if (lane == 0) {
        const MessageHeader h = *Layout::header(msg);
        a.src_info[out_row] = h.src_token;
        a.src_topk_pos[out_row] = h.topk_pos;
      }
      const int4* src = reinterpret_cast<const int4*>(Layout::payload(msg));
      int4* dst = reinterpret_cast<int4*>(static_cast<uint8_t*>(a.recv_x) + out_row * row_bytes);
      for (int64_t i = lane; i < row_bytes / 16; i += kWarp) dst[i] = src[i];
      if (fp8) {
        const float* scales = l.fp8_scales(msg);
        for (int i = lane; i < num_scales; i += kWarp) {
          const float s = scales[i];
          if (a.fp8_mode == Fp8Mode::kUe8m0Scale) {
            // a power of two: its biased exponent is the UE8M0 byte e + 127
            static_cast<uint8_t*>(a.recv_scale)[out_row * num_scales + i] =
                static_cast<uint8_t>((__float_as_uint(s) >> 23) & 0xFFu);
          } else {
            static_cast<float*>(a.recv_scale)[out_row * num_scales + i] = s;
          }
        }
      }
    }
  } else {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      record_error(state, g.error_flag,
                   ErrorInfo{ErrorCode::kSplitMisuse, OpKind::kDispatch, cs.open_seq, 0, -1, -1, 0});
    }
    // Keep the outputs self-consistent (nothing received) so that no later op indexes with garbage.
    if (blockIdx.x == 0) {
      for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) {
        a.layout_range[2 * p] = 0;
        a.layout_range[2 * p + 1] = 0;
      }
      for (int e = threadIdx.x; e < l.num_local_experts; e += blockDim.x) a.recv_count[e] = 0;
    }
  }
  finish_kernel(&g.workspace.done[kDoneDispatchRecv], [&] {
    if (!open) return;
    state->seq = seq;
    state->open_seq = 0;
    state->open_kind = static_cast<uint32_t>(OpKind::kNone);
  });
}

}  // namespace
}  // namespace cuda

cudaError_t run_dispatch(const CudaGroup& g, const DispatchArgs& args, cudaStream_t stream) {
  using namespace cuda;
  const Layout& l = g.group.layout;
  const int num_experts = l.num_local_experts * l.num_ranks;
  const int num_pairs = static_cast<int>(l.num_pairs());
  if (g.group.phases & kSendPhase) {
    const int stage_blocks =
        blocks_for(num_experts > args.num_tokens ? num_experts : args.num_tokens, kStageThreads / kWarp, 4 * g.num_sms);
    dispatch_stage_kernel<<<stage_blocks, kStageThreads, 0, stream>>>(g, args);
    const int send_blocks = blocks_for(static_cast<int64_t>(args.num_tokens) * args.num_topk + num_experts,
                                       kSendThreads / kWarp, g.num_sms);
    const size_t send_smem = (2 * static_cast<size_t>(num_experts) + 1) * sizeof(int32_t);
    dispatch_send_kernel<<<send_blocks, kSendThreads, send_smem, stream>>>(g, args);
  }
  if (g.group.phases & kRecvPhase) {
    const int recv_blocks = blocks_for(static_cast<int64_t>(l.num_ranks) * l.max_tokens * l.num_local_experts,
                                       kRecvThreads / kWarp, g.num_sms);
    const size_t recv_smem = (2 * static_cast<size_t>(num_pairs) + 1) * sizeof(int32_t);
    dispatch_recv_kernel<<<recv_blocks, kRecvThreads, recv_smem, stream>>>(g, args);
  }
  return cudaGetLastError();
}

}  // namespace jax_ll_ep
