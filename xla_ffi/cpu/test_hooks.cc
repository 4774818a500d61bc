#include "cpu/test_hooks.h"

#include <chrono>
#include <thread>

namespace jax_ll_ep::cpu {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

TestHooks::TestHooks(int32_t num_groups, int32_t num_ranks, uint64_t seed)
    : num_ranks_(num_ranks),
      seed_(seed),
      delays_(static_cast<size_t>(num_ranks) * kNumHookPoints),
      skip_(static_cast<size_t>(num_ranks), 0),
      stamps_(new std::atomic<int64_t>[static_cast<size_t>(num_groups) * num_ranks * 2 * kNumStamps]) {
  for (int64_t i = 0; i < static_cast<int64_t>(num_groups) * num_ranks * 2 * kNumStamps; ++i) stamps_[i] = 0;
}

void TestHooks::set_delay(int32_t rank, HookPoint point, double min_s, double max_s) {
  delays_[static_cast<size_t>(rank) * kNumHookPoints + static_cast<int>(point)] = {min_s, max_s};
}

void TestHooks::set_skip(int32_t rank) { skip_[rank] = 1; }

void TestHooks::pause(int32_t group, int32_t rank, HookPoint point, uint64_t seq) const {
  const Delay& d = delays_[static_cast<size_t>(rank) * kNumHookPoints + static_cast<int>(point)];
  if (d.max_s <= 0.0) return;
  uint64_t h = splitmix64(seed_);
  h = splitmix64(h ^ static_cast<uint64_t>(group));
  h = splitmix64(h ^ static_cast<uint64_t>(rank));
  h = splitmix64(h ^ static_cast<uint64_t>(point));
  h = splitmix64(h ^ seq);
  const double u = static_cast<double>(h >> 11) * 0x1.0p-53;  // uniform in [0, 1)
  std::this_thread::sleep_for(std::chrono::duration<double>(d.min_s + u * (d.max_s - d.min_s)));
}

bool TestHooks::skips(int32_t rank) const { return skip_[rank] != 0; }

int64_t TestHooks::stamp_index(int32_t group, int32_t rank, int32_t kind, Stamp which) const {
  return ((static_cast<int64_t>(group) * num_ranks_ + rank) * 2 + kind) * kNumStamps + static_cast<int>(which);
}

void TestHooks::stamp(int32_t group, int32_t rank, int32_t kind, Stamp which) const {
  const int64_t now =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
  stamps_[stamp_index(group, rank, kind, which)].store(now, std::memory_order_relaxed);
}

int64_t TestHooks::stamp_ns(int32_t group, int32_t rank, int32_t kind, Stamp which) const {
  return stamps_[stamp_index(group, rank, kind, which)].load(std::memory_order_relaxed);
}

}  // namespace jax_ll_ep::cpu
