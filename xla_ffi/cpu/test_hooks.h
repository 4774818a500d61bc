// Test instrumentation of the CPU protocol: injected delays, a rank that never calls, and timestamps.
//
// Installed only by tests (jax_ll_ep/testing/cpu_hooks.py); in normal operation a call's
// hooks pointer is null and every probe below is a branch on it. A TestHooks object is immutable once installed
// (the registry swaps in a new one); only the timestamps change, and they are atomics.
#pragma once

#include <stdint.h>

#include <atomic>
#include <memory>
#include <vector>

namespace jax_ll_ep::cpu {

// Where a delay can be injected in a call, in protocol order.
enum class HookPoint : int32_t {
  kBeforeSend = 0,    // before the send half writes any message
  kBeforeSignal = 1,  // between the last message and the first signal (data written, not yet announced)
  kBeforeRecv = 2,    // before the receive half starts waiting
};
inline constexpr int kNumHookPoints = 3;
inline constexpr const char* kHookPointNames[kNumHookPoints] = {"before_send", "before_signal", "before_recv"};

// Timestamps of a rank's most recent dispatch and most recent combine (steady clock, nanoseconds; comparable across
// the processes of one host).
enum class Stamp : int32_t {
  kEnter = 0,       // the call started
  kSignalling = 1,  // the send half is about to store its first signal: every signal of the call is stored later,
                    // so no peer can complete the call before this time (a stamp taken after the stores would not
                    // bound anything: a peer may finish as soon as its own signal is out)
  kReturned = 2,    // the receive half finished writing its outputs
};
inline constexpr int kNumStamps = 3;

class TestHooks {
 public:
  TestHooks(int32_t num_groups, int32_t num_ranks, uint64_t seed);

  // Configuration (before installation).
  void set_delay(int32_t rank, HookPoint point, double min_s, double max_s);
  void set_skip(int32_t rank);

  // Probes called by the protocol. The delay of (group, rank, point, seq) is a deterministic function of the seed,
  // uniform in [min_s, max_s]: a failing schedule can be replayed.
  void pause(int32_t group, int32_t rank, HookPoint point, uint64_t seq) const;
  bool skips(int32_t rank) const;
  // kind: 0 dispatch, 1 combine.
  void stamp(int32_t group, int32_t rank, int32_t kind, Stamp which) const;
  int64_t stamp_ns(int32_t group, int32_t rank, int32_t kind, Stamp which) const;

 private:
  struct Delay {
    double min_s = 0.0;
    double max_s = 0.0;
  };
  int32_t num_ranks_;
  uint64_t seed_;
  std::vector<Delay> delays_;  // [rank][point]
  std::vector<uint8_t> skip_;  // [rank]
  int64_t stamp_index(int32_t group, int32_t rank, int32_t kind, Stamp which) const;
  std::unique_ptr<std::atomic<int64_t>[]> stamps_;  // [group][rank][kind][stamp]
};

}  // namespace jax_ll_ep::cpu
