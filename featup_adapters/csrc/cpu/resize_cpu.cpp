// CPU implementation of bicubic_pad: bicubic resize (align_corners=False, A = -0.75, taps
// clamped at the borders, exactly the convention of torch's upsample_bicubic2d) followed by
// reflect padding by r (replicate when a side of the output is <= r), in one pass.
//
// Both steps are separable and the padding only re-indexes output rows / columns, so each axis
// is a table of 4 (source index, weight) taps per *padded* output position. Per plane and thread:
//   1. a source row is resized along x into a ring of 8 rows (slot = source row % 8; the 4
//      taps of one output row are consecutive source rows, so they never share a slot); for an
//      integer factor the interior columns are shifted contiguous loads (ColPlan), the borders
//      and the padding gathers;
//   2. each padded output row combines the 4 ring rows of its taps (vectorized over x).
// The backward is the transpose: per source row, a combination of the grad rows that used it
// (a list per source row), then along x the sum over the columns that used each source column:
// for an integer factor the interior as shifted contiguous combinations (AdjointCols), the
// borders by a gather (a fixed number of entries per column, padded with a zero slot). float16 / bfloat16 compute in
// float32; the forward rounds each finished output row once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/UpSample.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "denormals.h"
#include "kernels.h"
#include "large_alloc.h"
#include "resize_taps.h"

namespace featup_adapters {
namespace {

using namespace resize_taps;

// The transpose of forward taps: for each source position s, the padded positions that read it
// with their summed weights (duplicate taps of a clamped border merged).
template <typename T>
struct Adjoint {
  std::vector<int64_t> start;  // [n_in + 1] into pos / w
  std::vector<int64_t> pos;
  std::vector<T> w;
  int64_t max_count = 0;
};

template <typename T>
Adjoint<T> adjoint_taps(const Taps<T>& f, int64_t n_in) {
  std::vector<std::vector<std::pair<int64_t, T>>> lists(n_in);
  for (int64_t P = 0; P < f.n; ++P)
    for (int64_t k = 0; k < kTaps; ++k) {
      auto& l = lists[f.idx[k * f.n + P]];
      const T wk = f.w[k * f.n + P];
      if (!l.empty() && l.back().first == P) l.back().second += wk;
      else l.emplace_back(P, wk);
    }
  Adjoint<T> a;
  a.start.push_back(0);
  for (const auto& l : lists) {
    for (const auto& e : l) {
      a.pos.push_back(e.first);
      a.w.push_back(e.second);
    }
    a.start.push_back(static_cast<int64_t>(a.pos.size()));
    a.max_count = std::max<int64_t>(a.max_count, static_cast<int64_t>(l.size()));
  }
  return a;
}

// Rows per work item: whole planes when there are enough of them, else planes split in chunks
// so every thread gets work (each chunk re-resizes at most 3 source rows of its neighbour).
int64_t rows_per_item(int64_t planes, int64_t rows) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  if (planes >= want) return rows;
  const int64_t chunks = std::min<int64_t>((want + planes - 1) / planes, std::max<int64_t>(1, rows / 16));
  return (rows + chunks - 1) / chunks;
}

template <typename T, typename O>
void forward_kernel(const T* x, O* out, int64_t planes, int64_t h, int64_t w, const Taps<T>& th,
                    const Taps<T>& tw, int64_t W, int64_t plane_stride = -1) {
  if (plane_stride < 0) plane_stride = h * w;
  const auto& ks = resize_kernels<T>();
  const int64_t Hp = th.n, Wp = tw.n;
  const ColPlan<T> cols = col_plan(tw, w, W);
  const int64_t chunk = rows_per_item(planes, Hp), nchunks = (Hp + chunk - 1) / chunk;
  cpu::parallel_for_flushed(0, planes * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ring(kRing * Wp), row(std::is_same<T, O>::value ? 0 : Wp);
    int64_t tag[kRing];
    std::fill(tag, tag + kRing, -1);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t plane = item / nchunks, P0 = (item % nchunks) * chunk;
      const int64_t P1 = std::min(P0 + chunk, Hp);
      const T* src = x + plane * plane_stride;
      O* dst = out + plane * Hp * Wp;
      for (int64_t P = P0; P < P1; ++P) {
        if constexpr (std::is_same<T, O>::value) {
          padded_row(ks, ring.data(), tag, src, plane * h, w, P, th, cols, Wp, dst + P * Wp);
        } else {
          padded_row(ks, ring.data(), tag, src, plane * h, w, P, th, cols, Wp, row.data());
          O* o = dst + P * Wp;
          for (int64_t q = 0; q < Wp; ++q) o[q] = static_cast<O>(row[q]);
        }
      }
    }
  });
}

// The backward's columns, like ColPlan for the forward: for an integer factor the interior source
// columns j in [j0, j0 + run) are read by the same number L of consecutive padded columns with
// the same weights, one period p further for each next j (positions P0 + p (j - j0) + l, l < L).
// Their sums are shifted contiguous combinations of the p phases of the row, phase c being the
// padded columns P0 + c + p m (one strided pass over the row); the other columns (borders,
// reflected padding, non-integer factors) gather from a fixed-width table.
template <typename T>
struct AdjointCols {
  int64_t j0 = 0, run = 0, p = 0, L = 0, P0 = 0, M = 0;  // M: length of each phase
  std::vector<T> w;                                        // [L]
  // Gathered columns [first, first + n): G entries per column, tables [G][n] (unused entries
  // read the zero at Wp). All columns when there is no run, else those before and after it.
  struct Gathered {
    int64_t first, n;
    std::vector<int32_t> idx;
    std::vector<T> w;
  };
  int64_t G = 1;
  std::vector<Gathered> gathered;
};

template <typename T>
AdjointCols<T> adjoint_cols(const Adjoint<T>& a, int64_t w, int64_t Wp) {
  AdjointCols<T> c;
  auto count = [&](int64_t j) { return a.start[j + 1] - a.start[j]; };
  auto consecutive = [&](int64_t j) {
    for (int64_t e = a.start[j] + 1; e < a.start[j + 1]; ++e)
      if (a.pos[e] != a.pos[e - 1] + 1) return false;
    return count(j) > 0;
  };
  // j and j + 1 one period apart: same count and weights, positions shifted by the same step
  auto next = [&](int64_t j, int64_t step) {
    if (j + 1 >= w || count(j + 1) != count(j) || !consecutive(j + 1)) return false;
    for (int64_t l = 0; l < count(j); ++l)
      if (a.pos[a.start[j + 1] + l] != a.pos[a.start[j] + l] + step ||
          a.w[a.start[j + 1] + l] != a.w[a.start[j] + l]) return false;
    return true;
  };
  int64_t best_j = 0, best_run = 0, best_p = 0;
  for (int64_t j = 0; j + 1 < w;) {
    const int64_t step = count(j) > 0 && count(j + 1) > 0 ? a.pos[a.start[j + 1]] - a.pos[a.start[j]] : 0;
    if (step < 1 || !consecutive(j) || !next(j, step)) { ++j; continue; }
    int64_t e = j + 1;
    while (next(e, step)) ++e;
    if (e + 1 - j > best_run) { best_j = j; best_run = e + 1 - j; best_p = step; }
    j = e;
  }
  if (best_run >= 8) {
    c.j0 = best_j, c.run = best_run, c.p = best_p, c.L = count(best_j);
    c.P0 = a.pos[a.start[best_j]];
    c.M = c.run + (c.L + c.p - 1) / c.p;
    c.w.assign(a.w.begin() + a.start[best_j], a.w.begin() + a.start[best_j] + c.L);
  }
  for (int64_t j = 0; j < w; ++j) c.G = std::max(c.G, count(j));
  auto gather = [&](int64_t first, int64_t n) {
    if (n <= 0) return;
    typename AdjointCols<T>::Gathered s{first, n, std::vector<int32_t>(c.G * n, static_cast<int32_t>(Wp)),
                                        std::vector<T>(c.G * n, T(0))};
    for (int64_t q = 0; q < n; ++q)
      for (int64_t e = a.start[first + q], l = 0; e < a.start[first + q + 1]; ++e, ++l) {
        s.idx[l * n + q] = static_cast<int32_t>(a.pos[e]);
        s.w[l * n + q] = a.w[e];
      }
    c.gathered.push_back(std::move(s));
  };
  if (c.run == 0) {
    gather(0, w);
  } else {
    gather(0, c.j0);
    gather(c.j0 + c.run, w - c.j0 - c.run);
  }
  return c;
}

template <typename T>
void backward_kernel(const T* g, T* gi, int64_t planes, int64_t h, int64_t w, int64_t Hp, int64_t Wp,
                     const Adjoint<T>& ah, const Adjoint<T>& aw) {
  const auto& ks = resize_kernels<T>();
  const AdjointCols<T> cols = adjoint_cols(aw, w, Wp);
  const int64_t chunk = rows_per_item(planes, h), nchunks = (h + chunk - 1) / chunk;
  cpu::parallel_for_flushed(0, planes * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(Wp + 1, T(0)), phases(std::max<int64_t>(cols.p * cols.M, 1));
    std::vector<const T*> rows(std::max<int64_t>(ah.max_count, 1)), taps(std::max<int64_t>(cols.L, 1));
    for (int64_t l = 0; l < cols.L; ++l)  // tap l of the run: phase l % p, shifted by l / p
      taps[l] = phases.data() + (l % cols.p) * cols.M + l / cols.p;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t plane = item / nchunks, i0 = (item % nchunks) * chunk;
      const int64_t i1 = std::min(i0 + chunk, h);
      const T* G = g + plane * Hp * Wp;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t e0 = ah.start[i], n = ah.start[i + 1] - e0;
        for (int64_t e = 0; e < n; ++e) rows[e] = G + ah.pos[e0 + e] * Wp;
        ks.combine_rows(acc.data(), rows.data(), ah.w.data() + e0, n, Wp);
        acc[Wp] = T(0);
        T* dst = gi + (plane * h + i) * w;
        for (const auto& s : cols.gathered)
          ks.gather_cols(dst + s.first, acc.data(), s.idx.data(), s.w.data(), cols.G, s.n);
        if (cols.run == 0) continue;
        for (int64_t c = 0; c < cols.p; ++c) {  // phase c: acc[P0 + c + p m] (past the row: 0)
          T* ph = phases.data() + c * cols.M;
          for (int64_t m = 0; m < cols.M; ++m) ph[m] = acc[std::min(cols.P0 + c + cols.p * m, Wp)];
        }
        ks.combine_rows(dst + cols.j0, taps.data(), cols.w.data(), cols.L, cols.run);
      }
    }
  });
}

template <typename T, typename O>
void run_forward(const at::Tensor& x, at::Tensor& out, int64_t h, int64_t w, int64_t H, int64_t W, int64_t r,
                 bool reflect) {
  const auto th = forward_taps<T>(h, H, r, reflect);
  const auto tw = forward_taps<T>(w, W, r, reflect);
  forward_kernel<T, O>(x.data_ptr<T>(), out.data_ptr<O>(), x.size(0) * x.size(1), h, w, th, tw, W);
}

// The checks both forward ops make first; returns the input's dtype. `rows` names the input's
// third dimension in the message.
at::ScalarType check_forward_input(const char* op, const at::Tensor& input, at::IntArrayRef size,
                                   const char* rows) {
  TORCH_CHECK(input.dim() == 4, op, ": expected input of shape [B, C, ", rows, ", w] (4-D), got ",
              input.dim(), "-D tensor of shape ", input.sizes());
  TORCH_CHECK(size.size() == 2, op, ": expected size (H, W), got ", size);
  const auto dtype = input.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), op, ": expected a floating dtype, got ", dtype);
  return dtype;
}

at::Tensor bicubic_pad_cpu(const at::Tensor& input, at::IntArrayRef size, int64_t r) {
  const auto dtype = check_forward_input("bicubic_pad", input, size, "h");
  const int64_t B = input.size(0), C = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t H = size[0], W = size[1];
  check_sizes("bicubic_pad", h, w, H, W, r);
  auto out = empty_large({B, C, H + 2 * r, W + 2 * r}, input.options());
  if (out.numel() == 0) return out;
  const bool reflect = use_reflect(H, W, r);
  const auto ct = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto x = input.to(ct).contiguous();
  switch (dtype) {
    case at::kDouble: run_forward<double, double>(x, out, h, w, H, W, r, reflect); break;
    case at::kFloat: run_forward<float, float>(x, out, h, w, H, W, r, reflect); break;
    case at::kHalf: run_forward<float, at::Half>(x, out, h, w, H, W, r, reflect); break;
    case at::kBFloat16: run_forward<float, at::BFloat16>(x, out, h, w, H, W, r, reflect); break;
    default: TORCH_CHECK(false, "bicubic_pad: unsupported dtype ", dtype);
  }
  return out;
}

// Rows [row0, row1) of bicubic_pad's padded output, from a band of the source: `input` holds
// source rows [src_row0, src_row0 + hb) of a map with `src_rows` rows (the tiled path of
// JBUStack: each band of the output reads only the source rows its taps touch). The taps are
// those of the whole map, so a band equals the same rows of the whole op's output exactly.
at::Tensor bicubic_pad_rows_cpu(const at::Tensor& input, at::IntArrayRef size, int64_t r,
                                int64_t src_rows, int64_t src_row0, int64_t row0, int64_t row1) {
  const auto dtype = check_forward_input("bicubic_pad_rows", input, size, "rows");
  const int64_t B = input.size(0), C = input.size(1), hb = input.size(2), w = input.size(3);
  const int64_t H = size[0], W = size[1];
  check_sizes("bicubic_pad_rows", src_rows, w, H, W, r);
  TORCH_CHECK(src_row0 >= 0 && hb >= 1 && src_row0 + hb <= src_rows, "bicubic_pad_rows: expected the band's ",
              hb, " source rows starting at ", src_row0, " inside the source's ", src_rows, " rows");
  TORCH_CHECK(0 <= row0 && row0 < row1 && row1 <= H + 2 * r, "bicubic_pad_rows: expected output rows ",
              "0 <= row0 < row1 <= ", H + 2 * r, ", got [", row0, ", ", row1, ")");
  const bool reflect = use_reflect(H, W, r);
  const auto ct = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto out = empty_large({B, C, row1 - row0, W + 2 * r}, input.options().dtype(ct));
  // a band sliced out of a taller map keeps its plane stride: rows contiguous, planes evenly apart
  auto x = input.to(ct);
  const bool planar = x.stride(3) == 1 && x.stride(2) == w && x.stride(1) >= hb * w &&
                      (B == 1 || x.stride(0) == C * x.stride(1));
  if (!planar) x = x.contiguous();
  const int64_t plane_stride = planar ? x.stride(1) : hb * w;
  AT_DISPATCH_FLOATING_TYPES(ct, "bicubic_pad_rows_cpu", [&] {
    const auto full = forward_taps<scalar_t>(src_rows, H, r, reflect);
    const int64_t n = row1 - row0;
    Taps<scalar_t> th{n, std::vector<int32_t>(kTaps * n), std::vector<scalar_t>(kTaps * n)};
    for (int64_t k = 0; k < kTaps; ++k)
      for (int64_t P = 0; P < n; ++P) {
        const int64_t i = full.idx[k * full.n + row0 + P] - src_row0;
        TORCH_CHECK(i >= 0 && i < hb, "bicubic_pad_rows: output row ", row0 + P, " reads source row ",
                    i + src_row0, ", outside the band's rows [", src_row0, ", ", src_row0 + hb, ")");
        th.idx[k * n + P] = static_cast<int32_t>(i);
        th.w[k * n + P] = full.w[k * full.n + row0 + P];
      }
    const auto tw = forward_taps<scalar_t>(w, W, r, reflect);
    forward_kernel<scalar_t, scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B * C, hb, w, th, tw,
                                       W, plane_stride);
  });
  return out.to(dtype);
}

at::Tensor bicubic_pad_backward_cpu(const at::Tensor& grad_out, at::IntArrayRef input_size, int64_t r) {
  TORCH_CHECK(grad_out.dim() == 4, "bicubic_pad_backward: expected grad_out of shape [B, C, H+2r, W+2r] (4-D), got ",
              grad_out.dim(), "-D tensor of shape ", grad_out.sizes());
  TORCH_CHECK(input_size.size() == 2, "bicubic_pad_backward: expected input_size (h, w), got ", input_size);
  const auto dtype = grad_out.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "bicubic_pad_backward: expected a floating dtype, got ", dtype);
  const int64_t B = grad_out.size(0), C = grad_out.size(1), Hp = grad_out.size(2), Wp = grad_out.size(3);
  const int64_t h = input_size[0], w = input_size[1], H = Hp - 2 * r, W = Wp - 2 * r;
  check_sizes("bicubic_pad_backward", h, w, H, W, r);
  const auto ct = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto gi = empty_large({B, C, h, w}, grad_out.options().dtype(ct));
  if (gi.numel() == 0) return gi.to(dtype);
  const bool reflect = use_reflect(H, W, r);
  auto g = grad_out.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "bicubic_pad_backward_cpu", [&] {
    const auto ah = adjoint_taps(forward_taps<scalar_t>(h, H, r, reflect), h);
    const auto aw = adjoint_taps(forward_taps<scalar_t>(w, W, r, reflect), w);
    backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), gi.data_ptr<scalar_t>(), B * C, h, w, Hp, Wp, ah, aw);
  });
  return gi.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(featup_adapters, CPU, m) {
  m.impl("bicubic_pad", &bicubic_pad_cpu);
  m.impl("bicubic_pad_backward", &bicubic_pad_backward_cpu);
  m.impl("bicubic_pad_rows", &bicubic_pad_rows_cpu);
}

}  // namespace featup_adapters
