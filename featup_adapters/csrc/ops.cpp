// Declares the featup_adapters ops once. Kernels register per device in cpu/ and cuda/;
// fake kernels and autograd are registered from Python (featup_adapters/ops/_registration.py),
// which set_python_module points to so they are found whenever the ops are used.
#include <Python.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"
#include "cpu/large_alloc.h"

extern "C" {
// `import featup_adapters._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "featup_adapters ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace featup_adapters {

static std::string cpu_isa() { return cpu::best_kernels().name; }

// An uninitialized CPU tensor for a result written in full by a kernel: a large one from the
// cache of buffers freed before, else with 2 MB pages asked for (large_alloc.h).
static at::Tensor empty_large_cpu(at::IntArrayRef size, at::ScalarType dtype) {
  return empty_large(size, at::TensorOptions().dtype(dtype));
}
static int64_t cpu_cache_bytes() { return large_cache_bytes(); }
static void empty_cpu_cache() { large_cache_clear(); }
static bool set_torch_cpu_cache_op(bool on) { return set_torch_cpu_cache(on); }
static bool torch_cpu_cache_enabled_op() { return torch_cpu_cache_enabled(); }

TORCH_LIBRARY(featup_adapters, m) {
  m.set_python_module("featup_adapters.ops._registration");
  m.def("adaptive_conv(Tensor input, Tensor filters) -> Tensor");
  // out = adaptive_conv(input, filters) (+ bias[c]) in place, e.g. into a band of a larger result
  m.def("adaptive_conv_into(Tensor input, Tensor filters, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("adaptive_conv_grad_input(Tensor grad_out, Tensor filters) -> Tensor");
  m.def("adaptive_conv_grad_filters(Tensor grad_out, Tensor input) -> Tensor");
  m.def("_cpu_isa() -> str", &cpu_isa);
  m.def("_empty_large(int[] size, ScalarType dtype) -> Tensor", &empty_large_cpu);
  m.def("_cpu_cache_bytes() -> int", &cpu_cache_bytes);
  m.def("_empty_cpu_cache() -> ()", &empty_cpu_cache);
  m.def("_set_torch_cpu_cache(bool on) -> bool", &set_torch_cpu_cache_op);
  m.def("_torch_cpu_cache_enabled() -> bool", &torch_cpu_cache_enabled_op);
  // bicubic resize (align_corners=False) to size, then reflect padding by pad (cpu/resize_cpu.cpp)
  m.def("bicubic_pad(Tensor input, int[2] size, int pad) -> Tensor");
  m.def("bicubic_pad_backward(Tensor grad_out, int[2] input_size, int pad) -> Tensor");
  // rows [row0, row1) of bicubic_pad's output from a band of source rows (inference only)
  m.def("bicubic_pad_rows(Tensor input, int[2] size, int pad, int src_rows, int src_row0, int row0, int row1) -> Tensor");
  // adaptive_conv(bicubic_pad(source, size, pad), filters) (+ bias[c]) without the padded map
  // (cpu/resize_conv_cpu.cpp; inference only)
  m.def("bicubic_pad_conv(Tensor source, Tensor filters, int[2] size, int pad, Tensor? bias) -> Tensor");
  // range_proj(guidance) of one JBU stage in eval mode, padded by radius: [B, G, H, W] ->
  // [B, K, H+2r, W+2r] (cpu/stage_filters_cpu.cpp; inference only)
  m.def("jbu_stage_keys(Tensor guidance, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int radius) -> Tensor");
  // the filters [B, H, W, k*k] of one JBU stage in eval mode from its padded keys q_pad
  // [B, K, H+2r, W+2r] and guidance [B, G, H, W] (cpu/stage_filters_cpu.cpp; inference only)
  m.def("jbu_stage_filters(Tensor q_pad, Tensor guidance, float temp, Tensor log_s, Tensor w0, Tensor? b0, "
        "Tensor w3, Tensor? b3, int radius) -> Tensor");
}

// adaptive_conv_into, bicubic_pad_conv and the jbu_stage ops have no derivative: autograd refuses them when a
// gradient would be needed ("... is not implemented"), and otherwise passes them through
// (adaptive_conv_into bumping out's version counter, as any in-place op).
TORCH_LIBRARY_IMPL(featup_adapters, Autograd, m) {
  m.impl("adaptive_conv_into", torch::autograd::autogradNotImplementedFallback());
  m.impl("bicubic_pad_conv", torch::autograd::autogradNotImplementedFallback());
  m.impl("jbu_stage_keys", torch::autograd::autogradNotImplementedFallback());
  m.impl("jbu_stage_filters", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace featup_adapters
