// The CUDA backend's launchers: plain host functions that enqueue the protocol's kernels on a stream and return
// the launch status. They know nothing of XLA (the FFI glue in ffi/cuda_handlers.cc fills the argument structs).
//
// One call of an op is a send half and a receive half (GroupArgs::phases says which ones run); each op is ONE kernel
// that runs the halves it is asked for, so a fused call is a single launch:
//   dispatch send:  route every (token, expert) to its slot (per-block bitmask tables, no grid-wide pass), cast each
//                   token chunk once and write it into every destination's receive region, signal every
//                   (rank, local expert) pair
//   dispatch recv:  wait for all E_l x R signals, write the packed layout into the output buffers
//   combine send:   copy every valid row of y back to its source token's slot, signal every pair
//   combine recv:   wait for all E_l x R signals, reduce in float32 in k order
// In a fused call the local rank's own pairs skip the symmetric region where the layout allows it (dispatch on rank
// 0 writes its own rows straight into the outputs; combine reads its own rows of y in place), and need no signal.
// The call's sequence number and parity live in the rank's RankState (device memory) and are advanced by the
// kernels (the last block in of each launch), so the launchers hold no per-call host state and may be captured into
// CUDA graphs. The regions are NVSHMEM symmetric memory, or plain allocations reached through peer access when one
// process drives every GPU (jax_ll_ep/backends/cuda.py); the kernels see only peer pointers (or NVSHMEM PEs).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "jax_ll_ep/args.h"

namespace jax_ll_ep {

// Per-buffer device scratch (plain cudaMalloc, not symmetric): written and read only by this rank's kernels.
struct CudaWorkspace {
  uint32_t* entered;    // [1] blocks of the running launch that have read the call state (protocol.cuh enter_call)
  uint32_t* queue;      // [kNumParities] send-half work queues, by call parity (re-armed by the next call)
  uint32_t* pair_sent;  // [E] send items finished per destination pair (reset by the lane that completes it)
  uint64_t* trace;      // [kTraceRows][kTraceMarks] phase times of recent calls (CudaGroup::trace), else unused
};
// Phase trace (performance work only, CudaOptions(trace=True) at buffer creation): block 0 records %globaltimer at the
// phase boundaries of each call into row seq % kTraceRows; the latest block end is the exit. Word 0 of a row is
// (seq << 8) | OpKind, so a reader can tell which call a row belongs to.
inline constexpr int kTraceRows = 64;
inline constexpr int kTraceMarks = 8;
enum TraceMark : int {
  kMarkEntry = 1,     // block 0 starts
  kMarkTables = 2,    // send half: routing tables / layout scans built
  kMarkSent = 3,      // send half: block 0 left its claim loop
  kMarkArrived = 4,   // receive half: block 0 saw every signal
  kMarkReceived = 5,  // receive half: block 0 finished its share of the copies / reductions
  kMarkExit = 6,      // the last block finished
  kMarkAllSent = 7,   // the last warp of any block left its claim loop (every send item is done but its signal)
};
inline constexpr int kNumOps = 2;
enum OpIndex : int { kOpDispatch = 0, kOpCombine = 1 };

// Everything a kernel needs to reach this rank's and its peers' regions. Filled once per buffer.
struct CudaGroup {
  GroupArgs group;          // layout, rank, regions (a DEVICE array of R peer pointers; nullptr: put path),
                            // phases and tickets (set per call), timeout_s
  const int32_t* peer_pes;  // device array [R]: NVSHMEM PE of each rank of the group (put path)
  uint8_t* local_region;    // this rank's region (also its symmetric address for NVSHMEM calls)
  CudaWorkspace workspace;
  uint32_t* error_flag;         // device alias of a host-mapped word: set to the ErrorCode of a recorded error
  int32_t num_sms;              // multiprocessors this process may use (MPS may give it a share)
  int32_t max_blocks[kNumOps];  // grid cap of each op's kernel: the blocks of it that fit on the device at once
  int32_t use_put;              // 1 if any peer uses the NVSHMEM put path (then bf16 payloads are staged too)
  int32_t trace;                // 1: record the phase trace (CudaWorkspace::trace)
};

// Bytes of CudaWorkspace for a layout (one allocation, carved by carve_workspace).
int64_t workspace_bytes(const Layout& layout);
CudaWorkspace carve_workspace(void* base, const Layout& layout);

// Dynamic shared memory per block of each op's kernel for a layout. prepare_kernels (once per buffer, outside any
// stream capture) raises both kernels' limit to what the device allows a block, and returns cudaErrorInvalidValue
// if the layout needs more than that (too many experts times max_tokens / 32).
size_t dispatch_smem_bytes(const Layout& layout);
size_t combine_smem_bytes(const Layout& layout);
cudaError_t prepare_dispatch_kernel(int max_dynamic_smem, size_t smem, int* blocks_per_sm);
cudaError_t prepare_combine_kernel(int max_dynamic_smem, size_t smem, int* blocks_per_sm);
// Also returns each op's resident blocks per multiprocessor for this layout (indexed by OpIndex).
cudaError_t prepare_kernels(const Layout& layout, int device, int blocks_per_sm[kNumOps]);

// g.group.phases selects the halves; the split forms pass their tickets (device int32[1]) in g.group.ticket_out /
// ticket_in: the send half writes the call's sequence number (low 31 bits), the receive half checks it.
cudaError_t run_dispatch(const CudaGroup& g, const DispatchArgs& args, cudaStream_t stream);
cudaError_t run_combine(const CudaGroup& g, const CombineArgs& args, cudaStream_t stream);

// Benchmarks only: writes the device's %globaltimer (ns) as two uint32 words (low, high) into out[0..1] when the
// stream reaches it.
cudaError_t record_timestamp(uint32_t* out, cudaStream_t stream);

// NVSHMEM device state of this module (nvshmem4py initializes only the host library; docs/cuda.md). Reference
// counted by NVSHMEM itself.
int nvshmem_module_init();
void nvshmem_module_finalize();

}  // namespace jax_ll_ep
