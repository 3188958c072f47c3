#include "act_stats.h"

#include <ATen/ATen.h>

namespace multiflow {

SqSumProblem prepare_sq_sum(
    const at::Tensor& acc,
    const at::Tensor& x,
    const std::optional<at::Tensor>& token_mask) {
  constexpr const char* op = "multiflow::sq_sum_accumulate_";

  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape (..., F) with at least one dimension, got a 0-d tensor");
  const auto xt = x.scalar_type();
  TORCH_CHECK(
      xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16,
      op, ": x must be float32, float16 or bfloat16, got ", xt);
  const int64_t n_features = x.size(-1);

  TORCH_CHECK(acc.scalar_type() == at::kFloat, op, ": acc (the accumulator) must be float32, got ", acc.scalar_type());
  TORCH_CHECK(
      acc.dim() == 1 && acc.size(0) == n_features,
      op, ": acc must have shape (F,) where F = x.shape[-1] = ", n_features, ", got acc of shape ", acc.sizes());
  TORCH_CHECK(acc.is_contiguous(), op, ": acc must be contiguous");
  TORCH_CHECK(
      acc.device() == x.device(),
      op, ": acc and x must be on the same device, got acc on ", acc.device(), " and x on ", x.device());

  const auto leading = x.sizes().slice(0, x.dim() - 1);
  SqSumProblem p;
  p.n_features = n_features;
  p.n_tokens = c10::multiply_integers(leading);

  if (token_mask.has_value()) {
    const at::Tensor& m = *token_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": token_mask must be a bool tensor, got ", m.scalar_type());
    TORCH_CHECK(
        m.sizes() == leading,
        op, ": token_mask must have shape x.shape[:-1] = ", leading, ", got ", m.sizes());
    TORCH_CHECK(
        m.device() == x.device(),
        op, ": token_mask and x must be on the same device, got token_mask on ", m.device(), " and x on ", x.device());
    // One byte per token: a copy, where one is needed, is cheap next to x.
    p.mask = m.reshape({p.n_tokens}).contiguous();
  }

  // reshape returns a view whenever the leading dims flatten to a single
  // stride, so the common cases (contiguous x, or x sliced along its feature
  // dim, or a flattening view) read the caller's memory in place.
  at::Tensor x2 = x.reshape({p.n_tokens, n_features});
  if (n_features > 1 && x2.stride(1) != 1) {
    x2 = x2.contiguous();
  }
  p.x = x2;
  p.row_stride = x2.stride(0);
  return p;
}

}  // namespace multiflow
