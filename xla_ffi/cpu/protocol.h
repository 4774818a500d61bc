// The low-latency dispatch/combine protocol over host memory (threads of one process, or processes sharing a POSIX
// shared-memory segment). Knows nothing of XLA: the FFI handlers fill GroupArgs/DispatchArgs/CombineArgs (args.h)
// and call run_dispatch / run_combine; every offset and encoding comes from layout.h.
//
// One call (seq = state.seq + 1, parity = seq & 1):
//   send half     write every message into its owner's receive region [parity], then store one signal
//                 encode_signal(seq, kind, count) into EVERY (destination rank, local expert) pair, zero-token pairs
//                 included, each with a release store after the data it announces;
//   receive half  acquire-load until all E_l x R signals of this call are there (bounded by timeout_s), then read
//                 the receive region [parity] into the outputs and advance state.seq.
// docs/protocol.md gives the argument that this meets every requirement of the protocol.
#pragma once

#include <stdint.h>

#include <mutex>
#include <string>

#include "cpu/test_hooks.h"
#include "jax_ll_ep/args.h"
#include "jax_ll_ep/errors.h"
#include "jax_ll_ep/layout.h"

namespace jax_ll_ep::cpu {

// The outcome of a call, worded by errors.h. A non-kOk code has also been recorded in the rank's RankState (first
// error since the last check) so that buf.check() in Python can raise it as a typed exception.
struct Status {
  ErrorCode code = ErrorCode::kOk;
  std::string message;
  bool ok() const { return code == ErrorCode::kOk; }
};

// Host-side context of one call that is not part of the protocol's arguments.
struct CallEnv {
  int32_t group = 0;                  // which expert-parallel group of the mesh this rank belongs to
  std::mutex* record_lock = nullptr;  // guards the RankState error record against buf.check() (never null)
  const TestHooks* hooks = nullptr;   // test instrumentation; null in normal operation
};

// phases (GroupArgs::phases): kBothPhases for dispatch, kSendPhase for dispatch_send, kRecvPhase for
// dispatch_recv; the split forms exchange a ticket (GroupArgs::ticket_out / ticket_in).
Status run_dispatch(const GroupArgs& group, const DispatchArgs& args, const CallEnv& env);
Status run_combine(const GroupArgs& group, const CombineArgs& args, const CallEnv& env);

}  // namespace jax_ll_ep::cpu
