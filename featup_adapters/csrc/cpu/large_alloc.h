// Fresh buffers for large results (shared by the CPU ops).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace featup_adapters {

// Before the pages of a large buffer are first touched, ask Linux for 2 MB pages: first-touch
// faults on 4 KB pages cost about a quarter of the adaptive-conv forward at 224x224 (a 77 MB
// output), and torch's CPU allocator hands out fresh memory for every large tensor.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (t.nbytes() >= 4 * kHuge) {
    const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (start + t.nbytes()) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // best effort
  }
#endif
  return t;
}

}  // namespace featup_adapters
