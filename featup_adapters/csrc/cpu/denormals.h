// Subnormal floats treated as zero while a CPU kernel runs, on the thread that runs it.
//
// x86 cores take a microcode assist, tens to a hundred cycles, for every arithmetic operation
// that reads or produces a subnormal number (|x| < 1.2e-38 in float32). Such values are common
// in the JBU's data: a sharp range softmax leaves far-away taps at exp(-100) and the softmax
// backward multiplies gradients by them. At 224x224 the range logits' backward (32 channels) ran
// 5x slower on them than on normal numbers. Setting FTZ (results flushed to zero) and DAZ
// (subnormal inputs read as zero) in MXCSR, as oneDNN and most inference runtimes do, removes the
// penalty; no value above 1.2e-38 (float32) or 2.2e-308 (float64) changes.
//
// MXCSR is per thread, so the guard must sit inside each parallel_for body: every CPU kernel of
// ours runs its ranges through parallel_for_flushed below, which does that. The caller's (and
// each worker thread's) previous mode is restored when the guard goes out of scope, so the mode
// of PyTorch's own kernels is never changed. On other architectures the guard does nothing.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#define FA_HAVE_MXCSR 1
#endif

namespace featup_adapters {
namespace cpu {

class FlushDenormals {
 public:
  FlushDenormals() {
#ifdef FA_HAVE_MXCSR
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | kFtz | kDaz);
#endif
  }
  ~FlushDenormals() {
#ifdef FA_HAVE_MXCSR
    _mm_setcsr(saved_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  static constexpr unsigned kFtz = 0x8000, kDaz = 0x0040;
  unsigned saved_ = 0;
};

// at::parallel_for(begin, end, grain, f) with subnormals flushed on whichever thread runs each
// range of f.
template <typename F>
inline void parallel_for_flushed(int64_t begin, int64_t end, int64_t grain, F&& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b0, int64_t b1) {
    FlushDenormals ftz;
    f(b0, b1);
  });
}

}  // namespace cpu
}  // namespace featup_adapters
