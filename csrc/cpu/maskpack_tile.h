// pack_mask / unpack_mask on CPU: the interface between the driver
// (maskpack.cpp, which splits the work into tiles and runs them in parallel)
// and the per-ISA inner loops (maskpack_tile_impl.h, compiled once per ISA,
// see isa.h).
#pragma once

#include <cstdint>

namespace multiflow::cpu {

// Columns per tile: a whole number of 64-column AVX-512 steps, and 8 KiB of
// bools (256 words) per row segment, so a tile of a few rows stays in L1/L2.
inline constexpr int64_t kMaskPackColBlock = 8192;

// For r < rows: words[r * words_stride + w] = the 32 bools
// mask[r * mask_stride + 32 * w .. + 31] as bits 0..31 (a byte is true when it
// is not zero), for w < ceil(cols / 32); bits at or past `cols` are 0.
using PackTileFn = void (*)(
    const bool* mask,
    int64_t mask_stride,
    int64_t rows,
    int64_t cols,
    int32_t* words,
    int64_t words_stride);

// For r < rows and c < cols: mask[r * mask_stride + c] = bit (c % 32) of
// words[r * words_stride + c / 32]. Bits at or past `cols` are never read.
using UnpackTileFn = void (*)(
    const int32_t* words,
    int64_t words_stride,
    int64_t rows,
    int64_t cols,
    bool* mask,
    int64_t mask_stride);

struct MaskPackTiles {
  PackTileFn pack;
  UnpackTileFn unpack;
};

MaskPackTiles mask_pack_tiles_default();
MaskPackTiles mask_pack_tiles_avx2();
MaskPackTiles mask_pack_tiles_avx512();

}  // namespace multiflow::cpu
