"""Selection: k-th smallest thresholds, the tie rule, and N:M masks.

These are the plain-torch paths (concatenate + ``torch.kthvalue``); the selection kernels
of ``multiflow_kernels`` replace them without changing results.

Tie rule (DESIGN.md): with ``t`` the k-th smallest score, ``mask = score > t``, so every
weight tied at the threshold is pruned; ``k < 1`` prunes nothing.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["kth_smallest", "threshold_mask", "nm_mask", "check_sparsity"]


def check_sparsity(sparsity: float) -> float:
    """Validate a target sparsity: a real number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0):  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def kth_smallest(tensors: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of the union of ``tensors``, as a 0-d tensor.

    Equal to ``torch.kthvalue(torch.cat([t.flatten() for t in tensors]), k)``.
    """
    n = sum(t.numel() for t in tensors)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    flat = torch.cat([t.detach().flatten() for t in tensors]) if len(tensors) > 1 else tensors[0].detach().flatten()
    return torch.kthvalue(flat, k).values


def threshold_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the ``k`` lowest scores: ``score > kth_smallest(score, k)``."""
    if k < 1:
        return torch.ones(score.shape, dtype=torch.bool, device=score.device)
    t = kth_smallest([score], k)
    return score > t


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive inputs of each row.

    Ties break deterministically: among equal scores the lower input index is kept.
    ``score`` is (out, in) with ``in % m == 0``.
    """
    out_f, in_f = score.shape
    if in_f % m:
        raise ValueError(f"N:M masks need in_features divisible by M={m}, got {in_f}")
    groups = score.reshape(out_f, in_f // m, m)
    # a stable descending sort keeps lower indices first among equal scores
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(out_f, in_f)
