// The CUDA backend's buffers and their host-side resources: one entry per (buffer handle, CUDA device) holding what
// the kernels of that rank need besides its region (workspace, the device copy of the peer tables, the host-mapped
// error flag). Entries are created and destroyed from Python outside jit (jax_ll_ep/backends/cuda.py) and found by
// the FFI handlers on every call, possibly from several XLA threads: the map is guarded by a mutex and a handler
// holds a shared_ptr to its entry for the length of the call, so the lookup copies nothing. Also the plain region
// allocations of the peer-access transport and the device queries Python needs.
//
// Knows nothing of XLA or Python; errors are thrown as std::invalid_argument (bad arguments) or std::runtime_error
// (a CUDA call failed), which the extension module turns into ValueError / RuntimeError.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cuda/launch.h"
#include "jax_ll_ep/errors.h"
#include "jax_ll_ep/layout.h"

namespace jax_ll_ep::cuda {

struct RegisterArgs {
  int64_t handle = 0;
  int device = 0;     // CUDA ordinal
  int32_t group = 0;  // this rank's group (slice of the mesh along its other axes) and its rank in it
  int32_t rank = 0;
  int32_t num_ranks = 0;
  int32_t num_experts = 0;
  int32_t max_tokens = 0;
  int32_t hidden = 0;
  uintptr_t region = 0;                 // this rank's region (device address)
  std::vector<uintptr_t> peer_regions;  // [R]: each rank's region as this rank addresses it; 0: NVSHMEM put path
  std::vector<int32_t> peer_pes;        // [R]: each rank's NVSHMEM PE (put path)
  double timeout_s = 0.0;
  bool on_timeout_mask = false;  // Buffer(on_timeout="mask")
  bool trace = false;            // record the kernels' phase trace (launch.h)
};

// One rank's device resources.
struct BufferEntry {
  BufferEntry() = default;
  BufferEntry(const BufferEntry&) = delete;
  BufferEntry& operator=(const BufferEntry&) = delete;

  int64_t handle = 0;
  int device = 0;
  int32_t group = 0;  // this rank's place in the mesh
  int32_t rank = 0;
  CudaGroup kernel_args;  // what every launch needs (device pointers); phases and tickets are set per call
  // Freed by Registry::remove after the device's work (an entry outlives its resources while a call holds it).
  void* workspace = nullptr;      // cudaMalloc
  uint8_t** regions = nullptr;    // cudaMalloc [R]
  int32_t* peer_pes = nullptr;    // cudaMalloc [R]
  uint32_t* host_flag = nullptr;  // cudaHostAlloc (mapped): the ErrorCode of a recorded error, 0 if none

  const Layout& layout() const { return kernel_args.group.layout; }
  // The flag as it stands (an error an earlier call's kernels recorded), read without a device synchronisation.
  uint32_t recorded_error() const { return *reinterpret_cast<volatile uint32_t*>(host_flag); }
};

class Registry {
 public:
  static Registry& instance();

  // Prepares the kernels for the layout, allocates the entry's resources, zeroes the region and waits for it.
  void add(const RegisterArgs& args);
  // Waits for the device's work, then frees the entry's resources (the region is freed by its owner: Python).
  void remove(int64_t handle, int device);

  // The entry of (handle, device), or null. A process with a single entry for the handle (the NVSHMEM transport:
  // one GPU per process) gets it whatever the device ordinal: XLA's ordinal is the CUDA ordinal the buffer
  // registered (local_hardware_id), but nothing else depends on that. `handle_known`: whether any entry has it.
  std::shared_ptr<const BufferEntry> find(int64_t handle, int device, bool* handle_known) const;

  // After a device synchronisation: the rank's error record, cleared (with the flag) if there was one.
  std::optional<ErrorRecord> take_error(int64_t handle, int device);
  // After a device synchronisation: the rank's last completed call.
  uint64_t sequence_number(int64_t handle, int device);

  // Masking, after a device synchronisation (outside any call: buf.mask_ranks settles the buffer's programs first).
  struct MaskState {
    std::vector<int32_t> masked;  // the ranks the rank's mask holds (with those a timeout masked in its last call)
    uint32_t dropped_last;
    uint64_t dropped_total;
    uint64_t seq;
    uint64_t open_seq;
  };
  MaskState mask_state(int64_t handle, int device);
  // The rank's mask = ranks, its last completed call = seq, RankState::unusable cleared, dropped_last = 0.
  void set_mask(int64_t handle, int device, const std::vector<int32_t>& ranks, uint64_t seq);
  // After a device synchronisation: the phase trace rows (kTraceRows x kTraceMarks uint64), as bytes.
  std::string read_trace(int64_t handle, int device);

 private:
  std::shared_ptr<BufferEntry> entry(int64_t handle, int device) const;  // or throws

  mutable std::mutex lock_;
  std::map<std::pair<int64_t, int>, std::shared_ptr<BufferEntry>> buffers_;
};

// The peer-access transport (one process, several GPUs): each rank's region is a plain device allocation on its
// GPU, and every GPU of the group maps every other's through peer access, so the kernels' peer pointers are the
// allocations themselves.
uintptr_t alloc_region(int device, int64_t bytes);
void free_region(int device, uintptr_t region);
void enable_peer_access(const std::vector<int>& devices);

std::pair<size_t, size_t> mem_get_info(int device);  // (free, total) bytes
int multiprocessor_count(int device);

}  // namespace jax_ll_ep::cuda
