// CPU implementations of the adaptive-convolution ops: layout preparation with ATen, then the
// ISA-specific kernels (kernels_impl.h) over rows handed to threads by parallel_for_flushed.
// float16 / bfloat16 are computed in float32 and rounded once at the end. Subnormal values are
// read and written as zero while the kernels run (denormals.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "../checks.h"
#include "denormals.h"
#include "kernels.h"
#include "large_alloc.h"

namespace featup_adapters {
namespace {

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

// The forward kernel into `out` ([B, C, H, W] of the compute type, rows contiguous, planes
// `out.stride(1)` apart), plus `bias` ([C] of the compute type) when it is defined.
void run_forward(const at::Tensor& input, const at::Tensor& filters, at::Tensor& out,
                 const at::Tensor& bias) {
  const auto ct = out.scalar_type();
  const int64_t B = input.size(0), C = input.size(1), H = filters.size(1), W = filters.size(2), k = filters.size(3);
  if (out.numel() == 0) return;
  auto x = input.to(ct).contiguous();
  auto f = filters.to(ct).contiguous();  // the kernel transposes each row pair it needs itself
  const ConvShape s{B, C, H, W, k};
  const auto& isa = cpu::best_kernels();
  AT_DISPATCH_FLOATING_TYPES(ct, "adaptive_conv_cpu", [&] {
    const auto& ks = cpu::kernel_set<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const cpu::OutLayout<scalar_t> o{B > 1 ? out.stride(0) : 0, out.stride(1),
                                     bias.defined() ? bias.data_ptr<scalar_t>() : nullptr};
    cpu::parallel_for_flushed(0, cpu::forward_items(isa, s),
                              grain(2 * isa.channel_block * cpu::forward_strip_width(s) * k * k),
                              [&](int64_t b0, int64_t b1) { ks.forward(xp, fp, op, o, s, b0, b1); });
  });
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& filters) {
  check_forward_args(input, filters);
  const auto dtype = input.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "adaptive_conv: expected a floating dtype, got ", dtype);
  const int64_t B = input.size(0), C = input.size(1), H = filters.size(1), W = filters.size(2);
  auto out = empty_large({B, C, H, W}, input.options().dtype(compute_type(dtype)));
  run_forward(input, filters, out, at::Tensor());
  return out.to(dtype);
}

// out[...] = adaptive_conv(input, filters) (+ bias[c]), written in place. Rows of `out` that are
// contiguous with planes (and batches) apart, in the compute type, are written by the kernel
// directly, the bias added as it stores (a band of rows of a larger result: no band-sized
// temporary, no second pass); any other `out` gets the result copied in.
void forward_into_cpu(const at::Tensor& input, const at::Tensor& filters,
                      const std::optional<at::Tensor>& bias, at::Tensor out) {
  check_forward_args(input, filters);
  const auto dtype = input.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "adaptive_conv_into: expected a floating dtype, got ", dtype);
  const int64_t B = input.size(0), C = input.size(1), H = filters.size(1), W = filters.size(2);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == B && out.size(1) == C && out.size(2) == H && out.size(3) == W,
              "adaptive_conv_into: expected out of shape [", B, ", ", C, ", ", H, ", ", W, "], got ", out.sizes());
  TORCH_CHECK(out.device() == input.device(), "adaptive_conv_into: out must be on the input's device ",
              input.device(), ", got ", out.device());
  TORCH_CHECK(at::isFloatingType(out.scalar_type()), "adaptive_conv_into: expected a floating out, got ",
              out.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C && bias->device() == input.device(),
                "adaptive_conv_into: expected bias of shape [", C, "] on ", input.device(), ", got ",
                bias->sizes(), " on ", bias->device());
  const auto ct = compute_type(dtype);
  const auto b = has_bias ? bias->to(ct).contiguous() : at::Tensor();
  const bool direct = out.scalar_type() == ct && (W <= 1 || out.stride(3) == 1) &&
                      (H <= 1 || out.stride(2) == W) && out.stride(1) >= H * W &&
                      (B <= 1 || out.stride(0) >= C * out.stride(1));
  if (direct) {
    run_forward(input, filters, out, b);
    return;
  }
  auto res = empty_large({B, C, H, W}, input.options().dtype(ct));
  run_forward(input, filters, res, b);
  out.copy_(res);
}

at::Tensor grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& filters) {
  check_grad_input_args(grad_out, filters);
  const auto dtype = grad_out.scalar_type();
  const auto ct = compute_type(dtype);
  const int64_t B = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3), k = filters.size(3);
  const int64_t Hp = H + k - 1, Wp = W + k - 1;
  auto gi = empty_large({B, C, Hp, Wp}, grad_out.options().dtype(ct));
  if (gi.numel() == 0) return gi.to(dtype);
  if (H == 0 || W == 0) return gi.zero_().to(dtype);
  auto g = grad_out.to(ct).contiguous();
  auto f = filters.to(ct).contiguous();  // the kernel pads and transposes the rows it needs
  const ConvShape s{B, C, H, W, k};
  const auto& isa = cpu::best_kernels();
  AT_DISPATCH_FLOATING_TYPES(ct, "adaptive_conv_grad_input_cpu", [&] {
    const auto& ks = cpu::kernel_set<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    scalar_t* gip = gi.data_ptr<scalar_t>();
    cpu::parallel_for_flushed(0, cpu::grad_input_items(isa, s), grain(2 * isa.channel_block * Wp * k * k),
                              [&](int64_t b0, int64_t b1) { ks.grad_input(gp, fp, gip, s, b0, b1); });
  });
  return gi.to(dtype);
}

at::Tensor grad_filters_cpu(const at::Tensor& grad_out, const at::Tensor& input) {
  check_grad_filters_args(grad_out, input);
  const auto dtype = grad_out.scalar_type();
  const auto ct = compute_type(dtype);
  const int64_t B = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3);
  const int64_t k = input.size(2) - H + 1;
  auto gf = empty_large({B, H, W, k, k}, grad_out.options().dtype(ct));
  if (gf.numel() > 0) {
    auto g = grad_out.to(ct).contiguous();
    auto x = input.to(ct).contiguous();
    const ConvShape s{B, C, H, W, k};
    AT_DISPATCH_FLOATING_TYPES(ct, "adaptive_conv_grad_filters_cpu", [&] {
      const auto& ks = cpu::kernel_set<scalar_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* op = gf.data_ptr<scalar_t>();
      cpu::parallel_for_flushed(0, cpu::grad_filters_items(s), grain(2 * std::max<int64_t>(C, 1) * W * k * k),
                                [&](int64_t b0, int64_t b1) { ks.grad_filters(gp, xp, op, s, b0, b1); });
    });
  }
  return gf.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(featup_adapters, CPU, m) {
  m.impl("adaptive_conv", &forward_cpu);
  m.impl("adaptive_conv_into", &forward_into_cpu);
  m.impl("adaptive_conv_grad_input", &grad_input_cpu);
  m.impl("adaptive_conv_grad_filters", &grad_filters_cpu);
}

}  // namespace featup_adapters
