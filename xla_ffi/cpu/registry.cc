#include "cpu/registry.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

namespace jax_ll_ep::cpu {
namespace {

std::string errno_text(const char* what, const std::string& name, int err) {
  return std::string(what) + "(" + name + ") failed: " + strerror(err);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------------------------
Mapping::~Mapping() {
  if (data_ != nullptr) munmap(data_, static_cast<size_t>(bytes_));
}

std::unique_ptr<Mapping> Mapping::adopt(void* data, int64_t bytes) {
  auto m = std::unique_ptr<Mapping>(new Mapping());
  m->data_ = static_cast<uint8_t*>(data);
  m->bytes_ = bytes;
  return m;
}

std::unique_ptr<Mapping> Mapping::anonymous(int64_t bytes, std::string* error) {
  // Anonymous pages are zero: every signal starts at sequence 0, which no call uses.
  void* p = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    *error = "could not allocate " + std::to_string(bytes) + " bytes for the buffer: " + strerror(errno);
    return nullptr;
  }
  return adopt(p, bytes);
}

std::unique_ptr<Mapping> Mapping::shared(const std::string& name, int64_t bytes, std::string* error) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    *error = errno_text("shm_open", name, errno);
    return nullptr;
  }
  struct stat st = {};
  if (fstat(fd, &st) != 0 || st.st_size < bytes) {
    *error = "shared-memory segment " + name + " is smaller than the " + std::to_string(bytes) +
             " bytes this buffer needs (a different buffer configuration in another process?)";
    close(fd);
    return nullptr;
  }
  void* p = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  close(fd);  // the mapping keeps the segment alive
  if (p == MAP_FAILED) {
    *error = errno_text("mmap", name, err);
    return nullptr;
  }
  return adopt(p, bytes);
}

std::string shm_create(const std::string& name, int64_t bytes) {
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) return errno_text("shm_open", name, errno);
  std::string error;
  // A new segment is zero-filled: every signal starts at sequence 0, which no call uses.
  if (ftruncate(fd, bytes) != 0) {
    error = errno_text("ftruncate", name, errno);
  } else if (const int err = posix_fallocate(fd, 0, bytes); err != 0) {
    error = "could not reserve " + std::to_string(bytes) + " bytes of shared memory for " + name + ": " +
            strerror(err) + " (is /dev/shm large enough? `df -h /dev/shm`)";
  }
  close(fd);
  if (!error.empty()) ::shm_unlink(name.c_str());
  return error;
}

std::string shm_unlink(const std::string& name) {
  if (::shm_unlink(name.c_str()) != 0) return errno_text("shm_unlink", name, errno);
  return "";
}

// ---------------------------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------------------------
Registry& Registry::instance() {
  static Registry* registry = new Registry();  // never destroyed: handlers may run during interpreter teardown
  return *registry;
}

std::string Registry::create(const CreateArgs& args) {
  const Layout layout = make_layout(args.num_ranks, args.num_experts, args.max_tokens, args.hidden);
  if (layout.region_bytes == 0) {
    return "invalid buffer configuration: num_ranks=" + std::to_string(args.num_ranks) +
           " num_experts=" + std::to_string(args.num_experts) + " max_tokens=" + std::to_string(args.max_tokens) +
           " hidden=" + std::to_string(args.hidden);
  }
  if (args.num_groups <= 0) return "num_groups must be positive";
  auto entry = std::make_shared<BufferEntry>();
  entry->handle = args.handle;
  entry->layout = layout;
  entry->num_groups = args.num_groups;
  entry->timeout_s = args.timeout_s;
  entry->on_timeout_mask = args.on_timeout_mask;
  for (const auto& [device, where] : args.devices) {
    if (where.group < 0 || where.group >= args.num_groups || where.rank < 0 || where.rank >= args.num_ranks) {
      return "device " + std::to_string(device) + " maps to (group " + std::to_string(where.group) + ", rank " +
             std::to_string(where.rank) + "), outside " + std::to_string(args.num_groups) + " groups of " +
             std::to_string(args.num_ranks) + " ranks";
    }
    entry->devices[device] = where;
  }
  const int64_t total = layout.region_bytes * args.num_groups * args.num_ranks;
  std::string error;
  entry->memory =
      args.shm_name.empty() ? Mapping::anonymous(total, &error) : Mapping::shared(args.shm_name, total, &error);
  if (!entry->memory) return error;
  entry->regions.assign(args.num_groups, std::vector<uint8_t*>(args.num_ranks));
  for (int32_t g = 0; g < args.num_groups; ++g) {
    for (int32_t r = 0; r < args.num_ranks; ++r) {
      entry->regions[g][r] =
          entry->memory->data() + (static_cast<int64_t>(g) * args.num_ranks + r) * layout.region_bytes;
    }
  }
  std::lock_guard<std::mutex> guard(lock_);
  if (buffers_.count(args.handle) != 0) return "buffer handle " + std::to_string(args.handle) + " already exists";
  buffers_[args.handle] = std::move(entry);
  return "";
}

bool Registry::destroy(int64_t handle) {
  std::shared_ptr<BufferEntry> entry;  // released outside the lock
  std::lock_guard<std::mutex> guard(lock_);
  hooks_.erase(handle);
  auto it = buffers_.find(handle);
  if (it == buffers_.end()) return false;
  entry = std::move(it->second);
  buffers_.erase(it);
  return true;
}

Registry::Resolved Registry::resolve(int64_t handle) {
  std::lock_guard<std::mutex> guard(lock_);
  Resolved out;
  if (auto it = buffers_.find(handle); it != buffers_.end()) out.entry = it->second;
  if (auto it = hooks_.find(handle); it != hooks_.end()) out.hooks = it->second;
  return out;
}

bool Registry::set_hooks(int64_t handle, std::shared_ptr<const TestHooks> hooks) {
  std::lock_guard<std::mutex> guard(lock_);
  if (buffers_.count(handle) == 0) return false;
  if (hooks) {
    hooks_[handle] = std::move(hooks);
  } else {
    hooks_.erase(handle);
  }
  return true;
}

namespace {

std::vector<DeviceRank> local_ranks(const BufferEntry& entry) {
  std::vector<DeviceRank> ranks;
  for (const auto& [device, where] : entry.devices) ranks.push_back(where);
  std::sort(ranks.begin(), ranks.end(), [](const DeviceRank& a, const DeviceRank& b) {
    return a.group != b.group ? a.group < b.group : a.rank < b.rank;
  });
  return ranks;
}

}  // namespace

std::vector<std::tuple<int32_t, int32_t, uint64_t, uint64_t>> Registry::sequence_numbers(int64_t handle) {
  std::shared_ptr<BufferEntry> entry = resolve(handle).entry;
  std::vector<std::tuple<int32_t, int32_t, uint64_t, uint64_t>> out;
  if (!entry) return out;
  for (const DeviceRank& where : local_ranks(*entry)) {
    const RankState* st = entry->layout.state(entry->region(where.group, where.rank));
    out.emplace_back(where.group, where.rank, st->seq, st->open_seq);
  }
  return out;
}

std::vector<ErrorRecord> Registry::errors(int64_t handle, bool clear) {
  std::shared_ptr<BufferEntry> entry = resolve(handle).entry;
  std::vector<ErrorRecord> out;
  if (!entry) return out;
  const std::vector<DeviceRank> ranks = local_ranks(*entry);
  const Layout& layout = entry->layout;
  std::lock_guard<std::mutex> guard(entry->record_lock);
  for (const DeviceRank& where : ranks) {
    uint8_t* region = entry->region(where.group, where.rank);
    RankState* st = layout.state(region);
    if (st->error_count == 0) continue;
    out.push_back(read_record(*st, layout.missing(region), layout, where.group, where.rank));
    if (clear) {
      st->error_code = 0;
      st->error_kind = 0;
      st->error_seq = 0;
      st->error_detail = 0;
      st->error_count = 0;
      st->error_token = -1;
      st->error_topk_pos = -1;
      st->error_signal = 0;
      memset(layout.missing(region), 0, static_cast<size_t>(layout.num_experts()));
    }
  }
  return out;
}

std::vector<Registry::MaskState> Registry::mask_states(int64_t handle) {
  std::shared_ptr<BufferEntry> entry = resolve(handle).entry;
  std::vector<MaskState> out;
  if (!entry) return out;
  const Layout& layout = entry->layout;
  for (const DeviceRank& where : local_ranks(*entry)) {
    uint8_t* region = entry->region(where.group, where.rank);
    const RankState* st = layout.state(region);
    MaskState m{where.group, where.rank, {}, st->dropped_last, st->dropped_total, st->seq, st->open_seq};
    const uint32_t* mask = layout.rank_mask(region);
    for (int32_t r = 0; r < layout.num_ranks; ++r) {
      if (rank_in(mask, r)) m.masked.push_back(r);
    }
    out.push_back(std::move(m));
  }
  return out;
}

std::string Registry::set_mask(int64_t handle, const std::vector<int32_t>& ranks, uint64_t seq) {
  std::shared_ptr<BufferEntry> entry = resolve(handle).entry;
  if (!entry) return "unknown buffer handle " + std::to_string(handle);
  const Layout& layout = entry->layout;
  for (int32_t r : ranks) {
    if (r < 0 || r >= layout.num_ranks) {
      return "rank " + std::to_string(r) + " is outside [0, " + std::to_string(layout.num_ranks) + ")";
    }
  }
  const std::vector<DeviceRank> local = local_ranks(*entry);
  for (const DeviceRank& where : local) {
    const RankState* st = layout.state(entry->region(where.group, where.rank));
    if (st->open_seq != 0) {
      return "rank " + std::to_string(where.rank) + " of group " + std::to_string(where.group) +
             " has an open split call (seq=" + std::to_string(st->open_seq) +
             "); finish it with its receive half first";
    }
  }
  for (const DeviceRank& where : local) {
    uint8_t* region = entry->region(where.group, where.rank);
    apply_rank_mask(layout, *layout.state(region), layout.rank_mask(region), ranks.data(),
                    static_cast<int64_t>(ranks.size()), seq);
  }
  return "";
}

}  // namespace jax_ll_ep::cpu
