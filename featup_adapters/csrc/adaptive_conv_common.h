// Shared by the CPU and CUDA kernels of the adaptive convolution:
//   out[b, c, y, x] = sum_{i, j < k} filters[b, y, x, i, j] * input[b, c, y + i, x + j]
// Everything here is plain arithmetic on raw pointers, marked __host__ __device__ under nvcc,
// so the CPU tests exercise the same per-element code the CUDA kernel runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif

namespace featup_adapters {

// Largest filter size k (odd k from 1 to kMaxFilterSize): the argument checks (checks.h) and the
// CUDA kernels' per-k instantiations (cuda/adaptive_conv_kernels.cuh) both use this constant.
constexpr int64_t kMaxFilterSize = 15;

// Sizes of one problem. Input is [B, C, Hp, Wp] with Hp = H + k - 1, Wp = W + k - 1.
struct ConvShape {
  int64_t B, C, H, W, k;
  FA_HD int64_t Hp() const { return H + k - 1; }
  FA_HD int64_t Wp() const { return W + k - 1; }
  FA_HD int64_t kk() const { return k * k; }
};

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

// Offsets into contiguous tensors.
FA_HD int64_t input_offset(const ConvShape& s, int64_t b, int64_t c, int64_t y, int64_t x) {
  return ((b * s.C + c) * s.Hp() + y) * s.Wp() + x;
}
FA_HD int64_t output_offset(const ConvShape& s, int64_t b, int64_t c, int64_t y, int64_t x) {
  return ((b * s.C + c) * s.H + y) * s.W + x;
}
// filters[b, y, x, i, j] (the user-facing layout)
FA_HD int64_t filter_offset(const ConvShape& s, int64_t b, int64_t y, int64_t x, int64_t t) {
  return ((b * s.H + y) * s.W + x) * s.kk() + t;
}

// Valid tap range for gradients w.r.t. the input: input row (or column) P receives from output
// row p = P - i for taps i in [first_tap(P, n), last_tap(P, k)], where n is the output size H (W).
FA_HD int64_t first_tap(int64_t P, int64_t n) { return P - n + 1 > 0 ? P - n + 1 : 0; }
FA_HD int64_t last_tap(int64_t P, int64_t k) { return P < k - 1 ? P : k - 1; }

// Number of channel blocks of size cb covering C channels.
FA_HD int64_t num_blocks(int64_t C, int64_t cb) { return (C + cb - 1) / cb; }

}  // namespace featup_adapters
