// The CPU kernels, written once and compiled once per instruction set (kernels_<isa>.cpp set
// FA_ISA, the tile sizes and `#pragma GCC target` before including this file). Include no
// headers here: anything included would be compiled for the target ISA and could leak into
// generic code through the one-definition rule.
//
// How it is fast: every kernel is a register-tiled gather. A tile holds CB channels x XT
// consecutive pixels (or TT taps x XT pixels for grad_filters) of accumulators in vector
// registers; each filter vector is loaded once per tap and reused across the CB channels, so
// the inner loop is one unaligned load + one FMA per vector. Work items are independent rows,
// so there are no atomics and no reductions across threads.
#ifndef FA_ISA
#error "define FA_ISA (and the tile sizes) before including kernels_impl.h"
#endif

namespace featup_adapters {
namespace cpu {
namespace FA_ISA {
namespace {

constexpr int CB = FA_CB;   // channels per forward / grad_input tile
constexpr int XT = FA_XT;   // pixels per tile (a multiple of the vector width)
constexpr int TT = FA_TT;   // taps per grad_filters tile
constexpr int CC = 16;      // channels summed per pass over a grad_filters accumulator row

// A vector of N lanes of T (GCC/Clang vector extension: lowered to whatever registers the target
// ISA has). Loads and stores are unaligned.
template <typename T, int N>
struct Vec { typedef T type __attribute__((vector_size(N * sizeof(T)))); };

template <typename T, int N>
inline typename Vec<T, N>::type vload(const T* p) {
  typename Vec<T, N>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, int N>
inline void vstore(T* p, typename Vec<T, N>::type v) { __builtin_memcpy(p, &v, sizeof(v)); }

// out[c][x0 + v] = sum_t F[foff[t] + x0 + v] * X[c * xplane + xoff[t] + x0 + v] for v < NX,
// for x0 stepping by NX while the tile fits in [x0, xend). Returns the first x0 not done.
template <typename T, int NC, int NX>
inline int64_t gather_tiles(const T* __restrict F, const int64_t* foff, const T* __restrict X,
                            const int64_t* xoff, int64_t ntaps, int64_t xplane,
                            T* __restrict out, int64_t oplane, int64_t x0, int64_t xend) {
  typedef typename Vec<T, NX>::type V;
  for (; x0 + NX <= xend; x0 += NX) {
    V acc[NC];
    for (int c = 0; c < NC; ++c) acc[c] = V{} ;
    for (int64_t t = 0; t < ntaps; ++t) {
      const V fv = vload<T, NX>(F + foff[t] + x0);
      const T* xv = X + xoff[t] + x0;
      for (int c = 0; c < NC; ++c) acc[c] += fv * vload<T, NX>(xv + c * xplane);
    }
    for (int c = 0; c < NC; ++c) vstore<T, NX>(out + c * oplane + x0, acc[c]);
  }
  return x0;
}

// Whole row [0, xend) for NC channels: wide tiles first, then narrower ones for the tail.
template <typename T, int NC>
inline void gather_row(const T* F, const int64_t* foff, const T* X, const int64_t* xoff,
                       int64_t ntaps, int64_t xplane, T* out, int64_t oplane, int64_t xend) {
  int64_t x0 = gather_tiles<T, NC, XT>(F, foff, X, xoff, ntaps, xplane, out, oplane, 0, xend);
  if (XT > 8) x0 = gather_tiles<T, NC, (XT > 8 ? XT / 2 : 1)>(F, foff, X, xoff, ntaps, xplane, out, oplane, x0, xend);
  if (XT > 16) x0 = gather_tiles<T, NC, (XT > 16 ? XT / 4 : 1)>(F, foff, X, xoff, ntaps, xplane, out, oplane, x0, xend);
  x0 = gather_tiles<T, NC, 4>(F, foff, X, xoff, ntaps, xplane, out, oplane, x0, xend);
  gather_tiles<T, NC, 1>(F, foff, X, xoff, ntaps, xplane, out, oplane, x0, xend);
}

// A row for `nc` channels: full blocks of CB, then single channels.
template <typename T>
inline void gather_channels(int64_t nc, const T* F, const int64_t* foff, const T* X,
                            const int64_t* xoff, int64_t ntaps, int64_t xplane, T* out,
                            int64_t oplane, int64_t xend) {
  int64_t c = 0;
  for (; c + CB <= nc; c += CB)
    gather_row<T, CB>(F, foff, X + c * xplane, xoff, ntaps, xplane, out + c * oplane, oplane, xend);
  for (; c < nc; ++c)
    gather_row<T, 1>(F, foff, X + c * xplane, xoff, ntaps, xplane, out + c * oplane, oplane, xend);
}

template <typename T>
void forward(const T* x, const T* ft, T* out, const ConvShape& s, int64_t begin, int64_t end) {
  const int64_t k = s.k, kk = s.kk(), H = s.H, W = s.W, Hp = s.Hp(), Wp = s.Wp();
  const int64_t nblocks = num_blocks(s.C, CB);
  int64_t foff[225], xoff[225];  // k <= 15
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      foff[i * k + j] = (i * k + j) * W;
      xoff[i * k + j] = i * Wp + j;
    }
  for (int64_t item = begin; item < end; ++item) {
    // channel block fastest: consecutive items share one filter row (kept in cache)
    const int64_t cb = item % nblocks, y = (item / nblocks) % H, b = item / (H * nblocks);
    const int64_t c0 = cb * CB, nc = (s.C - c0) < CB ? (s.C - c0) : CB;
    const T* F = ft + (b * H + y) * kk * W;
    const T* X = x + input_offset(s, b, c0, y, 0);
    T* O = out + output_offset(s, b, c0, y, 0);
    gather_channels<T>(nc, F, foff, X, xoff, kk, Hp * Wp, O, H * W, W);
  }
}

template <typename T>
void grad_input(const T* gp, const T* ftp, T* gi, const ConvShape& s, int64_t begin, int64_t end) {
  // gi[c][Y][X] = sum_{i valid, j} ftp[Y-i][t][X + k-1-j] * gp[c][Y-i][X + k-1-j]
  const int64_t k = s.k, kk = s.kk(), H = s.H, W = s.W, Hp = s.Hp(), Wp = s.Wp();
  const int64_t Wg = W + 2 * (k - 1);
  const int64_t nblocks = num_blocks(s.C, CB);
  int64_t foff[225], xoff[225];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t cb = item % nblocks, Y = (item / nblocks) % Hp, b = item / (Hp * nblocks);
    const int64_t c0 = cb * CB, nc = (s.C - c0) < CB ? (s.C - c0) : CB;
    const int64_t i0 = first_tap(Y, H), i1 = last_tap(Y, k);
    int64_t n = 0;
    for (int64_t i = i0; i <= i1; ++i)
      for (int64_t j = 0; j < k; ++j, ++n) {
        foff[n] = ((Y - i) * kk + i * k + j) * Wg + (k - 1 - j);
        xoff[n] = (Y - i) * Wg + (k - 1 - j);
      }
    const T* F = ftp + b * H * kk * Wg;
    const T* G = gp + (b * s.C + c0) * H * Wg;
    T* O = gi + input_offset(s, b, c0, Y, 0);
    gather_channels<T>(nc, F, foff, G, xoff, n, H * Wg, O, Hp * Wp, Wp);
  }
}

// acc[t][v] (+)= sum_{c < nc} G[c * gplane + x0 + v] * X[c * xplane + xoff[t] + x0 + v]
template <typename T, int NT, int NX>
inline int64_t tap_tiles(const T* __restrict G, const T* __restrict X, const int64_t* xoff,
                         int64_t nc, int64_t gplane, int64_t xplane, T* __restrict acc_row,
                         int64_t W, bool first, int64_t x0) {
  typedef typename Vec<T, NX>::type V;
  int64_t off[NT];
  for (int t = 0; t < NT; ++t) off[t] = xoff[t];
  for (; x0 + NX <= W; x0 += NX) {
    V acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = first ? V{} : vload<T, NX>(acc_row + t * W + x0);
    for (int64_t c = 0; c < nc; ++c) {
      const V gv = vload<T, NX>(G + c * gplane + x0);
      const T* xv = X + c * xplane + x0;
      for (int t = 0; t < NT; ++t) acc[t] += gv * vload<T, NX>(xv + off[t]);
    }
    for (int t = 0; t < NT; ++t) vstore<T, NX>(acc_row + t * W + x0, acc[t]);
  }
  return x0;
}

template <typename T, int NT>
inline void tap_row(const T* G, const T* X, const int64_t* xoff, int64_t nc, int64_t gplane,
                    int64_t xplane, T* acc_row, int64_t W, bool first) {
  int64_t x0 = tap_tiles<T, NT, XT>(G, X, xoff, nc, gplane, xplane, acc_row, W, first, 0);
  if (XT > 8) x0 = tap_tiles<T, NT, (XT > 8 ? XT / 2 : 1)>(G, X, xoff, nc, gplane, xplane, acc_row, W, first, x0);
  x0 = tap_tiles<T, NT, 4>(G, X, xoff, nc, gplane, xplane, acc_row, W, first, x0);
  tap_tiles<T, NT, 1>(G, X, xoff, nc, gplane, xplane, acc_row, W, first, x0);
}

template <typename T>
void grad_filters(const T* g, const T* x, T* gft, const ConvShape& s, int64_t begin, int64_t end) {
  // gft[b][y][t][x] = sum_c g[b][c][y][x] * x[b][c][y + i][x + j]
  const int64_t k = s.k, kk = s.kk(), H = s.H, W = s.W, Hp = s.Hp(), Wp = s.Wp();
  int64_t xoff[225];
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) xoff[i * k + j] = i * Wp + j;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t y = item % H, b = item / H;
    T* acc_row = gft + (b * H + y) * kk * W;
    if (s.C == 0) {
      for (int64_t n = 0; n < kk * W; ++n) acc_row[n] = T(0);
      continue;
    }
    for (int64_t c0 = 0; c0 < s.C; c0 += CC) {
      const int64_t nc = (s.C - c0) < CC ? (s.C - c0) : CC;
      const T* G = g + output_offset(s, b, c0, y, 0);
      const T* X = x + input_offset(s, b, c0, y, 0);
      const bool first = c0 == 0;
      int64_t t = 0;
      for (; t + TT <= kk; t += TT)
        tap_row<T, TT>(G, X, xoff + t, nc, H * W, Hp * Wp, acc_row + t * W, W, first);
      for (; t + 2 <= kk; t += 2)
        tap_row<T, 2>(G, X, xoff + t, nc, H * W, Hp * Wp, acc_row + t * W, W, first);
      for (; t < kk; ++t)
        tap_row<T, 1>(G, X, xoff + t, nc, H * W, Hp * Wp, acc_row + t * W, W, first);
    }
  }
}

}  // namespace

const IsaKernels& kernels() {
  static const IsaKernels table{
      FA_ISA_NAME, CB,
      KernelSet<float>{&forward<float>, &grad_input<float>, &grad_filters<float>},
      KernelSet<double>{&forward<double>, &grad_input<double>, &grad_filters<double>}};
  return table;
}

}  // namespace FA_ISA
}  // namespace cpu
}  // namespace featup_adapters
