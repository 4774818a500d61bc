#include "cuda/registry.h"

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

#include "jax_ll_ep/limits.h"

namespace jax_ll_ep::cuda {
namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("jax_ll_ep: ") + what + ": " + cudaGetErrorString(e));
}

// The rank's RankState once the device is idle (every call enqueued on it has finished: it is then stable).
RankState read_state(const BufferEntry& b, const char* why) {
  check_cuda(cudaSetDevice(b.device), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), why);
  RankState s;
  check_cuda(cudaMemcpy(&s, b.layout().state(b.kernel_args.local_region), sizeof(s), cudaMemcpyDeviceToHost),
             "read RankState");
  return s;
}

// Frees what `b` holds (the parts that were allocated); errors are ignored: this runs on teardown paths.
void release(BufferEntry& b) {
  cudaSetDevice(b.device);
  if (b.workspace != nullptr) cudaFree(b.workspace);
  if (b.regions != nullptr) cudaFree(b.regions);
  if (b.peer_pes != nullptr) cudaFree(b.peer_pes);
  if (b.host_flag != nullptr) cudaFreeHost(b.host_flag);
  b.workspace = nullptr;
  b.regions = nullptr;
  b.peer_pes = nullptr;
  b.host_flag = nullptr;
}

void allocate(const RegisterArgs& a, const Layout& l, BufferEntry& b) {
  check_cuda(cudaSetDevice(a.device), "cudaSetDevice");
  int blocks_per_sm[kNumOps] = {1, 1};
  const cudaError_t prepared = prepare_kernels(l, a.device, blocks_per_sm);
  if (prepared != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error of the failed call
    throw std::invalid_argument(
        "jax_ll_ep: cannot prepare the cuda kernels (" + std::string(cudaGetErrorString(prepared)) +
        "): for num_experts=" + std::to_string(a.num_experts) +
        " and max_tokens_per_rank=" + std::to_string(a.max_tokens) + " a block needs " +
        std::to_string(std::max(dispatch_smem_bytes(l), combine_smem_bytes(l))) +
        " bytes of shared memory; if that is more than this GPU allows, lower max_tokens_per_rank or num_experts");
  }
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device), "cudaDeviceGetAttribute");
  check_cuda(cudaMalloc(&b.workspace, workspace_bytes(l)), "workspace allocation");
  check_cuda(cudaMemset(b.workspace, 0, workspace_bytes(l)), "workspace zeroing");
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&b.regions), sizeof(uint8_t*) * a.num_ranks), "peer table");
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&b.peer_pes), sizeof(int32_t) * a.num_ranks), "peer table");
  std::vector<uint8_t*> regions(a.num_ranks);
  bool use_put = false;
  for (int r = 0; r < a.num_ranks; ++r) {
    regions[r] = reinterpret_cast<uint8_t*>(a.peer_regions[r]);
    use_put = use_put || regions[r] == nullptr;
  }
  check_cuda(cudaMemcpy(b.regions, regions.data(), sizeof(uint8_t*) * a.num_ranks, cudaMemcpyHostToDevice), "copy");
  check_cuda(cudaMemcpy(b.peer_pes, a.peer_pes.data(), sizeof(int32_t) * a.num_ranks, cudaMemcpyHostToDevice), "copy");
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&b.host_flag), sizeof(uint32_t), cudaHostAllocMapped),
             "host-mapped error flag");
  *b.host_flag = 0;
  uint32_t* device_flag = nullptr;
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_flag), b.host_flag, 0), "error flag");
  // Zeroed signals hold sequence number 0, which no call uses: nothing in the region can pass for a signal.
  check_cuda(cudaMemset(reinterpret_cast<void*>(a.region), 0, static_cast<size_t>(l.region_bytes)), "region zeroing");
  check_cuda(cudaDeviceSynchronize(), "region zeroing");

  CudaGroup& g = b.kernel_args;
  g.group.layout = l;
  g.group.rank = a.rank;
  g.group.regions = b.regions;
  g.group.phases = kBothPhases;
  g.group.timeout_s = a.timeout_s;
  g.group.on_timeout_mask = a.on_timeout_mask ? 1 : 0;
  g.peer_pes = b.peer_pes;
  g.local_region = reinterpret_cast<uint8_t*>(a.region);
  g.workspace = carve_workspace(b.workspace, l);
  g.error_flag = device_flag;
  g.num_sms = sms;
  for (int op = 0; op < kNumOps; ++op) g.max_blocks[op] = sms * (blocks_per_sm[op] > 0 ? blocks_per_sm[op] : 1);
  g.use_put = use_put ? 1 : 0;
  g.trace = a.trace ? 1 : 0;
}

}  // namespace

Registry& Registry::instance() {
  static Registry* registry = new Registry();  // never destroyed: handlers may run during interpreter teardown
  return *registry;
}

void Registry::add(const RegisterArgs& a) {
  const Layout l = make_layout(a.num_ranks, a.num_experts, a.max_tokens, a.hidden);
  if (l.region_bytes == 0) throw std::invalid_argument("jax_ll_ep: invalid buffer shape for make_layout");
  if (l.num_experts() > kMaxCudaExperts) {
    throw std::invalid_argument("jax_ll_ep: the cuda backend supports at most " + std::to_string(kMaxCudaExperts) +
                                " experts; num_experts=" + std::to_string(a.num_experts));
  }
  if (static_cast<int32_t>(a.peer_regions.size()) != a.num_ranks ||
      static_cast<int32_t>(a.peer_pes.size()) != a.num_ranks || a.rank < 0 || a.rank >= a.num_ranks) {
    throw std::invalid_argument("jax_ll_ep: peer tables must have one entry per rank");
  }
  {
    std::lock_guard<std::mutex> guard(lock_);
    if (buffers_.count({a.handle, a.device})) {
      throw std::invalid_argument("jax_ll_ep: buffer handle registered twice for one device");
    }
  }
  auto b = std::make_shared<BufferEntry>();
  b->handle = a.handle;
  b->device = a.device;
  b->group = a.group;
  b->rank = a.rank;
  try {
    allocate(a, l, *b);
  } catch (...) {
    release(*b);
    throw;
  }
  std::lock_guard<std::mutex> guard(lock_);
  buffers_[{a.handle, a.device}] = std::move(b);
}

void Registry::remove(int64_t handle, int device) {
  std::shared_ptr<BufferEntry> b;
  {
    std::lock_guard<std::mutex> guard(lock_);
    auto it = buffers_.find({handle, device});
    if (it == buffers_.end()) return;
    b = std::move(it->second);
    buffers_.erase(it);
  }
  cudaSetDevice(b->device);
  cudaDeviceSynchronize();  // every enqueued kernel that uses the resources has finished
  release(*b);
}

std::shared_ptr<const BufferEntry> Registry::find(int64_t handle, int device, bool* handle_known) const {
  std::lock_guard<std::mutex> guard(lock_);
  auto it = buffers_.find({handle, device});
  if (it != buffers_.end()) {
    *handle_known = true;
    return it->second;
  }
  auto first = buffers_.lower_bound({handle, INT_MIN});
  *handle_known = first != buffers_.end() && first->first.first == handle;
  if (*handle_known) {
    auto next = std::next(first);
    if (next == buffers_.end() || next->first.first != handle) return first->second;
  }
  return nullptr;
}

std::shared_ptr<BufferEntry> Registry::entry(int64_t handle, int device) const {
  std::lock_guard<std::mutex> guard(lock_);
  auto it = buffers_.find({handle, device});
  if (it == buffers_.end()) throw std::invalid_argument("jax_ll_ep: unknown cuda buffer handle for this device");
  return it->second;
}

std::optional<ErrorRecord> Registry::take_error(int64_t handle, int device) {
  std::shared_ptr<BufferEntry> b = entry(handle, device);
  const Layout& l = b->layout();
  uint8_t* region = b->kernel_args.local_region;
  RankState s = read_state(*b, "synchronize before reading the error record");
  if (s.error_code == 0) return std::nullopt;
  std::vector<uint8_t> missing(static_cast<size_t>(l.num_experts()));
  check_cuda(cudaMemcpy(missing.data(), l.missing(region), missing.size(), cudaMemcpyDeviceToHost),
             "read missing table");
  const ErrorRecord record = read_record(s, missing.data(), l, b->group, b->rank);
  // Clear the record, the missing table and the host flag (the call state and RankState::unusable stay), on a fresh
  // read of the state.
  s = read_state(*b, "synchronize before clearing the error record");
  s.error_code = 0;
  s.error_kind = 0;
  s.error_seq = 0;
  s.error_detail = 0;
  s.error_count = 0;
  s.error_token = 0;
  s.error_topk_pos = 0;
  s.error_signal = 0;
  s.open_error = 0;
  check_cuda(cudaMemcpy(l.state(region), &s, sizeof(s), cudaMemcpyHostToDevice), "write RankState");
  check_cuda(cudaMemset(l.missing(region), 0, missing.size()), "clear missing");
  check_cuda(cudaDeviceSynchronize(), "clear error record");
  *reinterpret_cast<volatile uint32_t*>(b->host_flag) = 0;
  return record;
}

uint64_t Registry::sequence_number(int64_t handle, int device) {
  return read_state(*entry(handle, device), "synchronize before reading the call state").seq;
}

Registry::MaskState Registry::mask_state(int64_t handle, int device) {
  std::shared_ptr<BufferEntry> b = entry(handle, device);
  const Layout& l = b->layout();
  uint8_t* region = b->kernel_args.local_region;
  const RankState s = read_state(*b, "synchronize before reading the mask");
  std::vector<uint32_t> sets(3 * static_cast<size_t>(l.mask_words()));
  check_cuda(cudaMemcpy(sets.data(), l.rank_mask(region), 4 * sets.size(), cudaMemcpyDeviceToHost), "read the mask");
  MaskState m{{}, s.dropped_last, s.dropped_total, s.seq, s.open_seq};
  const uint32_t* late = sets.data() + l.mask_words() * (1 + parity_of(s.seq));  // not merged until the next launch
  for (int32_t r = 0; r < l.num_ranks; ++r) {
    if (rank_in(sets.data(), r) || rank_in(late, r)) m.masked.push_back(r);
  }
  return m;
}

void Registry::set_mask(int64_t handle, int device, const std::vector<int32_t>& ranks, uint64_t seq) {
  std::shared_ptr<BufferEntry> b = entry(handle, device);
  const Layout& l = b->layout();
  uint8_t* region = b->kernel_args.local_region;
  for (int32_t r : ranks) {
    if (r < 0 || r >= l.num_ranks) throw std::invalid_argument("jax_ll_ep: set_mask: rank out of range");
  }
  RankState s = read_state(*b, "synchronize before setting the mask");
  if (s.open_seq != 0) throw std::invalid_argument("jax_ll_ep: set_mask: a split call is open");
  std::vector<uint32_t> sets(3 * static_cast<size_t>(l.mask_words()));
  apply_rank_mask(l, s, sets.data(), ranks.data(), static_cast<int64_t>(ranks.size()), seq);
  check_cuda(cudaMemcpy(l.rank_mask(region), sets.data(), 4 * sets.size(), cudaMemcpyHostToDevice), "write the mask");
  check_cuda(cudaMemcpy(l.state(region), &s, sizeof(s), cudaMemcpyHostToDevice), "write RankState");
  // The next call claims its send items from the work queue of its own parity, which only the previous call's last
  // block in re-arms; `seq` may have moved by an odd number here (a rank that sat out calls), so re-arm both (no
  // call runs: synchronized above).
  check_cuda(cudaMemset(b->kernel_args.workspace.queue, 0, kNumParities * sizeof(uint32_t)), "re-arm work queues");
  check_cuda(cudaDeviceSynchronize(), "set the mask");
}

std::string Registry::read_trace(int64_t handle, int device) {
  std::shared_ptr<BufferEntry> b = entry(handle, device);
  check_cuda(cudaSetDevice(b->device), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "synchronize before reading the trace");
  std::string rows(sizeof(uint64_t) * kTraceRows * kTraceMarks, '\0');
  check_cuda(cudaMemcpy(rows.data(), b->kernel_args.workspace.trace, rows.size(), cudaMemcpyDeviceToHost),
             "read trace");
  return rows;
}

uintptr_t alloc_region(int device, int64_t bytes) {
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  void* p = nullptr;
  check_cuda(cudaMalloc(&p, static_cast<size_t>(bytes)), "region allocation");
  return reinterpret_cast<uintptr_t>(p);
}

void free_region(int device, uintptr_t region) {
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "synchronize before freeing a region");
  check_cuda(cudaFree(reinterpret_cast<void*>(region)), "region free");
}

void enable_peer_access(const std::vector<int>& devices) {
  for (int from : devices) {
    for (int to : devices) {
      if (from == to) continue;
      int can = 0;
      check_cuda(cudaDeviceCanAccessPeer(&can, from, to), "cudaDeviceCanAccessPeer");
      if (!can) {
        throw std::runtime_error("jax_ll_ep: CUDA device " + std::to_string(from) + " cannot access device " +
                                 std::to_string(to) +
                                 " as a peer; one process driving several GPUs needs peer access between all of "
                                 "them (NVLink or PCIe P2P), else run one process per GPU (NVSHMEM)");
      }
      check_cuda(cudaSetDevice(from), "cudaSetDevice");
      const cudaError_t e = cudaDeviceEnablePeerAccess(to, 0);
      if (e == cudaErrorPeerAccessAlreadyEnabled) {
        cudaGetLastError();  // (not sticky) clear it
      } else {
        check_cuda(e, "cudaDeviceEnablePeerAccess");
      }
    }
  }
}

std::pair<size_t, size_t> mem_get_info(int device) {
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  size_t free_bytes = 0, total = 0;
  check_cuda(cudaMemGetInfo(&free_bytes, &total), "cudaMemGetInfo");
  return {free_bytes, total};
}

int multiprocessor_count(int device) {
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms;
}

}  // namespace jax_ll_ep::cuda
