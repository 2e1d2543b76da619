// A cache of large CPU buffers, kept between calls, for `cvt.fast.reuse_cpu_buffers`.
//
// glibc gives large freed blocks back to the system (those above its mmap threshold at once, the top of its heap
// above its trim threshold), so a model call that allocates the same large tensors as the call before pays a
// page fault and a page clear for every 4 KiB of them again (about a fifth of a CvT-13 CPU call at batch 16 with
// glibc's defaults: BENCHMARKS.md). This allocator wraps PyTorch's CPU allocator for the whole process but keeps
// blocks only for allocations made inside a scope (`enter` ... `leave`, per thread): a freed block goes back to
// the cache, and a later allocation of the same size in a scope takes it. Everything else passes through.
//
// What is kept is bounded by what the last call used: when a thread leaves its outermost scope, the idle blocks
// that no allocation took during that scope are freed, so a change of batch size or resolution does not leave
// the old sizes behind. `release` frees every idle block.
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <iterator>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

// Smaller blocks come from glibc's heap without page faults after the first call.
constexpr size_t kMinCachedBytes = size_t{1} << 20;

thread_local int scope_depth = 0;
thread_local int64_t scope_start = 0;

class BufferCache final : public c10::Allocator {
 public:
  explicit BufferCache(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t bytes) override {
    if (scope_depth == 0 || bytes < kMinCachedBytes) return base_->allocate(bytes);
    void* data = take_idle(bytes);
    if (data == nullptr) {
      data = c10::alloc_cpu(bytes);
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_[data] = Block{bytes, generation_};
      held_bytes_ += bytes;
    }
    return {data, data, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &give_back; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void enter() {
    if (scope_depth++ == 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      scope_start = ++generation_;
    }
  }

  void leave() {
    if (--scope_depth == 0) free_idle(scope_start);
  }

  void free_idle(int64_t used_before) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto idle = idle_.begin(); idle != idle_.end();) {
      std::vector<void*> kept;
      for (void* data : idle->second) {
        if (blocks_.at(data).last_used < used_before) {
          c10::free_cpu(data);
          blocks_.erase(data);
          held_bytes_ -= idle->first;
        } else {
          kept.push_back(data);
        }
      }
      idle->second.swap(kept);
      idle = idle->second.empty() ? idle_.erase(idle) : std::next(idle);
    }
  }

  int64_t held_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(held_bytes_);
  }

 private:
  struct Block {
    size_t bytes;
    int64_t last_used;  // the generation of the scope that last took it
  };

  void* take_idle(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto idle = idle_.find(bytes);
    if (idle == idle_.end() || idle->second.empty()) return nullptr;
    void* data = idle->second.back();
    idle->second.pop_back();
    blocks_.at(data).last_used = generation_;
    return data;
  }

  static void give_back(void* data);

  c10::Allocator* base_;
  std::mutex mutex_;
  std::unordered_map<void*, Block> blocks_;  // every block the cache owns, idle or in use
  std::unordered_map<size_t, std::vector<void*>> idle_;
  size_t held_bytes_ = 0;
  int64_t generation_ = 0;
};

// Never destroyed: tensors that outlive the module's static objects still hand their blocks back to it.
BufferCache* cache = nullptr;

void BufferCache::give_back(void* data) {
  {
    std::lock_guard<std::mutex> lock(cache->mutex_);
    auto block = cache->blocks_.find(data);
    if (block != cache->blocks_.end()) {
      cache->idle_[block->second.bytes].push_back(data);
      return;
    }
  }
  // A raw allocation (oneDNN's scratchpads) made outside a scope, through `raw_deleter`: the base allocator's.
  cache->base_->raw_deleter()(data);
}

// Installs the cache as PyTorch's CPU allocator; false where another allocator of higher priority holds the
// place, or where the current one has no raw deleter to hand oneDNN's scratchpads back to.
bool install() {
  if (cache == nullptr && c10::GetCPUAllocator()->raw_deleter() != nullptr) {
    cache = new BufferCache(c10::GetCPUAllocator());
    c10::SetCPUAllocator(cache, /*priority=*/0);
  }
  return cache != nullptr && c10::GetCPUAllocator() == cache;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("install", &install);
  m.def("enter", [] { cache->enter(); });
  m.def("leave", [] { cache->leave(); });
  m.def("release", [] { cache->free_idle(INT64_MAX); });
  m.def("held_bytes", [] { return cache->held_bytes(); });
}
