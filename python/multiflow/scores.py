"""Scoring rules of the baselines: each one reads like its equation. MULTIFLOW's flow score
is the ``flow_importance`` / ``flow_scores`` op family (plain-torch twin, every rounding step
spelled out: ``multiflow_kernels.reference.flow_importance``).

Every function takes one layer's weight ``w`` (out x in) and what the method needs
(``a``: the activation statistic of DESIGN.md, length ``in``; ``grad``: an accumulated
gradient) and returns a float32 score of ``w``'s shape. Higher score = more important.
Selection (thresholds, tie rule, N:M) is shared machinery in :mod:`multiflow.selection`.

Scale robustness: a layer whose weights or activations are tiny (a freshly initialised
BLIP vision tower has an init range of 1e-10) would underflow float32 products to 0 and
collapse the ranking. Ranking inside a layer is invariant to a positive rescaling of
``|w|`` and of ``sqrt(a)``, so both are first divided by a power of two that brings their
maximum into [0.5, 1). Multiplying by a power of two is exact in binary floating point, so
whenever the naive float32 computation does not underflow it yields exactly the same
ranking (bit for bit, up to the common scale factor).
"""
from __future__ import annotations

import torch

from multiflow_kernels.reference import pow2_scale

__all__ = [
    "pow2_normalise",
    "magnitude_scores",
    "l2_normalised_scores",
    "lamp_scores",
    "wanda_scores",
    "snip_scores",
    "random_scores",
]


def pow2_normalise(t: torch.Tensor) -> torch.Tensor:
    """Return ``t * 2**-e`` (exact) with ``e`` chosen so that ``max|t|`` lies in [0.5, 1)
    (``e`` clamped to [-126, 126]); all-zero and non-finite tensors are unchanged."""
    return t * pow2_scale(t)


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """``|W|`` (OMP and layer-wise magnitude pruning)."""
    return w.detach().float().abs()


def l2_normalised_scores(w: torch.Tensor) -> torch.Tensor:
    """``|W| / ||W||_2``: each layer's magnitudes divided by the layer's L2 norm."""
    w64 = w.detach().double()
    norm = torch.linalg.vector_norm(w64)
    if norm == 0:
        return w64.abs().float()
    return (w64.abs() / norm).float()


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al., 2021): ``W_u^2 / sum_{v >= u} W_v^2`` over the layer's weights
    sorted by ascending magnitude. Equal magnitudes are ordered by flat index (stable)."""
    sq = w.detach().double().flatten() ** 2
    order = torch.sort(sq, stable=True).indices
    sorted_sq = sq[order]
    # suffix sums: sum over the weights at least as large (in sorted order)
    suffix = sorted_sq.flip(0).cumsum(0).flip(0)
    scores_sorted = torch.where(suffix > 0, sorted_sq / suffix, torch.zeros_like(suffix))
    out = torch.empty_like(sq)
    out[order] = scores_sorted
    return out.view_as(w).float()


def wanda_scores(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al., 2024): ``|W_ij| * ||X_j||`` (``sqrt(a_j)``), compared per output row."""
    w_abs = pow2_normalise(w.detach().float().abs())
    root_a = pow2_normalise(a.detach().float().clamp_min(0).sqrt())
    return w_abs * root_a[None, :]


def snip_scores(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """SNIP (Lee et al., 2019): connection sensitivity ``|dL/dW * W|``."""
    # Compared across layers, so no per-layer rescaling here.
    return (grad.detach().double() * w.detach().double()).abs().float()


def random_scores(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores (random pruning), reproducible through ``generator``."""
    return torch.rand(w.shape, generator=generator, dtype=torch.float32).to(w.device)
