// AVX-512 build of the CPU kernels; used only when the CPU reports AVX-512F (kernels_dispatch.cpp).
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define FA_ISA avx512
#define FA_ISA_NAME "avx512"
#define FA_CB 8
#define FA_XT 16
#define FA_PF_BYTES 128  // software prefetch distance of the kernels
#define FA_TT 8
#define FA_VEC_BYTES 64
#include "kernels_impl.h"
#pragma GCC pop_options
#endif
