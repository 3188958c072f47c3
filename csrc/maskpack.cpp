#include "maskpack.h"

#include <ATen/ATen.h>

namespace multiflow {

PackProblem prepare_pack_mask(const at::Tensor& mask) {
  constexpr const char* op = "multiflow::pack_mask";
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2, op, ": mask must have shape (R, C), got a ", mask.dim(), "-d tensor of shape ", mask.sizes());

  PackProblem p;
  p.rows = mask.size(0);
  p.cols = mask.size(1);
  // Rows may be strided (a view reads the caller's memory in place); the
  // columns of a row are read as consecutive bytes, so they must be contiguous.
  p.mask = (p.cols > 1 && mask.stride(1) != 1) ? mask.contiguous() : mask;
  p.row_stride = p.mask.stride(0);
  p.bits = at::empty({p.rows, packed_words(p.cols)}, mask.options().dtype(at::kInt));
  return p;
}

UnpackProblem prepare_unpack_mask(const at::Tensor& bits, int64_t cols) {
  constexpr const char* op = "multiflow::unpack_mask";
  TORCH_CHECK(bits.scalar_type() == at::kInt, op, ": bits must be an int32 tensor, got ", bits.scalar_type());
  TORCH_CHECK(bits.dim() == 2, op, ": bits must have shape (R, W), got a ", bits.dim(), "-d tensor of shape ", bits.sizes());
  TORCH_CHECK(cols >= 0, op, ": cols must be >= 0, got ", cols);
  TORCH_CHECK(
      bits.size(1) == packed_words(cols),
      op, ": bits must have W = ceil(cols / 32) = ", packed_words(cols), " words per row for cols = ", cols,
      ", got bits of shape ", bits.sizes());

  UnpackProblem p;
  p.rows = bits.size(0);
  p.cols = cols;
  p.bits = bits.contiguous();  // 1/8 of the output's size: a copy, where needed, is cheap
  p.mask = at::empty({p.rows, cols}, bits.options().dtype(at::kBool));
  return p;
}

}  // namespace multiflow
