// Combine: one kernel that runs the send half, the receive half, or both (a fused call is a single launch).
//
// The expert owner sends row `offset + s` of pair (local expert e, source rank r) of the dispatch layout back to slot
// s of pair (e, owner) in rank r's receive slots of the call's parity: the slot r's own dispatch gave that token (r's
// s-th token that chose the expert), so every slot is written by one rank only (layout.h). The source rank waits for
// all E_l x R signals and reduces its own rows in float32 in k order, finding each row by the same slot rule.
//
// Send half:    every block scans the handle's layout_range into per-pair counts; warps claim items from a work
//               queue: one row of y to a peer, or the data-free signals of 32 pairs. The warp that completes a
//               pair's rows signals it.
// Receive half: every block marks from this rank's topk_idx each token's choice of each expert (the slot rule that
//               finds every row), and block 0 counts the rows it expects per pair; one warp per block waits for all
//               E_l x R signals (bounded) and block 0 checks the counts against the expected ones; then each warp
//               reduces a run of 256-channel chunks of one token, every row load in flight before the first add.
// Fused call: this rank's own rows are not copied through the symmetric region and their pairs are not signalled
// (the rows are in y, an input that is complete before the kernel starts); the receive half reads them in place: the
// row of own (token t, expert e) is e's offset in the handle's layout_range plus t's slot, the number of this rank's
// tokens before t that chose e (the dispatch's slot rule), checked against src_info / src_topk_pos.
// Masking: nothing is sent to a masked rank, none of its pairs is waited for, and a token's choice of its experts is
// dropped (as if -1); with no rank masked this costs a test of a null pointer per choice.
#include <cuda_bf16.h>

#include "cuda/launch.h"
#include "cuda/protocol.cuh"

namespace jax_ll_ep {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarp;
constexpr int kLoadBatch = 8;  // row loads in flight per lane in the reduction

// Shared memory of the send half.
struct SendTables {
  int32_t* count;        // [P] rows of each pair (0 where the handle's entry is invalid)
  int32_t* remote_base;  // [P + 1] exclusive scan of the rows copied through the symmetric region (count, or 0 for
                         // own pairs of a fused call)
  int32_t* totals;       // [kWarp] scan scratch
};

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
  // release (gpu) per item, acquire by the lane that completes the pair, then its release of the signal
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

__device__ void send_half(const CudaGroup& g, const CombineArgs& a, const uint32_t* ranks_masked, int32_t* smem,
                          uint64_t seq, bool direct) {
  const Layout& l = g.group.layout;
  const int num_pairs = static_cast<int>(l.num_experts());
  const int num_ranks = l.num_ranks, rank = g.group.rank;
  const int64_t rows = static_cast<int64_t>(num_ranks) * l.max_tokens;
  const SendTables s{smem, smem + num_pairs, smem + 2 * num_pairs + 1};
  const SendContext sc{s, seq, parity_of(seq), direct};
  // Each pair's entry of the handle, validated, and scanned by the whole block into the remote rows' order (the
  // scan's last barrier also publishes count).
  block_exclusive_scan(num_pairs, s.remote_base, s.totals, [&](int p) {
    const int32_t offset = a.layout_range[2 * p], c = a.layout_range[2 * p + 1];
    const bool ok = offset >= 0 && c >= 0 && c <= l.max_tokens && offset <= rows - c;
    if (!ok && blockIdx.x == 0) {
      record_error(
          l.state(g.local_region), g.error_flag,
          ErrorInfo{ErrorCode::kInvalidHandle, OpKind::kCombine, seq, -1 - p, p % num_ranks, p / num_ranks, 0});
    }
    const bool own = direct && p % num_ranks == rank;
    const bool gone = masked_rank(ranks_masked, p % num_ranks);  // nothing goes to a masked rank
    s.count[p] = ok && !gone ? c : 0;
    return ok && !own && !gone ? c : 0;
  });
  trace_mark(g, seq, OpKind::kCombine, kMarkTables);
  const uint32_t remote_rows = static_cast<uint32_t>(s.remote_base[num_pairs]);
  const uint32_t items = remote_rows + static_cast<uint32_t>((num_pairs + kWarp - 1) / kWarp);
  const int lane = lane_id();
  uint8_t* local = g.local_region;
  const int64_t row_bytes = 2 * static_cast<int64_t>(l.hidden);
  for_each_claimed_item(call_queue(g, seq), items, [&](uint32_t item) {
    if (item < remote_rows) {  // one row of y to its source rank, into the slot of pair (e, this rank)
      const int m = static_cast<int>(item);
      const int p = find_bucket(s.remote_base, num_pairs, m);
      const int slot = m - s.remote_base[p];  // < count <= T (validated above)
      const int64_t row = static_cast<int64_t>(p / num_ranks) * rows + a.layout_range[2 * p] + slot;
      uint8_t* dst = Layout::payload(l.message(local, sc.parity, p / num_ranks, rank, slot));
      warp_copy_to_peer(peer_of(g, p % num_ranks), local, dst - local,
                        reinterpret_cast<const uint8_t*>(a.y + row * l.hidden), row_bytes);
      __syncwarp();  // the whole warp's stores precede lane 0's release below
      if (lane == 0) count_row_done(g, sc, p, 1u);
    } else {  // the data-free signals of up to 32 empty pairs (a fused call's own pairs need none: their rows
              // stay in y, and the receive half takes their count from these tables)
      const int p = static_cast<int>(item - remote_rows) * kWarp + lane;
      if (p < num_pairs && s.count[p] == 0 && !(direct && p % num_ranks == rank) &&
          !masked_rank(ranks_masked, p % num_ranks)) {
        send_empty_signal(peer_of(g, p % num_ranks), local,
                          reinterpret_cast<uint8_t*>(l.combine_signal(local, sc.parity, p / num_ranks, rank)) - local,
                          encode_signal(seq, OpKind::kCombine, 0u));
      }
    }
  });
  trace_latest(g, seq, kMarkAllSent);
  trace_mark(g, seq, OpKind::kCombine, kMarkSent);
}

// Shared memory of the receive half, after the send half's tables (a fused call reads the send half's counts).
struct RecvTables {
  int32_t* count;         // [P] announced rows per pair (-1: never arrived)
  int32_t* expected;      // [P] rows this rank's routing sent to each pair
  int32_t* own_offset;    // [E_l] fused call: own pair's offset in the layout (-1: invalid)
  uint32_t* expert_mask;  // [E][words] tokens of this rank that chose expert e (the slot rule of every row)
  int32_t* tile;          // [kTopkTile] staged topk_idx
  float* weights;         // [kTopkTile] topk_weights, when all of topk_idx fits one tile
};

__host__ __device__ __forceinline__ int64_t send_table_words(const Layout& l) {
  return 2 * l.num_experts() + 1 + kWarp;
}
__host__ __device__ __forceinline__ int64_t recv_table_words(const Layout& l) {
  return 2 * l.num_experts() + l.num_local_experts + l.num_experts() * words_per_expert(l) + 2 * kTopkTile;
}

__device__ __forceinline__ RecvTables recv_tables(const Layout& l, int32_t* smem) {
  const int num_pairs = static_cast<int>(l.num_experts());
  RecvTables r;
  r.count = smem + send_table_words(l);
  r.expected = r.count + num_pairs;
  r.own_offset = r.expected + num_pairs;
  r.expert_mask = reinterpret_cast<uint32_t*>(r.own_offset + l.num_local_experts);
  r.tile = reinterpret_cast<int32_t*>(r.expert_mask + l.num_experts() * words_per_expert(l));
  r.weights = reinterpret_cast<float*>(r.tile + kTopkTile);
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// Receive half: acc = 0; for k in order: if valid(k): acc = acc + (w[k] * y_k)  (products and sums rounded to
// float32, no FMA), 8 channels per lane; one item = consecutive 256-channel chunks of one token.
// ---------------------------------------------------------------------------------------------------------------
__device__ void recv_half(const CudaGroup& g, const CombineArgs& a, const uint32_t* ranks_masked, int32_t* smem,
                          uint64_t seq, bool direct, int per_item) {
  const Layout& l = g.group.layout;
  const int num_pairs = static_cast<int>(l.num_experts());
  const int num_ranks = l.num_ranks, num_local = l.num_local_experts, rank = g.group.rank;
  const int num_experts = num_local * num_ranks;
  const int words = words_per_expert(l);
  const int64_t rows = static_cast<int64_t>(num_ranks) * l.max_tokens;
  const RecvTables s = recv_tables(l, smem);
  const int32_t* layout_count = smem;  // the send half's validated counts per pair (fused call)
  const int lane = lane_id();
  uint8_t* local = g.local_region;
  RankState* state = l.state(local);
  const int parity = parity_of(seq);
  const int n = a.num_tokens, k_count = a.num_topk;

  const bool tile_holds_all = static_cast<int64_t>(n) * k_count <= kTopkTile;
  // (expert_mask was cleared, and topk_idx's first tile and the weights when it holds all staged, at entry:
  // start_receive_tables)
  const bool check = blockIdx.x == 0;  // block 0 checks the announced counts against the expected ones
  if (check) {
#pragma unroll 1
    for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) s.expected[p] = 0;
  }
  if (direct) {
#pragma unroll 1
    for (int e = threadIdx.x; e < num_local; e += blockDim.x) {
      const int32_t offset = a.layout_range[2 * (e * num_ranks + rank)];
      s.own_offset[e] = offset >= 0 && offset <= rows ? offset : -1;
    }
  }
  if (ranks_masked != nullptr && check && threadIdx.x == 0) state->dropped_last = 0u;
  // (the entry barrier orders the clearing of expert_mask and the staging before the visits; the staging barrier
  // inside orders the clearing of expected and the reset of dropped_last before them)
  for_each_topk_entry(a.topk_idx, n, k_count, s.tile, true, [&](int t, int, int32_t id, bool first, const int32_t*) {
    if (id < 0 || id >= num_experts || !first) return;
    const int e = id % num_local, owner = id / num_local;
    if (masked_rank(ranks_masked, owner)) {  // dropped as if -1
      if (check) atomicAdd(&state->dropped_last, 1u);
      return;
    }
    if (check) atomicAdd(&s.expected[e * num_ranks + owner], 1);
    atomicOr(&s.expert_mask[id * words + t / 32], 1u << (t % 32));
  });
  if (ranks_masked != nullptr && check && threadIdx.x == 0) {
    // (the barrier at the end of the visits orders block 0's counts before this read)
    atomicAdd(reinterpret_cast<unsigned long long*>(&state->dropped_total),
              static_cast<unsigned long long>(*reinterpret_cast<volatile uint32_t*>(&state->dropped_last)));
  }
  if (threadIdx.x < kWarp) {
    const WaitContext w = wait_context(g, OpKind::kCombine, seq, ranks_masked);
    warp_wait_signals(w, num_pairs, l.combine_signal(local, parity, 0, 0), l.dispatch_signal(local, parity, 0, 0),
                      direct ? rank : -1, s.count);
  }
  __syncthreads();  // warp 0's acquire (and the counts) precede every read below
  trace_mark(g, seq, OpKind::kCombine, kMarkArrived);
  if (check) {
    // own pairs of a fused call were not waited for: their count is the send half's validated one
#pragma unroll 1
    for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) {
      const int32_t c = direct && p % num_ranks == rank ? layout_count[p] : s.count[p];
      if (c >= 0 && c != s.expected[p]) {
        record_error(state, g.error_flag,
                     ErrorInfo{ErrorCode::kInvalidHandle, OpKind::kCombine, seq, p, p % num_ranks, p / num_ranks, 0});
      }
    }
  }
  const int units = l.hidden / 8;                       // 16 bytes of bf16 each
  const int unit_chunks = (units + kWarp - 1) / kWarp;  // chunks of 256 channels per token
  // An item is `per_item` consecutive chunks of one token (chunks_per_item): the token's routing, weights and rows
  // are found once per item, not once per chunk.
  const int64_t warps = num_global_warps();
  const int items_per_token = (unit_chunks + per_item - 1) / per_item;
  const int64_t items = static_cast<int64_t>(n) * items_per_token;
#pragma unroll 1
  for (int64_t item = global_warp(); item < items; item += warps) {
    const int t = static_cast<int>(item / items_per_token);
    const int first_chunk = static_cast<int>(item % items_per_token) * per_item;
    const int end_chunk = first_chunk + per_item < unit_chunks ? first_chunk + per_item : unit_chunks;
    // lane k: the token's k-th choice, its weight, and where its row is (own rows of a fused call: in y itself,
    // checked against the handle; else the receive region)
    const int64_t entry = static_cast<int64_t>(t) * k_count + lane;
    const int32_t id = lane >= k_count ? -1 : (tile_holds_all ? s.tile[entry] : a.topk_idx[entry]);
    const float weight = lane >= k_count ? 0.0f : (tile_holds_all ? s.weights[entry] : a.topk_weights[entry]);
    const uint32_t same = __match_any_sync(0xffffffffu, id);
    const bool valid = lane < k_count && id >= 0 && id < num_experts && (same & lanemask_lt()) == 0u &&
                       !masked_rank(ranks_masked, id / num_local);
    const uint32_t valid_mask = __ballot_sync(0xffffffffu, valid);
    const uint8_t* src = nullptr;
    int64_t own_row = -1;
    int32_t seen_t = t, seen_k = lane;
    if (valid) {
      const int e = id % num_local;
      const int32_t slot = slot_of(s.expert_mask + id * words, t);
      if (direct && id / num_local == rank) {
        const int32_t offset = s.own_offset[e];
        const int64_t r = offset + static_cast<int64_t>(slot);
        if (offset >= 0 && r < rows) {
          own_row = e * rows + r;
          src = reinterpret_cast<const uint8_t*>(a.y + own_row * l.hidden);
          seen_t = a.src_info[own_row];  // in flight with the row loads below
          seen_k = a.src_topk_pos[own_row];
        }
      } else {
        src = Layout::payload(l.message(local, parity, e, id / num_local, slot));
      }
    }
    uint32_t use = 0u;
#pragma unroll 1
    for (int chunk = first_chunk; chunk < end_chunk; ++chunk) {
      const int u = chunk * kWarp + lane;
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
          if (active && k < k_count && p != nullptr) v[j] = __ldcg(reinterpret_cast<const uint4*>(p) + u);
        }
        if (chunk == first_chunk && k0 == 0) {
          // the rows that count: valid entries whose row exists and (own rows) maps back to this (token, k)
          const bool row_ok = valid && src != nullptr && seen_t == t && seen_k == lane;
          use = valid_mask & __ballot_sync(0xffffffffu, row_ok);
          if (first_chunk == 0 && valid && !row_ok) {  // reported once per (token, k)
            record_error(state, g.error_flag,
                         ErrorInfo{ErrorCode::kInvalidHandle, OpKind::kCombine, seq, own_row, t, lane, 0});
          }
        }
#pragma unroll
        for (int j = 0; j < kLoadBatch; ++j) {
          const int k = k0 + j;
          if (k >= k_count || !((use >> k) & 1u)) continue;  // rows of invalid k are never used
          const uint32_t words4[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            acc[2 * q] = __fadd_rn(acc[2 * q], __fmul_rn(wk[j], __uint_as_float(words4[q] << 16)));
            acc[2 * q + 1] = __fadd_rn(acc[2 * q + 1], __fmul_rn(wk[j], __uint_as_float(words4[q] & 0xFFFF0000u)));
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
  trace_mark(g, seq, OpKind::kCombine, kMarkReceived);
}

// The receive half's tables started before the entry barrier (enter_call's prologue), while thread 0 reads the call
// state and the mask of ranks: the slot masks cleared, topk_idx's first tile staged, and the weights when that tile
// holds all of topk_idx. By thread i of `step`.
__device__ __forceinline__ void start_receive_tables(const Layout& l, const CombineArgs& a, int32_t* smem, int i,
                                                     int step) {
  const RecvTables s = recv_tables(l, smem);
  const int num_words = static_cast<int>(l.num_experts()) * words_per_expert(l);
#pragma unroll 1
  for (int w = i; w < num_words; w += step) s.expert_mask[w] = 0u;
  stage_first_topk_tile(a.topk_idx, a.num_tokens, a.num_topk, s.tile, i, step);
  if (static_cast<int64_t>(a.num_tokens) * a.num_topk <= kTopkTile) {
    stage_words(s.weights, a.topk_weights, a.num_tokens * a.num_topk, i, step);
  }
}

__global__ void __launch_bounds__(kThreads) combine_kernel(CudaGroup g, CombineArgs a, int32_t per_item) {
  extern __shared__ __align__(16) int32_t smem_words[];
  int32_t* tables = smem_words + plan_bytes(g.group.layout) / 4;  // after the plan and the mask of ranks
  const bool recv = (g.group.phases & kRecvPhase) != 0;           // (the plan's receive half: plan_call)
  const CallPlan plan = enter_call(g, OpKind::kCombine, reinterpret_cast<CallPlan*>(smem_words), [&](int i, int n) {
    if (recv) start_receive_tables(g.group.layout, a, tables, i, n);
  });
  trace_mark(g, plan.seq, OpKind::kCombine, kMarkEntry);
  if (plan.refuse == ErrorCode::kOk && plan.self_masked) {
    // a masked rank: nothing sent, nothing awaited, the output unspecified
  } else if (plan.refuse == ErrorCode::kOk) {
    const bool direct = plan.send && plan.recv;
    if (plan.send) send_half(g, a, plan.mask, tables, plan.seq, direct);
    if (plan.recv) {
      __syncthreads();  // the block's send loop is over before its tables' memory is reused
      recv_half(g, a, plan.mask, tables, plan.seq, direct, per_item);
    }
  } else {
    refuse_call(g, OpKind::kCombine, plan);
  }
  trace_exit(g, plan.seq);
}

}  // namespace
}  // namespace cuda

size_t combine_smem_bytes(const Layout& l) {
  return static_cast<size_t>(cuda::plan_bytes(l) + 4 * (cuda::send_table_words(l) + cuda::recv_table_words(l)));
}

cudaError_t prepare_combine_kernel(int max_dynamic_smem, size_t smem, int* blocks_per_sm) {
  return cuda::prepare_kernel(cuda::combine_kernel, cuda::kThreads, max_dynamic_smem, smem, blocks_per_sm);
}

// The reduction's item size: `per_item` consecutive 256-channel chunks of one token, the largest that keeps the
// slowest warp's share (rounds of items x chunks per item) at its minimum. One item per warp when the chunks allow
// (T=128 on 132 blocks: 2 chunks), but never an uneven last round: T=128 on an MPS share of 14 blocks (224 warps,
// 3,584 chunks) gets 4 (4 rounds of 4 chunks), where "as few as give every warp one item" took 16 and left 32
// warps with 2 items of 16 chunks while the rest had one.
static int chunks_per_item(int64_t tokens, int chunks_per_token, int64_t warps) {
  int best = 1;
  int64_t best_cost = -1;
  for (int per_item = 1; per_item <= chunks_per_token; ++per_item) {
    const int64_t items = tokens * ((chunks_per_token + per_item - 1) / per_item);
    const int64_t cost = (items + warps - 1) / warps * per_item;
    if (best_cost < 0 || cost <= best_cost) best = per_item, best_cost = cost;
  }
  return best;
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
  const int per_item = chunks_per_item(args.num_tokens, (l.hidden / 8 + kWarp - 1) / kWarp, int64_t{blocks} * kWarps);
  combine_kernel<<<blocks, kThreads, combine_smem_bytes(l), stream>>>(g, args, per_item);
  return cudaGetLastError();
}

}  // namespace jax_ll_ep
