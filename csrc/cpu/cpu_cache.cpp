// A caching CPU allocator: large blocks freed by tensors are kept and handed to the next
// allocation that fits, so a training loop that allocates the same activations every step
// reuses pages that are already mapped instead of paying a fresh mmap and its page faults
// (glibc serves every block over its mmap threshold, at most 32 MiB, with a new mapping and
// unmaps it on free). Blocks under `min_block` bytes go straight to c10's alloc_cpu /
// free_cpu. The cache is bounded (`limit` bytes held while free: a block freed when the
// cache is full pushes out the blocks cached longest ago); `empty()` frees it.
//
// Two ways in: installed with c10::SetCPUAllocator at a priority above the default (the
// training layer's setting: every CPU tensor of the process), and uninstalled by putting
// the previous allocator back at that priority; and, on by default, as the allocator of
// fastcore's own CPU operators' outputs (fastcore::empty_output, csrc/utils.h), so a user's
// process that never touches the setting reuses the blocks those outputs freed. Tensors
// allocated by either keep their own deleter, so switching at any time is safe. Values
// computed never depend on it (addresses only); torch.empty's contents are uninitialised
// either way.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr uint8_t kPriority = 120;
constexpr size_t kPage = 4096;

// Whether fastcore's operators allocate their outputs from the cache (cache_outputs below).
std::atomic<bool> outputs_cached{false};

struct Stats {
  int64_t hits = 0, misses = 0, cached_bytes = 0, cached_blocks = 0, live_bytes = 0;
};

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < min_block_) {
      void* p = c10::alloc_cpu(n);
      return {p, p, &free_small, c10::Device(c10::DeviceType::CPU)};
    }
    const size_t want = (n + kPage - 1) / kPage * kPage;
    void* p = nullptr;
    size_t size = want;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Best fit: the smallest free block that holds `want`, wasting at most 1/8 of it.
      auto it = free_.lower_bound(want);
      if (it != free_.end() && it->first <= want + want / 8) {
        p = it->second.second;
        size = it->first;
        order_.erase(it->second.first);
        free_.erase(it);
        stats_.cached_bytes -= static_cast<int64_t>(size);
        stats_.cached_blocks -= 1;
        stats_.hits += 1;
      } else {
        stats_.misses += 1;
      }
    }
    if (p == nullptr) p = c10::alloc_cpu(size);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_[p] = size;
      stats_.live_bytes += static_cast<int64_t>(size);
    }
    return {p, p, &free_large, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate / raw_deallocate (oneDNN, some ATen kernels) go through this: a block
  // from the default allocator (allocated before the cache was installed) is freed as the
  // default allocator would, a cached-size block of ours returns to the cache.
  c10::DeleterFnPtr raw_deleter() const override { return &free_large; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void configure(int64_t limit, int64_t min_block) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = limit;
    min_block_ = static_cast<size_t>(min_block);
  }

  // Frees every cached block; returns the bytes released.
  int64_t empty() {
    Blocks blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      order_.clear();
      stats_.cached_bytes = 0;
      stats_.cached_blocks = 0;
    }
    int64_t released = 0;
    for (auto& [size, entry] : blocks) {
      c10::free_cpu(entry.second);
      released += static_cast<int64_t>(size);
    }
    return released;
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

  void reset_counts() {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.hits = stats_.misses = 0;
  }

  static CachingCPUAllocator& get() {
    static auto* instance = new CachingCPUAllocator();  // never destroyed: deleters outlive exit
    return *instance;
  }

 private:
  static void free_small(void* p) { c10::free_cpu(p); }

  static void free_large(void* p) { get().release(p); }

  void release(void* p) {
    if (p == nullptr) return;
    bool keep = false;
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(p);
      // Not ours (c10::alloc_cpu'd by the default allocator, or one of our small blocks
      // freed through raw_deallocate): freed below as the default allocator frees.
      if (it != live_.end()) {
        const size_t size = it->second;
        live_.erase(it);
        stats_.live_bytes -= static_cast<int64_t>(size);
        // Kept only while something allocates from the cache again.
        const bool reused = outputs_cached.load(std::memory_order_relaxed) ||
                            c10::GetCPUAllocator() == this;
        if (reused && static_cast<int64_t>(size) <= limit_) {
          // Make room by freeing the blocks cached longest ago: a training loop reuses
          // what it freed last.
          while (stats_.cached_bytes + static_cast<int64_t>(size) > limit_) {
            auto oldest = order_.begin();
            auto victim = oldest->second;
            to_free.push_back(victim->second.second);
            stats_.cached_bytes -= static_cast<int64_t>(victim->first);
            stats_.cached_blocks -= 1;
            free_.erase(victim);
            order_.erase(oldest);
          }
          const uint64_t seq = next_seq_++;
          order_.emplace(seq, free_.emplace(size, std::make_pair(seq, p)));
          stats_.cached_bytes += static_cast<int64_t>(size);
          stats_.cached_blocks += 1;
          keep = true;
        }
      }
    }
    for (void* q : to_free) c10::free_cpu(q);
    if (!keep) c10::free_cpu(p);
  }

  // Free blocks by size (value: insertion number, pointer), and by insertion number.
  using Blocks = std::multimap<size_t, std::pair<uint64_t, void*>>;
  std::mutex mutex_;
  Blocks free_;
  std::map<uint64_t, Blocks::iterator> order_;
  uint64_t next_seq_ = 0;
  std::unordered_map<void*, size_t> live_;
  Stats stats_;
  int64_t limit_ = int64_t{4} << 30;
  size_t min_block_ = size_t{256} << 10;
};

c10::Allocator* previous = nullptr;

void check_config(int64_t limit, int64_t min_block) {
  TORCH_CHECK_VALUE(limit >= 0, "cpu cache: limit must be >= 0 bytes, got ", limit);
  TORCH_CHECK_VALUE(min_block >= 1, "cpu cache: min_block must be >= 1 byte, got ", min_block);
}

int64_t outputs_limit = 0, outputs_min_block = 1;  // what cache_outputs configured last

void cache_outputs(bool enabled, int64_t limit, int64_t min_block) {
  check_config(limit, min_block);
  auto& cache = CachingCPUAllocator::get();
  if (enabled) {
    cache.configure(limit, min_block);
    outputs_limit = limit;
    outputs_min_block = min_block;
  }
  outputs_cached.store(enabled, std::memory_order_relaxed);
  // Off, and not the process's allocator either: nothing will reuse the cached blocks.
  // Live outputs keep their deleter (their blocks are freed when they are).
  if (!enabled && c10::GetCPUAllocator() != &cache) cache.empty();
}

bool enable(int64_t limit, int64_t min_block) {
  check_config(limit, min_block);
  auto& cache = CachingCPUAllocator::get();
  cache.configure(limit, min_block);
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current == &cache) return true;
  previous = current;
  c10::SetCPUAllocator(&cache, kPriority);
  return c10::GetCPUAllocator() == &cache;  // false: another allocator holds a higher priority
}

bool disable() {
  auto& cache = CachingCPUAllocator::get();
  if (c10::GetCPUAllocator() == &cache && previous != nullptr) {
    c10::SetCPUAllocator(previous, kPriority);
  }
  cache.empty();
  // The operators' outputs go on with the configuration they were given.
  if (outputs_cached.load(std::memory_order_relaxed)) {
    cache.configure(outputs_limit, outputs_min_block);
  }
  return c10::GetCPUAllocator() != &cache;
}

}  // namespace

namespace fastcore {

c10::Allocator* output_allocator() {
  return outputs_cached.load(std::memory_order_relaxed) ? &CachingCPUAllocator::get() : nullptr;
}

void register_cpu_cache(pybind11::module& m) {
  m.def("cpu_cache_enable", &enable, pybind11::arg("limit"), pybind11::arg("min_block"),
        "Install the caching CPU allocator (limit: bytes kept while free; blocks under "
        "min_block bytes are not cached); True when it is the CPU allocator now.");
  m.def("cpu_cache_disable", &disable, "Put the previous CPU allocator back and free the cache.");
  m.def("cpu_cache_outputs", &cache_outputs, pybind11::arg("enabled"), pybind11::arg("limit"),
        pybind11::arg("min_block"),
        "Allocate fastcore's CPU operator outputs from the cache (enabled) or with at::empty; "
        "limit and min_block as for cpu_cache_enable.");
  m.def("cpu_cache_outputs_active", [] { return output_allocator() != nullptr; });
  m.def("cpu_cache_empty", [] { return CachingCPUAllocator::get().empty(); },
        "Free every cached block; returns the bytes released.");
  m.def("cpu_cache_active", [] { return c10::GetCPUAllocator() == &CachingCPUAllocator::get(); });
  m.def("cpu_cache_reset_counts", [] { CachingCPUAllocator::get().reset_counts(); });
  m.def("cpu_cache_stats", [] {
    const Stats s = CachingCPUAllocator::get().stats();
    pybind11::dict d;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["cached_bytes"] = s.cached_bytes;
    d["cached_blocks"] = s.cached_blocks;
    d["live_bytes"] = s.live_bytes;
    return d;
  });
}

}  // namespace fastcore
