#include "sparse24.h"

#include <ATen/ATen.h>

#include "dtypes.h"
#include "format_args.h"

namespace multiflow {
namespace {

void check_in_features(const char* op, int64_t in_features) {
  TORCH_CHECK(
      in_features % 4 == 0, op, ": in_features must be a multiple of 4 for the 2:4 format, got ", in_features);
}

// The format's own contract, shared by unpack and linear.
void check_format(const char* op, const at::Tensor& values, const at::Tensor& metadata) {
  TORCH_CHECK(
      is_weight_dtype(values.scalar_type()),
      op, ": values must be float32, float16 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK(
      values.dim() == 2, op, ": values must have shape (out_features, in_features / 2), got ", values.sizes());
  const int64_t rows = values.size(0);
  const int64_t cols = 2 * values.size(1);
  check_in_features(op, cols);
  TORCH_CHECK(
      metadata.scalar_type() == at::kShort,
      op, ": metadata must be an int16 tensor (sparse24_pack's output), got ", metadata.scalar_type());
  const int64_t words = sparse24_words(cols);
  TORCH_CHECK(
      metadata.dim() == 2 && metadata.size(0) == rows && metadata.size(1) == words,
      op, ": metadata must have shape (out_features, ceil(in_features / 16)) = (", rows, ", ", words,
      ") for values of shape ", values.sizes(), ", got ", metadata.sizes());
  TORCH_CHECK(
      metadata.device() == values.device(),
      op, ": metadata is on ", metadata.device(), " but values is on ", values.device());
}

void fill_format(Sparse24Problem& p, const at::Tensor& values, const at::Tensor& metadata) {
  p.values = values.contiguous();
  p.metadata = metadata.contiguous();
  p.rows = values.size(0);
  p.cols = 2 * values.size(1);
}

}  // namespace

Sparse24PackProblem prepare_sparse24_pack(const at::Tensor& weight, const at::Tensor& mask) {
  constexpr const char* op = "multiflow::sparse24_pack";
  check_pack_input(op, weight, mask);
  check_in_features(op, weight.size(1));
  Sparse24PackProblem p;
  p.weight = weight.contiguous();
  p.mask = mask.contiguous();
  p.rows = weight.size(0);
  p.cols = weight.size(1);
  return p;
}

Sparse24Problem prepare_sparse24_unpack(const at::Tensor& values, const at::Tensor& metadata) {
  check_format("multiflow::sparse24_unpack", values, metadata);
  Sparse24Problem p;
  fill_format(p, values, metadata);
  return p;
}

Sparse24Problem prepare_sparse24_linear(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& metadata,
    const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "multiflow::sparse24_linear";
  check_format(op, values, metadata);
  Sparse24Problem p;
  fill_format(p, values, metadata);
  set_linear_input(p, prepare_linear_input(op, x, bias, values, p.cols, p.rows));
  return p;
}

}  // namespace multiflow
