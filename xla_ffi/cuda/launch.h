// The CUDA backend's launchers: plain host functions that enqueue the protocol's kernels on a stream and return
// the launch status. They know nothing of XLA (the FFI glue in ffi/cuda_module.cc fills the argument structs).
//
// One call of an op is a send half and a receive half (GroupArgs::phases says which ones run):
//   dispatch send:  stage kernel (route every (token, expert) to its slot, cast/stage the payload), then the send
//                   kernel (copy messages to the owners' receive regions, signal every (rank, local expert) pair)
//   dispatch recv:  wait for all E_l x R signals, write the packed layout into the output buffers
//   combine send:   copy every valid row of y back to its source token's slot, signal every pair
//   combine recv:   wait for all E_l x R signals, reduce in float32 in k order
// The call's sequence number and parity live in the rank's RankState (device memory) and are advanced by the
// kernels, so the launchers hold no per-call host state and may be captured into CUDA graphs.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "jax_ll_ep/args.h"

namespace jax_ll_ep {

// Per-buffer device scratch (plain cudaMalloc, not symmetric): written and read only by this rank's kernels.
struct CudaWorkspace {
  uint32_t* done;         // [kNumDoneCounters] "last block out" counters, one per kernel that updates RankState
  int32_t* expert_count;  // [E] tokens of this call that chose each global expert (dispatch)
  int32_t* expert_list;   // [E][T] (token * kMaxTopk + k) of those tokens, in token order (dispatch)
  uint32_t* pair_sent;    // [max(E, E_l*R)] messages copied so far per destination pair (reset by the last one)
};
inline constexpr int kNumDoneCounters = 4;
enum DoneCounter : int { kDoneDispatchSend = 0, kDoneDispatchRecv = 1, kDoneCombineSend = 2, kDoneCombineRecv = 3 };

// Everything a kernel needs to reach this rank's and its peers' regions. Filled once per buffer.
struct CudaGroup {
  GroupArgs group;          // layout, rank, regions (a DEVICE array of R peer pointers; nullptr: put path),
                            // phases and tickets (set per call), timeout_s
  const int32_t* peer_pes;  // device array [R]: NVSHMEM PE of each rank of the group (put path)
  uint8_t* local_region;    // this rank's region (also its symmetric address for NVSHMEM calls)
  CudaWorkspace workspace;
  uint32_t* error_flag;  // device alias of a host-mapped word: set to the ErrorCode of a recorded error
  int32_t num_sms;       // multiprocessors this process may use (MPS may give it a share)
  int32_t use_put;       // 1 if any peer uses the NVSHMEM put path (then bf16 payloads are staged too)
};

// Bytes of CudaWorkspace for a layout (one allocation, carved by carve_workspace).
int64_t workspace_bytes(const Layout& layout);
CudaWorkspace carve_workspace(void* base, const Layout& layout);

// g.group.phases selects the halves; the split forms pass their tickets (device int32[1]) in g.group.ticket_out /
// ticket_in: the send half writes the call's sequence number (low 31 bits), the receive half checks it.
cudaError_t run_dispatch(const CudaGroup& g, const DispatchArgs& args, cudaStream_t stream);
cudaError_t run_combine(const CudaGroup& g, const CombineArgs& args, cudaStream_t stream);

// NVSHMEM device state of this module (nvshmem4py initializes only the host library; see
// shared/reference/jax-ffi-nvshmem-facts.md section 5). Reference counted by NVSHMEM itself.
int nvshmem_module_init();
void nvshmem_module_finalize();

}  // namespace jax_ll_ep
