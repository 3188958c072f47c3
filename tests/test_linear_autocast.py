"""Autocast of the linear ops (csrc/linear_autocast.cpp): under torch.autocast, masked_linear,
bitmap_linear and sparse24_linear (and so SparseLinear in every format) cast x, the weight or
its values and the bias to the autocast dtype, as nn.Linear does, so a float32 sparse layer
runs behind an autocast nn.Linear. The result is checked against F.linear under the same
autocast on the dense masked weight (earned tolerance, tests/_earned.py); gradients reach x and
the float32 master parameters in float32 (pruned weights' gradients stay exactly 0); outside
autocast, or with enabled=False, a dtype mismatch still raises the op's own error."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from _earned import assert_earned
from torch import nn

import multiflow_kernels as mk
from multiflow_kernels import formats, ops

FORMATS = ["masked", "bitmap", "2:4"]
OP = {"masked": "masked_linear", "bitmap": "bitmap_linear", "2:4": "sparse24_linear"}
# (device, autocast dtype): bfloat16 is CPU autocast's default, float16 CUDA's.
CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.cuda),
]
# Relative gradient error against the dense model under the same autocast (both round to
# the autocast dtype, summing in different orders).
GRAD_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
IN0, IN, OUT = 12, 48, 10  # IN: a multiple of 16 (2:4 on CUDA), not of 32 (a partial mask word)


def _weights(fmt, device, seed):
    """A float32 weight, a keep-mask fit for fmt (2:4 or about 40% kept) and a bias."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=gen)
    scores = torch.rand(OUT, IN, generator=gen)
    mask = ops.nm_mask(scores, 2, 4) if fmt == "2:4" else scores > 0.6
    b = torch.randn(OUT, generator=gen)
    return w.to(device), mask.to(device), b.to(device)


def _models(fmt, device, seed):
    """An nn.Linear feeding a layer that keeps mask of w: as a SparseLinear in fmt, and as a
    dense nn.Linear holding w * mask (the reference). Both float32, same first layer."""
    w, mask, b = _weights(fmt, device, seed)
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(IN0, IN), nn.Linear(IN, OUT)).to(device)
    with torch.no_grad():
        dense[1].weight.copy_(w * mask)
        dense[1].bias.copy_(b)
    sparse = nn.Sequential(copy.deepcopy(dense[0]), mk.SparseLinear.from_dense(dense[1], mask, format=fmt))
    return sparse, dense, mask


def _assert_as_dense_autocast(got, x, w_masked, b, device, dtype, what):
    """got ~ F.linear(x, w_masked, b) under autocast(device, dtype): got's error against the
    float64 result on the cast inputs is within a small multiple of that F.linear's."""
    with torch.autocast(device, dtype=dtype):
        plain = F.linear(x, w_masked, b)
    assert plain.dtype == dtype
    xc, wc, bc = (t.to(dtype).double() for t in (x, w_masked, b))
    exact = F.linear(xc, wc, bc)
    scale = F.linear(xc.abs(), wc.abs(), bc.abs())
    assert_earned(got, exact, plain, scale, dtype, what)


def _rel(got, want):
    return ((got.double() - want.double()).norm() / max(want.double().norm().item(), 1e-12)).item()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device, dtype", CASES)
def test_op_casts_float32_arguments(fmt, device, dtype):
    w, mask, b = _weights(fmt, device, seed=1)
    packed = formats.pack(fmt, w, mask)  # float32 weights; integer bits / offsets / metadata
    x = torch.randn(2, 3, IN, device=device)
    with torch.autocast(device, dtype=dtype):
        got = formats.linear(fmt, x, packed, IN, b)  # the op, through its Python entry point
    _assert_as_dense_autocast(got, x, w * mask, b, device, dtype, OP[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("through_linear", [False, True], ids=["float32-x", "after-autocast-linear"])
def test_sparse_linear_under_autocast(fmt, device, dtype, through_linear):
    sparse, dense, _ = _models(fmt, device, seed=2)
    x = torch.randn(2, 3, IN0 if through_linear else IN, device=device)
    with torch.autocast(device, dtype=dtype):
        h = sparse[0](x) if through_linear else x
        got = sparse[1](h)
    assert h.dtype == (dtype if through_linear else torch.float32)
    _assert_as_dense_autocast(got, h, dense[1].weight, dense[1].bias, device, dtype, f"SparseLinear {fmt}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("autocast", ["off", "disabled"])
def test_outside_autocast_nothing_changes(fmt, device, dtype, autocast):
    """No autocast, or autocast(enabled=False): float32 in, the same float32 out; a lower
    precision x against float32 weights raises the op's dtype error, as before."""
    w, mask, b = _weights(fmt, device, seed=3)
    packed = formats.pack(fmt, w, mask)
    x = torch.randn(4, IN, device=device)
    want = formats.linear(fmt, x, packed, IN, b)
    ctx = contextlib.nullcontext() if autocast == "off" else torch.autocast(device, dtype=dtype, enabled=False)
    with ctx:
        got = formats.linear(fmt, x, packed, IN, b)
        with pytest.raises(RuntimeError, match=rf"multiflow::{OP[fmt]}: \w+ must have \S+ dtype"):
            formats.linear(fmt, x.to(dtype), packed, IN, b)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device, dtype", CASES)
def test_grads_reach_float32_masters(fmt, device, dtype):
    """Forward under autocast, backward outside (as torch.autocast advises): x and the float32
    parameters get float32 gradients equal to the dense masked model's under the same autocast;
    masked: pruned weights get exactly 0; bitmap: the kept values too when they require grad."""
    sparse, dense, mask = _models(fmt, device, seed=4)
    if fmt == "bitmap":
        sparse[1].values.requires_grad_()
    x = torch.randn(2, 3, IN0, device=device, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        y, y_dense = sparse(x), dense(x_dense)
    assert y.dtype == y_dense.dtype == dtype
    g = torch.randn(y.shape, device=device).to(dtype)
    y.backward(g)
    y_dense.backward(g)

    tol = GRAD_TOL[dtype]
    grads = {"x": (x.grad, x_dense.grad), "first weight": (sparse[0].weight.grad, dense[0].weight.grad),
             "bias": (sparse[1].bias.grad, dense[1].bias.grad)}
    if fmt == "masked":
        grads["weight"] = (sparse[1].weight.grad, dense[1].weight.grad * mask)
        assert torch.all(sparse[1].weight.grad[~mask] == 0)
    if fmt == "bitmap":
        grads["values"] = (sparse[1].values.grad, dense[1].weight.grad[mask])  # row-major, as stored
    for name, (got, want) in grads.items():
        assert got is not None and got.dtype == torch.float32 and got.shape == want.shape, (name, got)
        assert _rel(got, want) <= tol, (name, _rel(got, want))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device, dtype", CASES)
def test_compiles_under_autocast(fmt, device, dtype):
    """torch.compile (aot_eager, one graph) traces the Autocast kernel's casts: the same result
    and float32 gradients as eager."""
    sparse, _, _ = _models(fmt, device, seed=5)
    twin = copy.deepcopy(sparse)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, IN0, device=device)
    with torch.autocast(device, dtype=dtype):
        want, got = sparse(x), compiled(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want)
    got.float().sum().backward()
    want.float().sum().backward()
    assert twin[1].bias.grad.dtype == torch.float32
    torch.testing.assert_close(twin[1].bias.grad, sparse[1].bias.grad)
