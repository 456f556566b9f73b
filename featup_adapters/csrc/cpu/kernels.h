// Declarations of the per-ISA CPU kernels (implemented in kernels_impl.h, compiled once per ISA).
// Each kernel processes a range [begin, end) of independent work items so the caller can hand
// ranges to threads (at::parallel_for, OpenMP underneath). No torch headers here.
#pragma once

#include <cstdint>

#include "../adaptive_conv_common.h"

namespace featup_adapters {
namespace cpu {

// Layouts (all contiguous):
//   forward:      x [B][C][Hp][Wp], filters [B][H][W][k*k] (as the user passes them),
//                 out as OutLayout says; items: (b, pair of rows y, y + 1, column strip,
//                 channel block), in bands of pairs, then strips, then channel blocks, a band's
//                 pairs fastest (see forward in kernels_impl.h), count = forward_items(kernels, s)
//   grad_input:   g [B][C][H][W], filters [B][H][W][k*k], gi [B][C][Hp][Wp]; items: (b, pair of
//                 rows Y, Y + 1, channel block), in bands of pairs, a band's pairs fastest
//                 (see grad_input in kernels_impl.h), count = grad_input_items(kernels, s)
//   grad_filters: g [B][C][H][W], x [B][C][Hp][Wp], gf [B][H][W][k*k] (the filters' layout);
//                 items: (b, pair of rows y, y + 1), count = grad_filters_items(s)
// Where forward writes: out[b][c][y][x] lives at b * batch + c * plane + y * W + x (rows of W
// contiguous pixels; a contiguous result has plane = H * W, batch = C * H * W, but a band of
// rows sliced out of a taller map has a larger plane), plus bias[c] when bias is not null.
template <typename T>
struct OutLayout {
  int64_t batch, plane;
  const T* bias;
};

template <typename T>
struct KernelSet {
  void (*forward)(const T* x, const T* filters, T* out, const OutLayout<T>& o, const ConvShape& s,
                  int64_t begin, int64_t end);
  void (*grad_input)(const T* g, const T* filters, T* gi, const ConvShape& s, int64_t begin, int64_t end);
  void (*grad_filters)(const T* g, const T* x, T* gf, const ConvShape& s, int64_t begin, int64_t end);
};

// Row kernels of the bicubic resize + pad op (resize_rows_impl.h): tables are [l][j], n apart.
//   gather_cols(dst, src, idx, w, L, n):  dst[j] = sum_{l < L} w[l][j] * src[idx[l][j]]
//   combine_rows(dst, rows, w, L, n):     dst[q] = sum_{l < L} w[l] * rows[l][q]
//   periodic_cols(dst, src, base, w, p, count): dst[m p + q] = sum_{k < 4} w[4q + k] src[base[q] + m + k]
template <typename T>
struct ResizeKernels {
  void (*gather_cols)(T* dst, const T* src, const int32_t* idx, const T* w, int64_t L, int64_t n);
  void (*combine_rows)(T* dst, const T* const* rows, const T* w, int64_t L, int64_t n);
  void (*periodic_cols)(T* dst, const T* src, const int32_t* base, const T* w, int64_t p, int64_t count);
};

// The filters of one JBU stage for inference (stage_filters_impl.h): items are the (b, y) output
// rows, count B * H. Layouts (contiguous): q_pad [B][K][H+2r][W+2r], guide [B][G][H][W], log_s [kk],
// w0 [kk][kk+G], b0 [kk] or null, w3 [kk][kk], b3 [kk] or null, out [B][H][W][kk] (kk = (2r+1)^2).
template <typename T>
struct StageFilterArgs {
  const T* q_pad;
  const T* guide;
  const T* log_s;
  const T* w0;
  const T* b0;
  const T* w3;
  const T* b3;
  T* out;
  T temp;
  int64_t B, K, G, H, W, r;
};

// The keys of one stage (range_proj in eval mode) into the interior of q_pad [B][K][H+2r][W+2r]:
// guide [B][G][H][W], w1 [K][G], b1 [K] or null, w2 [K][K], b2 [K] or null; items: (b, y) rows.
template <typename T>
struct StageKeyArgs {
  const T* guide;
  const T* w1;
  const T* b1;
  const T* w2;
  const T* b2;
  T* q_pad;
  int64_t B, K, G, H, W, r;
};

template <typename T>
struct StageFilterKernels {
  void (*filters)(const StageFilterArgs<T>& a, int64_t begin, int64_t end);
  void (*keys)(const StageKeyArgs<T>& a, int64_t begin, int64_t end);
};

struct IsaKernels {
  const char* name;
  int channel_block;  // channels per work item of forward / grad_input
  KernelSet<float> f32;
  KernelSet<double> f64;
  ResizeKernels<float> resize_f32;
  ResizeKernels<double> resize_f64;
  StageFilterKernels<float> filters_f32;
  StageFilterKernels<double> filters_f64;
};

namespace generic { const IsaKernels& kernels(); }
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 { const IsaKernels& kernels(); }
namespace avx512 { const IsaKernels& kernels(); }
#endif

// The best kernel set this CPU supports (chosen once, at first use).
const IsaKernels& best_kernels();

// The best kernel set's adaptive-convolution kernels for T (float or double).
template <typename T>
const KernelSet<T>& kernel_set();
template <> inline const KernelSet<float>& kernel_set<float>() { return best_kernels().f32; }
template <> inline const KernelSet<double>& kernel_set<double>() { return best_kernels().f64; }

// Work-item counts of a kernel set for one problem.
// The forward splits wide rows into column strips of at most about 256 pixels (a multiple of 16,
// so of every ISA's tile width) so that a band of pairs' filters and input rows stays in L2 at
// any width: strips of equal width, the last one narrower.
inline int64_t forward_strip_width(const ConvShape& s) {
  const int64_t n = num_blocks(s.W, 256);
  return num_blocks(num_blocks(s.W, n > 0 ? n : 1), 16) * 16;
}
inline int64_t forward_strips(const ConvShape& s) { return num_blocks(s.W, forward_strip_width(s)); }
inline int64_t forward_items(const IsaKernels& ks, const ConvShape& s) {
  return s.B * num_blocks(s.H, 2) * forward_strips(s) * num_blocks(s.C, ks.channel_block);
}
inline int64_t grad_input_items(const IsaKernels& ks, const ConvShape& s) {
  return s.B * num_blocks(s.Hp(), 2) * num_blocks(s.C, ks.channel_block);
}
inline int64_t grad_filters_items(const ConvShape& s) { return s.B * num_blocks(s.H, 2); }

}  // namespace cpu
}  // namespace featup_adapters
