#include "format_args.h"

#include <ATen/ATen.h>

#include "dtypes.h"

namespace multiflow {

void check_pack_input(const char* op, const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(
      is_weight_dtype(weight.scalar_type()),
      op, ": weight must be float32, float16 or bfloat16, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must have shape (out_features, in_features), got ", weight.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK(
      mask.sizes() == weight.sizes(),
      op, ": mask must have weight's shape ", weight.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(
      mask.device() == weight.device(), op, ": mask is on ", mask.device(), " but weight is on ", weight.device());
}

std::optional<at::Tensor> trivial_linear_result(
    const at::Tensor& x,
    const at::Tensor& bias,
    int64_t m,
    int64_t rows,
    int64_t cols,
    at::IntArrayRef out_shape) {
  if (m == 0 || rows == 0) {
    return at::empty({m, rows}, x.options()).view(out_shape);
  }
  if (cols == 0) {
    at::Tensor y = at::empty({m, rows}, x.options());
    return (bias.defined() ? y.copy_(bias.expand({m, rows})) : y.zero_()).view(out_shape);
  }
  return std::nullopt;
}

LinearInput prepare_linear_input(
    const char* op,
    const at::Tensor& x,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& values,
    int64_t in_features,
    int64_t out_features) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape (..., in_features), got a 0-d tensor");
  TORCH_CHECK(
      x.scalar_type() == values.scalar_type(),
      op, ": x must have values' dtype ", values.scalar_type(), ", got ", x.scalar_type());
  TORCH_CHECK(
      x.size(-1) == in_features,
      op, ": in_features mismatch: x.shape[-1] = ", x.size(-1), " but in_features = ", in_features);
  TORCH_CHECK(x.device() == values.device(), op, ": x is on ", x.device(), " but values is on ", values.device());
  LinearInput in;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(
        bias->dim() == 1 && bias->size(0) == out_features,
        op, ": bias must have shape (out_features,) = (", out_features, ",), got ", bias->sizes());
    TORCH_CHECK(
        bias->scalar_type() == x.scalar_type(),
        op, ": bias must have x's dtype ", x.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ", x.device());
    in.bias = bias->contiguous();
  }
  in.m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    in.m *= x.size(d);
  }
  in.x = x.reshape({in.m, in_features}).contiguous();
  in.out_shape = x.sizes().vec();
  in.out_shape.back() = out_features;
  return in;
}

}  // namespace multiflow
