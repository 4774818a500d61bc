// The CPU backend's buffers, by integer handle (the `buffer_id` attribute of every custom call).
//
// One buffer holds num_groups x R regions of make_layout(R, E, T, H).region_bytes each, in one allocation: private
// anonymous memory when all ranks are devices of this process, or a POSIX shared-memory segment mapped by every
// process of the mesh. Region (group g, rank r) starts at (g * R + r) * region_bytes, so every process computes the
// same peer addresses from its own mapping. Handlers of different devices run concurrently on XLA's threads: the
// registry's map is guarded by a mutex, and a handler holds a shared_ptr to its entry for the length of the call,
// so destroy() never frees memory under a running call. Knows nothing of XLA or Python.
#pragma once

#include <stdint.h>

#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cpu/test_hooks.h"
#include "jax_ll_ep/errors.h"
#include "jax_ll_ep/layout.h"

namespace jax_ll_ep::cpu {

// A zeroed mapping, released with munmap.
class Mapping {
 public:
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping();

  // Private anonymous memory (one process).
  static std::unique_ptr<Mapping> anonymous(int64_t bytes, std::string* error);
  // An existing shared-memory segment created by shm_create (several processes).
  static std::unique_ptr<Mapping> shared(const std::string& name, int64_t bytes, std::string* error);

  uint8_t* data() const { return data_; }

 private:
  static std::unique_ptr<Mapping> adopt(void* data, int64_t bytes);  // owns (and will unmap) a fresh mapping

  uint8_t* data_ = nullptr;
  int64_t bytes_ = 0;
};

// Creates (exclusively) and sizes a POSIX shared-memory segment; reserves its pages so that a too-small /dev/shm
// fails here with a message instead of a SIGBUS later. Returns "" or an error message.
std::string shm_create(const std::string& name, int64_t bytes);
// Removes the name (mappings stay valid until unmapped). Returns "" or an error message.
std::string shm_unlink(const std::string& name);

struct DeviceRank {
  int32_t group;
  int32_t rank;
};

struct BufferEntry {
  int64_t handle = 0;
  Layout layout = {};
  int32_t num_groups = 0;
  double timeout_s = 0.0;
  bool on_timeout_mask = false;  // Buffer(on_timeout="mask")
  std::unique_ptr<Mapping> memory;
  std::unordered_map<int32_t, DeviceRank> devices;  // this process's devices: global device id -> (group, rank)
  std::vector<std::vector<uint8_t*>> regions;       // [group][rank], this process's addresses
  std::mutex record_lock;                           // the error records of this process's ranks

  uint8_t* region(int32_t group, int32_t rank) const { return regions[group][rank]; }
};

struct CreateArgs {
  int64_t handle;
  int32_t num_ranks;
  int32_t num_experts;
  int32_t max_tokens;
  int32_t hidden;
  double timeout_s;
  bool on_timeout_mask;
  int32_t num_groups;
  std::vector<std::pair<int32_t, DeviceRank>> devices;  // this process's devices
  std::string shm_name;                                 // "" for private memory
};

class Registry {
 public:
  static Registry& instance();

  // Returns "" or an error message.
  std::string create(const CreateArgs& args);
  // False if the handle is unknown. Memory is released once no call holds the entry.
  bool destroy(int64_t handle);

  // The entry and the hooks installed at this moment (null when none), for one call.
  struct Resolved {
    std::shared_ptr<BufferEntry> entry;
    std::shared_ptr<const TestHooks> hooks;
  };
  Resolved resolve(int64_t handle);

  // Test hooks; null removes them. False if the handle is unknown.
  bool set_hooks(int64_t handle, std::shared_ptr<const TestHooks> hooks);

  // (group, rank, seq, open_seq) of this process's ranks, ordered by (group, rank): diagnostics and tests.
  std::vector<std::tuple<int32_t, int32_t, uint64_t, uint64_t>> sequence_numbers(int64_t handle);

  // The error records of this process's ranks that hold an error, ordered by (group, rank); optionally cleared.
  std::vector<ErrorRecord> errors(int64_t handle, bool clear);

  // Masking, outside any call (buf.mask_ranks settles the buffer's programs first). The mask state of each of this
  // process's ranks, ordered by (group, rank).
  struct MaskState {
    int32_t group;
    int32_t rank;
    std::vector<int32_t> masked;  // the ranks its mask holds
    uint32_t dropped_last;
    uint64_t dropped_total;
    uint64_t seq;       // last completed call
    uint64_t open_seq;  // an open split call (0: none)
  };
  std::vector<MaskState> mask_states(int64_t handle);
  // Sets every local rank's mask to `ranks`, its call sequence to `seq` (the same on every live rank: the calls line
  // up again), clears RankState::unusable, and zeroes dropped_last. Returns "" or an error message (an open split
  // call, a rank out of range).
  std::string set_mask(int64_t handle, const std::vector<int32_t>& ranks, uint64_t seq);

 private:
  std::mutex lock_;
  std::unordered_map<int64_t, std::shared_ptr<BufferEntry>> buffers_;
  std::unordered_map<int64_t, std::shared_ptr<const TestHooks>> hooks_;
};

}  // namespace jax_ll_ep::cpu
