#include "bitmap.h"

#include <ATen/ATen.h>

#include "dtypes.h"
#include "maskpack.h"

namespace multiflow {
namespace {

// The format's own contract, shared by unpack and linear.
void check_format(
    const char* op,
    const at::Tensor& values,
    const at::Tensor& bits,
    const at::Tensor& row_ptr,
    const at::Tensor& block_ptr,
    int64_t in_features) {
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  TORCH_CHECK(
      is_weight_dtype(values.scalar_type()),
      op, ": values must be float32, float16 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D (nnz,), got shape ", values.sizes());
  TORCH_CHECK(bits.scalar_type() == at::kInt, op, ": bits must be an int32 tensor (pack_mask's output), got ",
              bits.scalar_type());
  TORCH_CHECK(bits.dim() == 2, op, ": bits must have shape (out_features, ceil(in_features / 32)), got ", bits.sizes());
  const int64_t rows = bits.size(0);
  const int64_t words = packed_words(in_features);
  TORCH_CHECK(
      bits.size(1) == words,
      op, ": bits must have shape (out_features, ceil(in_features / 32)) = (", rows, ", ", words,
      ") for in_features = ", in_features, ", got ", bits.sizes());
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong, op, ": row_ptr must be an int64 tensor, got ", row_ptr.scalar_type());
  TORCH_CHECK(
      row_ptr.dim() == 1 && row_ptr.size(0) == rows + 1,
      op, ": row_ptr must have shape (out_features + 1,) = (", rows + 1, ",), got ", row_ptr.sizes());
  TORCH_CHECK(
      block_ptr.scalar_type() == at::kInt, op, ": block_ptr must be an int32 tensor, got ", block_ptr.scalar_type());
  const int64_t blocks = bitmap_blocks(in_features);
  TORCH_CHECK(
      block_ptr.dim() == 2 && block_ptr.size(0) == rows && block_ptr.size(1) == blocks,
      op, ": block_ptr must have shape (out_features, ceil(in_features / 512)) = (", rows, ", ", blocks, "), got ",
      block_ptr.sizes());
  TORCH_CHECK(
      bits.device() == values.device() && row_ptr.device() == values.device() &&
          block_ptr.device() == values.device(),
      op, ": values, bits, row_ptr and block_ptr must be on one device, got ", values.device(), ", ", bits.device(),
      ", ", row_ptr.device(), ", ", block_ptr.device());
  // nnz is read on the host only where row_ptr lives there (no device sync);
  // the CPU kernels also check every row's count against its bits.
  if (row_ptr.device().is_cpu()) {
    const int64_t* rp = row_ptr.contiguous().const_data_ptr<int64_t>();
    TORCH_CHECK(rp[0] == 0, op, ": row_ptr[0] must be 0, got ", rp[0]);
    TORCH_CHECK(
        values.numel() == rp[rows],
        op, ": values must have row_ptr[-1] = ", rp[rows], " elements (the kept weights), got ", values.numel());
  }
}

void fill_format(
    BitmapProblem& p,
    const at::Tensor& values,
    const at::Tensor& bits,
    const at::Tensor& row_ptr,
    const at::Tensor& block_ptr,
    int64_t in_features) {
  p.values = values.contiguous();
  p.bits = bits.contiguous();
  p.row_ptr = row_ptr.contiguous();
  p.block_ptr = block_ptr.contiguous();
  p.rows = bits.size(0);
  p.cols = in_features;
}

}  // namespace

BitmapPackProblem prepare_bitmap_pack(const at::Tensor& weight, const at::Tensor& mask) {
  constexpr const char* op = "multiflow::bitmap_pack";
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
  BitmapPackProblem p;
  p.weight = weight.contiguous();
  p.mask = mask.contiguous();
  p.rows = weight.size(0);
  p.cols = weight.size(1);
  return p;
}

BitmapProblem prepare_bitmap_unpack(
    const at::Tensor& values,
    const at::Tensor& bits,
    const at::Tensor& row_ptr,
    const at::Tensor& block_ptr,
    int64_t in_features) {
  check_format("multiflow::bitmap_unpack", values, bits, row_ptr, block_ptr, in_features);
  BitmapProblem p;
  fill_format(p, values, bits, row_ptr, block_ptr, in_features);
  return p;
}

BitmapProblem prepare_bitmap_linear(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& bits,
    const at::Tensor& row_ptr,
    const at::Tensor& block_ptr,
    int64_t in_features,
    const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "multiflow::bitmap_linear";
  check_format(op, values, bits, row_ptr, block_ptr, in_features);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape (..., in_features), got a 0-d tensor");
  TORCH_CHECK(
      x.scalar_type() == values.scalar_type(),
      op, ": x must have values' dtype ", values.scalar_type(), ", got ", x.scalar_type());
  TORCH_CHECK(
      x.size(-1) == in_features,
      op, ": in_features mismatch: x.shape[-1] = ", x.size(-1), " but in_features = ", in_features);
  TORCH_CHECK(x.device() == values.device(), op, ": x is on ", x.device(), " but values is on ", values.device());
  BitmapProblem p;
  fill_format(p, values, bits, row_ptr, block_ptr, in_features);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(
        bias->dim() == 1 && bias->size(0) == p.rows,
        op, ": bias must have shape (out_features,) = (", p.rows, ",), got ", bias->sizes());
    TORCH_CHECK(
        bias->scalar_type() == x.scalar_type(),
        op, ": bias must have x's dtype ", x.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ", x.device());
    p.bias = bias->contiguous();
  }
  p.m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    p.m *= x.size(d);
  }
  p.x = x.reshape({p.m, in_features}).contiguous();
  p.out_shape = x.sizes().vec();
  p.out_shape.back() = p.rows;
  return p;
}

}  // namespace multiflow
