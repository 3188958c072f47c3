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

// Weight rows one call of the kernel takes (their segments share the loads of x).
inline constexpr int64_t kBitmapRowsPerCall = 4;

// Floats of scratch per (row of x, weight row): two accumulators of the
// widest ISA's 16 lanes.
inline constexpr int64_t kBitmapScratchPerRow = 32;

// out[j * m + i] = sum_c W_j[c] * x[i * ldx + c] for i < m and j < n_rows
// (1 <= n_rows <= kBitmapRowsPerCall), in float32, where W_j is weight row j of
// the bitmap format: its kept weights start at values + row_ptr[j] (values of
// type T = float, c10::Half or c10::BFloat16, widened exactly), its mask words
// at bits + j * words, and row_ptr[j + 1] - row_ptr[j] is their popcount (the
// caller has checked, and that no padding bit past in_features is set).
// values holds n_values elements in all: loads may run past a row's values
// into the next rows' (never used), never past the tensor. x rows hold
// words * 32 floats (zero past in_features). scratch: m * n_rows *
// kBitmapScratchPerRow floats. Each output is summed in a fixed order
// (segments ascending, a fixed lane split inside) whatever n_rows and the
// thread count.
using BitmapRowFn = void (*)(
    const void* values,
    int64_t n_values,
    const int32_t* row_ptr,
    const int32_t* bits,
    int64_t words,
    int64_t n_rows,
    const float* x,
    int64_t m,
    int64_t ldx,
    float* scratch,
    float* out);

// Weight rows one call of a BitmapGemvFn takes at most.
inline constexpr int64_t kBitmapGemvMaxRows = 16;

// One row of x whose elements are all finite (the caller checks): out[j] =
// sum over the kept columns c of W_j[c] * x[c] for j < n_rows <= kBitmapGemvMaxRows,
// in float32 (each row summed in a fixed order whatever n_rows and its place). Only
// the kept columns are multiplied (x is compressed to them, 16 or 32 columns at a
// time on AVX-512, 8 on AVX2; AVX2 zeroes the lanes past them), which is why x must be finite: a pruned column's inf / NaN would not
// reach the output as it does through F.linear (0 * inf), so the caller takes
// the BitmapRowFn path then. x holds words * 32 floats (zero past in_features).
// This kernel checks each row's count itself and never reads past
// values + n_values (the whole tensor; its loads may run into the next rows'
// values, which are not used): it returns -1, or the first j whose bits'
// popcount differs from row_ptr[j + 1] - row_ptr[j] (out is then undefined).
// row_ptr indexes values (row_ptr[0] need not be 0: a block of rows); the
// caller has checked that no padding bit past in_features is set.
using BitmapGemvFn = int64_t (*)(
    const void* values,
    int64_t n_values,
    const int32_t* row_ptr,
    const int32_t* bits,
    int64_t words,
    int64_t n_rows,
    const float* x,
    float* out);

// Rows of x in groups of this many (one vector of float32 lanes per column).
inline constexpr int64_t kBitmapSpmmGroup = 16;

// Several rows of x, all finite (the caller checks; as for BitmapGemvFn, only the
// kept columns are multiplied), given transposed: xt[(g * cols_pad + c) * 16 + l]
// = x[16 g + l][c] (zero where 16 g + l >= m), for g < ceil(m / 16) and
// c < cols_pad = words * 32. out[j * m + i] = sum over the kept columns c of
// W_j[c] * x[i][c] for j < n_rows, i < m. Each weight row's kept columns are first
// listed in idx (n_rows * (words * 32 + 16) int32 of scratch), then every kept
// weight meets the 16-row vectors of its column. Every row's count is checked
// before any of its values is read: returns -1 or the first row whose count
// disagrees (out then undefined); the caller has checked the padding bits.
using BitmapSpmmFn = int64_t (*)(
    const void* values,
    const int32_t* row_ptr,
    const int32_t* bits,
    int64_t words,
    int64_t n_rows,
    const float* xt,
    int64_t m,
    int32_t* idx,
    float* out);

// The format conversions, one weight row per call, on the elements' bits (E =
// uint32_t for float32, uint16_t for float16 / bfloat16: copied, never converted,
// so the round trip is exact, NaN payloads and -0.0 included). No bit at or past
// cols is set in the row's ceil(cols / 32) words (pack_mask's bits; unpack's
// caller has refused padding bits).
//
// pack: out[0, n) = w[c] for each set bit c, in column order, where n is the
// row's popcount; reads w[0, cols) only, writes out[0, n) only.
using BitmapPackRowFn = void (*)(const void* w, int64_t cols, const int32_t* bits, void* out, int64_t n);

// unpack: out[c] for c < cols = the next value for each set bit c, 0 elsewhere;
// reads the row's popcount(bits) values from `values` (loads may run into the
// next rows' values, never past values_end), writes out[0, cols) only.
using BitmapUnpackRowFn = void (*)(const void* values, const void* values_end, const int32_t* bits, int64_t cols,
                                   void* out);

struct BitmapTiles {
  BitmapRowFn row_f32;
  BitmapRowFn row_f16;
  BitmapRowFn row_bf16;
  // nullptr where the ISA has none (AVX-512 and AVX2 have one; the baseline build has not).
  BitmapGemvFn gemv_f32;
  BitmapGemvFn gemv_f16;
  BitmapGemvFn gemv_bf16;
  BitmapSpmmFn spmm_f32;
  BitmapSpmmFn spmm_f16;
  BitmapSpmmFn spmm_bf16;
  // AVX-512: per 16 columns, a register compress / expand (16-bit elements
  // with AVX512-VBMI2, unless MULTIFLOW_CPU_VBMI2=0: per 32 columns in 16-bit
  // lanes); AVX2: per 8 columns, a permute from a 256-entry table; baseline:
  // scalar.
  BitmapPackRowFn pack32;
  BitmapPackRowFn pack16;
  BitmapUnpackRowFn unpack32;
  BitmapUnpackRowFn unpack16;
};

BitmapTiles bitmap_tiles_default();
BitmapTiles bitmap_tiles_avx2();
BitmapTiles bitmap_tiles_avx512();

}  // namespace multiflow::cpu
