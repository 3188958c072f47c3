// pack_mask / unpack_mask, the device-independent half: argument checks and the
// row views every backend's kernel reads and writes.
//
// Layout (the schema's contract, csrc/ops.cpp): a bool mask (R, C) packs into
// int32 words (R, W), W = ceil(C / 32); bit b of word w of row r is
// mask[r, 32 * w + b] (bit 31 is the sign bit of the int32), padding bits are 0.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace multiflow {

// Words per row of a packed mask with `cols` columns.
inline int64_t packed_words(int64_t cols) {
  return (cols + 31) / 32;
}

struct PackProblem {
  // The mask as (rows, cols) bools: element (r, c) is at mask.data_ptr() + r * row_stride + c.
  // A view of the caller's mask whenever its columns are contiguous; a contiguous copy otherwise.
  at::Tensor mask;
  int64_t row_stride = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  // The result, int32 (rows, packed_words(cols)), contiguous and not yet written.
  at::Tensor bits;
};

struct UnpackProblem {
  // The words as a contiguous int32 (rows, packed_words(cols)) tensor.
  at::Tensor bits;
  int64_t rows = 0;
  int64_t cols = 0;
  // The result, bool (rows, cols), contiguous and not yet written.
  at::Tensor mask;
};

// Check the arguments against the schema's contract (TORCH_CHECK, naming the
// argument at fault), then build the views above and allocate the output.
PackProblem prepare_pack_mask(const at::Tensor& mask);
UnpackProblem prepare_unpack_mask(const at::Tensor& bits, int64_t cols);

}  // namespace multiflow
