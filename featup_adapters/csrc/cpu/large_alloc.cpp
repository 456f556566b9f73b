// The cache behind empty_large (large_alloc.h).
//
// A buffer of 4 MiB or more that one of this library's ops allocated goes back to a cache when
// its tensor is freed, and the next op asking for about that size (at most a quarter more) gets
// it back with its pages already mapped: a training step allocates the same maps every time
// (about 240 MB at 224x224, C=384), an inference loop the same result. At most
// FEATUP_CPU_CACHE_MB MiB are held (default: 1/16 of the physical memory, at most 1 GiB; 0
// turns the cache off): a freed buffer that does not fit is freed, and a request the cache
// cannot serve first frees idle buffers until they and the new one fit.
// featup_adapters.ops.empty_cpu_cache() frees what is held.
#include "large_alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <unordered_map>
#include <mutex>
#include <vector>
#if !defined(_WIN32)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#elif defined(_WIN32)
#include <malloc.h>
#endif

namespace featup_adapters {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMinCached = size_t(4) << 20;

size_t round_up(size_t n) { return (n + kHuge - 1) / kHuge * kHuge; }

// Ask Linux to back the whole 2 MB pages inside [p, p + n) with 2 MB pages (best effort), before
// they are first touched.
void advise_huge_pages(void* p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t start = reinterpret_cast<uintptr_t>(p);
  const uintptr_t begin = (start + kHuge - 1) & ~uintptr_t(kHuge - 1);
  const uintptr_t end = (start + n) & ~uintptr_t(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

void* aligned_alloc_or_null(size_t size) {
#if defined(_WIN32)
  return _aligned_malloc(size, kHuge);
#else
  void* p = nullptr;
  return posix_memalign(&p, kHuge, size) == 0 ? p : nullptr;
#endif
}

void aligned_free(void* p) {
#if defined(_WIN32)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

size_t default_limit() {
  if (const char* v = std::getenv("FEATUP_CPU_CACHE_MB")) {
    char* end = nullptr;
    errno = 0;
    const long long mb = std::strtoll(v, &end, 10);
    TORCH_CHECK(end != v && *end == '\0' && errno != ERANGE && mb >= 0 &&
                    static_cast<unsigned long long>(mb) <= (SIZE_MAX >> 20),
                "FEATUP_CPU_CACHE_MB: expected a whole number of MiB from 0 (no cache) to ", SIZE_MAX >> 20,
                ", got '", v, "'");
    return size_t(mb) << 20;
  }
  size_t phys = size_t(1) << 34;  // unknown: as if 16 GiB
#if defined(__linux__)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) phys = size_t(pages) * size_t(page);
#endif
  return std::min(phys / 16, size_t(1) << 30);
}

struct Block {
  void* ptr;
  size_t size;
};

class LargeCache;
LargeCache& cache();

class LargeCache final : public c10::Allocator {
 public:
  LargeCache() : limit_(default_limit()) {
#if !defined(_WIN32)
    // a fork (e.g. a DataLoader worker) while another thread holds the lock would leave the
    // child's copy locked for good: hold it across the fork instead
    pthread_atfork([] { cache().mu_.lock(); }, [] { cache().mu_.unlock(); }, [] { cache().mu_.unlock(); });
#endif
  }

  size_t limit() const { return limit_; }

  c10::DataPtr allocate(size_t n) override {
    const size_t size = round_up(std::max<size_t>(n, 1));
    Block* b = take(size);
    if (!b) b = fresh(size);
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_.emplace(b->ptr, b);
    }
    // the context is the data itself (what torch's raw_allocate, used by oneDNN, asks for)
    return c10::DataPtr(b->ptr, b->ptr, &LargeCache::release, c10::Device(c10::DeviceType::CPU));
  }

  // Gives a buffer this cache handed out back to it; false for any other pointer.
  bool release_if_ours(void* ptr) {
    Block* b = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(ptr);
      if (it == live_.end()) return false;
      b = it->second;
      live_.erase(it);
    }
    give(b);
    return true;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  c10::DeleterFnPtr raw_deleter() const override { return &LargeCache::release; }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return int64_t(held_);
  }

  void clear() {
    std::multimap<size_t, Block*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
      held_ = 0;
    }
    for (auto& kv : drop) destroy(kv.second);
  }

 private:
  static void release(void* ctx);

  Block* take(size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.lower_bound(size);
    if (it == free_.end() || it->first > size + size / 4) return nullptr;
    Block* b = it->second;
    held_ -= it->first;
    free_.erase(it);
    return b;
  }

  Block* fresh(size_t size) {
    // a miss: the sizes asked for have changed, so idle buffers (largest first) go back to the
    // system until they and the new one fit the limit; what the cache holds stays bounded
    std::vector<Block*> drop;
    if (size <= limit_) {  // a larger one will not be kept either: leave the cache as it is
      std::lock_guard<std::mutex> lock(mu_);
      while (!free_.empty() && held_ + size > limit_) {
        auto last = std::prev(free_.end());
        drop.push_back(last->second);
        held_ -= last->first;
        free_.erase(last);
      }
    }
    for (Block* b : drop) destroy(b);
    void* p = aligned_alloc_or_null(size);
    if (!p) {
      clear();  // what the cache holds may be what is missing
      p = aligned_alloc_or_null(size);
      TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "featup_adapters: could not allocate ", size,
                       " bytes on the CPU");
    }
    advise_huge_pages(p, size);
    return new Block{p, size};
  }

  void give(Block* b) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ + b->size <= limit_) {
        free_.emplace(b->size, b);
        held_ += b->size;
        return;
      }
    }
    destroy(b);
  }

  static void destroy(Block* b) {
    aligned_free(b->ptr);
    delete b;
  }

  const size_t limit_;
  std::mutex mu_;
  std::multimap<size_t, Block*> free_;  // by size
  std::unordered_map<void*, Block*> live_;  // handed out, by data pointer
  size_t held_ = 0;
};

// Never destroyed: tensors may be freed during interpreter teardown, after static destructors.
LargeCache& cache() {
  static LargeCache* c = new LargeCache();
  return *c;
}

void LargeCache::release(void* ptr) {
  const bool ours = cache().release_if_ours(ptr);
  TORCH_INTERNAL_ASSERT(ours, "featup_adapters: a CPU buffer freed that its cache did not hand out");
}

// torch's CPU allocator with the cache behind its large requests (set_torch_cpu_cache): every
// large CPU tensor, not only this library's results. A training step's temporaries (autograd's
// zero-filled gradients of slices and grid samples, the kernel construction's products) are the
// same sizes every step; from torch's allocator each comes as fresh pages to fault in again.
class TorchWide final : public c10::Allocator {
 public:
  c10::Allocator* prev = nullptr;  // torch's allocator before: small requests, and restored after

  c10::DataPtr allocate(size_t n) override {
    LargeCache& c = cache();
    if (n >= kMinCached && c.limit() > 0) return c.allocate(n);
    return prev->allocate(n);
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
  // raw_allocate's buffers (oneDNN's scratch) come back here without their DataPtr: ours go
  // to the cache, the rest to the deleter of the allocator that made them
  c10::DeleterFnPtr raw_deleter() const override { return &TorchWide::raw_delete; }

 private:
  static void raw_delete(void* ptr);
};

TorchWide& torch_wide() {
  static TorchWide* w = new TorchWide();  // never destroyed, like the cache
  return *w;
}

void TorchWide::raw_delete(void* ptr) {
  if (ptr == nullptr || cache().release_if_ours(ptr)) return;
  c10::DeleterFnPtr d = torch_wide().prev->raw_deleter();
  TORCH_INTERNAL_ASSERT(d != nullptr, "featup_adapters: no raw deleter to free a CPU buffer with");
  d(ptr);
}

std::mutex& torch_wide_mutex() {
  static std::mutex* m = new std::mutex();
  return *m;
}

// c10 keeps the allocator of the highest priority asked for; ours takes the top one, and
// restoring hands the same priority back to the allocator it replaced.
constexpr uint8_t kTorchWidePriority = 255;

}  // namespace

bool set_torch_cpu_cache(bool on) {
  std::lock_guard<std::mutex> lock(torch_wide_mutex());
  TorchWide& w = torch_wide();
  c10::Allocator* current = c10::GetCPUAllocator();
  const bool was = current == &w;
  if (on && !was) {
    w.prev = current;
    c10::SetCPUAllocator(&w, kTorchWidePriority);
    TORCH_CHECK(c10::GetCPUAllocator() == &w, "featup_adapters: torch kept its CPU allocator; the cache is not in use");
  } else if (!on && was) {
    c10::SetCPUAllocator(w.prev, kTorchWidePriority);
  }
  return was;
}

bool torch_cpu_cache_enabled() { return c10::GetCPUAllocator() == &torch_wide(); }

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  LargeCache& c = cache();
  if (nbytes >= kMinCached && c.limit() > 0 && options.device().is_cpu() && !options.pinned_memory())
    return at::detail::empty_generic(sizes, &c, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     c10::typeMetaToScalarType(options.dtype()), std::nullopt);
  auto t = at::empty(sizes, options);  // small, or the cache off
  if (t.nbytes() >= 4 * kHuge) advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

int64_t large_cache_bytes() { return cache().held(); }
void large_cache_clear() { cache().clear(); }

}  // namespace featup_adapters
