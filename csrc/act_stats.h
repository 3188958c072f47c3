// sq_sum_accumulate_, the device-independent half: argument checks and the
// (tokens, features) view that every backend's kernel reads.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace multiflow {

struct SqSumProblem {
  // x as (n_tokens, n_features): element (t, j) is at x.data_ptr() + t * row_stride + j.
  // A view of the caller's x whenever its leading dims flatten to one stride and
  // its features are contiguous; a contiguous copy otherwise.
  at::Tensor x;
  // Undefined (keep every token) or a contiguous bool tensor of n_tokens elements.
  at::Tensor mask;
  int64_t n_tokens = 0;
  int64_t n_features = 0;
  int64_t row_stride = 0;
};

// Checks the arguments against the schema's contract (TORCH_CHECK, naming the
// argument at fault) and builds the view above.
SqSumProblem prepare_sq_sum(
    const at::Tensor& acc,
    const at::Tensor& x,
    const std::optional<at::Tensor>& token_mask);

}  // namespace multiflow
