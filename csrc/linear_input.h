// The x and bias of the linear ops over a compressed weight (bitmap_linear,
// sparse24_linear): their checks, naming the op and the argument at fault, and
// the 2-D view of x every backend reads. Device-independent (no data read).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace multiflow {

struct LinearInput {
  at::Tensor x;     // (m, in_features), contiguous
  at::Tensor bias;  // (out_features,) contiguous, or undefined
  int64_t m = 0;    // the product of x's leading dims
  std::vector<int64_t> out_shape;  // x.shape[:-1] + (out_features,)
};

// x must be (..., in_features) of values' dtype on values' device; bias None or
// (out_features,) of x's dtype and device.
LinearInput prepare_linear_input(
    const char* op,
    const at::Tensor& x,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& values,
    int64_t in_features,
    int64_t out_features);

}  // namespace multiflow
