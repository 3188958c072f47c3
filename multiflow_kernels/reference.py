"""Plain-torch implementation of every op: the oracle in tests.

Each function has the name, arguments and semantics of its op in ops.py, and
is written to be obviously right rather than fast.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sq_sum_accumulate_(acc: Tensor, x: Tensor, token_mask: Tensor | None = None) -> None:
    """acc[j] += sum over kept tokens t of float(x[t, j]) ** 2 (float32)."""
    n_tokens = math.prod(x.shape[:-1])
    tokens = x.reshape(n_tokens, x.shape[-1]).float()
    if token_mask is not None:
        tokens = tokens[token_mask.reshape(n_tokens)]
    acc += tokens.square().sum(dim=0)


def sq_sum(x: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """The per-feature sum of squares of x's kept tokens, as a new float32 (F,) tensor."""
    acc = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    sq_sum_accumulate_(acc, x, token_mask)
    return acc
