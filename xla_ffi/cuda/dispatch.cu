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
constexpr int kChunk = 1024;           // channels per send item: 8 fp8 scale blocks, or 128 16-byte bf16 units
constexpr int kRounds = kChunk / 256;  // a warp covers 256 channels per 16-byte load per lane
constexpr int kBlocksPerChunk = kChunk / kScaleBlock;
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// Scale and its inverse for one 128-channel block (the exact float32 semantics of jax_ll_ep/fp8.py, no FMA).
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

// ---------------------------------------------------------------------------------------------------------------
// One chunk of one token in registers. fp8: round r covers scale blocks (8c + 2r + half), each lane 8 channels of its
// half-warp's block; bf16: round r covers the 16-byte units 128c + 32r + lane.
// ---------------------------------------------------------------------------------------------------------------
struct Chunk {
  uint4 raw[kRounds];    // bf16 payload
  uint2 fp8[kRounds];    // e4m3 bytes
  float scale[kRounds];  // the block's scale (fp8), valid in lanes with sub == 0
};

__device__ __forceinline__ int fp8_block(int c, int r) { return c * kBlocksPerChunk + 2 * r + (lane_id() >> 4); }
__device__ __forceinline__ int bf16_unit(int c, int r) { return c * (kChunk / 8) + r * kWarp + lane_id(); }

__device__ void load_chunk(const Layout& l, const DispatchArgs& a, int t, int c, Chunk& ch) {
  const uint16_t* x_row = a.x + static_cast<int64_t>(t) * l.hidden;
  const int sub = lane_id() & 15;
  if (a.fp8_mode == Fp8Mode::kNone) {
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const int u = bf16_unit(c, r);
      ch.raw[r] = u < l.hidden / 8 ? __ldg(reinterpret_cast<const uint4*>(x_row) + u) : make_uint4(0, 0, 0, 0);
    }
    return;
  }
  const int num_blocks = l.hidden / kScaleBlock;
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {  // every load in flight before the first use
    const int b = fp8_block(c, r);
    ch.raw[r] = b < num_blocks ? __ldg(reinterpret_cast<const uint4*>(x_row + b * kScaleBlock + sub * 8))
                               : make_uint4(0, 0, 0, 0);
  }
  // One round per iteration, not unrolled: the kernels' cost at small T is mostly fetching their code (cold after
  // any other kernel; docs/performance.md), so the cast is kept to one round's code. The registers rotate instead
  // of being indexed by the round (an indexed register array would live in local memory).
#pragma unroll 1
  for (int r = 0; r < kRounds; ++r) {
    const uint32_t w[4] = {ch.raw[0].x, ch.raw[0].y, ch.raw[0].z, ch.raw[0].w};
#pragma unroll
    for (int q = 0; q + 1 < kRounds; ++q) ch.raw[q] = ch.raw[q + 1];
    float v[8];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[2 * j] = bf16_bits_to_float(w[j] & 0xFFFFu);
      v[2 * j + 1] = bf16_bits_to_float(w[j] >> 16);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
    // max over the 16 lanes of this half-warp (xor distances below 16 never cross halves); max is exact
#pragma unroll
    for (int d = 8; d >= 1; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
    amax = fmaxf(amax, kAmaxFloor);
    float scale, inv;
    fp8_scales(amax, a.fp8_mode, scale, inv);
    uint32_t packed[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float lo = fminf(fmaxf(__fmul_rn(v[2 * j], inv), -kFp8Max), kFp8Max);
      const float hi = fminf(fmaxf(__fmul_rn(v[2 * j + 1], inv), -kFp8Max), kFp8Max);
      // cvt.rn.satfinite: round to nearest even (the values are already inside the finite range)
      const uint32_t pair = __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
      packed[j / 2] |= pair << (16 * (j % 2));
    }
#pragma unroll
    for (int q = 0; q + 1 < kRounds; ++q) {
      ch.fp8[q] = ch.fp8[q + 1];
      ch.scale[q] = ch.scale[q + 1];
    }
    ch.fp8[kRounds - 1] = make_uint2(packed[0], packed[1]);
    ch.scale[kRounds - 1] = scale;
  }
}

// Where a chunk goes: a row of payload bytes (a message's payload, or an output row) and its scales (float32, or
// UE8M0 bytes when `ue8m0` is set; unused for bf16).
struct RowDst {
  uint8_t* data;
  float* scales;
  uint8_t* ue8m0;
};

__device__ __forceinline__ void store_chunk(const Layout& l, Fp8Mode mode, const Chunk& ch, int c, const RowDst& d) {
  const int sub = lane_id() & 15;
  if (mode == Fp8Mode::kNone) {
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const int u = bf16_unit(c, r);
      if (u < l.hidden / 8) reinterpret_cast<uint4*>(d.data)[u] = ch.raw[r];
    }
    return;
  }
  const int num_blocks = l.hidden / kScaleBlock;
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const int b = fp8_block(c, r);
    if (b >= num_blocks) continue;
    *reinterpret_cast<uint2*>(d.data + b * kScaleBlock + sub * 8) = ch.fp8[r];
    if (sub != 0) continue;
    if (d.ue8m0 != nullptr) {
      d.ue8m0[b] = static_cast<uint8_t>((__float_as_uint(ch.scale[r]) >> 23) & 0xFFu);  // a power of two: e + 127
    } else {
      d.scales[b] = ch.scale[r];
    }
  }
}

// Byte ranges of chunk c inside a message payload (for the put path): the data part and the float32 scales part.
__device__ __forceinline__ void chunk_ranges(const Layout& l, Fp8Mode mode, int c, int64_t& data_off,
                                             int64_t& data_bytes, int64_t& scale_off, int64_t& scale_bytes) {
  if (mode == Fp8Mode::kNone) {
    const int64_t units = l.hidden / 8;
    const int64_t first = static_cast<int64_t>(c) * (kChunk / 8);
    data_off = 16 * first;
    data_bytes = 16 * ((units - first) < kChunk / 8 ? units - first : kChunk / 8);
    scale_off = scale_bytes = 0;
    return;
  }
  const int64_t blocks = l.hidden / kScaleBlock;
  const int64_t first = static_cast<int64_t>(c) * kBlocksPerChunk;
  const int64_t count = (blocks - first) < kBlocksPerChunk ? blocks - first : kBlocksPerChunk;
  data_off = first * kScaleBlock;
  data_bytes = count * kScaleBlock;
  scale_off = l.hidden + 4 * first;
  scale_bytes = 4 * count;
}

// ---------------------------------------------------------------------------------------------------------------
// Step 0: per-block routing tables. mask[e][w] bit i: token 32w + i chose global expert e (its first occurrence in
// the row; out-of-range ids and repeats count as -1); count[e]: the number of such tokens. Block 0 also records the
// routing errors (the first bad entry of each bad row describes it). When the whole topk_idx fits in one tile, the
// tile stays in shared memory for the send items.
// ---------------------------------------------------------------------------------------------------------------
__device__ void build_routing_tables(const CudaGroup& g, const DispatchArgs& a, int32_t* tile, uint32_t* mask,
                                     int32_t* count, uint64_t seq) {
  const Layout& l = g.group.layout;
  const int num_experts = l.num_local_experts * l.num_ranks;
  const int words = words_per_expert(l);
#pragma unroll 1
  for (int i = threadIdx.x; i < num_experts * words; i += blockDim.x) mask[i] = 0u;
  // (the staging barrier inside orders the clearing before any bit is set)
  for_each_topk_entry(a.topk_idx, a.num_tokens, a.num_topk, tile,
                      [&](int t, int k, int32_t id, bool first, const int32_t* row) {
                        if (id == -1) return;
                        const bool in_range = id >= 0 && id < num_experts;
                        if (in_range && first) {
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
  __syncthreads();  // the tables are complete for the whole block
}

struct SendContext {
  const int32_t* tile;  // topk_idx in shared memory when it fits one tile, else null
  const uint32_t* mask;
  const int32_t* count;
  uint64_t seq;
  int parity;
  int chunks;   // items per token
  bool direct;  // fused call on rank 0: own rows go straight into the outputs
};

// Step 1, one item: chunk c of token t to every destination of the token.
__device__ void send_token_chunk(const CudaGroup& g, const DispatchArgs& a, const SendContext& sc, int t, int c) {
  const Layout& l = g.group.layout;
  const int num_experts = l.num_local_experts * l.num_ranks;
  const int lane = lane_id();
  const int rank = g.group.rank;
  uint8_t* local = g.local_region;
  const int64_t entry = static_cast<int64_t>(t) * a.num_topk + lane;
  const int32_t id = lane >= a.num_topk ? -1 : (sc.tile != nullptr ? sc.tile[entry] : a.topk_idx[entry]);
  Chunk ch;
  load_chunk(l, a, t, c, ch);                               // (its loads do not depend on the routing below)
  const uint32_t same = __match_any_sync(0xffffffffu, id);  // called by the whole warp (convergent)
  const bool valid = lane < a.num_topk && id >= 0 && id < num_experts && (same & lanemask_lt()) == 0u;
  const uint32_t entries = __ballot_sync(0xffffffffu, valid);
  const int32_t slot = valid ? slot_of(sc.mask + id * words_per_expert(l), t) : 0;
  const bool fp8 = a.fp8_mode != Fp8Mode::kNone;
  uint8_t* staged = Layout::payload(l.send_message(local, t));
  if (g.use_put) {
    // NVSHMEM puts need a symmetric source: this rank's staging copy of the token.
    store_chunk(l, a.fp8_mode, ch, c, RowDst{staged, reinterpret_cast<float*>(staged + l.hidden), nullptr});
    __syncwarp();  // the staged chunk is complete before any lane's put reads it
  }
  const int64_t rows = l.recv_rows();
  for (uint32_t rest = entries; rest != 0u; rest &= rest - 1u) {
    const int k = __ffs(rest) - 1;
    const int e = __shfl_sync(0xffffffffu, id, k);
    const int s = __shfl_sync(0xffffffffu, slot, k);
    const int dst = e / l.num_local_experts, local_expert = e % l.num_local_experts;
    if (sc.direct && dst == rank) {
      const int64_t out_row = local_expert * rows + s;
      const int num_scales = l.hidden / kScaleBlock;
      RowDst d{static_cast<uint8_t*>(a.recv_x) + out_row * (fp8 ? l.hidden : 2 * static_cast<int64_t>(l.hidden)),
               nullptr, nullptr};
      if (a.fp8_mode == Fp8Mode::kUe8m0Scale) {
        d.ue8m0 = static_cast<uint8_t*>(a.recv_scale) + out_row * num_scales;
      } else if (fp8) {
        d.scales = static_cast<float*>(a.recv_scale) + out_row * num_scales;
      }
      store_chunk(l, a.fp8_mode, ch, c, d);
      if (c == 0 && lane == 0) {
        a.src_info[out_row] = t;
        a.src_topk_pos[out_row] = k;
      }
      continue;
    }
    const PeerRef peer = peer_of(g, dst);
    const int64_t offset = l.dispatch_message(local, parity_of(sc.seq), local_expert, rank, s) - local;
    if (c == 0 && lane == 0) {
      put_16_bytes(peer, local, offset, static_cast<uint32_t>(t) | (static_cast<uint64_t>(k) << 32),
                   static_cast<uint32_t>(sc.seq));
    }
    const int64_t payload = offset + static_cast<int64_t>(sizeof(MessageHeader));
    if (peer.peer_base != nullptr) {
      uint8_t* p = peer.peer_base + payload;
      store_chunk(l, a.fp8_mode, ch, c, RowDst{p, reinterpret_cast<float*>(p + l.hidden), nullptr});
    } else {
      int64_t data_off, data_bytes, scale_off, scale_bytes;
      chunk_ranges(l, a.fp8_mode, c, data_off, data_bytes, scale_off, scale_bytes);
      put_warp(local + payload + data_off, staged + data_off, data_bytes, peer.pe);
      if (scale_bytes > 0) put_warp(local + payload + scale_off, staged + scale_off, scale_bytes, peer.pe);
    }
  }
  __syncwarp();  // the whole warp's stores precede each lane's release below
  // Own rows of a fused call on rank 0 went straight into the outputs: their pair needs no signal (the receive half
  // takes its count from the routing tables, and the kernel's end publishes the rows).
  if (!valid || (sc.direct && id / l.num_local_experts == rank)) return;
  // release (gpu): this item's stores precede the count; the lane that completes the pair acquires every other
  // item's stores through the same counter before its release of the signal.
  const uint32_t prev = atomic_add_release_gpu(&g.workspace.pair_sent[id], 1u);
  if (prev + 1u == static_cast<uint32_t>(sc.count[id]) * static_cast<uint32_t>(sc.chunks)) {
    fence_acquire_gpu();
    g.workspace.pair_sent[id] = 0u;  // re-armed for the next call (stream order separates the calls)
    const int dst = id / l.num_local_experts, local_expert = id % l.num_local_experts;
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
  if (sc.direct && e / l.num_local_experts == g.group.rank) return;  // own pair of a fused call: no signal
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

__device__ void send_half(const CudaGroup& g, const DispatchArgs& a, uint32_t* smem, uint64_t seq, bool direct) {
  const Layout& l = g.group.layout;
  const int num_experts = l.num_local_experts * l.num_ranks;
  int32_t* tile = reinterpret_cast<int32_t*>(smem);  // [kTopkTile]
  uint32_t* mask = smem + kTopkTile;                 // [E][words]
  int32_t* count = send_counts(l, smem);             // [E]
  build_routing_tables(g, a, tile, mask, count, seq);
  trace_mark(g, seq, OpKind::kDispatch, kMarkTables);
  const bool tile_holds_all = static_cast<int64_t>(a.num_tokens) * a.num_topk <= kTopkTile;
  const SendContext sc{tile_holds_all ? tile : nullptr,  mask,  count, seq, parity_of(seq),
                       (l.hidden + kChunk - 1) / kChunk, direct};
  const uint32_t token_items = static_cast<uint32_t>(a.num_tokens) * static_cast<uint32_t>(sc.chunks);
  const uint32_t items = token_items + static_cast<uint32_t>((num_experts + kWarp - 1) / kWarp);
  for (;;) {
    const uint32_t item = warp_claim(call_queue(g, seq));
    if (item >= items) {
      trace_latest(g, seq, kMarkAllSent);
      break;
    }
    if (item < token_items) {
      send_token_chunk(g, a, sc, static_cast<int>(item / sc.chunks), static_cast<int>(item % sc.chunks));
    } else {
      signal_empty_experts(g, sc, static_cast<int>(item - token_items) * kWarp);
    }
  }
  trace_mark(g, seq, OpKind::kDispatch, kMarkSent);
}

// ---------------------------------------------------------------------------------------------------------------
// Step 2: wait for every pair, derive the layout, copy the messages out (rank 0's own rows of a fused call are
// already in place, and their counts are in the send half's tables: those pairs are not waited for).
// ---------------------------------------------------------------------------------------------------------------
__device__ void recv_half(const CudaGroup& g, const DispatchArgs& a, uint32_t* smem, uint64_t seq, bool direct) {
  const Layout& l = g.group.layout;
  const int num_pairs = static_cast<int>(l.num_experts());
  const int num_ranks = l.num_ranks, rank = g.group.rank;
  const int32_t* own_count = send_counts(l, smem) + rank * l.num_local_experts;  // fused call: [E_l]
  int32_t* count = reinterpret_cast<int32_t*>(smem + send_table_words(l));       // [P], p = local_expert * R + rank
  int32_t* base = count + num_pairs;                                             // [P + 1]
  const int lane = lane_id();
  uint8_t* local = g.local_region;
  const int parity = parity_of(seq);
  const int64_t rows = l.recv_rows();
  if (threadIdx.x < kWarp) {
    const WaitContext w{
        l.state(local), g.error_flag, l.missing(local), seq, OpKind::kDispatch, timeout_deadline(g.group.timeout_s),
        l.max_tokens,   num_ranks,    num_ranks > 1};
    warp_wait_signals(w, num_pairs, l.dispatch_signal(local, parity, 0, 0), l.combine_signal(local, parity, 0, 0),
                      direct ? rank : -1, count);
    const auto own = [&](int p) { return direct && p % num_ranks == rank; };
#pragma unroll 1
    for (int p = threadIdx.x; p < num_pairs; p += kWarp) {
      count[p] = own(p) ? own_count[p / num_ranks] : (count[p] < 0 ? 0 : count[p]);
    }
  }
  block_exclusive_scan(count, base, num_pairs);  // its barrier orders warp 0's acquire before every copy below
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
  const bool fp8 = a.fp8_mode != Fp8Mode::kNone;
  const int64_t row_bytes = fp8 ? l.hidden : 2 * static_cast<int64_t>(l.hidden);
  const int num_scales = l.hidden / kScaleBlock;
#pragma unroll 1
  for (int32_t m = global_warp(); m < total; m += num_global_warps()) {
    const int p = find_bucket(base, num_pairs, m);
    const int e = p / num_ranks, r = p % num_ranks;
    if (direct && r == g.group.rank) continue;  // written by the send half
    const int slot = m - base[p];
    const int64_t out_row = static_cast<int64_t>(e) * rows + (base[p] - base[e * num_ranks]) + slot;
    uint8_t* msg = l.dispatch_message(local, parity, e, r, slot);
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
      if (a.fp8_mode == Fp8Mode::kUe8m0Scale) {
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

// Keeps a failed receive's outputs self-consistent (nothing received) so that no later op indexes with garbage.
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

__global__ void __launch_bounds__(kThreads) dispatch_kernel(CudaGroup g, DispatchArgs a) {
  extern __shared__ __align__(16) uint32_t smem[];
  const CallPlan plan = enter_call(g, OpKind::kDispatch, reinterpret_cast<CallPlan*>(smem));
  uint32_t* tables = smem + kPlanBytes / 4;
  trace_mark(g, plan.seq, OpKind::kDispatch, kMarkEntry);
  if (plan.refuse == ErrorCode::kOk) {
    const bool direct = plan.send && plan.recv && g.group.rank == 0;
    if (plan.send) send_half(g, a, tables, plan.seq, direct);
    if (plan.recv) {
      __syncthreads();  // the block's send loop is over before its tables' memory is reused
      recv_half(g, a, tables, plan.seq, direct);
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
  return static_cast<size_t>(cuda::kPlanBytes + 4 * (cuda::send_table_words(l) + 2 * l.num_experts() + 1));
}

cudaError_t prepare_dispatch_kernel(int max_dynamic_smem, size_t smem, int* blocks_per_sm) {
  return cuda::prepare_kernel(cuda::dispatch_kernel, cuda::kThreads, max_dynamic_smem, smem, blocks_per_sm);
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
  dispatch_kernel<<<blocks, kThreads, dispatch_smem_bytes(l), stream>>>(g, args);
  return cudaGetLastError();
}

}  // namespace jax_ll_ep
