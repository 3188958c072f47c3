// masked_linear on CPU: the interface between the driver (masked_linear.cpp,
// which blocks the problem, builds the masked weight tiles and runs blocks in
// parallel) and the per-ISA kernels (masked_tile_impl.h, compiled once per ISA,
// see isa.h): the GEMM micro-kernel, the few-row forward and the masked row copy.
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

// Rows of x a MaskedGemvFn call takes at most (registers: 2 accumulators each).
inline constexpr int64_t kMaskedGemvRows = 8;

// Few rows of x (the memory-bound case): out[i] = sum over the kept columns c of
// w[c] * x[i * k + c] for i < m (1 <= m <= kMaskedGemvRows), one weight row w of
// k elements (float, c10::Half or c10::BFloat16, widened exactly) whose mask is
// the row's ceil(k / 32) words of bits; a pruned weight counts as +0.0 whatever
// its value (as in the B tiles). x: m rows of k float32. Sums in float32, in a
// fixed order for the ISA: each output is one row's dot product, so results do
// not depend on the thread count. Reads w[0, k) and x's m rows only.
using MaskedGemvFn = void (*)(const void* w, const int32_t* bits, int64_t k, const float* x, int64_t m, float* out);

// dst[j] = src[j] (T = float, c10::Half or c10::BFloat16, widened exactly) where
// the mask keeps column c0 + j, else +0.0 (whatever src[j] is), for j < n; the
// row's mask words start at bits, and c0 % 32 == 0. Reads src[0, n) only.
using MaskedCopyFn = void (*)(const void* src, const int32_t* bits, int64_t c0, int64_t n, float* dst);

// One function per weight dtype (for_activation_dtype picks the entry).
template <typename Fn>
struct PerDtype {
  Fn f32;
  Fn f16;
  Fn bf16;
};

struct MaskedTiles {
  GemmTileFn gemm;
  // The weight tiles of grad_x and grad_w's masked epilogue (f32).
  PerDtype<MaskedCopyFn> copy;
  // AVX-512: 16 columns per vector, the mask applied with a zeroing move; AVX2: 8
  // columns, an AND with the byte's lane mask; baseline: scalar. A row's last
  // partial word is scalar on every ISA.
  PerDtype<MaskedGemvFn> gemv;
};

MaskedTiles masked_tiles_default();
MaskedTiles masked_tiles_avx2();
MaskedTiles masked_tiles_avx512();

}  // namespace multiflow::cpu
