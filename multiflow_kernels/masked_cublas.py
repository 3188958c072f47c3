"""masked_linear on CUDA through cuBLAS: the masked weight built in one pass, then dense GEMMs.

The Triton kernels (triton/masked_linear.py) apply the mask inside the GEMM; measured on an
H200 (benchmarks/RESULTS.md, 2026-11-28) their forward took 2.4-31x the time of
``F.linear(x, W * M)`` through cuBLAS (median 6.7x), the code a user would write, and
1.8-52x that of dense ``F.linear``. So on CUDA the ops run this by default (it computes
that line, plus unpacking the bits; timed in a second H200 run: forward 1.7-11.7x the
dense time in float16, 3.7x faster than the Triton forward (median over 252 cases));
``MULTIFLOW_MASKED_CUDA=triton``
selects the Triton kernels (multiflow_kernels/triton/__init__.py).

Same contract and semantics as the Triton kernels and reference.py's twins:

- the weight is masked with ``torch.where(mask, weight, 0)``, not multiplied, so a NaN
  or inf stored at a pruned position never reaches the output (0 * inf would);
- grad_weight is exactly 0 where the mask is False (pruned weights never revive);
- the GEMMs are torch's (cuBLAS) with torch's settings: float16 / bfloat16 accumulate in
  float32 except where ``allow_fp16_reduced_precision_reduction`` (on by default) /
  ``allow_bf16_reduced_precision_reduction`` let cuBLAS reduce split-K partials in the
  16-bit type; float32 uses TF32 only if the user enabled it.

Cost per call: one masked copy of the weight (and the bool mask unpacked from the bits,
1 byte per weight), freed after the call; then the GEMMs a dense layer runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import _check_bias, _check_grad_out, _check_masked_linear_args


def _masked_weight(weight: Tensor, mask_bits: Tensor) -> tuple[Tensor, Tensor]:
    mask = torch.ops.multiflow.unpack_mask(mask_bits.contiguous(), weight.shape[1])
    return torch.where(mask, weight, 0), mask


def masked_linear_cublas(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Tensor | None = None) -> Tensor:
    """multiflow::masked_linear: ``x @ (weight * mask).T + bias`` with cuBLAS."""
    op = "multiflow::masked_linear"
    _check_masked_linear_args(op, x, weight, mask_bits)
    _check_bias(op, x, weight, bias)
    w, _ = _masked_weight(weight, mask_bits)
    return F.linear(x, w, bias)


def masked_linear_backward_cublas(
    grad_out: Tensor, x: Tensor, weight: Tensor, mask_bits: Tensor, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """multiflow::masked_linear_backward with cuBLAS: (grad_x, grad_weight, grad_bias);
    outputs that ``output_mask`` leaves out are (0,)-shaped tensors."""
    op = "multiflow::masked_linear_backward"
    _check_masked_linear_args(op, x, weight, mask_bits)
    _check_grad_out(op, grad_out, x, weight)
    n, k = weight.shape
    g = grad_out.reshape(-1, n)
    grad_x, grad_w, grad_b = (x.new_empty(0) for _ in range(3))  # distinct: outputs must not alias
    if output_mask[0] or output_mask[1]:
        w, mask = _masked_weight(weight, mask_bits)
        if output_mask[0]:
            grad_x = (g @ w).reshape(x.shape)
        if output_mask[1]:
            gw = g.t() @ x.reshape(-1, k)
            grad_w = torch.where(mask, gw, 0)
    if output_mask[2]:
        grad_b = g.float().sum(0).to(x.dtype)
    return grad_x, grad_w, grad_b
