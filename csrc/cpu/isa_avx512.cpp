// The CPU inner kernels built for AVX-512 (F, BW, VL, DQ) + FMA, the set
// ATen's own AVX512 kernels assume; called only where selected_isa() says the
// CPU has them. See isa.h for the scheme.
#include "cpu/isa.h"

#if MULTIFLOW_X86_ISAS
#include "cpu/isa_prelude.h"

#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define MULTIFLOW_ISA avx512

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#endif
// The target pragma enables the instructions but, unlike -m flags, does not
// define the feature macros; Sleef's header (included by at::vec) declares its
// vector functions only under them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif

#include "cpu/act_stats_tile_impl.h"
#include "cpu/flow_tile_impl.h"
#include "cpu/select_tile_impl.h"
#include "cpu/maskpack_tile_impl.h"
#include "cpu/masked_tile_impl.h"
#include "cpu/bitmap_tile_impl.h"
#include "cpu/sparse24_tile_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
#endif  // MULTIFLOW_X86_ISAS
