// sparse24_pack / sparse24_unpack / sparse24_linear on CPU: the interface
// between the driver (sparse24.cpp, which splits the rows into parallel blocks,
// raises for a mask that is not 2:4 and writes linear's epilogue) and the
// per-ISA row kernels (sparse24_tile_impl.h, compiled once per ISA, see isa.h).
#pragma once

#include <cstdint>

namespace multiflow::cpu {

// Weight rows one call of the kernel takes at most.
inline constexpr int64_t kSparse24RowsPerCall = 16;

// x rows are padded with zeros to a multiple of this many columns (the widest
// ISA's window of x per step: 2 metadata words).
inline constexpr int64_t kSparse24XPadCols = 32;

// sparse24_linear's kernel: out[j * m + i] = sum_c W_j[c] * x[i * ldx + c] for i < m and j < n_rows
// (1 <= n_rows <= kSparse24RowsPerCall), in float32, where W_j is weight row j
// of the 2:4 format (csrc/sparse24.h): its cols / 2 values at values + j * cols / 2
// (of type T = float, c10::Half or c10::BFloat16, widened exactly) and its
// ceil(cols / 16) metadata words at metadata + j * ceil(cols / 16). x rows hold
// ldx >= kSparse24XPadCols * ceil(cols / kSparse24XPadCols) floats, zero past
// cols. Only the positions the metadata names are multiplied (as the sparse
// tensor cores do), so a non-finite x at a position a row does not name never
// reaches that row. Each output is summed in a fixed order (steps ascending, a
// fixed lane split inside) whatever n_rows, m and the thread count. Any
// metadata is read safely: positions stay inside their chunk.
using Sparse24RowsFn = void (*)(
    const void* values,
    const int16_t* metadata,
    int64_t cols,
    int64_t n_rows,
    const float* x,
    int64_t m,
    int64_t ldx,
    float* out);

// Packs one row of `cols` columns (cols % 4 == 0) into the 2:4 format
// (csrc/sparse24.h) by the elements' bits E (uint32_t for float32, uint16_t for
// float16 / bfloat16): weight and mask (bytes, any nonzero one counts as kept)
// hold cols elements, values cols / 2, metadata ceil(cols / 16) words, padding
// chunks 0. A filler position stores 0, not the weight's bits. Returns false
// when a chunk keeps more than 2 (its code and values are then those of the
// table's pick, and the caller raises). Reads and writes nothing outside the row.
template <typename E>
using Sparse24PackRowFn = bool (*)(const E* weight, const uint8_t* mask, int64_t cols, E* values, uint16_t* metadata);

// Unpacks one row: out (cols elements) = per chunk, zeros, then its first
// value at the code's first position, then its second value at the second
// position (which wins when the two are equal). Any metadata is accepted: the
// 16 codes of every chunk, valid or not, give the same bits on every ISA.
// The padding chunks of the row's last word are ignored.
template <typename E>
using Sparse24UnpackRowFn = void (*)(const E* values, const uint16_t* metadata, int64_t cols, E* out);

struct Sparse24Tiles {
  Sparse24RowsFn f32;
  Sparse24RowsFn f16;
  Sparse24RowsFn bf16;
  Sparse24PackRowFn<uint32_t> pack_row32;
  Sparse24PackRowFn<uint16_t> pack_row16;
  Sparse24UnpackRowFn<uint32_t> unpack_row32;
  Sparse24UnpackRowFn<uint16_t> unpack_row16;
};

Sparse24Tiles sparse24_tiles_default();
Sparse24Tiles sparse24_tiles_avx2();
Sparse24Tiles sparse24_tiles_avx512();

}  // namespace multiflow::cpu
