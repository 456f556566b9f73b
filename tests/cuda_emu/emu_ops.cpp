// The project's CUDA kernels and host drivers (featup_adapters/csrc/cuda/adaptive_conv_kernels.cuh),
// compiled as host C++ with cuda_shim.h and exposed through a C interface for ctypes.
//
//   fa_emu_run(op, dtype, a, b, out, shape, sms, counts) runs one op exactly as the CUDA wrapper
//     would (same plans, same launches, same early returns) on CPU buffers:
//       op 0 forward      a = input [B, C, H+k-1, W+k-1], b = filters [B, H, W, k, k], out [B, C, H, W]
//       op 1 grad_input   a = grad_out [B, C, H, W],     b = filters,                out [B, C, H+k-1, W+k-1]
//       op 2 grad_filters a = grad_out,                  b = input,                  out [B, H, W, k, k]
//     dtype 0 float32, 1 float64, 2 float16, 3 bfloat16; shape = {B, C, H, W, k}; sms = the
//     multiprocessor count the plans assume; counts = int32[out elements], incremented per store
//     (may be null). Returns null, or an error message (valid until the next call).
//   fa_emu_plan(op, shape, sms, acc_bytes, out[12]) the plan of the op's main kernel.
//   fa_emu_convert(kind, n, src, dst) float <-> half / bfloat16 bit conversions of the shim.
//   fa_emu_set_plant(n) switches on planted bug n of a mutated copy (the tests' proof they can fail).
#include "cuda_shim.h"
#include "cuda/adaptive_conv_kernels.cuh"

#include <string>

using featup_adapters::ConvShape;
namespace ck = featup_adapters::cuda_kernels;

namespace {

thread_local std::string g_error;
thread_local int64_t g_launches = 0;

struct EmuRuntime {
  int64_t sms_;
  std::vector<std::unique_ptr<unsigned char[]>> scratch;
  std::vector<std::unique_ptr<std::atomic<int32_t>[]>> scratch_counts;
  std::vector<int64_t> scratch_elems;

  int64_t sms() const { return sms_; }

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), const ck::Plan& p, Args... args) {
    ++g_launches;
    // sum_splits_kernel has no __syncthreads and no shared memory: its threads run one after another
    const void* kp = reinterpret_cast<const void*>(kernel);
    const bool serial = kp == reinterpret_cast<const void*>(&ck::sum_splits_kernel<float>) ||
                        kp == reinterpret_cast<const void*>(&ck::sum_splits_kernel<double>) ||
                        kp == reinterpret_cast<const void*>(&ck::sum_splits_kernel<emu::Half>) ||
                        kp == reinterpret_cast<const void*>(&ck::sum_splits_kernel<emu::BFloat16>);
    emu::launch(p.grid, p.block, p.smem, [&] { kernel(static_cast<Params>(args)...); }, serial);
  }

  void zero(void* ptr, int64_t bytes) {
    // a memset writes every byte once: count it per element like a kernel's stores
    for (const emu::Region& r : emu::regions().list)
      if (static_cast<const char*>(ptr) == r.base) {
        if (bytes != r.elems * r.elem_size) throw emu::Error("zero() of a part of a result");
        for (int64_t e = 0; e < r.elems; ++e) r.counts[e].fetch_add(1);
      }
    std::memset(ptr, 0, static_cast<size_t>(bytes));
  }

  void* workspace(int64_t bytes) {
    scratch.emplace_back(new unsigned char[bytes]);
    std::memset(scratch.back().get(), 0xff, static_cast<size_t>(bytes));  // NaN until written
    const int64_t elems = bytes / 4;  // counted per 4 bytes; the partial sums are float or double
    scratch_counts.emplace_back(new std::atomic<int32_t>[elems]);
    for (int64_t e = 0; e < elems; ++e) scratch_counts.back()[e] = 0;
    scratch_elems.push_back(elems);
    emu::regions().add(scratch.back().get(), elems, 0, scratch_counts.back().get());  // written once each
    return scratch.back().get();
  }

  [[noreturn]] void fail(const char* message) { throw emu::Error(message); }
};

template <typename T>
void run_typed(int op, const void* a, const void* b, void* out, const ConvShape& s, EmuRuntime& rt) {
  const T* pa = static_cast<const T*>(a);
  const T* pb = static_cast<const T*>(b);
  T* po = static_cast<T*>(out);
  if (op == 0) ck::run_forward<T>(rt, pa, pb, po, s);
  else if (op == 1) ck::run_grad_input<T>(rt, pa, pb, po, s);
  else if (op == 2) ck::run_grad_filters<T>(rt, pa, pb, po, s);
  else throw emu::Error("unknown op " + std::to_string(op));
}

int64_t out_elems(int op, const ConvShape& s) {
  if (op == 0) return s.B * s.C * s.H * s.W;
  if (op == 1) return s.B * s.C * s.Hp() * s.Wp();
  return s.B * s.H * s.W * s.kk();
}

int64_t dtype_size(int dtype) { return dtype == 0 ? 4 : dtype == 1 ? 8 : 2; }

}  // namespace

extern "C" {

const char* fa_emu_run(int op, int dtype, const void* a, const void* b, void* out, const int64_t* shape,
                       int64_t sms, int32_t* counts) {
  const ConvShape s{shape[0], shape[1], shape[2], shape[3], shape[4]};
  emu::regions().list.clear();
  g_launches = 0;
  try {
    static_assert(sizeof(std::atomic<int32_t>) == sizeof(int32_t), "counts are handed over as int32");
    const int64_t n = out_elems(op, s);
    std::unique_ptr<std::atomic<int32_t>[]> own;
    std::atomic<int32_t>* c = reinterpret_cast<std::atomic<int32_t>*>(counts);
    if (c == nullptr) {
      own.reset(new std::atomic<int32_t>[n > 0 ? n : 1]);
      for (int64_t e = 0; e < n; ++e) own[e] = 0;
      c = own.get();
    }
    emu::regions().add(out, n, dtype_size(dtype), c);
    EmuRuntime rt{};
    rt.sms_ = sms;
    auto run = [&](auto tag) {
      using T = decltype(tag);
      run_typed<T>(op, a, b, out, s, rt);
    };
    switch (dtype) {
      case 0: run(float{}); break;
      case 1: run(double{}); break;
      case 2: run(emu::Half{}); break;
      case 3: run(emu::BFloat16{}); break;
      default: throw emu::Error("unknown dtype " + std::to_string(dtype));
    }
    for (size_t q = 0; q < rt.scratch_counts.size(); ++q) {
      const int64_t acc_words = static_cast<int64_t>(dtype == 1 ? 2 : 1);
      for (int64_t e = 0; e < rt.scratch_elems[q]; e += acc_words)
        if (rt.scratch_counts[q][e] != 1)
          throw emu::Error("partial sum " + std::to_string(e / acc_words) + " written " +
                           std::to_string(rt.scratch_counts[q][e].load()) + " times");
    }
  } catch (const std::exception& e) {
    g_error = e.what();
    emu::regions().list.clear();
    return g_error.c_str();
  }
  emu::regions().list.clear();
  return nullptr;
}

int64_t fa_emu_launches() { return g_launches; }

// Enables planted bug n in a mutated copy of the kernels (see tests/test_cuda_emulated.py).
void fa_emu_set_plant(int n) { emu::plant = n; }

// out: grid x, y, z, block x, y, z, smem, rows, splits, per_split
const char* fa_emu_plan(int op, const int64_t* shape, int64_t sms, int64_t acc_bytes, int64_t* out) {
  const ConvShape s{shape[0], shape[1], shape[2], shape[3], shape[4]};
  ck::Plan p;
  if (op == 0) p = ck::forward_plan(s, sms, acc_bytes);
  else if (op == 1) p = ck::grad_input_plan(s, sms, acc_bytes);
  else if (op == 2) p = ck::grad_filters_plan(s, sms, acc_bytes);
  else return "unknown op";
  const int64_t v[10] = {p.grid.x, p.grid.y, p.grid.z, p.block.x, p.block.y, p.block.z,
                         p.smem, p.rows, p.splits, p.per_split};
  for (int q = 0; q < 10; ++q) out[q] = v[q];
  return nullptr;
}

// kind 0: float -> half bits, 1: half bits -> float, 2: float -> bfloat16 bits, 3: bfloat16 bits -> float
void fa_emu_convert(int kind, int64_t n, const void* src, void* dst) {
  for (int64_t e = 0; e < n; ++e) {
    if (kind == 0) static_cast<uint16_t*>(dst)[e] = emu::Half(static_cast<const float*>(src)[e]).bits;
    else if (kind == 1) static_cast<float*>(dst)[e] = emu::half_bits_to_float(static_cast<const uint16_t*>(src)[e]);
    else if (kind == 2) static_cast<uint16_t*>(dst)[e] = emu::BFloat16(static_cast<const float*>(src)[e]).bits;
    else static_cast<float*>(dst)[e] = emu::bf16_bits_to_float(static_cast<const uint16_t*>(src)[e]);
  }
}

}  // extern "C"
