// CPU implementations of the adaptive-convolution ops: layout preparation with ATen, then the
// ISA-specific kernels (kernels_impl.h) over rows handed to threads by at::parallel_for.
// float16 / bfloat16 are computed in float32 and rounded once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "../checks.h"
#include "kernels.h"
#include "large_alloc.h"

namespace featup_adapters {
namespace {

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
const cpu::KernelSet<T>& kernel_set();
template <> const cpu::KernelSet<float>& kernel_set<float>() { return cpu::best_kernels().f32; }
template <> const cpu::KernelSet<double>& kernel_set<double>() { return cpu::best_kernels().f64; }

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& filters) {
  check_forward_args(input, filters);
  const auto dtype = input.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "adaptive_conv: expected a floating dtype, got ", dtype);
  const auto ct = compute_type(dtype);
  const int64_t B = input.size(0), C = input.size(1), H = filters.size(1), W = filters.size(2), k = filters.size(3);
  auto out = empty_large({B, C, H, W}, input.options().dtype(ct));
  if (out.numel() == 0) return out.to(dtype);
  auto x = input.to(ct).contiguous();
  auto f = filters.to(ct).contiguous();  // the kernel transposes each row pair it needs itself
  const ConvShape s{B, C, H, W, k};
  const auto& isa = cpu::best_kernels();
  AT_DISPATCH_FLOATING_TYPES(ct, "adaptive_conv_cpu", [&] {
    const auto& ks = kernel_set<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, cpu::forward_items(isa, s), grain(2 * isa.channel_block * W * k * k),
                     [&](int64_t b0, int64_t b1) { ks.forward(xp, fp, op, s, b0, b1); });
  });
  return out.to(dtype);
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
    const auto& ks = kernel_set<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    scalar_t* gip = gi.data_ptr<scalar_t>();
    at::parallel_for(0, cpu::grad_input_items(isa, s), grain(2 * isa.channel_block * Wp * k * k),
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
      const auto& ks = kernel_set<scalar_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* op = gf.data_ptr<scalar_t>();
      at::parallel_for(0, cpu::grad_filters_items(s), grain(2 * std::max<int64_t>(C, 1) * W * k * k),
                       [&](int64_t b0, int64_t b1) { ks.grad_filters(gp, xp, op, s, b0, b1); });
    });
  }
  return gf.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(featup_adapters, CPU, m) {
  m.impl("adaptive_conv", &forward_cpu);
  m.impl("adaptive_conv_grad_input", &grad_input_cpu);
  m.impl("adaptive_conv_grad_filters", &grad_filters_cpu);
}

}  // namespace featup_adapters
