// sparse24_linear on CPU: the interface between the driver (sparse24.cpp, which
// splits the output rows into parallel blocks and writes the epilogue) and the
// per-ISA row kernel (sparse24_tile_impl.h, compiled once per ISA, see isa.h).
#pragma once

#include <cstdint>

namespace multiflow::cpu {

// Weight rows one call of the kernel takes at most.
inline constexpr int64_t kSparse24RowsPerCall = 16;

// x rows are padded with zeros to a multiple of this many columns (the widest
// ISA's window of x per step: 2 metadata words).
inline constexpr int64_t kSparse24XPadCols = 32;

// out[j * m + i] = sum_c W_j[c] * x[i * ldx + c] for i < m and j < n_rows
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

struct Sparse24Tiles {
  Sparse24RowsFn f32;
  Sparse24RowsFn f16;
  Sparse24RowsFn bf16;
};

Sparse24Tiles sparse24_tiles_default();
Sparse24Tiles sparse24_tiles_avx2();
Sparse24Tiles sparse24_tiles_avx512();

}  // namespace multiflow::cpu
