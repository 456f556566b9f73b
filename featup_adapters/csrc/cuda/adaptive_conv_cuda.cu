// CUDA implementations of the adaptive-convolution ops (forward, grad_input, grad_filters).
//
// Fast by construction (it cannot be timed on the machines that build it):
// * One launch covers the whole batch: grid z walks (batch, channel block) pairs.
// * Threads of a warp own consecutive x positions, so every read of input / grad_out and every
//   write of out / grad_input is coalesced; neighbouring taps re-read the same lines from L1.
// * forward and grad_input: each thread loads its pixel's k*k filter values once per channel
//   block (CB = 8 channels) and reuses each value for all CB channels held in registers.
// * grad_filters: each thread owns one pixel and one row of k taps and sums over ALL channels
//   in registers, so the channel reduction needs no atomics and no second pass.
// * Accumulation in float for half/bfloat16 (at::opmath_type), on the current stream, under a
//   device guard, with a launch check after every kernel.
// Index arithmetic is shared with the CPU kernel (../adaptive_conv_common.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../adaptive_conv_common.h"
#include "../checks.h"

namespace featup_adapters {
namespace {

constexpr int TX = 32;   // threads along x (one warp)
constexpr int TY = 8;    // threads along y
constexpr int CB = 8;    // channels per thread in forward / grad_input
constexpr int KMAX = 15; // largest supported filter size

inline dim3 grid_for(int64_t W, int64_t H, int64_t z) {
  const int64_t gz = z < 65535 ? z : 65535;  // the kernels stride over the rest
  return dim3((W + TX - 1) / TX, (H + TY - 1) / TY, gz > 0 ? gz : 1);
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ in, const T* __restrict__ filt,
                               T* __restrict__ out, ConvShape s) {
  using Acc = at::opmath_type<T>;
  const int64_t x = blockIdx.x * TX + threadIdx.x, y = blockIdx.y * TY + threadIdx.y;
  if (x >= s.W || y >= s.H) return;
  const int64_t nb = num_blocks(s.C, CB);
  for (int64_t z = blockIdx.z; z < s.B * nb; z += gridDim.z) {
    const int64_t b = z / nb, c0 = (z % nb) * CB;
    const int nc = static_cast<int>(s.C - c0 < CB ? s.C - c0 : CB);
    const int64_t plane = s.Hp() * s.Wp();
    const T* f = filt + filter_offset(s, b, y, x, 0);
    const T* src = in + input_offset(s, b, c0, y, x);
    Acc acc[CB];
#pragma unroll
    for (int c = 0; c < CB; ++c) acc[c] = Acc(0);
    for (int64_t i = 0; i < s.k; ++i)
      for (int64_t j = 0; j < s.k; ++j) {
        const Acc w = static_cast<Acc>(f[i * s.k + j]);
        const T* p = src + i * s.Wp() + j;
#pragma unroll
        for (int c = 0; c < CB; ++c)
          if (c < nc) acc[c] += w * static_cast<Acc>(p[c * plane]);
      }
#pragma unroll
    for (int c = 0; c < CB; ++c)
      if (c < nc) out[output_offset(s, b, c0 + c, y, x)] = static_cast<T>(acc[c]);
  }
}

// grad_input[b, c, Y, X] = sum over valid (i, j) of grad_out[b, c, Y-i, X-j] * filt[b, Y-i, X-j, i, j]
template <typename T>
__global__ void grad_input_kernel(const T* __restrict__ gout, const T* __restrict__ filt,
                                  T* __restrict__ gin, ConvShape s) {
  using Acc = at::opmath_type<T>;
  const int64_t X = blockIdx.x * TX + threadIdx.x, Y = blockIdx.y * TY + threadIdx.y;
  if (X >= s.Wp() || Y >= s.Hp()) return;
  const int64_t nb = num_blocks(s.C, CB);
  const int64_t i0 = first_tap(Y, s.H), i1 = last_tap(Y, s.k);
  const int64_t j0 = first_tap(X, s.W), j1 = last_tap(X, s.k);
  const int64_t plane = s.H * s.W;
  for (int64_t z = blockIdx.z; z < s.B * nb; z += gridDim.z) {
    const int64_t b = z / nb, c0 = (z % nb) * CB;
    const int nc = static_cast<int>(s.C - c0 < CB ? s.C - c0 : CB);
    Acc acc[CB];
#pragma unroll
    for (int c = 0; c < CB; ++c) acc[c] = Acc(0);
    for (int64_t i = i0; i <= i1; ++i)
      for (int64_t j = j0; j <= j1; ++j) {
        const int64_t y = Y - i, x = X - j;
        const Acc w = static_cast<Acc>(filt[filter_offset(s, b, y, x, i * s.k + j)]);
        const T* g = gout + output_offset(s, b, c0, y, x);
#pragma unroll
        for (int c = 0; c < CB; ++c)
          if (c < nc) acc[c] += w * static_cast<Acc>(g[c * plane]);
      }
#pragma unroll
    for (int c = 0; c < CB; ++c)
      if (c < nc) gin[input_offset(s, b, c0 + c, Y, X)] = static_cast<T>(acc[c]);
  }
}

// grad_filt[b, y, x, i, j] = sum_c grad_out[b, c, y, x] * in[b, c, y+i, x+j]; one tap row i per
// thread, channels reduced in registers.
template <typename T>
__global__ void grad_filters_kernel(const T* __restrict__ gout, const T* __restrict__ in,
                                    T* __restrict__ gfilt, ConvShape s) {
  using Acc = at::opmath_type<T>;
  const int64_t x = blockIdx.x * TX + threadIdx.x, y = blockIdx.y * TY + threadIdx.y;
  if (x >= s.W || y >= s.H) return;
  for (int64_t z = blockIdx.z; z < s.B * s.k; z += gridDim.z) {
    const int64_t b = z / s.k, i = z % s.k;
    Acc acc[KMAX];
#pragma unroll
    for (int j = 0; j < KMAX; ++j) acc[j] = Acc(0);
    for (int64_t c = 0; c < s.C; ++c) {
      const Acc g = static_cast<Acc>(gout[output_offset(s, b, c, y, x)]);
      const T* p = in + input_offset(s, b, c, y + i, x);
#pragma unroll
      for (int j = 0; j < KMAX; ++j)
        if (j < s.k) acc[j] += g * static_cast<Acc>(p[j]);
    }
    T* dst = gfilt + filter_offset(s, b, y, x, i * s.k);
#pragma unroll
    for (int j = 0; j < KMAX; ++j)
      if (j < s.k) dst[j] = static_cast<T>(acc[j]);
  }
}

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& filters) {
  check_forward_args(input, filters);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t B = input.size(0), C = input.size(1), H = filters.size(1), W = filters.size(2), k = filters.size(3);
  auto out = at::empty({B, C, H, W}, input.options());
  if (out.numel() == 0) return out;
  auto x = input.contiguous();
  auto f = filters.contiguous();
  const ConvShape s{B, C, H, W, k};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "adaptive_conv_cuda", [&] {
    forward_kernel<scalar_t><<<grid_for(W, H, B * num_blocks(C, CB)), dim3(TX, TY), 0, stream>>>(
        x.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& filters) {
  check_grad_input_args(grad_out, filters);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t B = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3), k = filters.size(3);
  auto gi = at::empty({B, C, H + k - 1, W + k - 1}, grad_out.options());
  if (gi.numel() == 0) return gi;
  if (H == 0 || W == 0) return gi.zero_();
  auto g = grad_out.contiguous();
  auto f = filters.contiguous();
  const ConvShape s{B, C, H, W, k};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "adaptive_conv_grad_input_cuda", [&] {
    grad_input_kernel<scalar_t><<<grid_for(s.Wp(), s.Hp(), B * num_blocks(C, CB)), dim3(TX, TY), 0, stream>>>(
        g.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), gi.data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const ConvShape s{B, C, H, W, k};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "adaptive_conv_grad_filters_cuda", [&] {
    grad_filters_kernel<scalar_t><<<grid_for(W, H, B * k), dim3(TX, TY), 0, stream>>>(
        g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gf.data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
