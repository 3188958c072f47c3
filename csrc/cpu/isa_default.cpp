// The CPU inner kernels built for the baseline target: the fallback on every
// CPU, and the only path off x86-64 (at::vec still uses NEON etc. there).
// See isa.h for the scheme.
#include "cpu/isa.h"
#include "cpu/isa_prelude.h"

#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define MULTIFLOW_ISA default

#include "cpu/act_stats_tile_impl.h"
#include "cpu/flow_tile_impl.h"
#include "cpu/select_tile_impl.h"
#include "cpu/maskpack_tile_impl.h"
#include "cpu/masked_tile_impl.h"
#include "cpu/bitmap_tile_impl.h"
#include "cpu/sparse24_tile_impl.h"
