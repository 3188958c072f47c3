// Argument checks shared by the compressed-weight formats (bitmap, 2:4), naming
// the op and the argument at fault: the weight and mask a packing op takes, and
// the x and bias of a linear op over a compressed weight, with the 2-D view of x
// every backend reads. Device-independent (no data read).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace multiflow {

// weight must be 2-D float32, float16 or bfloat16; mask bool of weight's shape
// on weight's device.
void check_pack_input(const char* op, const at::Tensor& weight, const at::Tensor& mask);

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

// y of a linear op over a compressed weight when no kernel has to run: empty when x has no
// rows or the weight no outputs, bias (or 0) broadcast when in_features is 0; nullopt
// otherwise. x is (m, cols), y is returned viewed as out_shape.
std::optional<at::Tensor> trivial_linear_result(
    const at::Tensor& x,
    const at::Tensor& bias,
    int64_t m,
    int64_t rows,
    int64_t cols,
    at::IntArrayRef out_shape);

// The same for a format's problem struct (members x, bias, m, rows, cols, out_shape).
template <typename Problem>
std::optional<at::Tensor> trivial_linear_result(const Problem& p) {
  return trivial_linear_result(p.x, p.bias, p.m, p.rows, p.cols, p.out_shape);
}

// Moves `in` into a format's problem struct (members x, bias, m, out_shape).
template <typename Problem>
void set_linear_input(Problem& p, LinearInput&& in) {
  p.x = std::move(in.x);
  p.bias = std::move(in.bias);
  p.m = in.m;
  p.out_shape = std::move(in.out_shape);
}

}  // namespace multiflow
