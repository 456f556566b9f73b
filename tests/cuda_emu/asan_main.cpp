// The emulated CUDA kernels under AddressSanitizer + UBSan: every buffer is a heap allocation of
// exactly the tensor's size, so a read or write one element outside it aborts. Each op runs in
// all four dtypes over shapes that reach the kernels' edges, and is compared with a plain double
// loop over the same (rounded) inputs. Prints one line per failure and "ok N" at the end; exits 1
// on any failure (sanitizer findings abort on their own, -fno-sanitize-recover).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda_shim.h"

extern "C" const char* fa_emu_run(int op, int dtype, const void* a, const void* b, void* out, const int64_t* shape,
                                  int64_t sms, int32_t* counts);

namespace {

struct Shape { int64_t B, C, H, W, k; };

double to_double(const std::vector<uint16_t>& v, size_t e, int dtype) {
  return dtype == 2 ? emu::half_bits_to_float(v[e]) : emu::bf16_bits_to_float(v[e]);
}

// Holds one tensor in the dtype under test and its exact double values.
struct Buf {
  int dtype;
  std::vector<float> f32;
  std::vector<double> f64;
  std::vector<uint16_t> h;
  std::vector<double> exact;
  Buf(int dt, size_t n, std::mt19937& rng) : dtype(dt), exact(n) {
    std::normal_distribution<double> nd;
    if (dt == 0) f32.resize(n); else if (dt == 1) f64.resize(n); else h.resize(n);
    for (size_t e = 0; e < n; ++e) {
      const double v = nd(rng);
      if (dt == 0) { f32[e] = static_cast<float>(v); exact[e] = f32[e]; }
      else if (dt == 1) { f64[e] = v; exact[e] = v; }
      else {
        h[e] = dt == 2 ? emu::float_to_half_bits(static_cast<float>(v)) : emu::float_to_bf16_bits(static_cast<float>(v));
        exact[e] = to_double(h, e, dt);
      }
    }
  }
  Buf(int dt, size_t n) : dtype(dt), exact(n) {  // an output
    if (dt == 0) f32.assign(n, NAN); else if (dt == 1) f64.assign(n, NAN); else h.assign(n, 0x7e00);
  }
  void* data() { return dtype == 0 ? static_cast<void*>(f32.data()) : dtype == 1 ? static_cast<void*>(f64.data()) : static_cast<void*>(h.data()); }
  double at(size_t e) const { return dtype == 0 ? f32[e] : dtype == 1 ? f64[e] : to_double(h, e, dtype); }
};

int failures = 0, checks = 0;

void compare(const char* what, const Shape& s, int dtype, const Buf& got, const std::vector<double>& ref,
             const std::vector<int32_t>& counts, double scale) {
  const double tol = dtype == 1 ? 1e-10 : dtype == 0 ? 1e-4 : dtype == 2 ? 4e-3 : 3e-2;
  for (size_t e = 0; e < ref.size(); ++e) {
    ++checks;
    if (counts[e] != 1 || !(std::fabs(got.at(e) - ref[e]) <= tol * (scale + std::fabs(ref[e])))) {
      std::printf("FAIL %s B=%lld C=%lld H=%lld W=%lld k=%lld dtype=%d element %zu: got %g want %g, written %d times\n",
                  what, (long long)s.B, (long long)s.C, (long long)s.H, (long long)s.W, (long long)s.k, dtype, e,
                  got.at(e), ref[e], counts[e]);
      ++failures;
      return;
    }
  }
}

void run_shape(const Shape& s, int dtype, int64_t sms, std::mt19937& rng) {
  const int64_t Hp = s.H + s.k - 1, Wp = s.W + s.k - 1, kk = s.k * s.k;
  const size_t nin = s.B * s.C * Hp * Wp, nout = s.B * s.C * s.H * s.W, nf = s.B * s.H * s.W * kk;
  Buf in(dtype, nin, rng), f(dtype, nf, rng), g(dtype, nout, rng);
  std::vector<double> r_out(nout, 0.0), r_gin(nin, 0.0), r_gf(nf, 0.0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t y = 0; y < s.H; ++y)
        for (int64_t x = 0; x < s.W; ++x) {
          const size_t o = ((b * s.C + c) * s.H + y) * s.W + x;
          for (int64_t i = 0; i < s.k; ++i)
            for (int64_t j = 0; j < s.k; ++j) {
              const size_t ii = ((b * s.C + c) * Hp + y + i) * Wp + x + j, fi = ((b * s.H + y) * s.W + x) * kk + i * s.k + j;
              r_out[o] += f.exact[fi] * in.exact[ii];
              r_gin[ii] += f.exact[fi] * g.exact[o];
              r_gf[fi] += g.exact[o] * in.exact[ii];
            }
        }
  const int64_t shape[5] = {s.B, s.C, s.H, s.W, s.k};
  const double scale = std::sqrt(static_cast<double>(kk > s.C ? kk : s.C));
  struct Case { const char* name; int op; Buf* a; Buf* bb; size_t n; std::vector<double>* ref; };
  Case cases[3] = {{"forward", 0, &in, &f, nout, &r_out}, {"grad_input", 1, &g, &f, nin, &r_gin},
                   {"grad_filters", 2, &g, &in, nf, &r_gf}};
  for (Case& cs : cases) {
    Buf out(dtype, cs.n);
    std::vector<int32_t> counts(cs.n, 0);
    const char* err = fa_emu_run(cs.op, dtype, cs.a->data(), cs.bb->data(), out.data(), shape, sms,
                                 counts.empty() ? nullptr : counts.data());
    if (err) {
      std::printf("FAIL %s dtype=%d: %s\n", cs.name, dtype, err);
      ++failures;
      continue;
    }
    compare(cs.name, s, dtype, out, *cs.ref, counts, scale);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  const Shape shapes[] = {
      {1, 1, 1, 1, 1}, {2, 3, 5, 7, 3}, {1, 13, 9, 37, 7}, {1, 72, 3, 33, 5}, {1, 5, 2, 3, 15},
      {2, 9, 3, 2, 11}, {1, 3, 4, 34, 13}, {0, 3, 4, 5, 3}, {2, 3, 0, 5, 3}, {2, 0, 4, 5, 3}, {1, 2, 3, 0, 1},
  };
  for (const Shape& s : shapes)
    for (int dtype = 0; dtype < 4; ++dtype)
      for (int64_t sms : {1, 132}) run_shape(s, dtype, sms, rng);
  std::printf("%s %d\n", failures ? "failed" : "ok", checks);
  return failures ? 1 : 0;
}
