// Portable build of the CPU kernels (baseline ISA of the compiler: SSE2 on x86-64, NEON on aarch64).
#include "kernels.h"

#define FA_ISA generic
#define FA_ISA_NAME "generic"
#define FA_CB 4
#define FA_XT 4
#define FA_PF_BYTES 64  // software prefetch distance of the kernels
#define FA_TT 4
#include "kernels_impl.h"
