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
_WEIGHT_DTYPES = _ACTIVATION_DTYPES


def flow_importance(
    weights: list[Tensor], act_sq_norms: list[Tensor]
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """MULTIFLOW node importances of many layers, in one call.

    Per layer ``l`` with weight ``W`` (out x in) and activation statistic ``a`` (in,):
    ``w = |W| * w_scale[l]`` and ``r = sqrt(max(a, 0)) * r_scale`` (power-of-two scales
    that bring each maximum into [0.5, 1), so tiny layers do not underflow; ``r = 1``
    when ``a`` is all zero), ``A = w * r[None, :]`` in float32, ``imp_out = mean_j A``
    and ``imp_in = mean_i A`` summed in float64 and rounded once to float32. Equal
    (torch.equal) to :func:`multiflow_kernels.reference.flow_importance`.

    Args:
        weights: 2-D weights (out, in), float32, float16 or bfloat16 (dtypes may mix),
            all on one device; any strides.
        act_sq_norms: float32 (in,) per layer, on its weight's device.

    Returns:
        (imp_out, imp_in, w_scale): lists of float32 (out,) and (in,) tensors, and the
        float32 (L,) tensor of the weight scales.
    """
    weights, act_sq_norms = list(weights), list(act_sq_norms)
    if not weights and not act_sq_norms:  # no tensor to dispatch on
        return [], [], torch.empty(0, dtype=torch.float32)
    return torch.ops.multiflow.flow_importance.default(weights, act_sq_norms)


def _check_flow_args(op: str, weights: list[Tensor], act_sq_norms: list[Tensor]) -> None:
    """The contract of flow_importance / flow_scores (the C++ checks' Python twin, for
    the fake kernels and the Triton launchers)."""
    torch._check(
        len(weights) == len(act_sq_norms),
        lambda: f"{op}: weights and act_sq_norms must have the same length (one statistic per layer), "
        f"got {len(weights)} weights and {len(act_sq_norms)} act_sq_norms",
    )
    for l, (w, a) in enumerate(zip(weights, act_sq_norms)):
        torch._check(w.dim() == 2, lambda: f"{op}: weights[{l}] must be 2-D (out, in), got shape {tuple(w.shape)}")
        torch._check(
            w.dtype in _WEIGHT_DTYPES, lambda: f"{op}: weights[{l}] must be float32, float16 or bfloat16, got {w.dtype}"
        )
        torch._check(
            w.device == weights[0].device,
            lambda: f"{op}: weights[{l}] is on {w.device} but weights[0] is on {weights[0].device} "
            "(all layers must be on one device)",
        )
        torch._check(a.dtype == torch.float32, lambda: f"{op}: act_sq_norms[{l}] must be float32, got {a.dtype}")
        torch._check(
            a.dim() == 1 and a.shape[0] == w.shape[1],
            lambda: f"{op}: act_sq_norms[{l}] must have shape (in,) where in = weights[{l}].shape[1] = "
            f"{w.shape[1]}, got shape {tuple(a.shape)}",
        )
        torch._check(
            a.device == w.device,
            lambda: f"{op}: act_sq_norms[{l}] must be on the device of weights[{l}] ({w.device}), got {a.device}",
        )


@torch.library.register_fake("multiflow::flow_importance")
def _flow_importance_fake(weights: list[Tensor], act_sq_norms: list[Tensor]):
    _check_flow_args("multiflow::flow_importance", weights, act_sq_norms)
    imp_out = [w.new_empty(w.shape[0], dtype=torch.float32) for w in weights]
    imp_in = [w.new_empty(w.shape[1], dtype=torch.float32) for w in weights]
    device = weights[0].device if weights else torch.device("cpu")
    return imp_out, imp_in, torch.empty(len(weights), dtype=torch.float32, device=device)


def flow_scores(weights: list[Tensor], act_sq_norms: list[Tensor]) -> list[Tensor]:
    """The MULTIFLOW flow score of every weight of many layers, in one call.

    ``score_l = (imp_out[:, None] * (|W_l| * w_scale[l])) * imp_in[None, :]`` in float32,
    with the importances of :func:`flow_importance`: a new contiguous float32 tensor of
    each weight's shape. Equal (bitwise) to :func:`multiflow_kernels.reference.flow_scores`.
    Same arguments as :func:`flow_importance`.
    """
    weights, act_sq_norms = list(weights), list(act_sq_norms)
    if not weights and not act_sq_norms:
        return []
    return torch.ops.multiflow.flow_scores.default(weights, act_sq_norms)


@torch.library.register_fake("multiflow::flow_scores")
def _flow_scores_fake(weights: list[Tensor], act_sq_norms: list[Tensor]) -> list[Tensor]:
    _check_flow_args("multiflow::flow_scores", weights, act_sq_norms)
    return [w.new_empty(w.shape, dtype=torch.float32) for w in weights]



# =======================================================================================
# Selection: kth_smallest_group, kth_smallest_each, count_at_most, flow_kth_each,
# flow_masks, nm_mask (entry points + fake kernels)
# =======================================================================================


# =======================================================================================
# Mask packing: pack_mask, unpack_mask (entry points + fake kernels)
# =======================================================================================
