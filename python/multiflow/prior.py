"""The multimodal magnitude prior: layer-wise sparsity from each modality's |W| distribution.

Per modality, pool ``|W|`` of all its prunable layers, take the k-th smallest value at the
target sparsity (``k = int(s * n)``), and give each layer the fraction of its ``|W|`` at or
below that threshold.
"""
from __future__ import annotations

from collections import defaultdict
from types import ModuleType
from typing import Mapping, Optional

import torch

from .selection import get_impl

__all__ = ["group_by_modality", "modality_prior"]


def group_by_modality(modalities: Mapping[str, str]) -> dict[str, list[str]]:
    """Modality -> layer names, in the order the names appear."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name, modality in modalities.items():
        groups[modality].append(name)
    return dict(groups)


def modality_prior(
    weights: Mapping[str, torch.Tensor],
    modalities: Mapping[str, str],
    sparsity: float,
    *,
    impl: Optional[ModuleType] = None,
) -> dict[str, float]:
    """Layer name -> sparsity ``s_l`` chosen by the multimodal magnitude prior.

    One exact k-th-value selection over each modality's ``|W|`` (never concatenated) and
    one count per layer of the magnitudes at or below it."""
    impl = impl or get_impl()
    prior: dict[str, float] = {}
    for names in group_by_modality({n: modalities[n] for n in weights}).values():
        ws = [weights[n].detach() for n in names]
        total = sum(w.numel() for w in ws)
        k = int(sparsity * total)
        if k < 1:
            prior.update({n: 0.0 for n in names})
            continue
        t = impl.kth_smallest_group(ws, k, True)
        counts = impl.count_at_most(ws, t, True).tolist()
        for n, w, c in zip(names, ws, counts):
            prior[n] = c / w.numel() if w.numel() else 0.0
    return prior
