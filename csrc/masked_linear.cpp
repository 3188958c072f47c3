#include "masked_linear.h"

#include <ATen/ATen.h>

#include "dtypes.h"
#include "maskpack.h"

namespace multiflow {
namespace {

void check_common(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask_bits) {
  TORCH_CHECK(
      is_weight_dtype(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape (..., in_features), got a 0-d tensor");
  TORCH_CHECK(
      weight.dim() == 2, op, ": weight must have shape (out_features, in_features), got shape ", weight.sizes());
  TORCH_CHECK(
      weight.scalar_type() == x.scalar_type(),
      op, ": weight must have x's dtype ", x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(
      x.size(-1) == weight.size(1),
      op, ": in_features mismatch: x.shape[-1] = ", x.size(-1), " but weight has shape ", weight.sizes(),
      " (out_features, in_features)");
  TORCH_CHECK(mask_bits.scalar_type() == at::kInt, op, ": mask_bits must be an int32 tensor (pack_mask's output), got ",
              mask_bits.scalar_type());
  const int64_t words = packed_words(weight.size(1));
  TORCH_CHECK(
      mask_bits.dim() == 2 && mask_bits.size(0) == weight.size(0) && mask_bits.size(1) == words,
      op, ": mask_bits must have shape (out_features, ceil(in_features / 32)) = (", weight.size(0), ", ", words,
      "), got ", mask_bits.sizes());
  TORCH_CHECK(
      weight.device() == x.device() && mask_bits.device() == x.device(),
      op, ": x, weight and mask_bits must be on one device, got ", x.device(), ", ", weight.device(), ", ",
      mask_bits.device());
}

void fill_views(MaskedLinearProblem& p, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask_bits) {
  p.k = weight.size(1);
  p.n = weight.size(0);
  p.m = x.numel() / std::max<int64_t>(p.k, 1);
  if (p.k == 0) {
    p.m = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) {
      p.m *= x.size(d);
    }
  }
  p.x = x.reshape({p.m, p.k}).contiguous();
  p.weight = weight.contiguous();
  p.mask_bits = mask_bits.contiguous();
  p.out_shape = x.sizes().vec();
  p.out_shape.back() = p.n;
}

}  // namespace

MaskedLinearProblem prepare_masked_linear(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& mask_bits,
    const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "multiflow::masked_linear";
  check_common(op, x, weight, mask_bits);
  MaskedLinearProblem p;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(
        bias->dim() == 1 && bias->size(0) == weight.size(0),
        op, ": bias must have shape (out_features,) = (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(
        bias->scalar_type() == x.scalar_type(),
        op, ": bias must have x's dtype ", x.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ", x.device());
    p.bias = bias->contiguous();
  }
  fill_views(p, x, weight, mask_bits);
  return p;
}

MaskedLinearProblem prepare_masked_linear_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& mask_bits) {
  constexpr const char* op = "multiflow::masked_linear_backward";
  check_common(op, x, weight, mask_bits);
  std::vector<int64_t> expect = x.sizes().vec();
  expect.back() = weight.size(0);
  TORCH_CHECK(
      grad_out.sizes() == at::IntArrayRef(expect),
      op, ": grad_out must have shape x.shape[:-1] + (out_features,) = ", at::IntArrayRef(expect), ", got ",
      grad_out.sizes());
  TORCH_CHECK(
      grad_out.scalar_type() == x.scalar_type(),
      op, ": grad_out must have x's dtype ", x.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out is on ", grad_out.device(), " but x is on ", x.device());
  MaskedLinearProblem p;
  fill_views(p, x, weight, mask_bits);
  p.grad_out = grad_out.reshape({p.m, p.n}).contiguous();
  return p;
}

at::Tensor skipped_grad(const at::Tensor& x) {
  return at::empty({0}, x.options());
}

}  // namespace multiflow
