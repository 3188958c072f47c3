"""Selection: k-th smallest thresholds, the tie rule, and N:M masks.

Each function runs on an implementation namespace ``impl``: ``multiflow_kernels.ops``
(our kernels: radix select without concatenating, the default) or
``multiflow_kernels.reference`` (plain torch: concatenate + ``torch.kthvalue``); both give
identical results.

Tie rule (DESIGN.md): with ``t`` the k-th smallest score, ``mask = score > t``, so every
weight tied at the threshold is pruned; ``k < 1`` prunes nothing.
"""
from __future__ import annotations

import numbers
from types import ModuleType
from typing import Optional, Sequence

import torch

__all__ = ["kth_smallest", "threshold_mask", "nm_mask", "check_sparsity", "get_impl"]


def get_impl(backend: str = "kernels") -> ModuleType:
    """``"kernels"``: multiflow_kernels.ops; ``"reference"``: multiflow_kernels.reference."""
    if backend == "kernels":
        from multiflow_kernels import ops

        return ops
    if backend == "reference":
        from multiflow_kernels import reference

        return reference
    raise ValueError(f"backend must be 'kernels' or 'reference', got {backend!r}")


def check_sparsity(sparsity: float) -> float:
    """Validate a target sparsity: a real number in [0, 1) (a Python, NumPy or 0-d tensor number)."""
    if isinstance(sparsity, torch.Tensor) and sparsity.dim() == 0 and sparsity.dtype != torch.bool:
        sparsity = sparsity.item()  # a complex one stays complex, and is refused below
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0):  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def kth_smallest(tensors: Sequence[torch.Tensor], k: int, *, absolute: bool = False,
                 impl: Optional[ModuleType] = None) -> torch.Tensor:
    """The k-th smallest value (1-based) of the union of ``tensors`` (``|t|`` when
    ``absolute``), as a 0-d float32 tensor; equal to ``torch.kthvalue`` on the
    concatenation, computed without concatenating."""
    n = sum(t.numel() for t in tensors)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return (impl or get_impl()).kth_smallest_group([t.detach() for t in tensors], k, absolute)


def threshold_mask(score: torch.Tensor, k: int, *, impl: Optional[ModuleType] = None) -> torch.Tensor:
    """Keep-mask pruning the ``k`` lowest scores: ``score > kth_smallest(score, k)``
    (``k < 1`` keeps everything)."""
    if k < 1:
        return torch.ones(score.shape, dtype=torch.bool, device=score.device)
    t = (impl or get_impl()).kth_smallest_each([score.detach()], [int(k)])[0]
    return score > t


def nm_mask(score: torch.Tensor, n: int, m: int, *, impl: Optional[ModuleType] = None) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive inputs of each row.

    Ties break deterministically: among equal scores the lower input index is kept.
    ``score`` is (out, in) with ``in % m == 0``.
    """
    if score.shape[1] % m:
        raise ValueError(f"N:M masks need in_features divisible by M={m}, got {score.shape[1]}")
    return (impl or get_impl()).nm_mask(score.detach(), int(n), int(m))
