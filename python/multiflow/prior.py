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
    one count per layer of the magnitudes at or below it. The counts of every modality
    are read back at once: each read waits for the device, so one read, not one per
    modality."""
    impl = impl or get_impl()
    prior: dict[str, float] = {}
    pending = []  # (names, weights, counts on the device) per modality to read back
    for names in group_by_modality({n: modalities[n] for n in weights}).values():
        ws = [weights[n].detach() for n in names]
        total = sum(w.numel() for w in ws)
        k = int(sparsity * total)
        # every name now, so that the order of the result is the modalities' order
        prior.update({n: 0.0 for n in names})
        if k >= 1:
            t = impl.kth_smallest_group(ws, k, True)
            pending.append((names, ws, impl.count_at_most(ws, t, True)))
    if pending:
        # (modalities may live on different devices: gathered on the first one's)
        counts = torch.cat([c.to(pending[0][2].device) for _, _, c in pending]).tolist()
        layers = ((n, w) for names, ws, _ in pending for n, w in zip(names, ws))
        for (n, w), c in zip(layers, counts):
            prior[n] = c / w.numel() if w.numel() else 0.0
    return prior
