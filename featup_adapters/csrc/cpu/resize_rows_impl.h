// Row kernels of the separable bicubic resize + pad (resize_cpu.cpp drives them), compiled once
// per instruction set from kernels_impl.h, like the adaptive-convolution kernels. No headers.
//
//   gather_cols:  dst[j] = sum_{l < L} w[l][j] * src[idx[l][j]]    (one row, taps along the row)
//   combine_rows: dst[q] = sum_{l < L} w[l] * rows[l][q]            (taps across rows)
//   periodic_cols: gather_cols's interior for an integer factor, as shifted contiguous loads
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

// The periodic interior of an integer-factor resize (no gathers): for m < count, phase q < p,
//   dst[m * p + q] = sum_{k < 4} w[4 q + k] * src[base[q] + m + k]
// (contiguous loads per phase; p = 2, FeatUp's 2x stages, has its own loop).
template <typename T>
void periodic_cols(T* __restrict dst, const T* __restrict src, const int32_t* base, const T* w,
                   int64_t p, int64_t count) {
  if (p == 2) {
    const T* __restrict a = src + base[0];
    const T* __restrict b = src + base[1];
    const T a0 = w[0], a1 = w[1], a2 = w[2], a3 = w[3], b0 = w[4], b1 = w[5], b2 = w[6], b3 = w[7];
    for (int64_t m = 0; m < count; ++m) {
      dst[2 * m] = a0 * a[m] + a1 * a[m + 1] + a2 * a[m + 2] + a3 * a[m + 3];
      dst[2 * m + 1] = b0 * b[m] + b1 * b[m + 1] + b2 * b[m + 2] + b3 * b[m + 3];
    }
    return;
  }
  for (int64_t q = 0; q < p; ++q) {
    const T* __restrict s = src + base[q];
    const T w0 = w[4 * q], w1 = w[4 * q + 1], w2 = w[4 * q + 2], w3 = w[4 * q + 3];
    for (int64_t m = 0; m < count; ++m)
      dst[m * p + q] = w0 * s[m] + w1 * s[m + 1] + w2 * s[m + 2] + w3 * s[m + 3];
  }
}

template <typename T>
void combine_rows(T* __restrict dst, const T* const* rows, const T* w, int64_t L, int64_t n) {
  // Rows four at a time, each group in one pass over dst (the first group assigns, the others
  // accumulate), so a long combination (the backward's 8 rows at 2x) makes two passes, not eight.
  int64_t l = 0;
  for (; l + 4 <= L; l += 4) {
    const T* __restrict r0 = rows[l];
    const T* __restrict r1 = rows[l + 1];
    const T* __restrict r2 = rows[l + 2];
    const T* __restrict r3 = rows[l + 3];
    const T w0 = w[l], w1 = w[l + 1], w2 = w[l + 2], w3 = w[l + 3];
    if (l == 0)
      for (int64_t q = 0; q < n; ++q) dst[q] = w0 * r0[q] + w1 * r1[q] + w2 * r2[q] + w3 * r3[q];
    else
      for (int64_t q = 0; q < n; ++q) dst[q] += w0 * r0[q] + w1 * r1[q] + w2 * r2[q] + w3 * r3[q];
  }
  const int64_t rest = L - l;
  if (rest == 0) {
    if (L == 0)
      for (int64_t q = 0; q < n; ++q) dst[q] = T(0);
    return;
  }
  const T* __restrict r0 = rows[l];
  const T* __restrict r1 = rows[rest > 1 ? l + 1 : l];
  const T* __restrict r2 = rows[rest > 2 ? l + 2 : l];
  const T w0 = w[l], w1 = rest > 1 ? w[l + 1] : T(0), w2 = rest > 2 ? w[l + 2] : T(0);
  const bool first = l == 0;
  if (rest == 1)
    for (int64_t q = 0; q < n; ++q) dst[q] = (first ? T(0) : dst[q]) + w0 * r0[q];
  else if (rest == 2)
    for (int64_t q = 0; q < n; ++q) dst[q] = (first ? T(0) : dst[q]) + (w0 * r0[q] + w1 * r1[q]);
  else
    for (int64_t q = 0; q < n; ++q)
      dst[q] = (first ? T(0) : dst[q]) + (w0 * r0[q] + w1 * r1[q] + w2 * r2[q]);
}
