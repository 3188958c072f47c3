// bitmap_pack / bitmap_unpack / bitmap_linear, the device-independent half:
// argument checks (naming the argument at fault) and the views every backend reads.
//
// The bitmap format of a weight W (out, in) with keep-mask M (the schema's
// contract, csrc/ops.cpp):
//   values    (nnz,), W's dtype: the kept weights, row-major;
//   bits      int32 (out, ceil(in / 32)) = pack_mask(M) (csrc/maskpack.h);
//   row_ptr   int32 (out + 1,): index in values of row r's first kept weight
//             (so nnz <= 2^31 - 1);
//   block_ptr int32 (out, ceil(in / 512) - 1, or 0 columns for in <= 512): entry
//             [r, b - 1] = kept weights of row r before column 512 b, for the blocks
//             b >= 1 (block 0 starts at row_ptr[r]: its offset, always 0, is not stored).
// Metadata per row: 4 bytes of row_ptr + 4 per 512 columns past the first, so a 75%-sparse
// float16 weight with 768 inputs takes 0.25 (values) + 0.0625 (bits) + 0.0052 = 0.318x
// its dense bytes.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace multiflow {

// Columns per block_ptr entry.
inline constexpr int64_t kBitmapBlockCols = 512;

inline int64_t bitmap_blocks(int64_t cols) {
  return (cols + kBitmapBlockCols - 1) / kBitmapBlockCols;
}

// Columns of block_ptr: one per 512-column block after the first.
inline int64_t bitmap_block_ptr_cols(int64_t cols) {
  return std::max<int64_t>(bitmap_blocks(cols) - 1, 0);
}

// Kept weights a bitmap format may hold (row_ptr is int32).
inline constexpr int64_t kBitmapMaxNnz = std::numeric_limits<int32_t>::max();

struct BitmapPackProblem {
  at::Tensor weight;  // (rows, cols), contiguous
  at::Tensor mask;    // (rows, cols) bool, contiguous
  int64_t rows = 0;
  int64_t cols = 0;
};

struct BitmapProblem {
  // Contiguous views of the format.
  at::Tensor values;
  at::Tensor bits;
  at::Tensor row_ptr;
  at::Tensor block_ptr;
  int64_t rows = 0;  // out_features
  int64_t cols = 0;  // in_features
  // bitmap_linear only: x as (m, cols) contiguous, bias (rows,) or undefined.
  at::Tensor x;
  at::Tensor bias;
  int64_t m = 0;
  std::vector<int64_t> out_shape;  // x.shape[:-1] + (rows,)
};

BitmapPackProblem prepare_bitmap_pack(const at::Tensor& weight, const at::Tensor& mask);

BitmapProblem prepare_bitmap_unpack(
    const at::Tensor& values,
    const at::Tensor& bits,
    const at::Tensor& row_ptr,
    const at::Tensor& block_ptr,
    int64_t in_features);

// row_ptr's order: raises naming the first row r with row_ptr[r] > row_ptr[r + 1].
void check_row_ptr_order(const char* op, const int32_t* rp, int64_t rows);

// Checks x, bias and the format as prepare_bitmap_unpack does, except row_ptr's order,
// which the kernels must check before they read a row (rows_inside_values).
BitmapProblem prepare_bitmap_linear(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& bits,
    const at::Tensor& row_ptr,
    const at::Tensor& block_ptr,
    int64_t in_features,
    const std::optional<at::Tensor>& bias,
    const char* op = "multiflow::bitmap_linear");  // the op named in error messages

// Rows [r0, r0 + nr) lie inside values (n_values long) by row_ptr: its entries there are
// non-decreasing, from >= 0 to <= n_values.
inline bool rows_inside_values(const int32_t* rp, int64_t r0, int64_t nr, int64_t n_values) {
  if (rp[r0] < 0 || rp[r0 + nr] > n_values) {
    return false;
  }
  for (int64_t r = r0; r < r0 + nr; ++r) {
    if (rp[r] > rp[r + 1]) {
      return false;
    }
  }
  return true;
}

}  // namespace multiflow
