// The CUDA kernels of the adaptive convolution and the host code that plans and launches them.
//
// This header needs no CUDA runtime and no ATen: adaptive_conv_cuda.cu includes it with a
// runtime that launches through <<<>>>, and the CPU emulation (tests/cuda_emu) compiles this very
// file as host C++ with a shim for the CUDA built-ins and a runtime that runs every thread of
// exactly the grids planned here. Keep CUDA-only constructs behind the FA_* macros below.
//
// Kernels (T = float, double, c10::Half, c10::BFloat16; Acc = float, or double for double):
//   forward_kernel<T, R>      out[b, c, y, x]   = sum_{i,j} f[b, y, x, i, j] * in[b, c, y+i, x+j]
//   grad_input_kernel<T, R>   gin[b, c, Y, X]   = sum_{valid i,j} g[b, c, Y-i, X-j] * f[b, Y-i, X-j, i, j]
//   grad_filters_kernel<T, K> gf[b, y, x, i, j] = sum_c g[b, c, y, x] * in[b, c, y+i, x+j]
//   sum_splits_kernel<T>      the fixed-order second pass of grad_filters when channels are split
//
// Block shapes (threadIdx.x = 32 consecutive x positions, one warp; threadIdx.y = warp):
// * forward / grad_input: a block owns 32 x positions of R rows (R = 2 when the staged filters
//   fit in 48 KB of shared memory, else 1) and a range of channel groups of 8; warp w takes groups
//   w, w + nw, ... of that range, so each thread makes R * 8 outputs. The block first copies the
//   filters of all its pixels (forward: 32 * R contiguous pixels * k*k taps, read with 16-byte
//   vector loads; grad_input: the k*k*(32+k-1)*R values its pixels receive from) into shared
//   memory, tap-major, and every warp reuses them for all its channel groups: each filter value
//   is read from global memory once per pixel per block, and the shared reads are conflict-free.
//   Input / grad_out rows are read by 32 lanes at consecutive addresses (coalesced); a row of
//   input is loaded once per thread and feeds the R output rows that use it.
// * grad_filters: warp i owns tap row i (blockDim.y = k, template K = k, so no predicated slots);
//   a block owns 32 pixels of one row and a channel range, and sums its channels in registers.
//   For small maps the channels are split over more blocks (grid z); each split writes float
//   partial sums and sum_splits_kernel adds them in split order: deterministic, no atomics.
//   Results go through shared memory so the k*k values of 32 pixels are written contiguously.
// * More work than the grid can hold (grid y <= 65535, grid z <= 65535) is walked by block-
//   uniform loops, and all index arithmetic is 64-bit (blockIdx.x * 32 is widened first).
// * Split factors are chosen so a launch has about two resident waves of threads on every SM
//   (at 14x14 the forward gets hundreds of blocks instead of a handful).
//
// Cost model at B=1, C=384, k=7, 224x224 output, float32 (bytes at DRAM, with L2 absorbing the
// re-reads of neighbouring rows; FLOPs = 2 per multiply-add):
//   forward      reads input 81 MB + filters 9.8 MB, writes 77 MB = 168 MB;  1.89 GFLOP
//   grad_input   reads grad_out 77 MB + filters 9.8 MB, writes 81 MB = 168 MB; 1.89 GFLOP
//   grad_filters reads grad_out 77 MB + input 81 MB, writes 9.8 MB = 168 MB;   1.89 GFLOP
// On an H100/H200-class GPU (3.3-4.8 TB/s, ~60 TFLOP/s fp32 FMA without tensor cores, ~30 TB/s
// aggregate L1) each kernel is bound by DRAM at ~35-50 us and by FMA issue at ~30 us; the L1
// traffic (forward: 8 loads of input per 16 multiply-adds, R=2; grad_filters: 1 load per
// multiply-add; one warp-wide load per SM per clock) puts the expected time at ~60 us (forward,
// grad_input) and ~130 us (grad_filters), against ~35 us for the DRAM roofline of an H200.
// bfloat16/float16 halve the bytes (DRAM ~18-25 us) but not the load instructions, so they are
// expected at about the float32 times. Model numbers, not measurements: scripts/gpu_check.sh
// measures them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../adaptive_conv_common.h"

// Dynamic shared memory of the block, as an array of `type`.
#ifndef FA_DYNAMIC_SMEM
#define FA_DYNAMIC_SMEM(type, name)                          \
  extern __shared__ __align__(16) unsigned char fa_smem_raw[]; \
  type* name = reinterpret_cast<type*>(fa_smem_raw)
#endif
// Every store to a result goes through FA_STORE, so the emulation can count writes per element.
#ifndef FA_STORE
#define FA_STORE(ptr, value) (*(ptr) = (value))
#endif
#ifndef FA_DEVICE
#define FA_DEVICE __device__ __forceinline__
#endif

namespace featup_adapters {
namespace cuda_kernels {

constexpr int kWarp = 32;         // threads along x, one warp
constexpr int kGroup = 8;         // channels per thread (one channel group)
constexpr int kMaxWarps = 8;      // warps per block in forward / grad_input
constexpr int kStagePitch = 33;   // row pitch of the staged filters (conflict-free stores)
constexpr int64_t kSmemDefault = 48 * 1024;  // larger dynamic shared memory needs an opt-in
// Largest grid y / z the plans use (the hardware limit); the emulation tests build with a small
// value to make the kernels walk the rows and (batch, split) items that do not fit the grid.
#ifndef FA_GRID_YZ_LIMIT
#define FA_GRID_YZ_LIMIT 65535
#endif
constexpr int64_t kGridYZ = FA_GRID_YZ_LIMIT;
static_assert(kGridYZ >= 1 && kGridYZ <= 65535, "grid y and z hold at most 65535 blocks");

template <typename T> using Acc = typename AccType<T>::type;

FA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FA_HD int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// put(e, value) for every e in [0, n) of src, spread over the block's threads; the aligned middle
// is read with 16-byte vector loads (8 half / bfloat16 values per load).
template <typename T, typename Put>
FA_DEVICE void load_contiguous(const T* src, int n, int tid, int nthreads, Put&& put) {
  constexpr int V = 16 / sizeof(T);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(src);
  int head = (addr % sizeof(T)) ? n : static_cast<int>(((16 - (addr & 15)) & 15) / sizeof(T));
  head = head < n ? head : n;
  for (int e = tid; e < head; e += nthreads) put(e, src[e]);
  const int nvec = (n - head) / V;
  const uint4* vsrc = reinterpret_cast<const uint4*>(src + head);
  for (int v = tid; v < nvec; v += nthreads) {
    const uint4 raw = vsrc[v];
    T vals[V];
    memcpy(vals, &raw, sizeof(raw));
#pragma unroll
    for (int q = 0; q < V; ++q) put(head + v * V + q, vals[q]);
  }
  for (int e = head + nvec * V + tid; e < n; e += nthreads) put(e, src[e]);
}

// ---------------------------------------------------------------------------------------------
// forward. Grid: x = ceil(W/32), y = ceil(H/R) (walked beyond 65535), z = B * splits (walked).
// Shared: R * k*k * 33 Acc, staged[(r * kk + t) * 33 + px] = f[b, y0 + r, x0 + px, t].
template <typename T, int R>
__global__ void forward_kernel(const T* __restrict__ in, const T* __restrict__ filt, T* __restrict__ out,
                               ConvShape s, int64_t splits, int64_t groups_per_split) {
  using A = Acc<T>;
  FA_DYNAMIC_SMEM(A, staged);
  const int tx = threadIdx.x, w = threadIdx.y, nw = blockDim.y;
  const int tid = w * kWarp + tx, nthreads = nw * kWarp;
  const int64_t k = s.k, kk = s.kk(), Wp = s.Wp(), plane = s.Hp() * s.Wp();
  const int ikk = static_cast<int>(kk);  // staging indices are bounded by the shared memory size
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * kWarp, x = x0 + tx;
  const int64_t npx = s.W - x0 < kWarp ? s.W - x0 : kWarp;
  const int64_t ngroups = num_blocks(s.C, kGroup), ny = ceil_div(s.H, R);
  for (int64_t yb = blockIdx.y; yb < ny; yb += gridDim.y) {
    const int64_t y0 = yb * R;
    const int rows = static_cast<int>(s.H - y0 < R ? s.H - y0 : R);
    for (int64_t z = blockIdx.z; z < s.B * splits; z += gridDim.z) {
      const int64_t b = z / splits, g0 = (z % splits) * groups_per_split;
      const int64_t g1 = g0 + groups_per_split < ngroups ? g0 + groups_per_split : ngroups;
      __syncthreads();  // the previous iteration's readers are done with `staged`
      for (int r = 0; r < rows; ++r) {
        auto dst = staged + r * kk * kStagePitch;  // A*
        load_contiguous(filt + filter_offset(s, b, y0 + r, x0, 0), static_cast<int>(npx * kk), tid, nthreads,
                        [&](int e, T v) { dst[(e % ikk) * kStagePitch + e / ikk] = static_cast<A>(v); });
      }
      __syncthreads();
      if (x >= s.W) continue;  // no barrier below
      for (int64_t g = g0 + w; g < g1; g += nw) {
        const int64_t c0 = g * kGroup;
        const int nc = static_cast<int>(s.C - c0 < kGroup ? s.C - c0 : kGroup);
        const T* src = in + input_offset(s, b, c0, y0, x);
        A acc[R][kGroup];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int c = 0; c < kGroup; ++c) acc[r][c] = A(0);
        // input row y0 + q feeds output row y0 + r through tap row i = q - r
        for (int64_t q = 0; q < k + rows - 1; ++q) {
          const T* row = src + q * Wp;
          for (int64_t j = 0; j < k; ++j) {
            A v[kGroup];
#pragma unroll
            for (int c = 0; c < kGroup; ++c) v[c] = c < nc ? static_cast<A>(row[c * plane + j]) : A(0);
#pragma unroll
            for (int r = 0; r < R; ++r) {
              const int64_t i = q - r;
              if (r < rows && i >= 0 && i < k) {
                const A wv = staged[(r * kk + i * k + j) * kStagePitch + tx];
#pragma unroll
                for (int c = 0; c < kGroup; ++c) acc[r][c] += wv * v[c];
              }
            }
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int c = 0; c < kGroup; ++c)
            if (r < rows && c < nc) FA_STORE(out + output_offset(s, b, c0 + c, y0 + r, x), static_cast<T>(acc[r][c]));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// grad_input. Grid: x = ceil(Wp/32), y = ceil(Hp/R) (walked), z = B * splits (walked).
// The block's pixels (X0 + tx, Y0 + r) receive from output rows y = Y0 - (k-1) + yy, yy < k+R-1,
// columns x = X0 - (k-1) + px, px < 32+k-1, through tap (i = Y0 + r - y, j = X0 + tx - x).
// Shared: (k+R-1) * R * k * (32+k-1) Acc, staged[((yy * R + r) * k + j) * P + px] = f[b, y, x, i, j]
// (0 where y, x or i is out of range; those entries are never used).
template <typename T, int R>
__global__ void grad_input_kernel(const T* __restrict__ gout, const T* __restrict__ filt, T* __restrict__ gin,
                                  ConvShape s, int64_t splits, int64_t groups_per_split) {
  using A = Acc<T>;
  FA_DYNAMIC_SMEM(A, staged);
  const int tx = threadIdx.x, w = threadIdx.y, nw = blockDim.y;
  const int tid = w * kWarp + tx, nthreads = nw * kWarp;
  const int64_t k = s.k, plane = s.H * s.W, Hp = s.Hp(), Wp = s.Wp();
  const int64_t P = kWarp + k - 1, nyy = k + R - 1;
  const int64_t X0 = static_cast<int64_t>(blockIdx.x) * kWarp, X = X0 + tx;
  const int64_t ngroups = num_blocks(s.C, kGroup), ny = ceil_div(Hp, R);
  for (int64_t yb = blockIdx.y; yb < ny; yb += gridDim.y) {
    const int64_t Y0 = yb * R;
    const int rows = static_cast<int>(Hp - Y0 < R ? Hp - Y0 : R);
    for (int64_t z = blockIdx.z; z < s.B * splits; z += gridDim.z) {
      const int64_t b = z / splits, g0 = (z % splits) * groups_per_split;
      const int64_t g1 = g0 + groups_per_split < ngroups ? g0 + groups_per_split : ngroups;
      __syncthreads();
      // j fastest: consecutive threads read the k contiguous taps of one tap row of a pixel
      const int ik = static_cast<int>(k), iP = static_cast<int>(P);  // bounded by the shared size
      const int n = static_cast<int>(nyy) * R * iP * ik;
      for (int e = tid; e < n; e += nthreads) {
        const int j = e % ik, px = (e / ik) % iP, r = (e / (ik * iP)) % R, yy = e / (ik * iP * R);
        const int64_t y = Y0 - (k - 1) + yy, x = X0 - (k - 1) + px, i = Y0 + r - y;
        A v = A(0);
        if (y >= 0 && y < s.H && x >= 0 && x < s.W && i >= 0 && i < k && r < rows)
          v = static_cast<A>(filt[filter_offset(s, b, y, x, i * k + j)]);
        staged[((yy * R + r) * k + j) * P + px] = v;
      }
      __syncthreads();
      if (X >= Wp) continue;  // no barrier below
      const int64_t j0 = first_tap(X, s.W), j1 = last_tap(X, k);
      for (int64_t g = g0 + w; g < g1; g += nw) {
        const int64_t c0 = g * kGroup;
        const int nc = static_cast<int>(s.C - c0 < kGroup ? s.C - c0 : kGroup);
        A acc[R][kGroup];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int c = 0; c < kGroup; ++c) acc[r][c] = A(0);
        for (int64_t yy = 0; yy < nyy; ++yy) {
          const int64_t y = Y0 - (k - 1) + yy;
          if (y < 0 || y >= s.H) continue;
          const T* grow = gout + output_offset(s, b, c0, y, 0);
          for (int64_t j = j0; j <= j1; ++j) {
            const int64_t x = X - j;
            A v[kGroup];
#pragma unroll
            for (int c = 0; c < kGroup; ++c) v[c] = c < nc ? static_cast<A>(grow[c * plane + x]) : A(0);
#pragma unroll
            for (int r = 0; r < R; ++r) {
              const int64_t i = Y0 + r - y;
              if (r < rows && i >= 0 && i < k) {
                const A wv = staged[((yy * R + r) * k + j) * P + (x - X0 + k - 1)];
#pragma unroll
                for (int c = 0; c < kGroup; ++c) acc[r][c] += wv * v[c];
              }
            }
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int c = 0; c < kGroup; ++c)
            if (r < rows && c < nc) FA_STORE(gin + input_offset(s, b, c0 + c, Y0 + r, X), static_cast<T>(acc[r][c]));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// grad_filters, pass 1. Grid: x = ceil(W/32), y = H (walked), z = B * splits (walked); block
// (32, K). Warp i sums tap row i over the channels [split * cps, (split+1) * cps). With one split
// it writes T results to gf; otherwise Acc partials to part[split][b][y][x][t].
// Shared: K*K * 33 Acc, staged[t * 33 + px] = the block's result for pixel x0 + px, tap t.
template <typename T, int K>
__global__ void grad_filters_kernel(const T* __restrict__ gout, const T* __restrict__ in, T* __restrict__ gf,
                                    Acc<T>* __restrict__ part, ConvShape s, int64_t splits, int64_t chans_per_split) {
  using A = Acc<T>;
  FA_DYNAMIC_SMEM(A, staged);
  constexpr int KK = K * K;
  const int tx = threadIdx.x, i = threadIdx.y;
  const int tid = i * kWarp + tx, nthreads = K * kWarp;
  const int64_t plane_in = s.Hp() * s.Wp(), plane_out = s.H * s.W;
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * kWarp, x = x0 + tx;
  const int64_t npx = s.W - x0 < kWarp ? s.W - x0 : kWarp;
  const int64_t pixels = s.B * s.H * s.W;
  for (int64_t y = blockIdx.y; y < s.H; y += gridDim.y) {
    for (int64_t z = blockIdx.z; z < s.B * splits; z += gridDim.z) {
      const int64_t b = z / splits, split = z % splits, c0 = split * chans_per_split;
      const int64_t c1 = c0 + chans_per_split < s.C ? c0 + chans_per_split : s.C;
      A acc[K];
#pragma unroll
      for (int j = 0; j < K; ++j) acc[j] = A(0);
      if (x < s.W) {
        const T* g = gout + output_offset(s, b, c0, y, x);
        const T* p = in + input_offset(s, b, c0, y + i, x);
        for (int64_t c = c0; c < c1; ++c, g += plane_out, p += plane_in) {
          const A gv = static_cast<A>(*g);
#pragma unroll
          for (int j = 0; j < K; ++j) acc[j] += gv * static_cast<A>(p[j]);
        }
      }
      __syncthreads();  // the previous iteration's writers are done with `staged`
#pragma unroll
      for (int j = 0; j < K; ++j) staged[(i * K + j) * kStagePitch + tx] = acc[j];
      __syncthreads();
      const int64_t first = filter_offset(s, b, y, x0, 0);  // the npx * KK results are contiguous
      for (int e = tid; e < static_cast<int>(npx) * KK; e += nthreads) {
        const A v = staged[(e % KK) * kStagePitch + e / KK];
        if (splits == 1) FA_STORE(gf + first + e, static_cast<T>(v));
        else FA_STORE(part + split * pixels * KK + first + e, v);
      }
    }
  }
}

// grad_filters, pass 2: gf[e] = sum over splits, in split order, of part[split][e].
template <typename T>
__global__ void sum_splits_kernel(const Acc<T>* __restrict__ part, T* __restrict__ gf, int64_t n, int64_t splits) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    Acc<T> sum = part[e];
    for (int64_t q = 1; q < splits; ++q) sum += part[q * n + e];
    FA_STORE(gf + e, static_cast<T>(sum));
  }
}

// ---------------------------------------------------------------------------------------------
// Launch plans: the one place the geometry is decided (the CUDA wrapper and the emulation both
// call these).
struct Plan {
  dim3 grid, block;
  int64_t smem = 0;         // dynamic shared memory in bytes
  int rows = 1;             // R (forward, grad_input) or K (grad_filters)
  int64_t splits = 1;       // channel splits per batch element
  int64_t per_split = 0;    // channel groups (forward, grad_input) or channels (grad_filters) per split
};

// Blocks that make about two resident waves of `threads_per_block` on `sms` multiprocessors.
inline int64_t wanted_blocks(int64_t sms, int64_t threads_per_block) {
  return ceil_div(2 * 2048 * (sms > 0 ? sms : 1), threads_per_block);
}

// Channel groups over warps and splits for forward / grad_input.
inline void plan_channels(Plan& p, const ConvShape& s, int64_t base_blocks, int64_t sms) {
  const int64_t ngroups = num_blocks(s.C, kGroup);
  const int64_t nw = clamp64(ngroups, 1, kMaxWarps);
  const int64_t want = wanted_blocks(sms, nw * kWarp);
  int64_t splits = clamp64(ceil_div(want, base_blocks), 1, ceil_div(ngroups, nw));
  p.per_split = ceil_div(ngroups, splits);
  p.splits = ceil_div(ngroups, p.per_split);
  p.block = dim3(kWarp, static_cast<unsigned>(nw), 1);
}

inline Plan forward_plan(const ConvShape& s, int64_t sms, int64_t acc_bytes) {
  Plan p;
  const int64_t per_row = s.kk() * kStagePitch * acc_bytes;
  p.rows = 2 * per_row <= kSmemDefault ? 2 : 1;
  p.smem = p.rows * per_row;
  const int64_t gx = ceil_div(s.W, kWarp), gy = ceil_div(s.H, p.rows);
  plan_channels(p, s, gx * gy * s.B, sms);
  p.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy < kGridYZ ? gy : kGridYZ),
                static_cast<unsigned>(s.B * p.splits < kGridYZ ? s.B * p.splits : kGridYZ));
  return p;
}

inline Plan grad_input_plan(const ConvShape& s, int64_t sms, int64_t acc_bytes) {
  Plan p;
  auto bytes = [&](int64_t R) { return (s.k + R - 1) * R * s.k * (kWarp + s.k - 1) * acc_bytes; };
  p.rows = bytes(2) <= kSmemDefault ? 2 : 1;
  p.smem = bytes(p.rows);
  const int64_t gx = ceil_div(s.Wp(), kWarp), gy = ceil_div(s.Hp(), p.rows);
  plan_channels(p, s, gx * gy * s.B, sms);
  p.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy < kGridYZ ? gy : kGridYZ),
                static_cast<unsigned>(s.B * p.splits < kGridYZ ? s.B * p.splits : kGridYZ));
  return p;
}

inline Plan grad_filters_plan(const ConvShape& s, int64_t sms, int64_t acc_bytes) {
  Plan p;
  p.rows = static_cast<int>(s.k);
  p.block = dim3(kWarp, static_cast<unsigned>(s.k), 1);
  p.smem = s.kk() * kStagePitch * acc_bytes;
  const int64_t gx = ceil_div(s.W, kWarp), base = gx * s.H * s.B;
  const int64_t want = wanted_blocks(sms, kWarp * s.k);
  // at least kGroup channels per split, so a split does more than read its partial sums back
  const int64_t splits = clamp64(ceil_div(want, base), 1, num_blocks(s.C, kGroup));
  p.per_split = ceil_div(s.C, splits);
  p.splits = ceil_div(s.C, p.per_split);
  p.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(s.H < kGridYZ ? s.H : kGridYZ),
                static_cast<unsigned>(s.B * p.splits < kGridYZ ? s.B * p.splits : kGridYZ));
  return p;
}

inline Plan sum_splits_plan(int64_t n, int64_t sms) {
  Plan p;
  p.block = dim3(256, 1, 1);
  const int64_t want = 8 * (sms > 0 ? sms : 1);
  p.grid = dim3(static_cast<unsigned>(clamp64(ceil_div(n, 256), 1, want)), 1, 1);
  return p;
}

// ---------------------------------------------------------------------------------------------
// Host drivers. `Runtime` provides:
//   int64_t sms();                                        multiprocessors of the device
//   void launch(kernel, const Plan&, args...);            run `kernel` with the plan's geometry
//   void zero(void* ptr, int64_t bytes);                  fill a result with zeros
//   void* workspace(int64_t bytes);                       scratch memory, valid until the op returns
//   void fail(const char* message);                       report an impossible request (throws)
// Results are preallocated and contiguous; inputs are contiguous.

template <typename T, typename Runtime>
void run_forward(Runtime& rt, const T* in, const T* filt, T* out, const ConvShape& s) {
  if (s.B * s.C * s.H * s.W == 0) return;
  const Plan p = forward_plan(s, rt.sms(), sizeof(Acc<T>));
  if (p.rows == 2) rt.launch(forward_kernel<T, 2>, p, in, filt, out, s, p.splits, p.per_split);
  else rt.launch(forward_kernel<T, 1>, p, in, filt, out, s, p.splits, p.per_split);
}

template <typename T, typename Runtime>
void run_grad_input(Runtime& rt, const T* gout, const T* filt, T* gin, const ConvShape& s) {
  if (s.B * s.C * s.Hp() * s.Wp() == 0) return;
  if (s.H == 0 || s.W == 0) {  // nothing flows back: the padded border gets zeros
    rt.zero(gin, s.B * s.C * s.Hp() * s.Wp() * static_cast<int64_t>(sizeof(T)));
    return;
  }
  const Plan p = grad_input_plan(s, rt.sms(), sizeof(Acc<T>));
  if (p.rows == 2) rt.launch(grad_input_kernel<T, 2>, p, gout, filt, gin, s, p.splits, p.per_split);
  else rt.launch(grad_input_kernel<T, 1>, p, gout, filt, gin, s, p.splits, p.per_split);
}

template <typename T, int K, typename Runtime>
void run_grad_filters_k(Runtime& rt, const T* gout, const T* in, T* gf, const ConvShape& s) {
  const Plan p = grad_filters_plan(s, rt.sms(), sizeof(Acc<T>));
  const int64_t n = s.B * s.H * s.W * s.kk();
  Acc<T>* part = p.splits > 1
      ? static_cast<Acc<T>*>(rt.workspace(p.splits * n * static_cast<int64_t>(sizeof(Acc<T>)))) : nullptr;
  rt.launch(grad_filters_kernel<T, K>, p, gout, in, gf, part, s, p.splits, p.per_split);
  if (p.splits > 1) rt.launch(sum_splits_kernel<T>, sum_splits_plan(n, rt.sms()), part, gf, n, p.splits);
}

template <typename T, typename Runtime>
void run_grad_filters(Runtime& rt, const T* gout, const T* in, T* gf, const ConvShape& s) {
  if (s.B * s.H * s.W * s.kk() == 0) return;
  if (s.C == 0) {  // an empty sum
    rt.zero(gf, s.B * s.H * s.W * s.kk() * static_cast<int64_t>(sizeof(T)));
    return;
  }
  static_assert(kMaxFilterSize == 15, "add the new filter sizes to the switch below");
  switch (s.k) {
    case 1: return run_grad_filters_k<T, 1>(rt, gout, in, gf, s);
    case 3: return run_grad_filters_k<T, 3>(rt, gout, in, gf, s);
    case 5: return run_grad_filters_k<T, 5>(rt, gout, in, gf, s);
    case 7: return run_grad_filters_k<T, 7>(rt, gout, in, gf, s);
    case 9: return run_grad_filters_k<T, 9>(rt, gout, in, gf, s);
    case 11: return run_grad_filters_k<T, 11>(rt, gout, in, gf, s);
    case 13: return run_grad_filters_k<T, 13>(rt, gout, in, gf, s);
    case 15: return run_grad_filters_k<T, 15>(rt, gout, in, gf, s);
    default: rt.fail("adaptive_conv_grad_filters: unsupported filter size");  // checks.h rejects it first
  }
}

}  // namespace cuda_kernels
}  // namespace featup_adapters
