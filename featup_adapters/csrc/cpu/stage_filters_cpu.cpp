// CPU implementations of jbu_stage_keys and jbu_stage_filters, one JBU stage (FeatUp's
// JBULearnedRange in eval mode) in two passes per output row (stage_filters_impl.h):
//   jbu_stage_keys:    range_proj(guidance) written straight into its padded map (reflect, or
//                      replicate where a side is <= r, as featup_adapters.ops.resize.pad2d);
//   jbu_stage_filters: range logits, softmax with the spatial term, fixup MLP from those keys,
// without full-size temporaries. For inference only (no derivative):
// featup_adapters/upsamplers/_kernel.py calls them when no gradient is needed and falls back to
// its step-by-step form otherwise.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "denormals.h"
#include "kernels.h"
#include "large_alloc.h"
#include "resize_taps.h"

namespace featup_adapters {
namespace {

void check_operand(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == shape, "jbu_stage_filters: expected ", name, " of shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), "jbu_stage_filters: expected ",
              name, " of dtype ", like.scalar_type(), " on ", like.device(), " (the keys'), got ", t.scalar_type(),
              " on ", t.device());
}

template <typename T>
const cpu::StageFilterKernels<T>& stage_kernels();
template <>
const cpu::StageFilterKernels<float>& stage_kernels<float>() { return cpu::best_kernels().filters_f32; }
template <>
const cpu::StageFilterKernels<double>& stage_kernels<double>() { return cpu::best_kernels().filters_f64; }

at::Tensor jbu_stage_filters_cpu(const at::Tensor& q_pad, const at::Tensor& guidance, double temp,
                                 const at::Tensor& log_s, const at::Tensor& w0, const std::optional<at::Tensor>& b0,
                                 const at::Tensor& w3, const std::optional<at::Tensor>& b3, int64_t radius) {
  TORCH_CHECK(q_pad.dim() == 4, "jbu_stage_filters: expected q_pad of shape [B, K, H + 2r, W + 2r] (4-D), got ",
              q_pad.dim(), "-D tensor of shape ", q_pad.sizes());
  const auto dtype = q_pad.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "jbu_stage_filters: expected float32 or float64 keys, got ",
              dtype);
  TORCH_CHECK(radius >= 0 && radius <= 7, "jbu_stage_filters: expected a radius in 0..7, got ", radius);
  const int64_t B = q_pad.size(0), K = q_pad.size(1), H = q_pad.size(2) - 2 * radius, W = q_pad.size(3) - 2 * radius;
  TORCH_CHECK(H >= 1 && W >= 1, "jbu_stage_filters: q_pad ", q_pad.sizes(), " is too small for radius ", radius,
              " (expected at least ", 2 * radius + 1, " rows and columns)");
  TORCH_CHECK(guidance.dim() == 4 && guidance.size(0) == B && guidance.size(2) == H && guidance.size(3) == W,
              "jbu_stage_filters: expected guidance of shape [", B, ", G, ", H, ", ", W, "] (q_pad without its ",
              radius, "-pixel border), got ", guidance.sizes());
  const int64_t G = guidance.size(1), k = 2 * radius + 1, kk = k * k;
  check_operand(guidance, "guidance", guidance.sizes(), q_pad);
  check_operand(log_s, "log_s", {kk}, q_pad);
  check_operand(w0, "w0", {kk, kk + G}, q_pad);
  check_operand(w3, "w3", {kk, kk}, q_pad);
  const bool has_b0 = b0.has_value() && b0->defined(), has_b3 = b3.has_value() && b3->defined();
  if (has_b0) check_operand(*b0, "b0", {kk}, q_pad);
  if (has_b3) check_operand(*b3, "b3", {kk}, q_pad);
  auto out = empty_large({B, H, W, kk}, q_pad.options());
  if (out.numel() == 0) return out;
  const auto q = q_pad.contiguous(), g = guidance.contiguous(), ls = log_s.contiguous();
  const auto a0 = w0.contiguous(), a3 = w3.contiguous();
  const auto c0 = has_b0 ? b0->contiguous() : at::Tensor(), c3 = has_b3 ? b3->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "jbu_stage_filters_cpu", [&] {
    const cpu::StageFilterArgs<scalar_t> args{
        q.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), ls.data_ptr<scalar_t>(), a0.data_ptr<scalar_t>(),
        has_b0 ? c0.data_ptr<scalar_t>() : nullptr, a3.data_ptr<scalar_t>(),
        has_b3 ? c3.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), static_cast<scalar_t>(temp),
        B, K, G, H, W, radius};
    const auto fn = stage_kernels<scalar_t>().filters;
    // about 64 strips of 32 pixels per range: enough work to amortize a range's scratch
    const int64_t grain = std::max<int64_t>(1, 2048 / W);
    cpu::parallel_for_flushed(0, B * H, grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  });
  return out;
}

// The border of a padded map whose interior is written: columns of the interior rows, then whole
// rows (reflect, or replicate where a side is <= r).
template <typename T>
void fill_border(T* q, int64_t planes, int64_t H, int64_t W, int64_t r) {
  const bool reflect = resize_taps::use_reflect(H, W, r);
  const int64_t Hp = H + 2 * r, Wp = W + 2 * r;
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pl = begin; pl < end; ++pl) {
      T* P = q + pl * Hp * Wp;
      for (int64_t y = r; y < r + H; ++y) {
        T* row = P + y * Wp;
        for (int64_t x = 0; x < r; ++x) {
          row[x] = row[r + resize_taps::unpad(x, W, r, reflect)];
          row[Wp - 1 - x] = row[r + resize_taps::unpad(Wp - 1 - x, W, r, reflect)];
        }
      }
      for (int64_t y = 0; y < r; ++y) {
        std::copy_n(P + (r + resize_taps::unpad(y, H, r, reflect)) * Wp, Wp, P + y * Wp);
        std::copy_n(P + (r + resize_taps::unpad(Hp - 1 - y, H, r, reflect)) * Wp, Wp, P + (Hp - 1 - y) * Wp);
      }
    }
  });
}

at::Tensor jbu_stage_keys_cpu(const at::Tensor& guidance, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                              const at::Tensor& w2, const std::optional<at::Tensor>& b2, int64_t radius) {
  TORCH_CHECK(guidance.dim() == 4, "jbu_stage_keys: expected guidance of shape [B, G, H, W] (4-D), got ",
              guidance.dim(), "-D tensor of shape ", guidance.sizes());
  const auto dtype = guidance.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "jbu_stage_keys: expected a float32 or float64 guidance, got ",
              dtype);
  TORCH_CHECK(radius >= 0 && radius <= 7, "jbu_stage_keys: expected a radius in 0..7, got ", radius);
  const int64_t B = guidance.size(0), G = guidance.size(1), H = guidance.size(2), W = guidance.size(3);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == G, "jbu_stage_keys: expected w1 of shape [K, ", G, "], got ", w1.sizes());
  const int64_t K = w1.size(0);
  const auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape, "jbu_stage_keys: expected ", name, " of shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype && t.device() == guidance.device(), "jbu_stage_keys: expected ", name,
                " of dtype ", dtype, " on ", guidance.device(), " (the guidance's), got ", t.scalar_type(), " on ",
                t.device());
  };
  check(w1, "w1", {K, G});
  check(w2, "w2", {K, K});
  const bool has_b1 = b1.has_value() && b1->defined(), has_b2 = b2.has_value() && b2->defined();
  if (has_b1) check(*b1, "b1", {K});
  if (has_b2) check(*b2, "b2", {K});
  auto out = empty_large({B, K, H + 2 * radius, W + 2 * radius}, guidance.options());
  if (B * K * H * W == 0) return out.zero_();
  const auto g = guidance.contiguous(), a1 = w1.contiguous(), a2 = w2.contiguous();
  const auto c1 = has_b1 ? b1->contiguous() : at::Tensor(), c2 = has_b2 ? b2->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "jbu_stage_keys_cpu", [&] {
    const cpu::StageKeyArgs<scalar_t> args{
        g.data_ptr<scalar_t>(), a1.data_ptr<scalar_t>(), has_b1 ? c1.data_ptr<scalar_t>() : nullptr,
        a2.data_ptr<scalar_t>(), has_b2 ? c2.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
        B, K, G, H, W, radius};
    const auto fn = stage_kernels<scalar_t>().keys;
    const int64_t grain = std::max<int64_t>(1, 4096 / W);
    cpu::parallel_for_flushed(0, B * H, grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
    if (radius > 0) fill_border(out.data_ptr<scalar_t>(), B * K, H, W, radius);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(featup_adapters, CPU, m) {
  m.impl("jbu_stage_keys", &jbu_stage_keys_cpu);
  m.impl("jbu_stage_filters", &jbu_stage_filters_cpu);
}

}  // namespace featup_adapters
