// Declarations of the per-ISA CPU kernels (implemented in kernels_impl.h, compiled once per ISA).
// Each kernel processes a range [begin, end) of independent work items so the caller can hand
// ranges to threads (at::parallel_for, OpenMP underneath). No torch headers here.
#pragma once

#include <cstdint>

#include "../adaptive_conv_common.h"

namespace featup_adapters {
namespace cpu {

// Layouts (all contiguous):
//   forward:      x [B][C][Hp][Wp], ft (filters transposed) [B][H][k*k][W], out [B][C][H][W]
//                 items: (b, y, channel block) flattened, block fastest, count = fwd_items(s)
//   grad_input:   gp (grad_out padded by k-1 left/right) [B][C][H][Wg], ftp (ft padded the same)
//                 [B][H][k*k][Wg], gi [B][C][Hp][Wp], Wg = W + 2(k-1); items: (b, Y, c block)
//   grad_filters: g [B][C][H][W], x [B][C][Hp][Wp], gft [B][H][k*k][W]; items: (b, y)
template <typename T>
struct KernelSet {
  void (*forward)(const T* x, const T* ft, T* out, const ConvShape& s, int64_t begin, int64_t end);
  void (*grad_input)(const T* gp, const T* ftp, T* gi, const ConvShape& s, int64_t begin, int64_t end);
  void (*grad_filters)(const T* g, const T* x, T* gft, const ConvShape& s, int64_t begin, int64_t end);
};

struct IsaKernels {
  const char* name;
  int channel_block;  // channels per work item of forward / grad_input
  KernelSet<float> f32;
  KernelSet<double> f64;
};

namespace generic { const IsaKernels& kernels(); }
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 { const IsaKernels& kernels(); }
namespace avx512 { const IsaKernels& kernels(); }
#endif

// The best kernel set this CPU supports (chosen once, at first use).
const IsaKernels& best_kernels();

}  // namespace cpu
}  // namespace featup_adapters
