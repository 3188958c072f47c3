"""Python entry points of the multiflow ops.

Each op's schema is in csrc/ops.cpp and its kernels in csrc/cpu/, csrc/cuda/ or
multiflow_kernels/triton/. Here: a thin documented function per op, with the
op's fake kernel (the shape/dtype contract, for torch.compile and opcheck)
right under it. The plain-torch twin of every op is in reference.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # noqa: F401  (the ops must exist before their fake kernels are registered)

_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sq_sum_accumulate_(acc: Tensor, x: Tensor, token_mask: Tensor | None = None) -> None:
    """Add the per-feature sum of squares of x's kept tokens into acc, in place.

    ``acc[j] += sum over tokens t with token_mask[t] of float(x[t, j]) ** 2``,
    summed in float32: the streaming activation statistic of calibration.

    Args:
        acc: float32 accumulator of shape (F,), contiguous, on x's device.
        x: activations of shape (..., F), float32, float16 or bfloat16; every
            leading index is a token (a 1-D x is a single token).
        token_mask: None to keep every token, or a bool tensor of shape
            x.shape[:-1] that is False for the tokens to skip (padding).
    """
    torch.ops.multiflow.sq_sum_accumulate_.default(acc, x, token_mask)


@torch.library.register_fake("multiflow::sq_sum_accumulate_")
def _sq_sum_accumulate_fake(acc: Tensor, x: Tensor, token_mask: Tensor | None = None) -> None:
    torch._check(x.dim() >= 1, lambda: "x must have shape (..., F), got a 0-d tensor")
    torch._check(x.dtype in _ACTIVATION_DTYPES, lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(acc.dtype == torch.float32, lambda: f"acc must be float32, got {acc.dtype}")
    torch._check(acc.dim() == 1, lambda: f"acc must have shape (F,), got {tuple(acc.shape)}")
    torch._check(
        acc.shape[0] == x.shape[-1],
        lambda: f"acc must have shape (F,) with F = x.shape[-1] = {x.shape[-1]}, got {tuple(acc.shape)}",
    )
    torch._check(acc.is_contiguous(), lambda: "acc must be contiguous")
    torch._check(acc.device == x.device, lambda: f"acc is on {acc.device} but x is on {x.device}")
    if token_mask is not None:
        torch._check(token_mask.dtype == torch.bool, lambda: f"token_mask must be bool, got {token_mask.dtype}")
        torch._check(
            token_mask.dim() == x.dim() - 1,
            lambda: f"token_mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(token_mask.shape)}",
        )
        for i in range(x.dim() - 1):
            torch._check(
                token_mask.shape[i] == x.shape[i],
                lambda: f"token_mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, "
                f"got {tuple(token_mask.shape)}",
            )
        torch._check(
            token_mask.device == x.device, lambda: f"token_mask is on {token_mask.device} but x is on {x.device}"
        )
    return None


def sq_sum(x: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """The per-feature sum of squares of x's kept tokens: a new float32 tensor (F,).

    Same arguments as :func:`sq_sum_accumulate_`, starting from zeros.
    """
    acc = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    sq_sum_accumulate_(acc, x, token_mask)
    return acc


# =======================================================================================
# Scoring: flow_importance, flow_scores (entry points + fake kernels)
# =======================================================================================


# =======================================================================================
# Selection: kth_smallest_group, kth_smallest_each, count_at_most, flow_kth_each,
# flow_masks, nm_mask (entry points + fake kernels)
# =======================================================================================


# =======================================================================================
# Mask packing: pack_mask, unpack_mask (entry points + fake kernels)
# =======================================================================================


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool mask into 32 bits per int32 word: bool (R, C) -> int32 (R, ceil(C / 32)).

    Bit ``b`` of word ``w`` of row ``r`` is ``mask[r, 32 * w + b]`` (bit 31 is the
    int32's sign bit, so words may be negative); the padding bits of a row's last
    word are 0. The inverse is :func:`unpack_mask`.

    Args:
        mask: bool tensor of shape (R, C), any strides, CPU or CUDA.
    """
    return torch.ops.multiflow.pack_mask.default(mask)


@torch.library.register_fake("multiflow::pack_mask")
def _pack_mask_fake(mask: Tensor) -> Tensor:
    torch._check(mask.dtype == torch.bool, lambda: f"mask must be a bool tensor, got {mask.dtype}")
    torch._check(mask.dim() == 2, lambda: f"mask must have shape (R, C), got {tuple(mask.shape)}")
    rows, cols = mask.shape
    return mask.new_empty((rows, (cols + 31) // 32), dtype=torch.int32)


def unpack_mask(bits: Tensor, cols: int) -> Tensor:
    """Unpack the words of :func:`pack_mask`: int32 (R, ceil(cols / 32)) -> bool (R, cols).

    ``out[r, c]`` is bit ``c % 32`` of ``bits[r, c // 32]``; padding bits are ignored.

    Args:
        bits: int32 tensor of shape (R, W) with ``W == ceil(cols / 32)``.
        cols: the number of columns of the unpacked mask, ``>= 0``.
    """
    return torch.ops.multiflow.unpack_mask.default(bits, cols)


@torch.library.register_fake("multiflow::unpack_mask")
def _unpack_mask_fake(bits: Tensor, cols: int) -> Tensor:
    torch._check(bits.dtype == torch.int32, lambda: f"bits must be an int32 tensor, got {bits.dtype}")
    torch._check(bits.dim() == 2, lambda: f"bits must have shape (R, W), got {tuple(bits.shape)}")
    torch._check(cols >= 0, lambda: f"cols must be >= 0, got {cols}")
    torch._check(
        bits.shape[1] == (cols + 31) // 32,
        lambda: f"bits must have W = ceil(cols / 32) = {(cols + 31) // 32} words per row, got {tuple(bits.shape)}",
    )
    return bits.new_empty((bits.shape[0], cols), dtype=torch.bool)
