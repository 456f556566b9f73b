// AVX2 + FMA build of the CPU kernels; used only when the CPU reports both (kernels_dispatch.cpp).
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FA_ISA avx2
#define FA_ISA_NAME "avx2"
#define FA_CB 6
#define FA_XT 8
#define FA_PF_BYTES 128  // software prefetch distance of the kernels
#define FA_TT 8
#define FA_VEC_BYTES 32
#include "kernels_impl.h"
#pragma GCC pop_options
#endif
