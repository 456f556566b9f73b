// The filters of one JBU stage for inference (stage_filters_cpu.cpp drives it), compiled once per
// instruction set from kernels_impl.h like the other kernels. No headers.
//
// For each output pixel p (row y, column x) of image b, with k = 2r + 1, kk = k * k taps t = (i, j):
//   z_t     = temp * <q_pad[:, y + i, x + j], q_pad[:, y + r, x + r]> + log_s[t]
//   K_t     = exp(z_t - max z) / sum_t exp(z_t - max z)                 (the range x spatial kernel)
//   h_u     = gelu(b0[u] + sum_t w0[u][t] K_t + sum_g w0[u][kk + g] guide[g][p])   (u < kk)
//   out[p]_t = K_t + 0.1 * (b3[t] + sum_u w3[t][u] h_u)
// i.e. the range logits, one softmax for the normalized kernel, and FeatUp's fixup MLP (eval
// mode: no dropout), for a strip of PX = 2 vectors of consecutive pixels at a time, held
// tap-major ([t][pixel]) in a scratch tile that stays in L1, so every step is a vector loop over
// the strip's pixels with the weights broadcast. The full-size logits, softmax temporaries and
// hidden layer of the step-by-step form are never written to memory.
#ifndef FA_ISA
#error "include stage_filters_impl.h from kernels_impl.h"
#endif

template <typename T>
constexpr int filter_lanes() { return int(FA_VEC_BYTES / sizeof(T)) > 0 ? int(FA_VEC_BYTES / sizeof(T)) : 1; }

template <typename T, int N>
inline typename Vec<T, N>::type splat(T v) {
  typename Vec<T, N>::type r = {};
  return r + v;
}

// exp per lane. float: Cody-Waite reduction to |f| <= ln2 / 2 and a degree-6 Taylor polynomial
// (relative error below 1e-7), inputs clamped to [-87.3, 88.3] (NaN passes through); double:
// the C library's exp per lane.
template <typename T, int N>
inline typename Vec<T, N>::type vexp(typename Vec<T, N>::type x) {
  using V = typename Vec<T, N>::type;
  if constexpr (sizeof(T) == 4) {
    using VI = typename Vec<int32_t, N>::type;
    const V lo = splat<T, N>(-87.3f), hi = splat<T, N>(88.3f);
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    const V magic = splat<T, N>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const V nf = (x * 1.44269504088896341f + magic) - magic;
    const V f = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
    V p = splat<T, N>(1.0f / 720);
    p = p * f + 1.0f / 120;
    p = p * f + 1.0f / 24;
    p = p * f + 1.0f / 6;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const VI n = __builtin_convertvector(nf, VI);
    const VI bits = (n + 127) << 23;
    V scale;
    __builtin_memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
  } else {
    V r;
    for (int l = 0; l < N; ++l) r[l] = __builtin_exp(x[l]);
    return r;
  }
}

// The exact GELU, 0.5 x (1 + erf(x / sqrt 2)), per lane. float: erf from Abramowitz & Stegun
// 7.1.26 (absolute error at most 1.5e-7); double: the C library's erf.
template <typename T, int N>
inline typename Vec<T, N>::type vgelu(typename Vec<T, N>::type x) {
  using V = typename Vec<T, N>::type;
  const V u = x * T(0.70710678118654752440);
  if constexpr (sizeof(T) == 4) {
    const V zero = {};
    const V a = u < zero ? -u : u;
    const V t = 1.0f / (1.0f + 0.3275911f * a);
    V p = splat<T, N>(1.061405429f);
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    const V e = 1.0f - p * t * vexp<T, N>(-(a * a));   // erf(|u|)
    const V erf = u < zero ? -e : e;
    return 0.5f * x * (1.0f + erf);
  } else {
    V r;
    for (int l = 0; l < N; ++l) r[l] = T(0.5) * x[l] * (T(1) + __builtin_erf(u[l]));
    return r;
  }
}

// L[(i k + j)][p] = sum_c q[c][i][j + p] * q[c][r][r + p] for the strip's 2N pixels p; q points at
// the strip's top-left padded pixel of channel 0, rows `row` apart, channels `plane` apart.
template <typename T, int N, int KT>
inline void logits_strip(const T* __restrict q, int64_t row, int64_t plane, int64_t K, T* __restrict L) {
  using V = typename Vec<T, N>::type;
  constexpr int R = KT / 2, PX = 2 * N;
  for (int i = 0; i < KT; ++i) {
    V a0[KT], a1[KT];
    for (int j = 0; j < KT; ++j) a0[j] = a1[j] = V{};
    for (int64_t c = 0; c < K; ++c) {
      const T* qc = q + c * plane;
      V c0 = vload<T, N>(qc + R * row + R), c1 = vload<T, N>(qc + R * row + R + N);
      keep_in_register<true>(c0);
      keep_in_register<true>(c1);
      const T* qi = qc + i * row;
      for (int j = 0; j < KT; ++j) {
        a0[j] += vload<T, N>(qi + j) * c0;
        a1[j] += vload<T, N>(qi + j + N) * c1;
      }
    }
    for (int j = 0; j < KT; ++j) {
      vstore<T, N>(L + (i * KT + j) * PX, a0[j]);
      vstore<T, N>(L + (i * KT + j) * PX + N, a1[j]);
    }
  }
}

template <typename T, int N>
inline void logits_strip_k(int k, const T* q, int64_t row, int64_t plane, int64_t K, T* L) {
  switch (k) {
    case 1: return logits_strip<T, N, 1>(q, row, plane, K, L);
    case 3: return logits_strip<T, N, 3>(q, row, plane, K, L);
    case 5: return logits_strip<T, N, 5>(q, row, plane, K, L);
    case 7: return logits_strip<T, N, 7>(q, row, plane, K, L);
    case 9: return logits_strip<T, N, 9>(q, row, plane, K, L);
    case 11: return logits_strip<T, N, 11>(q, row, plane, K, L);
    case 13: return logits_strip<T, N, 13>(q, row, plane, K, L);
    default: return logits_strip<T, N, 15>(q, row, plane, K, L);
  }
}

// out[u][p] for u in [u0, u0 + JB): MODE 0: gelu(b[u] + sum_t w[u][t] in[t][p]) (t < nin);
// MODE 1: K[u][p] + 0.1 (b[u] + sum_t w[u][t] in[t][p]); MODE 2: b[u] + sum_t w[u][t] in[t][p].
// Tiles are [row][2N]; MODE 2 writes its rows `ostride` apart (out[u * ostride + p]).
template <typename T, int N, int JB, int MODE>
inline void mlp_block(const T* __restrict in, int64_t nin, const T* __restrict w, const T* b, int64_t u0,
                      const T* __restrict K, T* __restrict out, int64_t ostride = 2 * N) {
  using V = typename Vec<T, N>::type;
  constexpr int PX = 2 * N;
  V a0[JB], a1[JB];
  for (int u = 0; u < JB; ++u) a0[u] = a1[u] = splat<T, N>(b ? b[u0 + u] : T(0));
  const T* wu = w + u0 * nin;
  for (int64_t t = 0; t < nin; ++t) {
    V x0 = vload<T, N>(in + t * PX), x1 = vload<T, N>(in + t * PX + N);
    keep_in_register<true>(x0);
    keep_in_register<true>(x1);
    for (int u = 0; u < JB; ++u) {
      const T wv = wu[u * nin + t];
      a0[u] += x0 * wv;
      a1[u] += x1 * wv;
    }
  }
  for (int u = 0; u < JB; ++u) {
    T* o = out + (u0 + u) * ostride;
    if constexpr (MODE == 2) {
      vstore<T, N>(o, a0[u]);
      vstore<T, N>(o + N, a1[u]);
    } else if constexpr (MODE == 0) {
      vstore<T, N>(o, vgelu<T, N>(a0[u]));
      vstore<T, N>(o + N, vgelu<T, N>(a1[u]));
    } else {
      const T* kr = K + (u0 + u) * PX;
      vstore<T, N>(o, vload<T, N>(kr) + a0[u] * T(0.1));
      vstore<T, N>(o + N, vload<T, N>(kr + N) + a1[u] * T(0.1));
    }
  }
}

template <typename T, int N, int MODE>
inline void mlp(const T* in, int64_t nin, const T* w, const T* b, int64_t nout, const T* K, T* out,
                int64_t ostride = 2 * N) {
  constexpr int JB = 6;
  int64_t u = 0;
  for (; u + JB <= nout; u += JB) mlp_block<T, N, JB, MODE>(in, nin, w, b, u, K, out, ostride);
  for (; u < nout; ++u) mlp_block<T, N, 1, MODE>(in, nin, w, b, u, K, out, ostride);
}

// Rows [begin, end) of the (b, y) rows of the output, in strips of 2N pixels.
template <typename T>
void stage_filters(const StageFilterArgs<T>& a, int64_t begin, int64_t end) {
  constexpr int N = filter_lanes<T>(), PX = 2 * N;
  using V = typename Vec<T, N>::type;
  const int64_t r = a.r, k = 2 * r + 1, kk = k * k, H = a.H, W = a.W, K = a.K, G = a.G;
  const int64_t Hp = H + 2 * r, Wp = W + 2 * r, nin = kk + G, lw = PX + 2 * r;
  T* scratch = new T[(nin + 2 * kk) * PX + K * k * lw];
  T* Kt = scratch;               // [nin][PX]: logits -> kernel (rows < kk), guidance (rows >= kk)
  T* Ht = Kt + nin * PX;         // [kk][PX]: hidden layer
  T* Ot = Ht + kk * PX;          // [kk][PX]: result
  T* local = Ot + kk * PX;       // [K][k][PX + 2r]: a partial strip's padded rows, zero-filled
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / H, y = item % H;
    const T* qrow = a.q_pad + (b * K * Hp + y) * Wp;        // channel 0, padded row y
    for (int64_t x0 = 0; x0 < W; x0 += PX) {
      const int64_t n = W - x0 < PX ? W - x0 : PX;
      if (n == PX) {
        logits_strip_k<T, N>(int(k), qrow + x0, Wp, Hp * Wp, K, Kt);
      } else {  // reads would pass the row's end: copy the strip's rows, zero-padded
        for (int64_t c = 0; c < K; ++c)
          for (int64_t i = 0; i < k; ++i) {
            const T* src = qrow + c * Hp * Wp + i * Wp + x0;
            T* dst = local + (c * k + i) * lw;
            for (int64_t p = 0; p < lw; ++p) dst[p] = p < n + 2 * r ? src[p] : T(0);
          }
        logits_strip_k<T, N>(int(k), local, lw, k * lw, K, Kt);
      }
      // softmax over the taps of temp * logits + log_s, per pixel (lane)
      for (int h = 0; h < 2; ++h) {
        T* L = Kt + h * N;
        V m = splat<T, N>(-__builtin_inf());
        for (int64_t t = 0; t < kk; ++t) {
          const V z = vload<T, N>(L + t * PX) * a.temp + a.log_s[t];
          vstore<T, N>(L + t * PX, z);
          m = z > m ? z : m;
          m = z != z ? z : m;   // a NaN logit makes the pixel's kernel NaN, as torch's max does
        }
        V s = {};
        for (int64_t t = 0; t < kk; ++t) {
          const V e = vexp<T, N>(vload<T, N>(L + t * PX) - m);
          vstore<T, N>(L + t * PX, e);
          s += e;
        }
        for (int64_t t = 0; t < kk; ++t) vstore<T, N>(L + t * PX, vload<T, N>(L + t * PX) / s);
      }
      for (int64_t g = 0; g < G; ++g) {  // the guidance rows of the MLP's input
        const T* src = a.guide + ((b * G + g) * H + y) * W + x0;
        T* dst = Kt + (kk + g) * PX;
        for (int64_t p = 0; p < PX; ++p) dst[p] = p < n ? src[p] : T(0);
      }
      mlp<T, N, 0>(Kt, nin, a.w0, a.b0, kk, nullptr, Ht);
      mlp<T, N, 1>(Ht, kk, a.w3, a.b3, kk, Kt, Ot);
      T* dst = a.out + ((b * H + y) * W + x0) * kk;
      for (int64_t p = 0; p < n; ++p)
        for (int64_t t = 0; t < kk; ++t) dst[p * kk + t] = Ot[t * PX + p];
    }
  }
  delete[] scratch;
}

// The keys of one stage, FeatUp's range_proj in eval mode, written into the interior of the padded
// map (stage_filters_cpu.cpp fills the border): for the (b, y) rows [begin, end),
//   q_pad[b][v][y + r][x + r] = b2[v] + sum_u w2[v][u] gelu(b1[u] + sum_g w1[u][g] guide[b][g][y][x])
template <typename T>
void stage_keys(const StageKeyArgs<T>& a, int64_t begin, int64_t end) {
  constexpr int N = filter_lanes<T>(), PX = 2 * N;
  const int64_t r = a.r, H = a.H, W = a.W, K = a.K, G = a.G, Hp = H + 2 * r, Wp = W + 2 * r;
  T* scratch = new T[(G + K + K) * PX];
  T* Gt = scratch;              // [G][PX] guidance
  T* Ht = Gt + G * PX;          // [K][PX] hidden layer
  T* Qt = Ht + K * PX;          // [K][PX] keys of a partial strip
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / H, y = item % H;
    T* qrow = a.q_pad + (b * K * Hp + y + r) * Wp + r;   // channel 0, interior of padded row y + r
    for (int64_t x0 = 0; x0 < W; x0 += PX) {
      const int64_t n = W - x0 < PX ? W - x0 : PX;
      for (int64_t g = 0; g < G; ++g) {
        const T* src = a.guide + ((b * G + g) * H + y) * W + x0;
        for (int64_t p = 0; p < PX; ++p) Gt[g * PX + p] = p < n ? src[p] : T(0);
      }
      mlp<T, N, 0>(Gt, G, a.w1, a.b1, K, nullptr, Ht);
      if (n == PX) {
        mlp<T, N, 2>(Ht, K, a.w2, a.b2, K, nullptr, qrow + x0, Hp * Wp);
      } else {
        mlp<T, N, 2>(Ht, K, a.w2, a.b2, K, nullptr, Qt);
        for (int64_t v = 0; v < K; ++v)
          for (int64_t p = 0; p < n; ++p) qrow[v * Hp * Wp + x0 + p] = Qt[v * PX + p];
      }
    }
  }
  delete[] scratch;
}
