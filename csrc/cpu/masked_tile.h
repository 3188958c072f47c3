// masked_linear on CPU: the interface between the driver (masked_linear.cpp,
// which blocks the problem, builds the masked weight tiles and runs blocks in
// parallel) and the per-ISA GEMM micro-kernel (masked_tile_impl.h, compiled
// once per ISA, see isa.h).
#pragma once

#include <cstdint>

namespace multiflow::cpu {

// Columns of a B tile are padded to a multiple of this (a whole number of the
// widest micro-kernel's column panels: 2 AVX-512 vectors of float).
inline constexpr int64_t kMaskedColPad = 32;

// c[i * ldc + j] += sum_p a[i * a_rs + p * a_cs] * b[p * ldb + j]
// for i < rows, j < cols, p < depth, in float32, p ascending for every (i, j)
// (the same order whatever the ISA's panel widths: results do not depend on the
// blocking of rows and columns). cols % kMaskedColPad == 0; ldb, ldc >= cols.
using GemmTileFn = void (*)(
    const float* a,
    int64_t a_rs,
    int64_t a_cs,
    const float* b,
    int64_t ldb,
    float* c,
    int64_t ldc,
    int64_t rows,
    int64_t cols,
    int64_t depth);

struct MaskedTiles {
  GemmTileFn gemm;
};

MaskedTiles masked_tiles_default();
MaskedTiles masked_tiles_avx2();
MaskedTiles masked_tiles_avx512();

}  // namespace multiflow::cpu
