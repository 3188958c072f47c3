#include "flow.h"

#include <ATen/ATen.h>

namespace multiflow {

std::vector<FlowLayer> prepare_flow(
    const char* op,
    at::TensorList weights,
    at::TensorList act_sq_norms) {
  TORCH_CHECK(
      weights.size() == act_sq_norms.size(),
      op, ": weights and act_sq_norms must have the same length (one statistic per layer), got ",
      weights.size(), " weights and ", act_sq_norms.size(), " act_sq_norms");

  std::vector<FlowLayer> layers;
  layers.reserve(weights.size());
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    const at::Tensor& a = act_sq_norms[l];
    TORCH_CHECK(w.dim() == 2, op, ": weights[", l, "] must be 2-D (out, in), got shape ", w.sizes());
    const auto wt = w.scalar_type();
    TORCH_CHECK(
        wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16,
        op, ": weights[", l, "] must be float32, float16 or bfloat16, got ", wt);
    TORCH_CHECK(
        w.device() == weights[0].device(),
        op, ": weights[", l, "] is on ", w.device(), " but weights[0] is on ", weights[0].device(),
        " (all layers must be on one device)");
    TORCH_CHECK(a.scalar_type() == at::kFloat, op, ": act_sq_norms[", l, "] must be float32, got ", a.scalar_type());
    TORCH_CHECK(
        a.dim() == 1 && a.size(0) == w.size(1),
        op, ": act_sq_norms[", l, "] must have shape (in,) where in = weights[", l, "].shape[1] = ", w.size(1),
        ", got shape ", a.sizes());
    TORCH_CHECK(
        a.device() == w.device(),
        op, ": act_sq_norms[", l, "] must be on the device of weights[", l, "] (", w.device(), "), got ", a.device());

    FlowLayer layer;
    layer.rows = w.size(0);
    layer.cols = w.size(1);
    // Transposed or column-strided weights are copied once: every kernel
    // streams rows with contiguous columns.
    layer.w = (layer.cols > 1 && w.stride(1) != 1) ? w.contiguous() : w;
    layer.row_stride = layer.w.stride(0);
    layer.a = a.contiguous();
    layers.push_back(std::move(layer));
  }
  return layers;
}

}  // namespace multiflow
