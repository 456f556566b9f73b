// CUDA entry points of the adaptive-convolution ops (forward, grad_input, grad_filters): argument
// checks, contiguous layouts, results, and a runtime that launches the kernels on the current
// stream under a device guard with a launch check after every kernel. The kernels, their launch
// plans and the bytes / FLOPs / expected times are in adaptive_conv_kernels.cuh, which the CPU
// emulation (tests/cuda_emu) compiles unchanged.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "adaptive_conv_kernels.cuh"

namespace featup_adapters {
namespace {

using cuda_kernels::Plan;

// The Runtime of the host drivers (see adaptive_conv_kernels.cuh) for a real device.
class CudaRuntime {
 public:
  explicit CudaRuntime(const at::Tensor& like)
      : options_(like.options()), stream_(at::cuda::getCurrentCUDAStream()),
        sms_(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) {}

  int64_t sms() const { return sms_; }

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), const Plan& p, Args... args) {
    if (p.smem > cuda_kernels::kSmemDefault)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(p.smem)));
    kernel<<<p.grid, p.block, static_cast<size_t>(p.smem), stream_>>>(static_cast<Params>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void zero(void* ptr, int64_t bytes) { C10_CUDA_CHECK(cudaMemsetAsync(ptr, 0, static_cast<size_t>(bytes), stream_)); }

  // Stream-ordered through the caching allocator: safe to release when the op returns.
  void* workspace(int64_t bytes) {
    scratch_.push_back(at::empty({bytes}, options_.dtype(at::kByte)));
    return scratch_.back().data_ptr();
  }

  [[noreturn]] void fail(const char* message) { TORCH_CHECK(false, message); }

 private:
  at::TensorOptions options_;
  cudaStream_t stream_;
  int64_t sms_;
  std::vector<at::Tensor> scratch_;
};

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& filters) {
  check_forward_args(input, filters);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t B = input.size(0), C = input.size(1), H = filters.size(1), W = filters.size(2), k = filters.size(3);
  auto out = at::empty({B, C, H, W}, input.options());
  if (out.numel() == 0) return out;
  auto x = input.contiguous();
  auto f = filters.contiguous();
  CudaRuntime rt(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "adaptive_conv_cuda", [&] {
    cuda_kernels::run_forward<scalar_t>(rt, x.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                        ConvShape{B, C, H, W, k});
  });
  return out;
}

at::Tensor grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& filters) {
  check_grad_input_args(grad_out, filters);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t B = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3), k = filters.size(3);
  auto gi = at::empty({B, C, H + k - 1, W + k - 1}, grad_out.options());
  if (gi.numel() == 0) return gi;
  auto g = grad_out.contiguous();
  auto f = filters.contiguous();
  CudaRuntime rt(grad_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "adaptive_conv_grad_input_cuda", [&] {
    cuda_kernels::run_grad_input<scalar_t>(rt, g.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), gi.data_ptr<scalar_t>(),
                                           ConvShape{B, C, H, W, k});
  });
  return gi;
}

at::Tensor grad_filters_cuda(const at::Tensor& grad_out, const at::Tensor& input) {
  check_grad_filters_args(grad_out, input);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t B = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3);
  const int64_t k = input.size(2) - H + 1;
  auto gf = at::empty({B, H, W, k, k}, grad_out.options());
  if (gf.numel() == 0) return gf;
  auto g = grad_out.contiguous();
  auto x = input.contiguous();
  CudaRuntime rt(grad_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "adaptive_conv_grad_filters_cuda", [&] {
    cuda_kernels::run_grad_filters<scalar_t>(rt, g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gf.data_ptr<scalar_t>(),
                                             ConvShape{B, C, H, W, k});
  });
  return gf;
}

}  // namespace

TORCH_LIBRARY_IMPL(featup_adapters, CUDA, m) {
  m.impl("adaptive_conv", &forward_cuda);
  m.impl("adaptive_conv_grad_input", &grad_input_cuda);
  m.impl("adaptive_conv_grad_filters", &grad_filters_cuda);
}

}  // namespace featup_adapters
