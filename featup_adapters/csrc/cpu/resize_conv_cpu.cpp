// CPU implementation of bicubic_pad_conv: adaptive_conv(bicubic_pad(source, size, r), filters)
// (+ bias[c]) for inference, without the full-resolution padded map.
//
// Output rows go in bands (one band per work item): the band's padded rows (its rows plus the
// 2r-row halo) for every channel are resized from the source into a per-thread buffer with the
// same tap tables and row routines as bicubic_pad (resize_taps.h), then the adaptive-convolution
// kernel runs on that buffer, single-threaded, into the band's rows of the result. The padded
// map (about the output's size) is never allocated, written to memory and read back; each band
// re-resizes 2r halo rows. Results equal bicubic_pad then adaptive_conv up to float rounding.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <memory>
#include <optional>

#include "../checks.h"
#include "denormals.h"
#include "kernels.h"
#include "large_alloc.h"
#include "resize_taps.h"

namespace featup_adapters {
namespace {

using namespace resize_taps;


// Output rows per band: an even number whose padded rows for all channels take about 16 MiB
// (the buffer lives in L3, not L2: every channel of a row is needed before the next row), at
// least 8 (the halo is re-resized per band), and few enough that every thread gets bands.
int64_t band_rows(int64_t C, int64_t H, int64_t Wp, int64_t r, int64_t elem) {
  const int64_t per_row = std::max<int64_t>(1, C * Wp * elem);
  int64_t rows = (int64_t(16) << 20) / per_row - 2 * r;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  rows = std::min(rows, (H + 2 * threads - 1) / (2 * threads));
  rows = std::max<int64_t>(rows, 16);
  return std::min(H, rows + (rows & 1));
}

template <typename T>
void run(const T* x, const T* filters, T* out, const T* bias, int64_t B, int64_t C, int64_t h,
         int64_t w, int64_t H, int64_t W, int64_t r) {
  const bool reflect = use_reflect(H, W, r);
  const int64_t k = 2 * r + 1, kk = k * k, Wp = W + 2 * r;
  const auto th = forward_taps<T>(h, H, r, reflect), tw = forward_taps<T>(w, W, r, reflect);
  const ColPlan<T> cols = col_plan(tw, w, W);
  const auto& rk = resize_kernels<T>();
  const auto& ck = cpu::kernel_set<T>();
  const auto& isa = cpu::best_kernels();
  const int64_t rows = band_rows(C, H, Wp, r, sizeof(T)), nbands = (H + rows - 1) / rows;
  cpu::parallel_for_flushed(0, B * nbands, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<T[]> ring(new T[kRing * Wp]);
    // 2 MB pages asked for (first-touch faults on 4 KB pages would cost what the fusion saves)
    at::Tensor buf_t = empty_large({C * (rows + 2 * r) * Wp}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    T* buf = buf_t.data_ptr<T>();
    int64_t tag[kRing];
    std::fill(tag, tag + kRing, -1);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nbands, y0 = (item % nbands) * rows;
      const int64_t n = std::min(rows, H - y0), R = n + 2 * r;
      for (int64_t c = 0; c < C; ++c) {  // padded rows [y0, y0 + R) of plane (b, c)
        const int64_t plane = b * C + c;
        for (int64_t P = y0; P < y0 + R; ++P)
          padded_row(rk, ring.get(), tag, x + plane * h * w, plane * h, w, P, th, cols, Wp,
                     buf + (c * R + P - y0) * Wp);
      }
      const ConvShape s{1, C, n, W, k};  // the band: input [C][R][Wp], rows y0 .. y0 + n - 1
      const cpu::OutLayout<T> o{0, H * W, bias};
      ck.forward(buf, filters + (b * H + y0) * W * kk, out + (b * C * H + y0) * W, o, s, 0,
                 cpu::forward_items(isa, s));
    }
  });
}

at::Tensor bicubic_pad_conv_cpu(const at::Tensor& source, const at::Tensor& filters, at::IntArrayRef size,
                                int64_t r, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(source.dim() == 4, "bicubic_pad_conv: expected source of shape [B, C, h, w] (4-D), got ",
              source.dim(), "-D tensor of shape ", source.sizes());
  TORCH_CHECK(size.size() == 2, "bicubic_pad_conv: expected size (H, W), got ", size);
  const auto dtype = source.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "bicubic_pad_conv: expected a float32 or float64 source, got ", dtype);
  TORCH_CHECK(r >= 0, "bicubic_pad_conv: expected pad >= 0, got ", r);
  const int64_t B = source.size(0), C = source.size(1), h = source.size(2), w = source.size(3);
  const int64_t H = size[0], W = size[1], k = 2 * r + 1;
  check_sizes("bicubic_pad_conv", h, w, H, W, r);
  TORCH_CHECK(filters.dim() == 5 && filters.size(0) == B && filters.size(1) == H && filters.size(2) == W &&
                  filters.size(3) == k && filters.size(4) == k,
              "bicubic_pad_conv: expected filters of shape [", B, ", ", H, ", ", W, ", ", k, ", ", k,
              "] (k = 2 pad + 1), got ", filters.sizes());
  TORCH_CHECK(filters.scalar_type() == dtype && filters.device() == source.device(),
              "bicubic_pad_conv: expected filters of dtype ", dtype, " on ", source.device(), ", got ",
              filters.scalar_type(), " on ", filters.device());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C && bias->device() == source.device(),
                "bicubic_pad_conv: expected bias of shape [", C, "] on ", source.device(), ", got ",
                bias->sizes(), " on ", bias->device());
  auto out = empty_large({B, C, H, W}, source.options());
  if (out.numel() == 0) return out;
  auto x = source.contiguous();
  auto f = filters.contiguous();
  auto bb = has_bias ? bias->to(dtype).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "bicubic_pad_conv_cpu", [&] {
    run<scalar_t>(x.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                  has_bias ? bb.data_ptr<scalar_t>() : nullptr, B, C, h, w, H, W, r);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(featup_adapters, CPU, m) { m.impl("bicubic_pad_conv", &bicubic_pad_conv_cpu); }

}  // namespace featup_adapters
