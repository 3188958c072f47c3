"""The earned tolerance shared by the matmul op tests (test_ops_masked_linear.py,
test_ops_bitmap.py, test_ops_sparse24.py): the kernel's error against a float64 result,
bounded by a small multiple of plain torch's own error in the test dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def assert_earned(got, exact, plain, scale, dtype, what):
    """|got - exact| <= 4 |plain - exact| + 4 eps(dtype) scale, elementwise maximum."""
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(exact.shape)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} vs {dtype}"
    if exact.numel() == 0:
        return
    err = (got.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    bound = 4 * plain_err + 4 * torch.finfo(dtype).eps * scale.max().item()
    assert err <= bound, f"{what}: kernel error {err:.3g} > bound {bound:.3g} (plain torch error {plain_err:.3g})"


def assert_linear_earned(got, x, w, b, what):
    """assert_earned for got = F.linear(x, w, b) (w dense, in x's dtype): exact in float64,
    plain torch in x's dtype, scale = F.linear(|x|, |w|, |b|)."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert_earned(got, exact, F.linear(x, w, b), scale, x.dtype, what)
