// sq_sum_accumulate_ on CPU: the interface between the driver (act_stats.cpp,
// which splits the work into tiles and runs them in parallel) and the per-ISA
// inner loop (act_stats_tile_impl.h, compiled once per ISA, see isa.h).
#pragma once

#include <cstdint>

namespace multiflow::cpu {

// Feature columns per tile. A tile keeps the float32 sums of its columns in an
// L1-resident block (256 floats = 1 KiB) while it streams its tokens' row
// segments (1 KiB of float32, 512 B of half, per token) from memory.
inline constexpr int64_t kSqSumColBlock = 256;

// out[j] += sum over t < n_tokens with (mask == nullptr || mask[t]) of
// float(x[t * row_stride + j])^2, for j < width <= kSqSumColBlock.
// The tokens are summed in order into fresh float32 sums, which are then added
// to out once: the result depends only on the tile's data, never on threads.
using SqSumTileFn = void (*)(
    const void* x,
    int64_t row_stride,
    const bool* mask,
    int64_t n_tokens,
    int64_t width,
    float* out);

struct SqSumTiles {
  SqSumTileFn f32;
  SqSumTileFn f16;
  SqSumTileFn bf16;
};

SqSumTiles sq_sum_tiles_default();
SqSumTiles sq_sum_tiles_avx2();
SqSumTiles sq_sum_tiles_avx512();

}  // namespace multiflow::cpu
