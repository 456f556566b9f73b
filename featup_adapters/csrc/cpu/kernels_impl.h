// The CPU kernels, written once and compiled once per instruction set (kernels_<isa>.cpp set
// FA_ISA, the tile sizes and `#pragma GCC target` before including this file). Include no
// headers here: anything included would be compiled for the target ISA and could leak into
// generic code through the one-definition rule.
//
// How it is fast: every kernel is a register-tiled gather. A tile holds two output rows x CB
// channels x XT consecutive pixels (or two rows x up to TT taps x XT pixels for grad_filters) of
// accumulators in vector registers. Each filter (or grad_output) vector is loaded once and reused
// across the tile's channels (taps), and each input vector loaded feeds both output rows. Work
// items are independent pairs of rows, so there are no atomics and no reductions across threads.
#ifndef FA_ISA
#error "define FA_ISA (and the tile sizes) before including kernels_impl.h"
#endif

namespace featup_adapters {
namespace cpu {
namespace FA_ISA {
namespace {

constexpr int CB = FA_CB;   // channels per forward / grad_input tile
constexpr int XT = FA_XT;   // pixels per tile (a multiple of the vector width)
constexpr int TT = FA_TT;   // at most this many taps per grad_filters tile
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

// ---- forward and grad_input: a gather producing two output rows per tile ----
//
// Both are a sum over "source rows" (input rows for forward, grad_output rows for grad_input),
// each feeding output row 0 and/or row 1 of the pair with its own filter row:
//   out_q[c][x] += sum_j F[f_q + j * fj + x] * X[c * xplane + xs + j * xj + x]
// One load of X serves both output rows, so a tile does 0.7 loads per FMA instead of 1.2
// (2 x NC accumulators). The source rows and filters of the next tiles are prefetched PF bytes
// ahead: a tile reads (k + 1) x NC source rows and 2k filter rows, more streams than the
// hardware prefetchers follow (at 224x224, C=384, k=7 this took the forward from 22 to 15 ms).
constexpr int64_t PF = FA_PF_BYTES;
#ifndef FA_VEC_BYTES
#define FA_VEC_BYTES 16  // the widest vector register of the target ISA
#endif

// A vector loaded once that feeds two FMAs (ON): without this GCC folds the load into each FMA
// as a memory operand and reads the (usually line-splitting) vector twice. Only for vectors
// that fit one register of the target ISA.
template <bool ON, typename V>
inline void keep_in_register(V& v) {
#if defined(__x86_64__)
  if constexpr (ON && sizeof(V) >= 16 && sizeof(V) <= FA_VEC_BYTES) __asm__("" : "+x"(v));
#endif
  (void)v;
}

// One source row of a pair: its offset in X and its filter rows for output rows 0 and 1
// (-1: the source row does not feed that output row).
struct SourceRow { int64_t x, f0, f1; };

// Where the filter of pixel x lies in a row's filters: pixels in blocks of XT (a full tile's
// width), each block `block_stride` elements after the previous one and holding its taps XT
// apart, so a tile's filter reads are one sequential stream.
struct FilterLayout {
  int64_t block_stride;
  int64_t offset(int64_t x) const { return (x / XT) * block_stride + x % XT; }
};

// The k taps j of one source row, accumulated into row 0 (USE0) and/or row 1 (USE1).
template <typename T, int NC, int NX, bool USE0, bool USE1>
inline void pair_step(typename Vec<T, NX>::type (&a0)[NC], typename Vec<T, NX>::type (&a1)[NC],
                      const T* F0, const T* F1, const T* __restrict xv, int64_t k, int64_t fj,
                      int64_t xj, int64_t xplane) {
  typedef typename Vec<T, NX>::type V;
  for (int64_t j = 0; j < k; ++j, F0 += fj, F1 += fj, xv += xj) {
    V f0 = V{}, f1 = V{};
    if (USE0) {
      f0 = vload<T, NX>(F0);
      __builtin_prefetch(F0 + PF / sizeof(T), 0, 3);
    }
    if (USE1) {
      f1 = vload<T, NX>(F1);
      __builtin_prefetch(F1 + PF / sizeof(T), 0, 3);
    }
    for (int c = 0; c < NC; ++c) {
      V xx = vload<T, NX>(xv + c * xplane);
      keep_in_register<USE0 && USE1>(xx);
      if (USE0) a0[c] += f0 * xx;
      if (USE1) a1[c] += f1 * xx;
    }
  }
}

// Pixels [x0, xend) in tiles of NX for NC channels; out row 1 lies `orow` after row 0 and is
// stored only if `two`. Returns the first x0 not done. PARTIAL: also the last, partial tile,
// computed in full (its filter and source vectors must be readable past xend: padded buffers)
// and stored up to xend.
template <typename T, int NC, int NX, bool PARTIAL = false>
inline int64_t pair_tiles(const T* __restrict F, const T* __restrict X, const SourceRow* rows,
                          int64_t nrows, int64_t k, const FilterLayout& fl, int64_t xj, int64_t xplane,
                          T* __restrict out, int64_t oplane, int64_t orow, bool two, int64_t x0,
                          int64_t xend, const T* bias) {
  typedef typename Vec<T, NX>::type V;
  for (; PARTIAL ? x0 < xend : x0 + NX <= xend; x0 += NX) {
    V a0[NC], a1[NC];
    for (int c = 0; c < NC; ++c) a0[c] = a1[c] = V{};
    const int64_t fx = fl.offset(x0), fj = XT;
    for (int64_t n = 0; n < nrows; ++n) {
      const SourceRow& r = rows[n];
      const T* xv = X + r.x + x0;
      for (int c = 0; c < NC; ++c) __builtin_prefetch(xv + c * xplane + PF / sizeof(T), 0, 3);
      const T* F0 = F + (r.f0 >= 0 ? r.f0 : 0) + fx;
      const T* F1 = F + (r.f1 >= 0 ? r.f1 : 0) + fx;
      if (r.f0 >= 0 && r.f1 >= 0)
        pair_step<T, NC, NX, true, true>(a0, a1, F0, F1, xv, k, fj, xj, xplane);
      else if (r.f0 >= 0)
        pair_step<T, NC, NX, true, false>(a0, a1, F0, F1, xv, k, fj, xj, xplane);
      else
        pair_step<T, NC, NX, false, true>(a0, a1, F0, F1, xv, k, fj, xj, xplane);
    }
    if (bias)
      for (int c = 0; c < NC; ++c) {
        a0[c] += bias[c];
        a1[c] += bias[c];
      }
    if (PARTIAL && x0 + NX > xend) {
      const int64_t bytes = (xend - x0) * sizeof(T);
      for (int c = 0; c < NC; ++c) {
        __builtin_memcpy(out + c * oplane + x0, &a0[c], bytes);
        if (two) __builtin_memcpy(out + c * oplane + orow + x0, &a1[c], bytes);
      }
      continue;
    }
    for (int c = 0; c < NC; ++c) {
      vstore<T, NX>(out + c * oplane + x0, a0[c]);
      if (two) vstore<T, NX>(out + c * oplane + orow + x0, a1[c]);
    }
  }
  return x0;
}

// Whole rows [0, width) for NC channels: wide tiles first, then narrower ones for the tail
// (PADDED: the tail as one partial wide tile; see pair_tiles). `bias`: null, or NC values added
// to the channels' results.
template <typename T, int NC, bool PADDED>
inline void pair_row(const T* F, const T* X, const SourceRow* rows, int64_t nrows, int64_t k,
                     const FilterLayout& fl, int64_t xj, int64_t xplane, T* out, int64_t oplane, int64_t orow,
                     bool two, int64_t width, const T* bias) {
  if (PADDED) {
    pair_tiles<T, NC, XT, true>(F, X, rows, nrows, k, fl, xj, xplane, out, oplane, orow, two, 0, width, bias);
    return;
  }
  int64_t x0 = pair_tiles<T, NC, XT>(F, X, rows, nrows, k, fl, xj, xplane, out, oplane, orow, two, 0, width, bias);
  if (XT > 8) x0 = pair_tiles<T, NC, (XT > 8 ? XT / 2 : 1)>(F, X, rows, nrows, k, fl, xj, xplane, out, oplane, orow, two, x0, width, bias);
  if (XT > 16) x0 = pair_tiles<T, NC, (XT > 16 ? XT / 4 : 1)>(F, X, rows, nrows, k, fl, xj, xplane, out, oplane, orow, two, x0, width, bias);
  x0 = pair_tiles<T, NC, 4>(F, X, rows, nrows, k, fl, xj, xplane, out, oplane, orow, two, x0, width, bias);
  pair_tiles<T, NC, 1>(F, X, rows, nrows, k, fl, xj, xplane, out, oplane, orow, two, x0, width, bias);
}

// `nc` channels of a pair (channel c at X + c * xplane, out + c * oplane): tiles of NC channels,
// then single channels. double vectors are twice as wide, so they get half the channels per
// tile to keep the 2 x NC accumulators in registers. PADDED: see pair_row.
template <typename T, bool PADDED = false>
inline void pair_channels(int64_t nc, const T* F, const T* X, const SourceRow* rows, int64_t nrows,
                          int64_t k, const FilterLayout& fl, int64_t xj, int64_t xplane, T* out,
                          int64_t oplane, int64_t orow, bool two, int64_t width,
                          const T* bias = nullptr) {
  constexpr int NC = sizeof(T) > 4 ? CB / 2 : CB;
  int64_t c = 0;
  for (; c + NC <= nc; c += NC)
    pair_row<T, NC, PADDED>(F, X + c * xplane, rows, nrows, k, fl, xj, xplane, out + c * oplane, oplane, orow, two, width,
                    bias ? bias + c : nullptr);
  for (; c < nc; ++c)
    pair_row<T, 1, PADDED>(F, X + c * xplane, rows, nrows, k, fl, xj, xplane, out + c * oplane, oplane, orow, two, width,
                   bias ? bias + c : nullptr);
}

// filters[b][y][x][t] for x in [xs, xs + width) -> ft[(x - xs) / XT][q][t][(x - xs) % XT] (as
// FilterLayout reads it) for `rows` consecutive output rows starting at (b, y); row q's taps
// start q * k * k * XT into a block.
template <typename T>
inline void block_rows(const T* filters, const ConvShape& s, int64_t b, int64_t y, int64_t rows,
                       int64_t xs, int64_t width, T* ft, const FilterLayout& fl) {
  const int64_t kk = s.kk();
  for (int64_t q = 0; q < rows; ++q) {
    const T* src = filters + filter_offset(s, b, y + q, xs, 0);
    for (int64_t x0 = 0; x0 < width; x0 += XT) {
      const int64_t x1 = x0 + XT < width ? x0 + XT : width;
      T* dst = ft + (x0 / XT) * fl.block_stride + q * kk * XT;
      for (int64_t t = 0; t < kk; ++t)
        for (int64_t xx = x0; xx < x1; ++xx) dst[t * XT + xx - x0] = src[xx * kk + t];
    }
  }
}

// The first 64-byte aligned address in `raw` (allocate 64 / sizeof(T) extra elements).
template <typename T>
inline T* align64(T* raw) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(raw) + 63) & ~uintptr_t(63));
}

// An item of a kernel that takes row pairs in bands of P (forward, grad_input): its batch b,
// its band's first pair and number of pairs np (the last band may be short), and `rest`, its
// index inside the band, in [0, np * per_pair) for items of `per_pair` per pair.
struct BandItem { int64_t b, first, np, rest; };
inline BandItem band_item(int64_t item, int64_t npairs, int64_t P, int64_t per_pair) {
  const int64_t idx = item % (npairs * per_pair), first = idx / (P * per_pair) * P;
  return BandItem{item / (npairs * per_pair), first, npairs - first < P ? npairs - first : P,
                  idx % (P * per_pair)};
}

// Pairs of output rows per band of the forward: as many as keep the band's filters for one
// column strip (laid out as block_rows does) within about 1 MiB of L2, at most 16.
inline int64_t forward_band(const ConvShape& s, int64_t elem_bytes) {
  const int64_t pair_bytes = 2 * s.kk() * num_blocks(forward_strip_width(s), XT) * XT * elem_bytes;
  const int64_t p = (int64_t(1) << 20) / (pair_bytes > 0 ? pair_bytes : 1);
  return p < 1 ? 1 : (p > 16 ? 16 : p);
}

template <typename T>
void forward(const T* x, const T* filters, T* out, const OutLayout<T>& o, const ConvShape& s,
             int64_t begin, int64_t end) {
  // out[c][y + q][x] = sum_{i, j} ft[q][i * k + j][x] * x[c][y + q + i][x + j]: source row r
  // (input row y + r) is tap row r of output row y and tap row r - 1 of output row y + 1.
  //
  // Items run over bands of P pairs, column strips (forward_strip_width), and within a band and
  // strip over channel blocks, the pairs of a block fastest: consecutive items read the same
  // channels' input rows 2 rows apart, so 6 of a pair's k + 1 = 8 input rows are still in L2
  // from the pair before (pairs taken one at a time over all channels re-read every input row
  // 4 times from L3 or memory). The band's filters for the strip are laid out once per thread
  // and stay in L2 for all its channel blocks; the strips keep both bounded at any width.
  const int64_t k = s.k, kk = s.kk(), H = s.H, W = s.W, Hp = s.Hp(), Wp = s.Wp();
  const int64_t nblocks = num_blocks(s.C, CB), npairs = num_blocks(H, 2);
  const int64_t P = forward_band(s, sizeof(T)), sw = forward_strip_width(s), nstrips = forward_strips(s);
  SourceRow rows[16];  // k + 1 <= 16
  // Each pair's filters for a strip in blocks of XT pixels, [x / XT][q][tap][x % XT]: a
  // full-width tile reads its 2 k^2 filter vectors from one contiguous, 64-byte aligned run of
  // memory (one stream for the prefetchers, instead of 2 k^2 rows).
  const FilterLayout fl{2 * kk * XT};
  const int64_t pair_elems = num_blocks(sw, XT) * fl.block_stride;
  T* ft_raw = new T[P * pair_elems + 64 / sizeof(T)];
  T* ft = align64(ft_raw);
  int64_t cached = -1;  // the (batch, band, strip) whose filters ft holds
  for (int64_t item = begin; item < end; ++item) {
    const auto [b, first, np, in_band] = band_item(item, npairs, P, nstrips * nblocks);
    const int64_t strip = in_band / (np * nblocks), rem = in_band % (np * nblocks);
    const int64_t cb = rem / np, p = rem % np, y = 2 * (first + p);
    const int64_t xs = strip * sw, width = W - xs < sw ? W - xs : sw;
    const bool two = y + 1 < H;
    const int64_t key = (b * npairs + first) * nstrips + strip;
    if (key != cached) {
      for (int64_t q = 0; q < np; ++q) {
        const int64_t yq = 2 * (first + q);
        block_rows(filters, s, b, yq, yq + 1 < H ? 2 : 1, xs, width, ft + q * pair_elems, fl);
      }
      cached = key;
    }
    int64_t nrows = 0;
    for (int64_t r = 0; r <= k; ++r) {
      const int64_t f0 = r < k ? r * k * XT : -1, f1 = two && r >= 1 ? (kk + (r - 1) * k) * XT : -1;
      if (f0 >= 0 || f1 >= 0) rows[nrows++] = SourceRow{r * Wp, f0, f1};
    }
    const int64_t c0 = cb * CB, nc = (s.C - c0) < CB ? (s.C - c0) : CB;
    pair_channels<T>(nc, ft + p * pair_elems, x + input_offset(s, b, c0, y, xs), rows, nrows, k, fl, 1,
                     Hp * Wp, out + b * o.batch + c0 * o.plane + y * W + xs, o.plane, W, two, width,
                     o.bias ? o.bias + c0 : nullptr);
  }
  delete[] ft_raw;
}

// filters[b][p][X - j][i * k + j] -> ft[X / XT][i * k + j][X % XT] for gi columns X in [0, Wp)
// (zero where X - j is outside [0, W)): one grad_out row p's filters, shifted per tap so that a
// tile of gi columns reads all its k * k filter vectors at the same x, from one block.
// Two passes through `tr` (shifted_scratch elements): the row transposed to tap-major,
// tr[t][k - 1 + x] = filters[b][p][x][t] with zeros around, in chunks of XT pixels whose taps
// lie in L1; then each block's tap t is the XT consecutive values of tr[t] starting at X0 - j.
// (One strided gather per element, read straight from the row, cost about 1.4 ms a call at
// 224 x 224: most of a call with few channels.)
inline int64_t shifted_scratch_width(const ConvShape& s) { return num_blocks(s.Wp(), XT) * XT + s.k - 1; }
inline int64_t shifted_scratch(const ConvShape& s) { return s.kk() * shifted_scratch_width(s); }

template <typename T>
inline void shifted_blocks(const T* filters, const ConvShape& s, int64_t b, int64_t p, T* ft, T* tr) {
  const int64_t k = s.k, kk = s.kk(), W = s.W, Wp = s.Wp(), tw = shifted_scratch_width(s);
  const T* src = filters + filter_offset(s, b, p, 0, 0);
  for (int64_t t = 0; t < kk; ++t) {
    T* row = tr + t * tw;
    for (int64_t x = 0; x < k - 1; ++x) row[x] = T(0);
    for (int64_t x = k - 1 + W; x < tw; ++x) row[x] = T(0);
  }
  for (int64_t x0 = 0; x0 < W; x0 += XT) {
    const int64_t n = W - x0 < XT ? W - x0 : XT;
    const T* chunk = src + x0 * kk;
    for (int64_t t = 0; t < kk; ++t) {
      T* row = tr + t * tw + k - 1 + x0;
      for (int64_t xx = 0; xx < n; ++xx) row[xx] = chunk[xx * kk + t];
    }
  }
  for (int64_t X0 = 0; X0 < Wp; X0 += XT) {
    T* dst = ft + (X0 / XT) * kk * XT;
    for (int64_t t = 0; t < kk; ++t)
      __builtin_memcpy(dst + t * XT, tr + t * tw + (k - 1) + X0 - t % k, XT * sizeof(T));
  }
}

// Pairs of gi rows per band of grad_input: as many as keep the band's 2P + k - 1 filter rows
// (k * k * Wp values each, as shifted_blocks lays them out) within about 1 MiB of L2, at most 16.
inline int64_t grad_input_band(const ConvShape& s, int64_t elem_bytes) {
  const int64_t row_bytes = s.kk() * num_blocks(s.Wp(), XT) * XT * elem_bytes;
  const int64_t p = ((int64_t(1) << 20) / (row_bytes > 0 ? row_bytes : 1) - (s.k - 1)) / 2;
  return p < 1 ? 1 : (p > 16 ? 16 : p);
}

template <typename T>
void grad_input(const T* g, const T* filters, T* gi, const ConvShape& s, int64_t begin, int64_t end) {
  // gi[c][Y][X] = sum_{p, j} filters[p][X - j][(Y - p) * k + j] * g[c][p][X - j] over the taps
  // with 0 <= Y - p < k and 0 <= X - j < W: source row p (grad_out row p) feeds gi row Y with
  // tap row Y - p. The kernel reads zero-padded copies, so every tap of every column reads
  // valid memory and the tiles need no bounds checks:
  //  - filter rows p, laid out by shifted_blocks, in a ring of 2P + k - 1 rows per thread
  //    (slot p % slots): all the rows of a band of P pairs;
  //  - the grad_out rows of a channel block, padded by k - 1 zero columns on the left and to a
  //    whole number of tiles plus k - 1 on the right, in a ring of k + 1 rows of CB channels
  //    (slot p % (k + 1)).
  // Both are padded past the last gi column to whole tiles, so a row's last, partial tile runs
  // as one full-width tile (pair_row's PADDED) instead of narrower and scalar ones.
  // Items run over bands of P pairs and within a band over channel blocks, the pairs of a block
  // fastest (as in forward): the next item needs 2 new grad_out rows instead of k + 1, and its
  // other rows are still in L1 / L2; the band's filter rows are laid out once per thread.
  const int64_t k = s.k, kk = s.kk(), H = s.H, W = s.W, Hp = s.Hp(), Wp = s.Wp();
  const int64_t Wg = num_blocks(Wp, XT) * XT + k - 1, gslots = k + 1;
  const int64_t nblocks = num_blocks(s.C, CB), npairs = num_blocks(Hp, 2);
  const int64_t P = grad_input_band(s, sizeof(T)), fslots = 2 * P + k - 1;
  const FilterLayout fl{kk * XT};
  const int64_t row_elems = num_blocks(Wp, XT) * kk * XT;
  T* fring_raw = new T[fslots * row_elems + 64 / sizeof(T)];
  T* fring = align64(fring_raw);
  T* grows = new T[gslots * CB * Wg]();
  T* tr = new T[shifted_scratch(s)];
  int64_t* ftag = new int64_t[fslots];  // filter row (b * H + p) held by each slot, -1: none
  int64_t gtag[16];                     // grad_out row ((b * nblocks + cb) * H + p) per slot
  for (int64_t n = 0; n < fslots; ++n) ftag[n] = -1;
  for (int64_t n = 0; n < gslots; ++n) gtag[n] = -1;
  SourceRow rows[16];
  for (int64_t item = begin; item < end; ++item) {
    const auto [b, first, np, rem] = band_item(item, npairs, P, nblocks);
    const int64_t cb = rem / np, Y = 2 * (first + rem % np);
    const int64_t c0 = cb * CB, nc = (s.C - c0) < CB ? (s.C - c0) : CB;
    const bool two = Y + 1 < Hp;
    int64_t nrows = 0;
    for (int64_t p = Y - k + 1; p <= Y + 1; ++p) {
      if (p < 0 || p >= H) continue;
      const int64_t i0 = Y - p, i1 = Y + 1 - p, slot = p % fslots, gs = p % gslots;
      const bool f0 = i0 >= 0, f1 = two && i1 < k;
      if (!f0 && !f1) continue;
      if (ftag[slot] != b * H + p) {
        shifted_blocks(filters, s, b, p, fring + slot * row_elems, tr);
        ftag[slot] = b * H + p;
      }
      if (gtag[gs] != (b * nblocks + cb) * H + p) {
        T* gdst = grows + gs * CB * Wg + (k - 1);
        for (int64_t c = 0; c < nc; ++c)
          __builtin_memcpy(gdst + c * Wg, g + output_offset(s, b, c0 + c, p, 0), W * sizeof(T));
        gtag[gs] = (b * nblocks + cb) * H + p;
      }
      const int64_t f = slot * row_elems;
      rows[nrows++] = SourceRow{gs * CB * Wg + k - 1, f0 ? f + i0 * k * XT : -1, f1 ? f + i1 * k * XT : -1};
    }
    pair_channels<T, true>(nc, fring, grows, rows, nrows, k, fl, -1, Wg,
                     gi + input_offset(s, b, c0, Y, 0), Hp * Wp, Wp, two, Wp);
  }
  delete[] tr;
  delete[] ftag;
  delete[] grows;
  delete[] fring_raw;
}

// ---- grad_filters: per-pixel tap sums over channels, two output rows per tile ----
//
// gf[b][y][x][i * k + j] = sum_c g[b][c][y][x] * x[b][c][y + i][x + j]. Source row r (input row
// y + r) is tap row r of output row y and tap row r - 1 of row y + 1, so a tile holds NT taps
// j0 .. j0 + NT - 1 of one source row for both rows (2 x NT accumulators) and each input vector
// load feeds two FMAs. Channels are summed CC at a time so that a chunk's rows stay in L2; the
// accumulators live in a per-thread [2][k*k][W] buffer, transposed to [W][k*k] at the end.

// acc_q[t][x] (+)= sum_{c < nc} G_q[c][x] * X[c][t + x] for t < NT, q in {0 (USE0), 1 (USE1)};
// row 1 of G lies `grow` after row 0. `first`: start from zero instead of the buffer.
template <typename T, int NT, int NX, bool USE0, bool USE1>
inline int64_t tap_tiles(const T* __restrict G, int64_t gplane, int64_t grow, const T* __restrict X,
                         int64_t xplane, int64_t nc, T* __restrict A0, T* __restrict A1, int64_t W,
                         bool first, int64_t x0) {
  typedef typename Vec<T, NX>::type V;
  for (; x0 + NX <= W; x0 += NX) {
    V a0[NT], a1[NT];
    for (int t = 0; t < NT; ++t) {
      a0[t] = USE0 && !first ? vload<T, NX>(A0 + t * W + x0) : V{};
      a1[t] = USE1 && !first ? vload<T, NX>(A1 + t * W + x0) : V{};
    }
    for (int64_t c = 0; c < nc; ++c) {
      const T* gv = G + c * gplane + x0;
      const T* xv = X + c * xplane + x0;
      __builtin_prefetch(xv + PF / sizeof(T), 0, 3);
      V g0 = V{}, g1 = V{};
      if (USE0) {
        g0 = vload<T, NX>(gv);
        __builtin_prefetch(gv + PF / sizeof(T), 0, 3);
      }
      if (USE1) {
        g1 = vload<T, NX>(gv + grow);
        __builtin_prefetch(gv + grow + PF / sizeof(T), 0, 3);
      }
      for (int t = 0; t < NT; ++t) {
        V xx = vload<T, NX>(xv + t);
        keep_in_register<USE0 && USE1>(xx);
        if (USE0) a0[t] += g0 * xx;
        if (USE1) a1[t] += g1 * xx;
      }
    }
    for (int t = 0; t < NT; ++t) {
      if (USE0) vstore<T, NX>(A0 + t * W + x0, a0[t]);
      if (USE1) vstore<T, NX>(A1 + t * W + x0, a1[t]);
    }
  }
  return x0;
}

template <typename T, int NT, bool USE0, bool USE1>
inline void tap_row(const T* G, int64_t gplane, int64_t grow, const T* X, int64_t xplane, int64_t nc,
                    T* A0, T* A1, int64_t W, bool first) {
  int64_t x0 = tap_tiles<T, NT, XT, USE0, USE1>(G, gplane, grow, X, xplane, nc, A0, A1, W, first, 0);
  if (XT > 4) x0 = tap_tiles<T, NT, 4, USE0, USE1>(G, gplane, grow, X, xplane, nc, A0, A1, W, first, x0);
  tap_tiles<T, NT, 1, USE0, USE1>(G, gplane, grow, X, xplane, nc, A0, A1, W, first, x0);
}

// NT = n taps (n <= N) of one source row, for the output rows it feeds.
template <typename T, int N>
inline void tap_group(int64_t n, bool use0, bool use1, const T* G, int64_t gplane, int64_t grow,
                      const T* X, int64_t xplane, int64_t nc, T* A0, T* A1, int64_t W, bool first) {
  if (n == N) {
    if (use0 && use1) tap_row<T, N, true, true>(G, gplane, grow, X, xplane, nc, A0, A1, W, first);
    else if (use0) tap_row<T, N, true, false>(G, gplane, grow, X, xplane, nc, A0, A1, W, first);
    else tap_row<T, N, false, true>(G, gplane, grow, X, xplane, nc, A0, A1, W, first);
  } else if (N > 1) {
    tap_group<T, (N > 1 ? N - 1 : 1)>(n, use0, use1, G, gplane, grow, X, xplane, nc, A0, A1, W, first);
  }
}

template <typename T>
void grad_filters(const T* g, const T* x, T* gf, const ConvShape& s, int64_t begin, int64_t end) {
  const int64_t k = s.k, kk = s.kk(), H = s.H, W = s.W, Hp = s.Hp(), Wp = s.Wp();
  const int64_t npairs = num_blocks(H, 2);
  T* acc = new T[2 * kk * W];  // [row of the pair][tap][x]
  for (int64_t item = begin; item < end; ++item) {
    const int64_t y = 2 * (item % npairs), b = item / npairs;
    const bool two = y + 1 < H;
    const int64_t rows = two ? 2 : 1;
    if (s.C == 0)
      for (int64_t n = 0; n < rows * kk * W; ++n) acc[n] = T(0);
    for (int64_t c0 = 0; c0 < s.C; c0 += CC) {
      const int64_t nc = (s.C - c0) < CC ? (s.C - c0) : CC;
      const T* G = g + output_offset(s, b, c0, y, 0);
      for (int64_t r = 0; r <= k; ++r) {
        const bool use0 = r < k, use1 = two && r >= 1;
        if (!use0 && !use1) continue;
        const T* X = x + input_offset(s, b, c0, y + r, 0);
        T* A0 = acc + (use0 ? r * k : 0) * W;
        T* A1 = acc + (use1 ? kk + (r - 1) * k : 0) * W;
        for (int64_t j0 = 0; j0 < k; j0 += TT) {
          const int64_t n = k - j0 < TT ? k - j0 : TT;
          tap_group<T, TT>(n, use0, use1, G, H * W, W, X + j0, Hp * Wp, nc, A0 + j0 * W,
                           A1 + j0 * W, W, c0 == 0);
        }
      }
    }
    for (int64_t q = 0; q < rows; ++q) {  // [tap][x] -> [x][tap]
      T* dst = gf + filter_offset(s, b, y + q, 0, 0);
      const T* src = acc + q * kk * W;
      for (int64_t x0 = 0; x0 < W; ++x0)
        for (int64_t t = 0; t < kk; ++t) dst[x0 * kk + t] = src[t * W + x0];
    }
  }
  delete[] acc;
}

#include "resize_rows_impl.h"
#include "stage_filters_impl.h"

}  // namespace

const IsaKernels& kernels() {
  static const IsaKernels table{
      FA_ISA_NAME, CB,
      KernelSet<float>{&forward<float>, &grad_input<float>, &grad_filters<float>},
      KernelSet<double>{&forward<double>, &grad_input<double>, &grad_filters<double>},
      ResizeKernels<float>{&gather_cols<float>, &combine_rows<float>, &periodic_cols<float>},
      ResizeKernels<double>{&gather_cols<double>, &combine_rows<double>, &periodic_cols<double>},
      StageFilterKernels<float>{&stage_filters<float>, &stage_keys<float>},
      StageFilterKernels<double>{&stage_filters<double>, &stage_keys<double>}};
  return table;
}

}  // namespace FA_ISA
}  // namespace cpu
}  // namespace featup_adapters
