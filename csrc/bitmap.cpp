#include "bitmap.h"

#include <ATen/ATen.h>

#include "dtypes.h"
#include "format_args.h"
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
    int64_t in_features,
    bool check_order) {
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  TORCH_CHECK(
      is_weight_dtype(values.scalar_type()),
      op, ": values must be float32, float16 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D (nnz,), got shape ", values.sizes());
  TORCH_CHECK(values.numel() <= kBitmapMaxNnz, op, ": values must have at most 2^31 - 1 elements (row_ptr is int32), got ",
              values.numel());
  TORCH_CHECK(bits.scalar_type() == at::kInt, op, ": bits must be an int32 tensor (pack_mask's output), got ",
              bits.scalar_type());
  TORCH_CHECK(bits.dim() == 2, op, ": bits must have shape (out_features, ceil(in_features / 32)), got ", bits.sizes());
  const int64_t rows = bits.size(0);
  const int64_t words = packed_words(in_features);
  TORCH_CHECK(
      bits.size(1) == words,
      op, ": bits must have shape (out_features, ceil(in_features / 32)) = (", rows, ", ", words,
      ") for in_features = ", in_features, ", got ", bits.sizes());
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt, op, ": row_ptr must be an int32 tensor, got ", row_ptr.scalar_type());
  TORCH_CHECK(
      row_ptr.dim() == 1 && row_ptr.size(0) == rows + 1,
      op, ": row_ptr must have shape (out_features + 1,) = (", rows + 1, ",), got ", row_ptr.sizes());
  TORCH_CHECK(
      block_ptr.scalar_type() == at::kInt, op, ": block_ptr must be an int32 tensor, got ", block_ptr.scalar_type());
  const int64_t bp_cols = bitmap_block_ptr_cols(in_features);
  TORCH_CHECK(
      block_ptr.dim() == 2 && block_ptr.size(0) == rows && block_ptr.size(1) == bp_cols,
      op, ": block_ptr must have shape (out_features, max(ceil(in_features / 512) - 1, 0)) = (", rows, ", ", bp_cols,
      "), got ", block_ptr.sizes());
  TORCH_CHECK(
      bits.device() == values.device() && row_ptr.device() == values.device() &&
          block_ptr.device() == values.device(),
      op, ": values, bits, row_ptr and block_ptr must be on one device, got ", values.device(), ", ", bits.device(),
      ", ", row_ptr.device(), ", ", block_ptr.device());
  // nnz is read on the host only where row_ptr lives there (no device sync);
  // the CPU kernels also check every row's count against its bits. With row_ptr[0]
  // = 0, row_ptr[-1] = nnz and row_ptr non-decreasing, every row's range lies
  // inside values, so a kernel that trusts a row's range never leaves the tensor.
  // check_order false: the caller checks the order itself (bitmap_linear's CPU
  // kernel, per block of rows just before it reads them: a serial pass here read
  // a cold row_ptr before any work started, 0.3-0.5 us of a 21 us 768 x 768 call).
  if (row_ptr.device().is_cpu()) {
    const at::Tensor rp_c = row_ptr.contiguous();  // kept alive: rp points into it
    const int32_t* rp = rp_c.const_data_ptr<int32_t>();
    TORCH_CHECK(rp[0] == 0, op, ": row_ptr[0] must be 0, got ", rp[0]);
    TORCH_CHECK(
        values.numel() == rp[rows],
        op, ": values must have row_ptr[-1] = ", rp[rows], " elements (the kept weights), got ", values.numel());
    if (check_order) {
      check_row_ptr_order(op, rp, rows);
    }
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

void check_row_ptr_order(const char* op, const int32_t* rp, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(
        rp[r] <= rp[r + 1], op, ": row_ptr must be non-decreasing, but row_ptr[", r, "] = ", rp[r], " > row_ptr[",
        r + 1, "] = ", rp[r + 1]);
  }
}

BitmapPackProblem prepare_bitmap_pack(const at::Tensor& weight, const at::Tensor& mask) {
  constexpr const char* op = "multiflow::bitmap_pack";
  check_pack_input(op, weight, mask);
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
  check_format("multiflow::bitmap_unpack", values, bits, row_ptr, block_ptr, in_features, /*check_order=*/true);
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
    const std::optional<at::Tensor>& bias,
    const char* op) {
  check_format(op, values, bits, row_ptr, block_ptr, in_features, /*check_order=*/false);
  BitmapProblem p;
  fill_format(p, values, bits, row_ptr, block_ptr, in_features);
  set_linear_input(p, prepare_linear_input(op, x, bias, values, in_features, p.rows));
  return p;
}

}  // namespace multiflow
