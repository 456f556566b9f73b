// Argument checks shared by the CPU and CUDA entry points; messages name what was expected
// and what came (they mirror featup_adapters/ops/_checks.py).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include "adaptive_conv_common.h"

namespace featup_adapters {

inline void check_forward_args(const at::Tensor& input, const at::Tensor& filters) {
  TORCH_CHECK(input.dim() == 4, "adaptive_conv: expected input of shape [B, C, H+k-1, W+k-1] (4-D), got ",
              input.dim(), "-D tensor of shape ", input.sizes());
  TORCH_CHECK(filters.dim() == 5, "adaptive_conv: expected filters of shape [B, H, W, k, k] (5-D), got ",
              filters.dim(), "-D tensor of shape ", filters.sizes());
  TORCH_CHECK(input.device() == filters.device(), "adaptive_conv: input and filters must be on the same device, got input on ",
              input.device(), " and filters on ", filters.device());
  TORCH_CHECK(input.scalar_type() == filters.scalar_type(), "adaptive_conv: input and filters must have the same dtype, got input ",
              input.scalar_type(), " and filters ", filters.scalar_type());
  const auto k = filters.size(3);
  TORCH_CHECK(filters.size(4) == k, "adaptive_conv: expected square filters [B, H, W, k, k], got ", k, "x",
              filters.size(4), " filters (shape ", filters.sizes(), ")");
  TORCH_CHECK(k % 2 == 1 && k <= kMaxFilterSize, "adaptive_conv: expected an odd filter size k <= ", kMaxFilterSize,
              ", got k=", k);
  TORCH_CHECK(input.size(0) == filters.size(0), "adaptive_conv: batch mismatch, input has B=", input.size(0),
              " but filters have B=", filters.size(0));
  TORCH_CHECK(input.size(2) == filters.size(1) + k - 1 && input.size(3) == filters.size(2) + k - 1,
              "adaptive_conv: expected input of spatial size H+k-1 x W+k-1 = ", filters.size(1) + k - 1, "x",
              filters.size(2) + k - 1, " for filters of shape ", filters.sizes(), ", got input of shape ", input.sizes());
}

inline void check_grad_input_args(const at::Tensor& grad_out, const at::Tensor& filters) {
  TORCH_CHECK(grad_out.dim() == 4 && filters.dim() == 5, "adaptive_conv_grad_input: expected grad_out [B, C, H, W] and filters "
              "[B, H, W, k, k], got ", grad_out.sizes(), " and ", filters.sizes());
  TORCH_CHECK(grad_out.scalar_type() == filters.scalar_type() && grad_out.device() == filters.device(),
              "adaptive_conv_grad_input: grad_out and filters must share dtype and device, got ", grad_out.scalar_type(), " on ",
              grad_out.device(), " and ", filters.scalar_type(), " on ", filters.device());
  const auto k = filters.size(3);
  TORCH_CHECK(filters.size(4) == k && k % 2 == 1 && k <= kMaxFilterSize, "adaptive_conv_grad_input: expected odd square "
              "filters with k <= ", kMaxFilterSize, ", got ", filters.sizes());
  TORCH_CHECK(filters.size(0) == grad_out.size(0) && filters.size(1) == grad_out.size(2) && filters.size(2) == grad_out.size(3),
              "adaptive_conv_grad_input: filters ", filters.sizes(), " do not match grad_out ", grad_out.sizes());
}

inline void check_grad_filters_args(const at::Tensor& grad_out, const at::Tensor& input) {
  TORCH_CHECK(grad_out.dim() == 4 && input.dim() == 4, "adaptive_conv_grad_filters: expected grad_out [B, C, H, W] and input "
              "[B, C, H+k-1, W+k-1], got ", grad_out.sizes(), " and ", input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type() && grad_out.device() == input.device(),
              "adaptive_conv_grad_filters: grad_out and input must share dtype and device, got ", grad_out.scalar_type(), " on ",
              grad_out.device(), " and ", input.scalar_type(), " on ", input.device());
  const auto k = input.size(2) - grad_out.size(2) + 1;
  TORCH_CHECK(input.size(0) == grad_out.size(0) && input.size(1) == grad_out.size(1) && k >= 1 && k % 2 == 1 && k <= kMaxFilterSize &&
              input.size(3) - grad_out.size(3) + 1 == k,
              "adaptive_conv_grad_filters: input ", input.sizes(), " is not grad_out ", grad_out.sizes(),
              " padded by an odd k-1 (k <= ", kMaxFilterSize, ") in both spatial dims");
}

}  // namespace featup_adapters
