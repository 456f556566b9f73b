// Picks the widest kernel set the running CPU supports. FEATUP_CPU_ISA=generic|avx2|avx512
// forces a narrower one (for tests and comparisons); a request the CPU cannot run is ignored.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace featup_adapters {
namespace cpu {

static const IsaKernels& choose() {
  const char* forced = std::getenv("FEATUP_CPU_ISA");
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (forced && std::strcmp(forced, "generic") == 0) return generic::kernels();
  if (forced && std::strcmp(forced, "avx2") == 0 && has2) return avx2::kernels();
  if (has512) return avx512::kernels();
  if (has2) return avx2::kernels();
#endif
  (void)forced;
  return generic::kernels();
}

const IsaKernels& best_kernels() {
  static const IsaKernels& chosen = choose();
  return chosen;
}

}  // namespace cpu
}  // namespace featup_adapters
