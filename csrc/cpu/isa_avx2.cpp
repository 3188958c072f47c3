// The CPU inner kernels built for AVX2 + FMA + F16C; called only where
// selected_isa() says the CPU has them. See isa.h for the scheme.
#include "cpu/isa.h"

#if MULTIFLOW_X86_ISAS
#include "cpu/isa_prelude.h"

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define MULTIFLOW_ISA avx2

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
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
