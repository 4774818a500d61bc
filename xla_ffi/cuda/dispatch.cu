// Dispatch: one kernel that runs the send half, the receive half, or both (a fused call is a single launch).
//
// Slot assignment is deterministic: the s-th token (in token order) of this rank that chose global expert e goes to
// slot s of pair (e % E_l, this rank) in the owner's receive region of the call's parity. The receiver therefore
// only concatenates the pairs of each local expert by source rank to get the contract's row order (by source rank,
// then by source token). Every block derives the slots itself from a bitmask per expert of the tokens that chose
// it (slot = set bits below the token), so no grid-wide pass runs before the first byte is sent.
//
// Send half:    (0) each block stages topk_idx and builds the bitmasks and per-expert counts in shared memory;
//               (1) warps claim items from a work queue: an item (token, chunk of kChunk channels) loads the chunk
//                   once, casts it (fp8) and stores it into the message of every destination of the token; an item
//                   of 32 experts signals the experts this rank sends nothing to. The lane that completes a pair's
//                   last item signals the pair.
// Receive half: (2) one warp per block waits for all E_l x R signals (bounded), the block scans the counts into
//                   the layout, and the grid copies the messages into the output buffers.
// Fused call on rank 0: its own rows start at offset 0 of each local expert's layout whatever the peers send, so
// step (1) writes them straight into the outputs and they skip the symmetric region (half the bytes for 1 rank);
// their pairs are not signalled: step (2) takes their counts from the block's own tables.
#include <cuda_fp8.h>

#include "cuda/launch.h"
#include "cuda/protocol.cuh"

namespace jax_ll_ep {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarp;
constexpr int kChunk = 1024;  // channels per send item: 8 fp8 scale blocks, or 128 16-byte bf16 units
constexpr int kLoads = kChunk * 2 / 16 / kWarp;  // 16-byte loads of x per lane per item (4)
constexpr int kBlocksPerChunk = kChunk / kScaleBlock;
// fp8: a round covers 512 channels, 16 consecutive ones per lane, so the 8 lanes of an aligned group hold one scale
// block and each lane stores its 16 e4m3 bytes with one 16-byte store.
constexpr int kFp8Rounds = kChunk / 512;
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// Scale and its inverse for one 128-channel block (the exact float32 semantics of jax_ll_ep/fp8.py, no FMA).
template <Fp8Mode kMode>
__device__ __forceinline__ void fp8_scales(float amax, float& scale, float& inv) {
  if constexpr (kMode == Fp8Mode::kFloatScale) {
    scale = __fdiv_rn(amax, kFp8Max);
    inv = __fdiv_rn(kFp8Max, amax);
  } else {
    // The smallest e with 2^e >= q = amax / 448, read off the bits of the float32 q (a positive normal number
    // since amax >= 1e-4): its exponent, plus one unless q is a power of two.
    const uint32_t q = __float_as_uint(__fdiv_rn(amax, kFp8Max));
    const int e = static_cast<int>((q >> 23) & 0xFFu) - 127 + ((q & 0x7FFFFFu) != 0u ? 1 : 0);
    scale = __uint_as_float(static_cast<uint32_t>(e + 127) << 23);
    inv = __uint_as_float(static_cast<uint32_t>(127 - e) << 23);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// One chunk (kChunk channels) of one token in registers.
//   bf16: raw[j] is the 16-byte unit 128c + 32j + lane.
//   fp8:  round r covers channels 1024c + 512r + 16 lane .. +15 (raw[2r], raw[2r + 1] before the cast), in scale
//         block 8c + 4r + lane / 8; q[r] holds their e4m3 bytes and scale[r] the block's scale.
// ---------------------------------------------------------------------------------------------------------------
struct Chunk {
  uint4 raw[kLoads];
  uint4 q[kFp8Rounds];
  float scale[kFp8Rounds];
};

__device__ __forceinline__ int bf16_unit(int c, int j) { return c * (kChunk / 8) + j * kWarp + lane_id(); }
__device__ __forceinline__ int fp8_block(int c, int r) { return c * kBlocksPerChunk + 4 * r + (lane_id() >> 3); }
__device__ __forceinline__ int fp8_byte(int c, int r) { return c * kChunk + r * 512 + 16 * lane_id(); }

// Casts the 16 channels of round r (8 lanes per 128-channel block).
template <Fp8Mode kMode>
__device__ __forceinline__ void cast_round(Chunk& ch, int r) {
  const uint32_t w[8] = {ch.raw[2 * r].x,     ch.raw[2 * r].y,     ch.raw[2 * r].z,     ch.raw[2 * r].w,
                         ch.raw[2 * r + 1].x, ch.raw[2 * r + 1].y, ch.raw[2 * r + 1].z, ch.raw[2 * r + 1].w};
  float v[16];
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    v[2 * j] = bf16_bits_to_float(w[j] & 0xFFFFu);
    v[2 * j + 1] = bf16_bits_to_float(w[j] >> 16);
  }
#pragma unroll
  for (int j = 0; j < 16; ++j) amax = fmaxf(amax, fabsf(v[j]));
  // max over the 8 lanes of this block (xor distances below 8 never leave the group); max is exact
#pragma unroll
  for (int d = 4; d >= 1; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
  amax = fmaxf(amax, kAmaxFloor);
  float scale, inv;
  fp8_scales<kMode>(amax, scale, inv);
  uint32_t packed[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float lo = fminf(fmaxf(__fmul_rn(v[2 * j], inv), -kFp8Max), kFp8Max);
    const float hi = fminf(fmaxf(__fmul_rn(v[2 * j + 1], inv), -kFp8Max), kFp8Max);
    // cvt.rn.satfinite: round to nearest even (the values are already inside the finite range)
    const uint32_t pair = __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
    packed[j / 2] |= pair << (16 * (j % 2));
  }
  ch.q[r] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  ch.scale[r] = scale;
}

template <Fp8Mode kMode>
__device__ __forceinline__ void load_chunk(const Layout& l, const DispatchArgs& a, int t, int c, Chunk& ch) {
  const uint16_t* x_row = a.x + static_cast<int64_t>(t) * l.hidden;
  if constexpr (kMode == Fp8Mode::kNone) {
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int u = bf16_unit(c, j);
      ch.raw[j] = u < l.hidden / 8 ? __ldg(reinterpret_cast<const uint4*>(x_row) + u) : make_uint4(0, 0, 0, 0);
    }
  } else {
    const int num_blocks = l.hidden / kScaleBlock;
#pragma unroll
    for (int r = 0; r < kFp8Rounds; ++r) {  // every load in flight before the first use
      const bool in = fp8_block(c, r) < num_blocks;
      const uint4* src = reinterpret_cast<const uint4*>(x_row + fp8_byte(c, r));
      ch.raw[2 * r] = in ? __ldg(src) : make_uint4(0, 0, 0, 0);
      ch.raw[2 * r + 1] = in ? __ldg(src + 1) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int r = 0; r < kFp8Rounds; ++r) cast_round<kMode>(ch, r);
  }
}

// Stores chunk c into one row: `data` is a row of payload bytes (a message's payload, or an output row); `scales`
// its scales, float32, or UE8M0 bytes when `ue8m0_bytes` (an output row of kUe8m0Scale); unused for bf16.
template <Fp8Mode kMode>
__device__ __forceinline__ void store_chunk(const Layout& l, const Chunk& ch, int c, uint8_t* data, void* scales,
                                            bool ue8m0_bytes) {
  if constexpr (kMode == Fp8Mode::kNone) {
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int u = bf16_unit(c, j);
      if (u < l.hidden / 8) reinterpret_cast<uint4*>(data)[u] = ch.raw[j];
    }
  } else {
    const int num_blocks = l.hidden / kScaleBlock;
#pragma unroll
    for (int r = 0; r < kFp8Rounds; ++r) {
      const int b = fp8_block(c, r);
      if (b >= num_blocks) continue;
      *reinterpret_cast<uint4*>(data + fp8_byte(c, r)) = ch.q[r];
      if ((lane_id() & 7) != 0) continue;
      if (kMode == Fp8Mode::kUe8m0Scale && ue8m0_bytes) {
        // a power of two: its biased exponent is the UE8M0 byte e + 127
        static_cast<uint8_t*>(scales)[b] = static_cast<uint8_t>((__float_as_uint(ch.scale[r]) >> 23) & 0xFFu);
      } else {
        static_cast<float*>(scales)[b] = ch.scale[r];
      }
    }
  }
}

// Byte ranges of chunk c inside a message payload (for the put path): the data part and the float32 scales part.
template <Fp8Mode kMode>
__device__ __forceinline__ void chunk_ranges(const Layout& l, int c, int64_t& data_off, int64_t& data_bytes,
                                             int64_t& scale_off, int64_t& scale_bytes) {
  if constexpr (kMode == Fp8Mode::kNone) {
    const int64_t units = l.hidden / 8;
    const int64_t first = static_cast<int64_t>(c) * (kChunk / 8);
    data_off = 16 * first;
    data_bytes = 16 * ((units - first) < kChunk / 8 ? units - first : kChunk / 8);
    scale_off = scale_bytes = 0;
  } else {
    const int64_t blocks = l.hidden / kScaleBlock;
    const int64_t first = static_cast<int64_t>(c) * kBlocksPerChunk;
    const int64_t count = (blocks - first) < kBlocksPerChunk ? blocks - first : kBlocksPerChunk;
    data_off = first * kScaleBlock;
    data_bytes = count * kScaleBlock;
    scale_off = l.hidden + 4 * first;
    scale_bytes = 4 * count;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Step 0: per-block routing tables. mask[e][w] bit i: token 32w + i chose global expert e (its first occurrence in
// the row; out-of-range ids and repeats count as -1, and so do experts of a masked rank); count[e]: the number of
// such tokens. Block 0 also records the routing errors (the first bad entry of each bad row describes it) and, when
// a rank is masked, the pairs dropped. When the whole topk_idx fits in one tile, the tile stays in shared memory for
// the send items. The masks are cleared and the first tile staged before the entry barrier (start_routing_tables,
// enter_call's prologue), while thread 0 reads the call state and the mask of ranks.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ void start_routing_tables(const Layout& l, const DispatchArgs& a, int32_t* tile,
                                                     uint32_t* mask, int i, int step) {
  const int num_words = l.num_local_experts * l.num_ranks * words_per_expert(l);
#pragma unroll 1
  for (int w = i; w < num_words; w += step) mask[w] = 0u;
  stage_first_topk_tile(a.topk_idx, a.num_tokens, a.num_topk, tile, i, step);
}

__device__ void build_routing_tables(const CudaGroup& g, const DispatchArgs& a, const uint32_t* ranks_masked,
                                     int32_t* tile, uint32_t* mask, int32_t* count, uint64_t seq) {
  const Layout& l = g.group.layout;
  const int num_experts = l.num_local_experts * l.num_ranks;
  const int words = words_per_expert(l);
  RankState* state = l.state(g.local_region);
  if (ranks_masked != nullptr && blockIdx.x == 0 && threadIdx.x == 0) state->dropped_last = 0u;
  // (the entry barrier ordered the clearing and the first tile before any visit; the staging barrier inside orders
  // the reset before block 0's counts)
  for_each_topk_entry(a.topk_idx, a.num_tokens, a.num_topk, tile, true,
                      [&](int t, int k, int32_t id, bool first, const int32_t* row) {
                        if (id == -1) return;
                        const bool in_range = id >= 0 && id < num_experts;
                        if (in_range && first && masked_rank(ranks_masked, id / l.num_local_experts)) {
                          if (blockIdx.x == 0) atomicAdd(&l.state(g.local_region)->dropped_last, 1u);
                        } else if (in_range && first) {
                          atomicOr(&mask[id * words + t / 32], 1u << (t % 32));
                        } else if (blockIdx.x == 0 && first_bad_entry(row, k, num_experts)) {
                          record_error(l.state(g.local_region), g.error_flag,
                                       ErrorInfo{in_range ? ErrorCode::kDuplicateExpert : ErrorCode::kInvalidExpert,
                                                 OpKind::kDispatch, seq, id, t, k, 0});
                        }
                      });
#pragma unroll 1
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int32_t c = 0;
#pragma unroll 1
    for (int w = 0; w < words; ++w) c += __popc(mask[e * words + w]);
    count[e] = c;
  }
  __syncthreads();  // the tables are complete for the whole block (and block 0's dropped count)
  if (ranks_masked != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    // (this thread's own atomics, and the barrier above orders the other threads' before this read)
    atomicAdd(reinterpret_cast<unsigned long long*>(&state->dropped_total),
              static_cast<unsigned long long>(*reinterpret_cast<volatile uint32_t*>(&state->dropped_last)));
  }
}

struct SendContext {
  const int32_t* tile;  // topk_idx in shared memory when it fits one tile, else null
  const uint32_t* mask;
  const int32_t* count;
  const uint32_t* ranks_masked;  // the launch's mask of ranks (CallPlan::mask; null: none masked)
  uint64_t seq;
  int parity;
  int chunks;   // items per token
  bool direct;  // fused call on rank 0: own rows go straight into the outputs
};

// The put path of one destination (out of line: NVSHMEM transports only): chunk c of the staged copy to the
// message at `message_offset` of rank `pe`'s region.
template <Fp8Mode kMode>
static __device__ __noinline__ void put_chunk(const Layout& l, uint8_t* local, const uint8_t* staged, int c,
                                              int64_t message_offset, int pe) {
  int64_t data_off, data_bytes, scale_off, scale_bytes;
  chunk_ranges<kMode>(l, c, data_off, data_bytes, scale_off, scale_bytes);
  uint8_t* payload = local + message_offset + static_cast<int64_t>(sizeof(MessageHeader));
  put_warp(payload + data_off, staged + data_off, data_bytes, pe);
  if (scale_bytes > 0) put_warp(payload + scale_off, staged + scale_off, scale_bytes, pe);
}

// Step 1, one item: chunk c of token t to every destination of the token. Lane k finds the row of the token's
// k-th choice (in parallel with the other lanes), then the warp stores the chunk into each row in turn.
template <Fp8Mode kMode>
__device__ void send_token_chunk(const CudaGroup& g, const DispatchArgs& a, const SendContext& sc, int t, int c) {
  const Layout& l = g.group.layout;
  const int num_local = l.num_local_experts;
  const int num_experts = num_local * l.num_ranks;
  const int lane = lane_id();
  const int rank = g.group.rank;
  uint8_t* local = g.local_region;
  const int64_t entry = static_cast<int64_t>(t) * a.num_topk + lane;
  const int32_t id = lane >= a.num_topk ? -1 : (sc.tile != nullptr ? sc.tile[entry] : a.topk_idx[entry]);
  Chunk ch;
  load_chunk<kMode>(l, a, t, c, ch);                        // (its loads do not depend on the routing below)
  const uint32_t same = __match_any_sync(0xffffffffu, id);  // called by the whole warp (convergent)
  // (an expert of a masked rank counts as -1: a uniform test of the plan's pointer when no rank is masked)
  const bool valid = lane < a.num_topk && id >= 0 && id < num_experts && (same & lanemask_lt()) == 0u &&
                     !masked_rank(sc.ranks_masked, id / num_local);
  const uint32_t entries = __ballot_sync(0xffffffffu, valid);
  constexpr bool kFp8 = kMode != Fp8Mode::kNone;
  // Lane k's destination: an output row (own rows of a fused call on rank 0), or a message in the owner's region,
  // stored to directly (peer_base) or, when `data` stays null, reached by NVSHMEM puts.
  uint8_t* data = nullptr;
  void* scales = nullptr;
  bool ue8m0_bytes = false, own = false;
  int64_t message_offset = 0;
  int pe = 0;
  if (valid) {
    const int32_t slot = slot_of(sc.mask + id * words_per_expert(l), t);
    const int dst = id / num_local, local_expert = id % num_local;
    own = sc.direct && dst == rank;
    if (own) {
      const int64_t out_row = local_expert * (static_cast<int64_t>(l.num_ranks) * l.max_tokens) + slot;
      const int num_scales = l.hidden / kScaleBlock;
      data = static_cast<uint8_t*>(a.recv_x) + out_row * (kFp8 ? l.hidden : 2 * static_cast<int64_t>(l.hidden));
      if constexpr (kMode == Fp8Mode::kUe8m0Scale) {
        scales = static_cast<uint8_t*>(a.recv_scale) + out_row * num_scales;
        ue8m0_bytes = true;
      } else if constexpr (kFp8) {
        scales = static_cast<float*>(a.recv_scale) + out_row * num_scales;
      }
      if (c == 0) {
        a.src_info[out_row] = t;
        a.src_topk_pos[out_row] = lane;
      }
    } else {
      const PeerRef peer = peer_of(g, dst);
      message_offset = l.message(local, sc.parity, local_expert, rank, slot) - local;
      pe = peer.pe;
      if (c == 0) {
        put_16_bytes(peer, local, message_offset, static_cast<uint32_t>(t) | (static_cast<uint64_t>(lane) << 32),
                     static_cast<uint32_t>(sc.seq));
      }
      if (peer.peer_base != nullptr) {
        data = peer.peer_base + message_offset + static_cast<int64_t>(sizeof(MessageHeader));
        scales = data + l.hidden;
      }
    }
  }
  uint8_t* staged = nullptr;
  if (g.use_put) {
    // NVSHMEM puts need a symmetric source: this rank's staging copy of the token.
    staged = Layout::payload(l.send_message(local, t));
    store_chunk<kMode>(l, ch, c, staged, staged + l.hidden, false);
    __syncwarp();  // the staged chunk is complete before any lane's put reads it
  }
  for (uint32_t rest = entries; rest != 0u; rest &= rest - 1u) {
    const int k = __ffs(rest) - 1;
    uint8_t* d = reinterpret_cast<uint8_t*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(data), k));
    if (d != nullptr) {
      void* sp = reinterpret_cast<void*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(scales), k));
      const bool bytes = kMode == Fp8Mode::kUe8m0Scale && __shfl_sync(0xffffffffu, ue8m0_bytes ? 1 : 0, k) != 0;
      store_chunk<kMode>(l, ch, c, d, sp, bytes);
    } else {
      put_chunk<kMode>(l, local, staged, c, __shfl_sync(0xffffffffu, message_offset, k),
                       __shfl_sync(0xffffffffu, pe, k));
    }
  }
  __syncwarp();  // the whole warp's stores precede each lane's release below
  // Own rows of a fused call on rank 0 went straight into the outputs: their pair needs no signal (the receive half
  // takes its count from the routing tables, and the kernel's end publishes the rows).
  if (!valid || own) return;
  // release (gpu): this item's stores precede the count; the lane that completes the pair acquires every other
  // item's stores through the same counter before its release of the signal.
  const uint32_t prev = atomic_add_release_gpu(&g.workspace.pair_sent[id], 1u);
  if (prev + 1u == static_cast<uint32_t>(sc.count[id]) * static_cast<uint32_t>(sc.chunks)) {
    fence_acquire_gpu();
    g.workspace.pair_sent[id] = 0u;  // re-armed for the next call (stream order separates the calls)
    const int dst = id / num_local, local_expert = id % num_local;
    send_signal(peer_of(g, dst), local,
                reinterpret_cast<uint8_t*>(l.dispatch_signal(local, sc.parity, local_expert, rank)) - local,
                encode_signal(sc.seq, OpKind::kDispatch, static_cast<uint32_t>(sc.count[id])));
  }
}

// Step 1, one item: experts first_expert .. +31 that this rank sends nothing to get their (data-free) signal.
__device__ void signal_empty_experts(const CudaGroup& g, const SendContext& sc, int first_expert) {
  const Layout& l = g.group.layout;
  const int e = first_expert + lane_id();
  if (e >= l.num_local_experts * l.num_ranks || sc.count[e] != 0) return;
  if (sc.direct && e / l.num_local_experts == g.group.rank) return;   // own pair of a fused call: no signal
  if (masked_rank(sc.ranks_masked, e / l.num_local_experts)) return;  // nothing at all goes to a masked rank
  uint8_t* local = g.local_region;
  const int dst = e / l.num_local_experts, local_expert = e % l.num_local_experts;
  send_empty_signal(peer_of(g, dst), local,
                    reinterpret_cast<uint8_t*>(l.dispatch_signal(local, sc.parity, local_expert, g.group.rank)) - local,
                    encode_signal(sc.seq, OpKind::kDispatch, 0u));
}

// Shared memory: the send half's tables (staged topk tile, masks, counts per expert), then the receive half's
// (counts and their scan per pair). Separate, because a fused call's receive half reads the send half's counts.
__host__ __device__ __forceinline__ int64_t send_table_words(const Layout& l) {
  const int64_t num_experts = l.num_experts();
  return kTopkTile + num_experts * words_per_expert(l) + num_experts;
}
__device__ __forceinline__ int32_t* send_counts(const Layout& l, uint32_t* smem) {
  return reinterpret_cast<int32_t*>(smem + send_table_words(l)) - l.num_local_experts * l.num_ranks;
}

template <Fp8Mode kMode>
__device__ void send_half(const CudaGroup& g, const DispatchArgs& a, const uint32_t* ranks_masked, uint32_t* smem,
                          uint64_t seq, bool direct) {
  const Layout& l = g.group.layout;
  const int num_experts = l.num_local_experts * l.num_ranks;
  int32_t* tile = reinterpret_cast<int32_t*>(smem);  // [kTopkTile]
  uint32_t* mask = smem + kTopkTile;                 // [E][words]
  int32_t* count = send_counts(l, smem);             // [E]
  build_routing_tables(g, a, ranks_masked, tile, mask, count, seq);
  trace_mark(g, seq, OpKind::kDispatch, kMarkTables);
  const bool tile_holds_all = static_cast<int64_t>(a.num_tokens) * a.num_topk <= kTopkTile;
  const SendContext sc{tile_holds_all ? tile : nullptr,  mask,  count, ranks_masked, seq, parity_of(seq),
                       (l.hidden + kChunk - 1) / kChunk, direct};
  const uint32_t token_items = static_cast<uint32_t>(a.num_tokens) * static_cast<uint32_t>(sc.chunks);
  const uint32_t items = token_items + static_cast<uint32_t>((num_experts + kWarp - 1) / kWarp);
  for_each_claimed_item(call_queue(g, seq), items, [&](uint32_t item) {
    if (item < token_items) {
      send_token_chunk<kMode>(g, a, sc, static_cast<int>(item / sc.chunks), static_cast<int>(item % sc.chunks));
    } else {
      signal_empty_experts(g, sc, static_cast<int>(item - token_items) * kWarp);
    }
  });
  trace_latest(g, seq, kMarkAllSent);
  trace_mark(g, seq, OpKind::kDispatch, kMarkSent);
}

// ---------------------------------------------------------------------------------------------------------------
// Step 2: wait for every pair, derive the layout, copy the messages out (rank 0's own rows of a fused call are
// already in place, and their counts are in the send half's tables: those pairs are not waited for).
// ---------------------------------------------------------------------------------------------------------------
template <Fp8Mode kMode>
__device__ void recv_half(const CudaGroup& g, const DispatchArgs& a, const uint32_t* ranks_masked, uint32_t* smem,
                          uint64_t seq, bool direct) {
  const Layout& l = g.group.layout;
  const int num_pairs = static_cast<int>(l.num_experts());
  const int num_ranks = l.num_ranks, rank = g.group.rank;
  const int32_t* own_count = send_counts(l, smem) + rank * l.num_local_experts;  // fused call: [E_l]
  int32_t* count = reinterpret_cast<int32_t*>(smem + send_table_words(l));       // [P], p = local_expert * R + rank
  int32_t* base = count + num_pairs;                                             // [P + 1]
  int32_t* totals = base + num_pairs + 1;                                        // [kWarp] scan scratch
  const int lane = lane_id();
  uint8_t* local = g.local_region;
  const int parity = parity_of(seq);
  const int64_t rows = l.recv_rows();
  if (threadIdx.x < kWarp) {
    const WaitContext w = wait_context(g, OpKind::kDispatch, seq, ranks_masked);
    warp_wait_signals(w, num_pairs, l.dispatch_signal(local, parity, 0, 0), l.combine_signal(local, parity, 0, 0),
                      direct ? rank : -1, count);
  }
  // Every pair's count (own pairs of a fused call from the send half's tables; a pair that never arrived counts 0),
  // scanned into the layout by the whole block. The scan's first barrier orders warp 0's acquire before every read
  // of the counts and before every copy below.
  block_exclusive_scan(num_pairs, base, totals, [&](int p) {
    const int32_t c = direct && p % num_ranks == rank ? own_count[p / num_ranks] : (count[p] < 0 ? 0 : count[p]);
    count[p] = c;
    return c;
  });
  trace_mark(g, seq, OpKind::kDispatch, kMarkArrived);
  if (blockIdx.x == 0) {
#pragma unroll 1
    for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) {
      const int first = (p / num_ranks) * num_ranks;
      a.layout_range[2 * p] = base[p] - base[first];
      a.layout_range[2 * p + 1] = count[p];
    }
#pragma unroll 1
    for (int e = threadIdx.x; e < l.num_local_experts; e += blockDim.x) {
      a.recv_count[e] = base[(e + 1) * num_ranks] - base[e * num_ranks];
    }
  }
  const int32_t total = base[num_pairs];
  constexpr bool fp8 = kMode != Fp8Mode::kNone;
  const int64_t row_bytes = fp8 ? l.hidden : 2 * static_cast<int64_t>(l.hidden);
  const int num_scales = l.hidden / kScaleBlock;
#pragma unroll 1
  for (int32_t m = global_warp(); m < total; m += num_global_warps()) {
    const int p = find_bucket(base, num_pairs, m);
    const int e = p / num_ranks, r = p % num_ranks;
    if (direct && r == g.group.rank) continue;  // written by the send half
    const int slot = m - base[p];
    const int64_t out_row = static_cast<int64_t>(e) * rows + (base[p] - base[e * num_ranks]) + slot;
    uint8_t* msg = l.message(local, parity, e, r, slot);
    if (lane == 0) {
      const int4 h = __ldcg(reinterpret_cast<const int4*>(Layout::header(msg)));  // MessageHeader
      a.src_info[out_row] = h.x;
      a.src_topk_pos[out_row] = h.y;
    }
    warp_copy16(reinterpret_cast<int4*>(static_cast<uint8_t*>(a.recv_x) + out_row * row_bytes),
                reinterpret_cast<const int4*>(Layout::payload(msg)), row_bytes / 16);
    if (!fp8) continue;
    const float* scales = l.fp8_scales(msg);
#pragma unroll 1
    for (int i = lane; i < num_scales; i += kWarp) {
      const float s = __ldcg(scales + i);
      if constexpr (kMode == Fp8Mode::kUe8m0Scale) {
        // a power of two: its biased exponent is the UE8M0 byte e + 127
        static_cast<uint8_t*>(a.recv_scale)[out_row * num_scales + i] =
            static_cast<uint8_t>((__float_as_uint(s) >> 23) & 0xFFu);
      } else {
        static_cast<float*>(a.recv_scale)[out_row * num_scales + i] = s;
      }
    }
  }
  trace_mark(g, seq, OpKind::kDispatch, kMarkReceived);
}

// Keeps a failed (or masked rank's) receive's outputs self-consistent (nothing received) so that no later op indexes
// with garbage.
__device__ void write_empty_layout(const Layout& l, const DispatchArgs& a) {
  if (blockIdx.x != 0) return;
#pragma unroll 1
  for (int p = threadIdx.x; p < l.num_experts(); p += blockDim.x) {
    a.layout_range[2 * p] = 0;
    a.layout_range[2 * p + 1] = 0;
  }
#pragma unroll 1
  for (int e = threadIdx.x; e < l.num_local_experts; e += blockDim.x) a.recv_count[e] = 0;
}

// One instantiation per fp8 mode (the host picks it from DispatchArgs::fp8_mode): the executed path has no mode
// branches, and each launch fetches only its own mode's code.
template <Fp8Mode kMode>
__global__ void __launch_bounds__(kThreads) dispatch_kernel(CudaGroup g, DispatchArgs a) {
  extern __shared__ __align__(16) uint32_t smem[];
  uint32_t* tables = smem + plan_bytes(g.group.layout) / 4;  // after the plan and the mask of ranks
  const bool send = (g.group.phases & kSendPhase) != 0;      // (the plan's send half: plan_call)
  const CallPlan plan = enter_call(g, OpKind::kDispatch, reinterpret_cast<CallPlan*>(smem), [&](int i, int n) {
    if (send) start_routing_tables(g.group.layout, a, reinterpret_cast<int32_t*>(tables), tables + kTopkTile, i, n);
  });
  trace_mark(g, plan.seq, OpKind::kDispatch, kMarkEntry);
  if (plan.refuse == ErrorCode::kOk && plan.self_masked) {
    if (plan.recv) write_empty_layout(g.group.layout, a);  // a masked rank: nothing sent, nothing awaited
  } else if (plan.refuse == ErrorCode::kOk) {
    const bool direct = plan.send && plan.recv && g.group.rank == 0;
    if (plan.send) send_half<kMode>(g, a, plan.mask, tables, plan.seq, direct);
    if (plan.recv) {
      __syncthreads();  // the block's send loop is over before its tables' memory is reused
      recv_half<kMode>(g, a, plan.mask, tables, plan.seq, direct);
    }
  } else {
    refuse_call(g, OpKind::kDispatch, plan);
    if (plan.recv) write_empty_layout(g.group.layout, a);
  }
  trace_exit(g, plan.seq);
}

}  // namespace
}  // namespace cuda

size_t dispatch_smem_bytes(const Layout& l) {
  return static_cast<size_t>(cuda::plan_bytes(l) +
                             4 * (cuda::send_table_words(l) + 2 * l.num_experts() + 1 + cuda::kWarp));
}

cudaError_t prepare_dispatch_kernel(int max_dynamic_smem, size_t smem, int* blocks_per_sm) {
  using namespace cuda;
  // Every instantiation, so that any fp8 mode may be launched; the grid cap is the smallest of their occupancies.
  const decltype(&dispatch_kernel<Fp8Mode::kNone>) kernels[] = {
      dispatch_kernel<Fp8Mode::kNone>, dispatch_kernel<Fp8Mode::kFloatScale>, dispatch_kernel<Fp8Mode::kPow2Scale>,
      dispatch_kernel<Fp8Mode::kUe8m0Scale>};
  int fewest = 0;
  for (size_t i = 0; i < sizeof(kernels) / sizeof(kernels[0]); ++i) {
    int n = 0;
    const cudaError_t e = prepare_kernel(kernels[i], kThreads, max_dynamic_smem, smem, &n);
    if (e != cudaSuccess) return e;
    fewest = i == 0 || n < fewest ? n : fewest;
  }
  *blocks_per_sm = fewest;
  return cudaSuccess;
}

cudaError_t run_dispatch(const CudaGroup& g, const DispatchArgs& args, cudaStream_t stream) {
  using namespace cuda;
  const Layout& l = g.group.layout;
  const int64_t num_experts = l.num_experts();
  int64_t warps = 1;
  if (g.group.phases & kSendPhase) {
    const int64_t chunks = (l.hidden + kChunk - 1) / kChunk;
    const int64_t items = static_cast<int64_t>(args.num_tokens) * chunks + (num_experts + kWarp - 1) / kWarp;
    const int64_t rows = static_cast<int64_t>(args.num_tokens) * args.num_topk;  // rows received, on average
    warps = items > rows ? items : rows;
  } else {
    warps = 4 * static_cast<int64_t>(l.max_tokens) * l.num_ranks;  // a guess: the receive half alone knows no K
  }
  // The work queue makes any grid size safe (protocol.cuh); beyond one resident wave nothing is gained.
  const int blocks = blocks_for(warps, kWarps, g.max_blocks[kOpDispatch]);
  const size_t smem = dispatch_smem_bytes(l);
  switch (args.fp8_mode) {
    case Fp8Mode::kNone:
      dispatch_kernel<Fp8Mode::kNone><<<blocks, kThreads, smem, stream>>>(g, args);
      break;
    case Fp8Mode::kFloatScale:
      dispatch_kernel<Fp8Mode::kFloatScale><<<blocks, kThreads, smem, stream>>>(g, args);
      break;
    case Fp8Mode::kPow2Scale:
      dispatch_kernel<Fp8Mode::kPow2Scale><<<blocks, kThreads, smem, stream>>>(g, args);
      break;
    case Fp8Mode::kUe8m0Scale:
      dispatch_kernel<Fp8Mode::kUe8m0Scale><<<blocks, kThreads, smem, stream>>>(g, args);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace jax_ll_ep
