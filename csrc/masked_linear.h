// masked_linear / masked_linear_backward, the device-independent half: argument
// checks (naming the argument at fault) and the 2-D views every backend reads.
//
// y = x @ (weight * mask).T + bias, mask = unpack_mask(mask_bits, in) (the
// pack_mask layout, csrc/maskpack.h). x (..., in) is seen as (M, K) = (tokens, in),
// weight as (N, K) = (out, in).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>

namespace multiflow {

struct MaskedLinearProblem {
  // Contiguous views (copies only where the caller's tensors are not contiguous).
  at::Tensor x;          // (M, K), x's dtype
  at::Tensor weight;     // (N, K), x's dtype
  at::Tensor mask_bits;  // (N, ceil(K / 32)) int32
  at::Tensor bias;       // (N,) or undefined
  at::Tensor grad_out;   // (M, N), backward only
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  std::vector<int64_t> out_shape;  // forward: x.shape[:-1] + (N,)
};

MaskedLinearProblem prepare_masked_linear(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& mask_bits,
    const std::optional<at::Tensor>& bias);

MaskedLinearProblem prepare_masked_linear_backward(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& mask_bits);

// The outputs masked_linear_backward does not compute (output_mask[i] false):
// a (0,)-shaped tensor of x's dtype and device. A custom op's fake kernel and
// opcheck need a real tensor in every slot of a (Tensor, Tensor, Tensor) result.
at::Tensor skipped_grad(const at::Tensor& x);

}  // namespace multiflow
