// The per-axis tap tables of bicubic_pad (bicubic resize, align_corners=False, then reflect
// padding) and the row routines built on them, shared by bicubic_pad (resize_cpu.cpp) and the
// fused bicubic_pad_conv (resize_conv_cpu.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/UpSample.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "kernels.h"

namespace featup_adapters {
namespace resize_taps {

constexpr int64_t kTaps = 4;
constexpr int64_t kRing = 8;

inline bool use_reflect(int64_t H, int64_t W, int64_t r) { return std::min(H, W) > r; }

// Padded position P in [0, n + 2r) -> output position in [0, n).
inline int64_t unpad(int64_t P, int64_t n, int64_t r, bool reflect) {
  int64_t o = P - r;
  if (reflect) {
    if (o < 0) o = -o;
    if (o >= n) o = 2 * (n - 1) - o;
    return o;
  }
  return std::min(std::max<int64_t>(o, 0), n - 1);
}

// Forward taps of one axis: idx / w are [4][n + 2r].
template <typename T>
struct Taps {
  int64_t n;  // padded output size
  std::vector<int32_t> idx;
  std::vector<T> w;
};

template <typename T>
Taps<T> forward_taps(int64_t n_in, int64_t n_out, int64_t r, bool reflect) {
  const int64_t n = n_out + 2 * r;
  Taps<T> t{n, std::vector<int32_t>(kTaps * n), std::vector<T>(kTaps * n)};
  const T scale = at::native::area_pixel_compute_scale<T>(n_in, n_out, false, std::nullopt);
  for (int64_t P = 0; P < n; ++P) {
    const int64_t o = unpad(P, n_out, r, reflect);
    const T real = at::native::area_pixel_compute_source_index<T>(scale, o, false, /*cubic=*/true);
    int64_t i;
    T lambda;
    at::native::guard_index_and_lambda(real, n_in, i, lambda);
    T c[4];
    at::native::get_cubic_upsample_coefficients<T>(c, lambda);
    for (int64_t k = 0; k < kTaps; ++k) {
      t.idx[k * n + P] = static_cast<int32_t>(std::min(std::max<int64_t>(i - 1 + k, 0), n_in - 1));
      t.w[k * n + P] = c[k];
    }
  }
  return t;
}

// The columns of one resized row: a periodic interior run (integer factor p = n_out / n_in,
// consecutive taps, the weights of position P + p those of P, the taps one source column on) done
// by periodic_cols, and the rest (borders, reflected padding) by gather_cols from own tables.
template <typename T>
struct ColPlan {
  Taps<T> head, tail;      // positions [0, start) and [start + periods * p, n)
  int64_t start = 0, periods = 0, p = 0;
  std::vector<int32_t> base;  // [p]
  std::vector<T> w;           // [p][4]
};

template <typename T>
Taps<T> sub_taps(const Taps<T>& t, int64_t a, int64_t b) {
  const int64_t n = b - a;
  Taps<T> s{n, std::vector<int32_t>(kTaps * n), std::vector<T>(kTaps * n)};
  for (int64_t k = 0; k < kTaps; ++k)
    for (int64_t P = 0; P < n; ++P) {
      s.idx[k * n + P] = t.idx[k * t.n + a + P];
      s.w[k * n + P] = t.w[k * t.n + a + P];
    }
  return s;
}

template <typename T>
ColPlan<T> col_plan(const Taps<T>& t, int64_t n_in, int64_t n_out) {
  ColPlan<T> c;
  const int64_t n = t.n, p = n_out % n_in == 0 ? n_out / n_in : 0;
  auto consecutive = [&](int64_t P) {
    for (int64_t k = 1; k < kTaps; ++k)
      if (t.idx[k * n + P] != t.idx[P] + k) return false;
    return true;
  };
  auto periodic = [&](int64_t P) {  // P and P + p: one period apart
    if (P + p >= n || !consecutive(P) || !consecutive(P + p) || t.idx[P + p] != t.idx[P] + 1) return false;
    for (int64_t k = 0; k < kTaps; ++k)
      if (t.w[k * n + P + p] != t.w[k * n + P]) return false;
    return true;
  };
  int64_t best_a = 0, best_len = 0;
  if (p >= 1 && p <= 16) {
    for (int64_t P = 0; P < n;) {
      if (!periodic(P)) { ++P; continue; }
      int64_t e = P;
      while (e < n && periodic(e)) ++e;
      if (e + p - P > best_len) { best_a = P; best_len = e + p - P; }  // [P, e + p) is periodic
      P = e;
    }
  }
  c.p = p;
  c.periods = p > 0 ? best_len / p : 0;
  if (c.periods < 2) {  // nothing worth a fast path: all positions gathered
    c.periods = 0;
    c.head = t;
    c.tail = Taps<T>{0, {}, {}};
    return c;
  }
  c.start = best_a;
  c.head = sub_taps(t, 0, best_a);
  c.tail = sub_taps(t, best_a + c.periods * p, n);
  c.base.resize(p);
  c.w.resize(p * kTaps);
  for (int64_t q = 0; q < p; ++q) {
    c.base[q] = t.idx[best_a + q];
    for (int64_t k = 0; k < kTaps; ++k) c.w[q * kTaps + k] = t.w[k * n + best_a + q];
  }
  return c;
}

template <typename T>
void resize_row(const cpu::ResizeKernels<T>& ks, T* dst, const T* src, const ColPlan<T>& c) {
  if (c.head.n > 0) ks.gather_cols(dst, src, c.head.idx.data(), c.head.w.data(), kTaps, c.head.n);
  if (c.periods == 0) return;
  ks.periodic_cols(dst + c.start, src, c.base.data(), c.w.data(), c.p, c.periods);
  if (c.tail.n > 0)
    ks.gather_cols(dst + c.start + c.periods * c.p, src, c.tail.idx.data(), c.tail.w.data(), kTaps, c.tail.n);
}

// Padded output row P of one plane (source `src`, rows w apart) into dst[Wp]: the source rows of
// its 4 taps are resized along x into `ring` (kRing rows of Wp; slot = row % kRing, `tag` the
// key0 + row each slot holds, -1 for none) unless already there, then combined.
template <typename T>
inline void padded_row(const cpu::ResizeKernels<T>& ks, T* ring, int64_t* tag, const T* src, int64_t key0,
                       int64_t w, int64_t P, const Taps<T>& th, const ColPlan<T>& cols, int64_t Wp, T* dst) {
  const int64_t Hp = th.n;
  const T* rows[kTaps];
  T wts[kTaps];
  for (int64_t k = 0; k < kTaps; ++k) {
    const int64_t i = th.idx[k * Hp + P], slot = i % kRing;
    if (tag[slot] != key0 + i) {
      resize_row(ks, ring + slot * Wp, src + i * w, cols);
      tag[slot] = key0 + i;
    }
    rows[k] = ring + slot * Wp;
    wts[k] = th.w[k * Hp + P];
  }
  ks.combine_rows(dst, rows, wts, kTaps, Wp);
}

template <typename T>
const cpu::ResizeKernels<T>& resize_kernels();
template <> inline const cpu::ResizeKernels<float>& resize_kernels<float>() { return cpu::best_kernels().resize_f32; }
template <> inline const cpu::ResizeKernels<double>& resize_kernels<double>() { return cpu::best_kernels().resize_f64; }

inline void check_sizes(const char* op, int64_t h, int64_t w, int64_t H, int64_t W, int64_t r) {
  TORCH_CHECK(h >= 1 && w >= 1, op, ": expected a source of at least 1x1 pixels, got ", h, "x", w);
  TORCH_CHECK(H >= 1 && W >= 1, op, ": expected an output size of at least 1x1, got ", H, "x", W);
  TORCH_CHECK(r >= 0, op, ": expected a padding r >= 0, got ", r);
  TORCH_CHECK(h < (int64_t(1) << 31) && w < (int64_t(1) << 31) && H + 2 * r < (int64_t(1) << 31) &&
                  W + 2 * r < (int64_t(1) << 31),
              op, ": sides must be below 2^31 pixels");
}

}  // namespace resize_taps
}  // namespace featup_adapters
