#include "select.h"

#include <ATen/ATen.h>

#include "dtypes.h"

namespace multiflow {
namespace {

// `first` names the tensor that set `device` (values[0], w_scale).
void check_same_device(
    const char* op, const char* what, int64_t l, const at::Tensor& t, const char* first, at::Device device) {
  TORCH_CHECK(
      t.device() == device,
      op, ": every tensor must be on one device, got ", what, "[", l, "] on ", t.device(), " and ", first, " on ",
      device);
}

}  // namespace

FlatValues prepare_values(const char* op, at::TensorList values) {
  FlatValues v;
  if (!values.empty()) {
    v.device = values[0].device();
  }
  v.tensors.reserve(values.size());
  v.numels.reserve(values.size());
  for (size_t l = 0; l < values.size(); ++l) {
    const at::Tensor& t = values[l];
    TORCH_CHECK(
        is_weight_dtype(t.scalar_type()),
        op, ": values[", l, "] must be float32, float16 or bfloat16, got ", t.scalar_type());
    check_same_device(op, "values", static_cast<int64_t>(l), t, "values[0]", v.device);
    v.tensors.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
    v.numels.push_back(t.numel());
  }
  return v;
}

void check_group_k(const char* op, const FlatValues& v, int64_t k) {
  int64_t total = 0;
  for (const int64_t n : v.numels) {
    total += n;
  }
  TORCH_CHECK(
      k >= 1 && k <= total,
      op, ": k must be in [1, ", total, "] (1 <= k <= the total number of values), got k = ", k);
}

void check_ks(const char* op, const std::vector<int64_t>& numels, at::IntArrayRef ks) {
  TORCH_CHECK(
      ks.size() == numels.size(),
      op, ": ks must have one entry per tensor (", numels.size(), "), got ", ks.size());
  for (size_t l = 0; l < ks.size(); ++l) {
    TORCH_CHECK(
        ks[l] >= 0 && ks[l] <= numels[l],
        op, ": ks[", l, "] must be in [0, ", numels[l], "] (0 <= k <= numel of tensor ", l, "), got ", ks[l]);
  }
}

void check_threshold(const char* op, const at::Tensor& threshold, at::Device device) {
  TORCH_CHECK(threshold.scalar_type() == at::kFloat, op, ": threshold must be float32, got ", threshold.scalar_type());
  TORCH_CHECK(threshold.dim() == 0, op, ": threshold must be a 0-d tensor, got shape ", threshold.sizes());
  TORCH_CHECK(
      threshold.device() == device,
      op, ": threshold must be on the values' device ", device, ", got ", threshold.device());
}

FlowLayers prepare_flow(
    const char* op,
    at::TensorList weights,
    at::TensorList imp_out,
    at::TensorList imp_in,
    const at::Tensor& w_scale) {
  const auto n_layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK(
      static_cast<int64_t>(imp_out.size()) == n_layers && static_cast<int64_t>(imp_in.size()) == n_layers,
      op, ": weights, imp_out and imp_in must have one entry per layer, got ", n_layers, ", ", imp_out.size(),
      " and ", imp_in.size());
  FlowLayers f;
  f.device = w_scale.device();
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat, op, ": w_scale must be float32, got ", w_scale.scalar_type());
  TORCH_CHECK(
      w_scale.dim() == 1 && w_scale.size(0) == n_layers,
      op, ": w_scale must have shape (L,) with L = len(weights) = ", n_layers, ", got ", w_scale.sizes());
  f.w_scale = w_scale.contiguous();

  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(
        is_weight_dtype(w.scalar_type()),
        op, ": weights[", l, "] must be float32, float16 or bfloat16, got ", w.scalar_type());
    TORCH_CHECK(w.dim() == 2, op, ": weights[", l, "] must be 2-D (out, in), got shape ", w.sizes());
    check_same_device(op, "weights", l, w, "w_scale", f.device);
    const at::Tensor& o = imp_out[l];
    const at::Tensor& i = imp_in[l];
    TORCH_CHECK(o.scalar_type() == at::kFloat, op, ": imp_out[", l, "] must be float32, got ", o.scalar_type());
    TORCH_CHECK(i.scalar_type() == at::kFloat, op, ": imp_in[", l, "] must be float32, got ", i.scalar_type());
    TORCH_CHECK(
        o.dim() == 1 && o.size(0) == w.size(0),
        op, ": imp_out[", l, "] must have shape (out,) = (", w.size(0), ",) for weights[", l, "] of shape ",
        w.sizes(), ", got ", o.sizes());
    TORCH_CHECK(
        i.dim() == 1 && i.size(0) == w.size(1),
        op, ": imp_in[", l, "] must have shape (in,) = (", w.size(1), ",) for weights[", l, "] of shape ",
        w.sizes(), ", got ", i.sizes());
    check_same_device(op, "imp_out", l, o, "w_scale", f.device);
    check_same_device(op, "imp_in", l, i, "w_scale", f.device);
    // A row-strided weight (a slice of a wider one) is read in place; one whose
    // columns are strided (a transposed weight) is copied once.
    f.weights.push_back(w.size(1) > 1 && w.stride(1) != 1 ? w.contiguous() : w);
    f.imp_out.push_back(o.contiguous());
    f.imp_in.push_back(i.contiguous());
    f.numels.push_back(w.numel());
  }
  return f;
}

at::Tensor prepare_thresholds(const char* op, const at::Tensor& thresholds, int64_t n_layers, at::Device device) {
  TORCH_CHECK(
      thresholds.scalar_type() == at::kFloat, op, ": thresholds must be float32, got ", thresholds.scalar_type());
  TORCH_CHECK(
      thresholds.dim() == 1 && thresholds.size(0) == n_layers,
      op, ": thresholds must have shape (L,) with L = len(weights) = ", n_layers, ", got ", thresholds.sizes());
  TORCH_CHECK(
      thresholds.device() == device,
      op, ": thresholds must be on the weights' device ", device, ", got ", thresholds.device());
  return thresholds.contiguous();
}

at::Tensor prepare_nm_scores(const at::Tensor& scores, int64_t n, int64_t m) {
  constexpr const char* op = "multiflow::nm_mask";
  TORCH_CHECK(
      is_weight_dtype(scores.scalar_type()),
      op, ": scores must be float32, float16 or bfloat16, got ", scores.scalar_type());
  TORCH_CHECK(scores.dim() == 2, op, ": scores must be 2-D (R, C), got shape ", scores.sizes());
  TORCH_CHECK(m >= 1, op, ": m must be >= 1, got m = ", m);
  TORCH_CHECK(n >= 0 && n <= m, op, ": n must be in [0, m] = [0, ", m, "], got n = ", n);
  TORCH_CHECK(
      scores.size(1) % m == 0,
      op, ": the number of columns C = ", scores.size(1), " must be a multiple of m = ", m, " (C % m == 0)");
  return scores.size(1) > 1 && scores.stride(1) != 1 ? scores.contiguous() : scores;
}

}  // namespace multiflow
