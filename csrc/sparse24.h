// sparse24_pack / sparse24_unpack / sparse24_linear, the device-independent half:
// argument checks (naming the argument at fault) and the views every backend reads.
//
// The 2:4 format of a weight W (out, in), in % 4 == 0, with a keep-mask M that keeps
// at most 2 of every 4 consecutive weights of a row (the schema's contract, csrc/ops.cpp):
//
//   values    (out, in / 2), W's dtype. Chunk q of row r (columns 4q .. 4q + 3) owns
//             values[r, 2q] and values[r, 2q + 1]: its kept weights in increasing column
//             order. A chunk with fewer than 2 kept weights is filled up with zeros at
//             the lowest unused positions (so every chunk names 2 distinct positions).
//   metadata  int16 (out, ceil(in / 16)). Chunk q of row r is described by the 4 bits
//             at bit 4 * (q % 4) of metadata[r, q / 4]: bits 0-1 = the position (0..3)
//             in the chunk of values[r, 2q], bits 2-3 = that of values[r, 2q + 1];
//             always first < second. The padding chunks of a row's last word
//             (in % 16 != 0) are 0.
//
// Each int16 word is bit for bit the 16-bit half of the metadata register that
// mma.sp.m16n8k32 (f16 / bf16, sparsity selector 0) reads for one row and 16 columns:
// lane 4g + j (j = 0, 1) of a warp holds rows g (low half) and g + 8 (high half) of
// the 16-row tile, columns 16 j .. 16 j + 15 of the 32-column k-step. The CUDA kernel
// assembles the registers from two words; nothing is reordered at pack time.
// Positions are ordered and distinct, as mma.sp requires (0b0000, 0b0101, 0b1010 and
// 0b1111 are undefined there).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace multiflow {

// Columns per metadata word.
inline constexpr int64_t kSparse24WordCols = 16;

constexpr int64_t sparse24_words(int64_t cols) {  // constexpr: callable in device code too
  return (cols + kSparse24WordCols - 1) / kSparse24WordCols;
}

struct Sparse24PackProblem {
  at::Tensor weight;  // (rows, cols), contiguous
  at::Tensor mask;    // (rows, cols) bool, contiguous
  int64_t rows = 0;
  int64_t cols = 0;
};

struct Sparse24Problem {
  // Contiguous views of the format.
  at::Tensor values;    // (rows, cols / 2)
  at::Tensor metadata;  // int16 (rows, ceil(cols / 16))
  int64_t rows = 0;     // out_features
  int64_t cols = 0;     // in_features = 2 * values.size(1)
  // sparse24_linear only: x as (m, cols) contiguous, bias (rows,) or undefined.
  at::Tensor x;
  at::Tensor bias;
  int64_t m = 0;
  std::vector<int64_t> out_shape;  // x.shape[:-1] + (rows,)
};

// Checks dtypes, shapes, devices and in % 4 == 0. Whether the mask is 2:4 is the
// packing kernel's check (it reads the mask anyway): ValueError naming the rows.
Sparse24PackProblem prepare_sparse24_pack(const at::Tensor& weight, const at::Tensor& mask);

Sparse24Problem prepare_sparse24_unpack(const at::Tensor& values, const at::Tensor& metadata);

Sparse24Problem prepare_sparse24_linear(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& metadata,
    const std::optional<at::Tensor>& bias);

}  // namespace multiflow
