// Host C++ stand-ins for what the CUDA kernels in featup_adapters/csrc/cuda use, so that
// adaptive_conv_kernels.cuh compiles unchanged with g++ and runs on the CPU:
// * the qualifiers (__global__, __device__, ...) are defined away;
// * blockIdx / threadIdx / blockDim / gridDim are variables set by emu::launch, which runs every
//   block of the grid in order and every thread of a block as a fiber (ucontext) of its own,
//   switched at each __syncthreads: a real barrier, deterministic, and cheap enough for a 2-core
//   machine (OS threads cost milliseconds per barrier there);
// * dynamic shared memory is a per-launch buffer reached through a checking proxy: every access
//   is bounds-checked against the planned size, and an access that races with another thread's
//   access to the same element between two barriers (read-after-write, write-after-read,
//   write-after-write) is reported; the buffer is filled with 0xFF (NaN) before every block;
// * FA_STORE counts the writes to every element of a registered result, so a test sees elements
//   written twice or never;
// * half / bfloat16 are bit-exact host types with round-to-nearest-even conversions.
// Any violation raises emu::Error from the launch; the tests turn it into a failure.
#pragma once

#include <atomic>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(n) alignas(n)

struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };

namespace emu {

struct Error : std::runtime_error { using std::runtime_error::runtime_error; };
struct Abort {};  // unwinds the other threads of a block after one of them failed

// ---- half / bfloat16 ------------------------------------------------------------------------
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to infinity
  if (a < 0x38800000u) {  // half subnormal (or zero): a multiple of 2^-24, exact in float
    float v;
    std::memcpy(&v, &a, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(v * 16777216.0f)));
  }
  uint32_t h = (((a >> 23) - 112u) << 10) | ((a & 0x7fffffu) >> 13);
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = std::ldexp(static_cast<float>(m), -24);
    return sign ? -v : v;
  }
  const uint32_t bits = sign | (e == 31 ? (0x7f800000u | (m << 13)) : (((e + 112u) << 23) | (m << 13)));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Half {
  uint16_t bits;
  Half() = default;
  Half(float f) : bits(float_to_half_bits(f)) {}  // NOLINT: like c10::Half
  explicit operator float() const { return half_bits_to_float(bits); }
};
struct BFloat16 {
  uint16_t bits;
  BFloat16() = default;
  BFloat16(float f) : bits(float_to_bf16_bits(f)) {}  // NOLINT: like c10::BFloat16
  explicit operator float() const { return bf16_bits_to_float(bits); }
};

// ---- results whose writes are counted -------------------------------------------------------
struct Region {
  const char* base;
  int64_t elems, elem_size;
  std::atomic<int32_t>* counts;
};
struct Regions {
  std::vector<Region> list;
  void add(const void* base, int64_t elems, int64_t elem_size, std::atomic<int32_t>* counts) {
    list.push_back({static_cast<const char*>(base), elems, elem_size, counts});
  }
};
inline Regions& regions() { static Regions r; return r; }

inline void count_write(const void* p, int64_t size) {
  const char* c = static_cast<const char*>(p);
  for (const Region& r : regions().list) {
    const int64_t unit = r.elem_size > 0 ? r.elem_size : 4;  // 0: untyped scratch, counted per 4 bytes
    if (c >= r.base && c < r.base + r.elems * unit) {
      const int64_t off = c - r.base;
      if (r.elem_size == 0) {
        if (off % size != 0 || off + size > r.elems * unit) throw Error("misaligned store to scratch memory");
        r.counts[off / 4].fetch_add(1, std::memory_order_relaxed);
        return;
      }
      if (off % r.elem_size != 0 || size != r.elem_size)
        throw Error("store of " + std::to_string(size) + " bytes at byte " + std::to_string(off) +
                    " of a result of " + std::to_string(r.elem_size) + "-byte elements");
      r.counts[off / r.elem_size].fetch_add(1, std::memory_order_relaxed);
      return;
    }
  }
  throw Error("store outside every registered result");
}

template <typename T, typename V>
inline void store(T* p, V value) {
  count_write(p, sizeof(T));
  *p = value;
}

// ---- launch state ---------------------------------------------------------------------------
// ---- launch state: a block's threads are fibers (ucontext) run round-robin on one OS thread --
struct Launch {
  dim3 grid, block;
  int64_t smem_bytes = 0;
  std::unique_ptr<unsigned char[]> smem;
  // per 4-byte word of shared memory: (epoch << 16 | writer + 1), (epoch << 16 | reader + 1 or 0xffff)
  std::unique_ptr<uint64_t[]> last_write, last_read;
  uint64_t epoch = 1;  // advanced by every barrier phase; shared accesses are checked per epoch
  bool serial = false;
  // fibers
  std::vector<ucontext_t> ctx;
  std::vector<std::unique_ptr<unsigned char[]>> stacks;
  std::vector<int> state;  // 0 running, 1 waiting at __syncthreads, 2 finished
  ucontext_t scheduler;
  std::string error;
  std::function<void()> body;
};

inline Launch* current = nullptr;
inline int plant = 0;  // which planted bug a mutated copy of the kernels enables (0: none)
inline int thread_rank = 0;
inline uint3 block_idx, thread_idx;
inline dim3 block_dim, grid_dim;

inline void set_thread(int rank) {
  thread_rank = rank;
  const dim3 b = current->block;
  thread_idx = {static_cast<unsigned>(rank % b.x), static_cast<unsigned>((rank / b.x) % b.y),
                static_cast<unsigned>(rank / (b.x * b.y))};
}

inline void syncthreads() {
  Launch& L = *current;
  if (L.serial) throw Error("__syncthreads in a kernel launched as barrier-free");
  L.state[thread_rank] = 1;
  swapcontext(&L.ctx[thread_rank], &L.scheduler);  // back when every thread of the block got here
}

inline void fiber_entry() {
  Launch& L = *current;
  const int rank = thread_rank;
  try {
    L.body();
  } catch (const std::exception& e) {
    if (L.error.empty()) L.error = e.what();
  }
  L.state[rank] = 2;
  swapcontext(&L.ctx[rank], &L.scheduler);  // never resumed
}

inline void check_shared(int64_t byte, int64_t size, bool write) {
  Launch& L = *current;
  if (byte < 0 || byte + size > L.smem_bytes)
    throw Error("shared memory access at byte " + std::to_string(byte) + " (+" + std::to_string(size) +
                ") outside the " + std::to_string(L.smem_bytes) + " bytes the plan asked for");
  const uint64_t e = L.epoch, me = static_cast<uint64_t>(thread_rank) + 1;
  const int64_t word = byte / 4;
  const uint64_t w = L.last_write[word];
  if ((w >> 16) == e && (w & 0xffff) != me)
    throw Error(std::string(write ? "write-after-write" : "read-after-write") + " race on shared word " +
                std::to_string(word) + ": threads " + std::to_string((w & 0xffff) - 1) + " and " +
                std::to_string(thread_rank) + " without a __syncthreads between");
  const uint64_t r = L.last_read[word];
  if (write) {
    if ((r >> 16) == e && (r & 0xffff) != me)
      throw Error("write-after-read race on shared word " + std::to_string(word) + ": thread " +
                  std::to_string(thread_rank) + " overwrites what another thread read without a __syncthreads between");
    L.last_write[word] = (e << 16) | me;
  } else {
    if ((r >> 16) != e) L.last_read[word] = (e << 16) | me;
    else if ((r & 0xffff) != me) L.last_read[word] = (e << 16) | 0xffff;
  }
}

template <typename T>
struct SharedRef {
  T* p;
  int64_t byte;
  operator T() const { check_shared(byte, sizeof(T), false); return *p; }  // NOLINT
  SharedRef& operator=(T v) { check_shared(byte, sizeof(T), true); *p = v; return *this; }
};
template <typename T>
struct Shared {
  T* base;
  int64_t off;
  SharedRef<T> operator[](int64_t i) const {
    return {base + off + i, static_cast<int64_t>((off + i) * static_cast<int64_t>(sizeof(T)))};
  }
  Shared operator+(int64_t d) const { return {base, off + d}; }
};
template <typename T>
inline Shared<T> dynamic_shared() { return {reinterpret_cast<T*>(current->smem.get()), 0}; }

// Runs fn() as every thread of every block of grid x block, blocks in order (x fastest). The
// threads of a block are fibers run round-robin until each waits at __syncthreads or has
// finished; a barrier phase where some wait and others finished is a divergent __syncthreads.
// A kernel declared barrier-free (serial) runs its threads as plain calls.
template <typename Fn>
void launch(dim3 grid, dim3 block, int64_t smem_bytes, Fn&& fn, bool serial = false) {
  const int64_t nthreads = static_cast<int64_t>(block.x) * block.y * block.z;
  const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  if (nthreads < 1 || nthreads > 1024 || block.z > 64 || nblocks < 1)
    throw Error("invalid launch: block " + std::to_string(block.x) + "x" + std::to_string(block.y) + "x" +
                std::to_string(block.z) + ", grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) +
                "x" + std::to_string(grid.z));
  if (grid.y > 65535 || grid.z > 65535) throw Error("grid y or z above 65535");
  if (smem_bytes > 227 * 1024) throw Error("more dynamic shared memory than any GPU has: " + std::to_string(smem_bytes));
  if (serial && smem_bytes != 0) throw Error("a barrier-free kernel with shared memory");
  Launch L;
  L.grid = grid;
  L.block = block;
  L.smem_bytes = smem_bytes;
  L.serial = serial;
  const int64_t words = (smem_bytes + 3) / 4 + 1;
  L.smem.reset(new unsigned char[smem_bytes + 16]);
  L.last_write.reset(new uint64_t[words]());
  L.last_read.reset(new uint64_t[words]());
  L.body = [&] { fn(); };
  Launch* const outer = current;
  current = &L;
  block_dim = block;
  grid_dim = grid;
  struct Restore { Launch* o; ~Restore() { current = o; } } restore{outer};
  constexpr size_t kStack = 256 * 1024;
  if (!serial) {
    L.ctx.resize(nthreads);
    L.state.assign(nthreads, 0);
    for (int64_t r = 0; r < nthreads; ++r) L.stacks.emplace_back(new unsigned char[kStack]);
  }
  for (int64_t n = 0; n < nblocks; ++n) {
    block_idx = {static_cast<unsigned>(n % grid.x), static_cast<unsigned>((n / grid.x) % grid.y),
                 static_cast<unsigned>(n / (static_cast<int64_t>(grid.x) * grid.y))};
    std::memset(L.smem.get(), 0xff, smem_bytes + 16);  // a block starts with NaN shared memory
    ++L.epoch;
    if (serial) {
      for (int r = 0; r < nthreads; ++r) { set_thread(r); fn(); }
      continue;
    }
    for (int r = 0; r < nthreads; ++r) {
      getcontext(&L.ctx[r]);
      L.ctx[r].uc_stack.ss_sp = L.stacks[r].get();
      L.ctx[r].uc_stack.ss_size = kStack;
      L.ctx[r].uc_link = nullptr;
      makecontext(&L.ctx[r], fiber_entry, 0);
      L.state[r] = 0;
    }
    for (;;) {  // one barrier phase per round
      for (int r = 0; r < nthreads; ++r) {
        if (L.state[r] == 2) continue;
        L.state[r] = 0;
        set_thread(r);
        swapcontext(&L.scheduler, &L.ctx[r]);
        if (!L.error.empty())
          throw Error(L.error + " (block " + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
                      std::to_string(block_idx.z) + ", thread " + std::to_string(r) + ")");
      }
      int waiting = 0, finished = 0;
      for (int r = 0; r < nthreads; ++r) (L.state[r] == 1 ? waiting : finished) += 1;
      ++L.epoch;
      if (waiting == 0) break;
      if (finished != 0)
        throw Error("divergent __syncthreads: " + std::to_string(waiting) + " threads of block " +
                    std::to_string(n) + " wait at a barrier while " + std::to_string(finished) +
                    " have finished the kernel");
    }
  }
}

}  // namespace emu

#define blockIdx (::emu::block_idx)
#define threadIdx (::emu::thread_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define __syncthreads() ::emu::syncthreads()
#define FA_DEVICE inline
#define FA_DYNAMIC_SMEM(type, name) ::emu::Shared<type> name = ::emu::dynamic_shared<type>()
#define FA_STORE(ptr, value) ::emu::store((ptr), (value))
