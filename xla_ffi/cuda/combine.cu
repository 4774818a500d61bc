// Combine: one kernel that runs the send half, the receive half, or both (a fused call is a single launch).
//
// The expert owner sends row `offset + i` of pair (local expert e, source rank r) of the dispatch layout back to
// rank r's combine_recv[parity][src_info][src_topk_pos]; the source rank waits for all E_l x R signals and reduces
// its own rows in float32 in k order.
//
// Send half:    every block scans the handle's layout_range into per-pair counts; warps claim items from a work
//               queue: one row of y to a peer, 32 of this rank's own rows (fused call), or the data-free signals of
//               32 empty pairs. The warp that completes a pair signals it.
// Receive half: every block waits for all E_l x R signals (bounded) and checks the counts against this rank's own
//               routing; then each warp reduces 256 channels of one token at a time, every row load of the step in
//               flight before the first add.
// Fused call: this rank's own rows are not copied through the symmetric region; the send half records, for each
// (token, k) it owns, which row of y holds it (self_row), and the receive half reads y in place.
#include <cuda_bf16.h>

#include "cuda/launch.h"
#include "cuda/protocol.cuh"

namespace jax_ll_ep {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarp;
constexpr int kLoadBatch = 8;  // row loads in flight per lane in the reduction

// Lanes k < K hold the row's ids; returns the mask of k that count: ids in [0, E), first occurrence only (the
// sanitisation dispatch applied, so exactly the rows that were dispatched are read back).
__device__ __forceinline__ uint32_t valid_topk_mask(const int32_t* row, int k_count, int num_experts, int32_t& id) {
  const int lane = lane_id();
  id = lane < k_count ? row[lane] : -1;
  const uint32_t same = __match_any_sync(0xffffffffu, id);
  const bool valid = id >= 0 && id < num_experts && (same & lanemask_lt()) == 0u;
  return __ballot_sync(0xffffffffu, valid);
}

// Shared memory of the send half.
struct SendTables {
  int32_t* count;        // [P] rows of each pair (0 where the handle's entry is invalid)
  int32_t* remote;       // [P] rows copied through the symmetric region (count, or 0 for own pairs of a fused call)
  int32_t* remote_base;  // [P + 1] exclusive scan of remote
  int32_t* own;          // [E_l] own rows per local expert (fused call), else 0
  int32_t* own_base;     // [E_l + 1]
};

__device__ __forceinline__ SendTables send_tables(const Layout& l, int32_t* smem) {
  const int num_pairs = static_cast<int>(l.num_pairs());
  SendTables s;
  s.count = smem;
  s.remote = s.count + num_pairs;
  s.remote_base = s.remote + num_pairs;
  s.own = s.remote_base + num_pairs + 1;
  s.own_base = s.own + l.num_local_experts;
  return s;
}

struct SendContext {
  SendTables tables;
  uint64_t seq;
  int parity;
  bool direct;  // fused call: own rows are read in place by the receive half
};

// The warp or lane that completes pair p's rows signals it. Called after a __syncwarp that orders the warp's
// stores before this lane's release.
__device__ __forceinline__ void count_row_done(const CudaGroup& g, const SendContext& sc, int p, uint32_t rows) {
  const Layout& l = g.group.layout;
  // release (gpu) per item, acquire by the lane that completes the pair, then its system-scope release
  const uint32_t prev = atomic_add_release_gpu(&g.workspace.pair_sent[p], rows);
  if (prev + rows != static_cast<uint32_t>(sc.tables.count[p])) return;
  fence_acquire_gpu();
  g.workspace.pair_sent[p] = 0u;  // re-armed for the next call (stream order separates the calls)
  uint8_t* local = g.local_region;
  const int e = p / l.num_ranks, r = p % l.num_ranks;
  send_signal(peer_of(g, r), local,
              reinterpret_cast<uint8_t*>(l.combine_signal(local, sc.parity, e, g.group.rank)) - local,
              encode_signal(sc.seq, OpKind::kCombine, static_cast<uint32_t>(sc.tables.count[p])));
}

// The row of y and its (token, k) for row i of pair p; false when the handle entry is outside the receive layout
// (recorded if `report`: one lane per bad row).
__device__ __forceinline__ bool handle_row(const CudaGroup& g, const CombineArgs& a, const SendContext& sc, int p,
                                           int i, bool report, int64_t& row, int32_t& t, int32_t& k) {
  const Layout& l = g.group.layout;
  const int e = p / l.num_ranks;
  row = static_cast<int64_t>(e) * l.num_ranks * l.max_tokens + a.layout_range[2 * p] + i;
  t = a.src_info[row];
  k = a.src_topk_pos[row];
  if (t >= 0 && t < l.max_tokens && k >= 0 && k < kMaxTopk) return true;
  if (!report) return false;
  record_error(l.state(g.local_region), g.error_flag,
               ErrorInfo{ErrorCode::kInvalidHandle, OpKind::kCombine, sc.seq, row, t, k, 0});
  return false;
}

__device__ void send_half(const CudaGroup& g, const CombineArgs& a, int32_t* smem, uint64_t seq, bool direct) {
  const Layout& l = g.group.layout;
  const int num_pairs = static_cast<int>(l.num_pairs());
  const int num_ranks = l.num_ranks, rank = g.group.rank;
  const int64_t rows = static_cast<int64_t>(num_ranks) * l.max_tokens;
  const SendContext sc{send_tables(l, smem), seq, parity_of(seq), direct};
  const SendTables& s = sc.tables;
  for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) {
    const int32_t offset = a.layout_range[2 * p], c = a.layout_range[2 * p + 1];
    const bool ok = offset >= 0 && c >= 0 && c <= l.max_tokens && offset <= rows - c;
    if (!ok && blockIdx.x == 0) {
      record_error(l.state(g.local_region), g.error_flag,
                   ErrorInfo{ErrorCode::kInvalidHandle, OpKind::kCombine, seq, c, p % num_ranks, p / num_ranks, 0});
    }
    const bool own = direct && p % num_ranks == rank;
    s.count[p] = ok ? c : 0;
    s.remote[p] = ok && !own ? c : 0;
    if (own) s.own[p / num_ranks] = ok ? c : 0;
  }
  if (!direct) {
    for (int e = threadIdx.x; e < l.num_local_experts; e += blockDim.x) s.own[e] = 0;
  }
  block_exclusive_scan(s.remote, s.remote_base, num_pairs);  // (its barriers also publish count and own)
  block_exclusive_scan(s.own, s.own_base, l.num_local_experts);
  const uint32_t remote_rows = static_cast<uint32_t>(s.remote_base[num_pairs]);
  const uint32_t own_items = static_cast<uint32_t>((s.own_base[l.num_local_experts] + kWarp - 1) / kWarp);
  const uint32_t items = remote_rows + own_items + static_cast<uint32_t>((num_pairs + kWarp - 1) / kWarp);
  const int lane = lane_id();
  uint8_t* local = g.local_region;
  const int64_t row_bytes = 2 * static_cast<int64_t>(l.hidden);
  for (;;) {
    const uint32_t item = warp_claim(&g.workspace.queue[kOpCombine]);
    if (item >= items) break;
    if (item < remote_rows) {  // one row of y to its source rank
      const int m = static_cast<int>(item);
      const int p = find_bucket(s.remote_base, num_pairs, m);
      int64_t row;
      int32_t t, k;
      if (handle_row(g, a, sc, p, m - s.remote_base[p], lane == 0, row, t, k)) {
        warp_copy_to_peer(peer_of(g, p % num_ranks), local, l.combine_row(local, sc.parity, t, k) - local,
                          reinterpret_cast<const uint8_t*>(a.y + row * l.hidden), row_bytes);
      }
      __syncwarp();  // the whole warp's stores precede lane 0's release below
      if (lane == 0) count_row_done(g, sc, p, 1u);
    } else if (item < remote_rows + own_items) {  // 32 own rows: where they are in y
      const int m = static_cast<int>(item - remote_rows) * kWarp + lane;
      const bool active = m < s.own_base[l.num_local_experts];
      int p = 0;
      if (active) {
        const int e = find_bucket(s.own_base, l.num_local_experts, m);
        p = e * num_ranks + rank;
        int64_t row;
        int32_t t, k;
        if (handle_row(g, a, sc, p, m - s.own_base[e], true, row, t, k)) {
          g.workspace.self_row[t * kMaxTopk + k] = static_cast<int32_t>(row);
        }
      }
      __syncwarp();  // the whole warp's stores precede each lane's release below
      if (active) count_row_done(g, sc, p, 1u);
    } else {  // the data-free signals of up to 32 empty pairs
      const int p = static_cast<int>(item - remote_rows - own_items) * kWarp + lane;
      if (p < num_pairs && s.count[p] == 0) {
        send_empty_signal(peer_of(g, p % num_ranks), local,
                          reinterpret_cast<uint8_t*>(l.combine_signal(local, sc.parity, p / num_ranks, rank)) - local,
                          encode_signal(seq, OpKind::kCombine, 0u));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Receive half: acc = 0; for k in order: if valid(k): acc = acc + (w[k] * y_k)  (products and sums rounded to
// float32, no FMA), 8 channels per lane, one item = 256 channels of one token.
// ---------------------------------------------------------------------------------------------------------------
__device__ void recv_half(const CudaGroup& g, const CombineArgs& a, int32_t* smem, uint64_t seq, bool direct) {
  const Layout& l = g.group.layout;
  const int num_pairs = static_cast<int>(l.num_pairs());
  const int num_ranks = l.num_ranks, num_local = l.num_local_experts;
  const int num_experts = num_local * num_ranks;
  int32_t* count = smem;                 // [P] announced rows per pair (-1: never arrived)
  int32_t* expected = smem + num_pairs;  // [P] rows this rank's routing sent to each pair
  const int lane = lane_id();
  uint8_t* local = g.local_region;
  RankState* state = l.state(local);
  const int parity = parity_of(seq);
  const int n = a.num_tokens, k_count = a.num_topk;

  for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) expected[p] = 0;
  __syncthreads();  // zeroed before the counts below
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const int32_t* row = a.topk_idx + static_cast<int64_t>(t) * k_count;
    for (int k = 0; k < k_count; ++k) {
      const int32_t id = row[k];
      if (id < 0 || id >= num_experts) continue;
      bool repeated = false;
      for (int j = 0; j < k; ++j) repeated = repeated || row[j] == id;
      if (!repeated) atomicAdd(&expected[(id % num_local) * num_ranks + id / num_local], 1);
    }
  }
  const WaitContext w{
      state, g.error_flag, l.missing(local), seq, OpKind::kCombine, timeout_deadline(g.group.timeout_s), l.max_tokens};
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
  const int units = l.hidden / 8;  // 16 bytes of bf16 each
  const int unit_chunks = (units + kWarp - 1) / kWarp;
  const int64_t items = static_cast<int64_t>(n) * unit_chunks;
  for (int64_t item = global_warp(); item < items; item += num_global_warps()) {
    const int t = static_cast<int>(item / unit_chunks);
    const int u = static_cast<int>(item % unit_chunks) * kWarp + lane;
    int32_t id;
    const uint32_t valid = valid_topk_mask(a.topk_idx + static_cast<int64_t>(t) * k_count, k_count, num_experts, id);
    const float weight = lane < k_count ? a.topk_weights[static_cast<int64_t>(t) * k_count + lane] : 0.0f;
    // lane k: where row k of this token is (own rows of a fused call: in y itself; else the receive region)
    const uint8_t* src = nullptr;
    if ((valid >> lane) & 1u) {
      src = direct && id / num_local == g.group.rank
                ? reinterpret_cast<const uint8_t*>(
                      a.y + static_cast<int64_t>(g.workspace.self_row[t * kMaxTopk + lane]) * l.hidden)
                : l.combine_row(local, parity, t, lane);
    }
    const bool active = u < units;
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
    for (int k0 = 0; k0 < k_count; k0 += kLoadBatch) {
      uint4 v[kLoadBatch];
      float wk[kLoadBatch];
#pragma unroll
      for (int j = 0; j < kLoadBatch; ++j) {  // every load of the batch in flight before the first add
        const int k = k0 + j;
        const uint8_t* p = reinterpret_cast<const uint8_t*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(src), k & (kWarp - 1)));
        wk[j] = __shfl_sync(0xffffffffu, weight, k & (kWarp - 1));
        v[j] = make_uint4(0, 0, 0, 0);
        if (active && k < k_count && ((valid >> k) & 1u)) v[j] = *reinterpret_cast<const uint4*>(p + 16 * u);
      }
#pragma unroll
      for (int j = 0; j < kLoadBatch; ++j) {
        const int k = k0 + j;
        if (k >= k_count || !((valid >> k) & 1u)) continue;  // rows of invalid k are never read
        const uint32_t words[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          acc[2 * q] = __fadd_rn(acc[2 * q], __fmul_rn(wk[j], __uint_as_float(words[q] << 16)));
          acc[2 * q + 1] = __fadd_rn(acc[2 * q + 1], __fmul_rn(wk[j], __uint_as_float(words[q] & 0xFFFF0000u)));
        }
      }
    }
    if (!active) continue;
    uint32_t out[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * q]));
      const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * q + 1]));
      out[q] = lo | (hi << 16);
    }
    reinterpret_cast<uint4*>(a.out + static_cast<int64_t>(t) * l.hidden)[u] =
        make_uint4(out[0], out[1], out[2], out[3]);
  }
}

__global__ void __launch_bounds__(kThreads) combine_kernel(CudaGroup g, CombineArgs a) {
  extern __shared__ int32_t smem[];
  const Layout& l = g.group.layout;
  RankState* state = l.state(g.local_region);
  const CallState cs = read_call_state(state);
  const bool send = (g.group.phases & kSendPhase) != 0, recv = (g.group.phases & kRecvPhase) != 0;
  // A send half needs no call to be open; a receive half alone completes the open call of this kind (its ticket).
  const bool proceed = send ? cs.open_seq == 0 : receive_matches(cs, OpKind::kCombine, g.group.ticket_in);
  const uint64_t seq = send ? cs.seq + 1 : cs.open_seq;
  if (proceed) {
    const bool direct = send && recv;
    if (send) send_half(g, a, smem, seq, direct);
    if (recv) {
      __syncthreads();  // the block's send loop is over before its tables' memory is reused
      recv_half(g, a, smem, seq, direct);
    }
  } else if (blockIdx.x == 0 && threadIdx.x == 0) {
    record_error(state, g.error_flag, ErrorInfo{ErrorCode::kSplitMisuse, OpKind::kCombine, cs.open_seq, 0, -1, -1, 0});
    if (send && g.group.ticket_out != nullptr) *g.group.ticket_out = -1;  // its receive half reports misuse
  }
  finish_kernel(&g.workspace.done[kOpCombine], [&] {
    g.workspace.queue[kOpCombine] = 0u;  // every block has left its claim loop
    if (!proceed) return;
    if (recv) {
      state->seq = seq;
      state->open_seq = 0;
      state->open_kind = static_cast<uint32_t>(OpKind::kNone);
    } else {
      state->open_seq = seq;
      state->open_kind = static_cast<uint32_t>(OpKind::kCombine);
      if (g.group.ticket_out != nullptr) *g.group.ticket_out = ticket_of(seq);
    }
  });
}

}  // namespace
}  // namespace cuda

size_t combine_smem_bytes(const Layout& l) {
  const int64_t send = 3 * l.num_pairs() + 2 * static_cast<int64_t>(l.num_local_experts) + 2;
  const int64_t recv = 2 * l.num_pairs();
  return static_cast<size_t>(4 * (send > recv ? send : recv));
}

cudaError_t prepare_combine_kernel(int max_dynamic_smem, size_t smem, int* blocks_per_sm) {
  const cudaError_t e =
      cudaFuncSetAttribute(cuda::combine_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_dynamic_smem);
  if (e != cudaSuccess) return e;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, cuda::combine_kernel, cuda::kThreads, smem);
}

cudaError_t run_combine(const CudaGroup& g, const CombineArgs& args, cudaStream_t stream) {
  using namespace cuda;
  const Layout& l = g.group.layout;
  int64_t warps = 4 * static_cast<int64_t>(l.max_tokens);  // rows sent back, a guess (the host does not know them)
  if (g.group.phases & kRecvPhase) {
    const int64_t reduce = static_cast<int64_t>(args.num_tokens) * ((l.hidden / 8 + kWarp - 1) / kWarp);
    warps = reduce > warps ? reduce : warps;
  }
  // The work queue makes any grid size safe (protocol.cuh); beyond one resident wave nothing is gained.
  const int blocks = blocks_for(warps, kWarps, g.max_blocks[kOpCombine]);
  combine_kernel<<<blocks, kThreads, combine_smem_bytes(l), stream>>>(g, args);
  return cudaGetLastError();
}

}  // namespace jax_ll_ep
