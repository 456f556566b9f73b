// Row kernels of the separable bicubic resize + pad (resize_cpu.cpp drives them), compiled once
// per instruction set from kernels_impl.h, like the adaptive-convolution kernels. No headers.
//
//   gather_cols:  dst[j] = sum_{l < L} w[l][j] * src[idx[l][j]]    (one row, taps along the row)
//   combine_rows: dst[q] = sum_{l < L} w[l] * rows[l][q]            (taps across rows)
//
// Tables are structure-of-arrays ([l][j], `n` apart) so that the loops over j / q run over
// contiguous memory and vectorize (gathers for gather_cols).
#ifndef FA_ISA
#error "include resize_rows_impl.h from kernels_impl.h"
#endif

template <typename T>
void gather_cols(T* __restrict dst, const T* __restrict src, const int32_t* __restrict idx,
                 const T* __restrict w, int64_t L, int64_t n) {
  if (L == 4) {  // the forward: four taps, one pass
    const int32_t *i0 = idx, *i1 = idx + n, *i2 = idx + 2 * n, *i3 = idx + 3 * n;
    const T *w0 = w, *w1 = w + n, *w2 = w + 2 * n, *w3 = w + 3 * n;
    for (int64_t j = 0; j < n; ++j)
      dst[j] = w0[j] * src[i0[j]] + w1[j] * src[i1[j]] + w2[j] * src[i2[j]] + w3[j] * src[i3[j]];
    return;
  }
  for (int64_t j = 0; j < n; ++j) dst[j] = T(0);
  for (int64_t l = 0; l < L; ++l) {
    const int32_t* il = idx + l * n;
    const T* wl = w + l * n;
    for (int64_t j = 0; j < n; ++j) dst[j] += wl[j] * src[il[j]];
  }
}

template <typename T>
void combine_rows(T* __restrict dst, const T* const* rows, const T* w, int64_t L, int64_t n) {
  if (L == 4) {
    const T* __restrict r0 = rows[0];
    const T* __restrict r1 = rows[1];
    const T* __restrict r2 = rows[2];
    const T* __restrict r3 = rows[3];
    const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
    for (int64_t q = 0; q < n; ++q) dst[q] = w0 * r0[q] + w1 * r1[q] + w2 * r2[q] + w3 * r3[q];
    return;
  }
  for (int64_t q = 0; q < n; ++q) dst[q] = T(0);
  for (int64_t l = 0; l < L; ++l) {
    const T* __restrict r = rows[l];
    const T wl = w[l];
    for (int64_t q = 0; q < n; ++q) dst[q] += wl * r[q];
  }
}
