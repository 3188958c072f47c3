"""Inputs and the earned check shared by the tests of bitmap_linear's CUDA kernels
(test_triton_bitmap.py: Triton; test_cuda_bitmap.py: CUDA C++)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _earned import assert_earned

from multiflow_kernels import reference


def make_weight(n_out, n_in, dtype, sparsity=0.75, seed=0):
    """Fresh random weight and mask at the given sparsity; strictly between 0 and 1,
    row 0 is all pruned and the last row all kept (where there are 3+ rows)."""
    gen = torch.Generator().manual_seed(seed * 7919 + n_in * 101 + n_out * 13)
    w = torch.randn(n_out, n_in, generator=gen).to(dtype)
    mask = torch.rand(n_out, n_in, generator=gen) >= sparsity
    if 0 < sparsity < 1 and n_out >= 3:
        mask[0] = False
        mask[-1] = True
    return w, mask


def make_x(leading, n_in, n_out, dtype, with_bias, seed=0):
    gen = torch.Generator().manual_seed(seed * 31 + n_in * 7 + n_out)
    x = torch.randn(*leading, n_in, generator=gen).to(dtype)
    b = torch.randn(n_out, generator=gen).to(dtype) if with_bias else None
    return x, b


def assert_linear_earned(y, x, fmt, n_in, b, what):
    wm = reference.bitmap_unpack(*fmt, n_in).double()
    b64 = None if b is None else b.double()
    exact = F.linear(x.double(), wm, b64)
    scale = F.linear(x.double().abs(), wm.abs(), None if b is None else b64.abs())
    plain = reference.bitmap_linear(x, *fmt, n_in, b)
    assert_earned(y, exact, plain, scale, x.dtype, what)
