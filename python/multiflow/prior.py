"""The multimodal magnitude prior: layer-wise sparsity from each modality's |W| distribution.

Per modality, pool ``|W|`` of all its prunable layers, take the k-th smallest value at the
target sparsity (``k = int(s * n)``), and give each layer the fraction of its ``|W|`` at or
below that threshold.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch

from .selection import kth_smallest

__all__ = ["group_by_modality", "modality_prior"]


def group_by_modality(modalities: Mapping[str, str]) -> dict[str, list[str]]:
    """Modality -> layer names, in the order the names appear."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name, modality in modalities.items():
        groups[modality].append(name)
    return dict(groups)


def modality_prior(
    weights: Mapping[str, torch.Tensor], modalities: Mapping[str, str], sparsity: float
) -> dict[str, float]:
    """Layer name -> sparsity ``s_l`` chosen by the multimodal magnitude prior."""
    prior: dict[str, float] = {}
    for names in group_by_modality({n: modalities[n] for n in weights}).values():
        magnitudes = [weights[n].detach().abs() for n in names]
        total = sum(m.numel() for m in magnitudes)
        k = int(sparsity * total)
        if k < 1:
            prior.update({n: 0.0 for n in names})
            continue
        t = kth_smallest(magnitudes, k)
        for n, m in zip(names, magnitudes):
            prior[n] = int((m <= t).sum()) / m.numel()
    return prior
