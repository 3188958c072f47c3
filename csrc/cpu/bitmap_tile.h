// bitmap_linear on CPU: the interface between the driver (bitmap.cpp, which
// splits the output rows into parallel blocks and writes the epilogue) and the
// per-ISA row kernel (bitmap_tile_impl.h, compiled once per ISA, see isa.h).
#pragma once

#include <cstdint>

namespace multiflow::cpu {

// A row is decoded kBitmapSegWords words (512 columns, one block_ptr block) at
// a time into a dense float32 segment on the stack (L1), which every row of x
// then reads: the decode is paid once per weight row, whatever M.
inline constexpr int64_t kBitmapSegWords = 16;

// Floats of scratch per row of x the row kernel needs (two accumulators of the
// widest ISA's 16 lanes).
inline constexpr int64_t kBitmapScratchPerRow = 32;

// out[i] = sum_c W[c] * x[i * ldx + c] for i < m, in float32, where W is one
// weight row in the bitmap format: `values` its kept weights (T = float,
// c10::Half or c10::BFloat16, widened exactly), `bits` its `words` mask words.
// x rows hold words * 32 floats (zero past in_features), so padding bits only
// ever meet zeros. scratch: m * kBitmapScratchPerRow floats. The sum order is
// fixed (segments ascending, a fixed lane split inside): the result does not
// depend on the thread count. Returns the number of values read (popcount of bits).
using BitmapRowFn = int64_t (*)(
    const void* values,
    const int32_t* bits,
    int64_t words,
    const float* x,
    int64_t m,
    int64_t ldx,
    float* scratch,
    float* out);

struct BitmapTiles {
  BitmapRowFn row_f32;
  BitmapRowFn row_f16;
  BitmapRowFn row_bf16;
};

BitmapTiles bitmap_tiles_default();
BitmapTiles bitmap_tiles_avx2();
BitmapTiles bitmap_tiles_avx512();

}  // namespace multiflow::cpu
