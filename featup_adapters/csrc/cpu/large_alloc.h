// Fresh buffers for large results (shared by the CPU ops).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace featup_adapters {

// An uninitialized CPU tensor for a result the kernel writes in full. Large ones (4 MiB and up)
// come from a cache of buffers this library's ops freed before (large_alloc.cpp): torch's CPU
// allocator hands out fresh memory for every large tensor, and the kernel's first touch of
// fresh pages cost about 12 ms per 77 MB (one C=384 map at 224x224) on the development VM, on
// every call and every training step (2 MB pages: 24 ms per 100 MB; 4 KB pages: 40). New buffers are 2 MB aligned and Linux
// is asked to back them with 2 MB pages before they are first touched.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// The cache: bytes held now (freed buffers waiting for reuse), and dropping them all.
int64_t large_cache_bytes();
void large_cache_clear();

// Put the cache behind torch's own CPU allocator for its large requests (4 MiB and up; smaller
// ones go to the allocator it replaces), or take it away again: returns whether it was there.
// Tensors keep the deleter they were made with, so switching never strands a buffer.
bool set_torch_cpu_cache(bool on);
bool torch_cpu_cache_enabled();

}  // namespace featup_adapters
