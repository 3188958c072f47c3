"""Autograd of the inference formats' linear ops (csrc/linear_autograd.cpp): bitmap_linear and
sparse24_linear pass gradients to x and bias (bitmap_linear also to its kept values), checked
against autograd of the dense masked expression in float64; sparse24_linear refuses a gradient
for its values with a clear error; opcheck with inputs that require grad; a model with a frozen
sparse layer trains the layer in front of it as the dense model does; double backward (a gradient
penalty, create_graph=True) against the dense masked expression."""
import pytest
import torch
from torch import nn

import multiflow_kernels as mk
from multiflow_kernels import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _mask(fmt, out_f, in_f, gen):
    if fmt == "bitmap":
        return torch.rand(out_f, in_f, generator=gen) > 0.7
    # 2:4: 2 random positions of every 4, some groups keeping only one (zero-filled slot)
    scores = torch.rand(out_f, in_f // 4, 4, generator=gen)
    keep = scores >= scores.topk(2, dim=-1).values[..., -1:]
    keep &= torch.rand(out_f, in_f // 4, 1, generator=gen) > 0.1
    keep[..., 0] |= ~keep.any(-1)
    return keep.reshape(out_f, in_f)


def _pack(fmt, w, mask):
    return ops.bitmap_pack(w, mask) if fmt == "bitmap" else ops.sparse24_pack(w, mask)


def _linear(fmt, x, packed, in_f, bias):
    if fmt == "bitmap":
        return ops.bitmap_linear(x, *packed, in_f, bias)
    return ops.sparse24_linear(x, *packed, bias)


def _rel(got, want):
    return ((got.double() - want).norm() / max(want.norm().item(), 1e-12)).item()


def _check_grads(fmt, dtype, x_shape, out_f, device, with_bias=True, values_grad=False):
    in_f = x_shape[-1]
    gen = torch.Generator().manual_seed(in_f * 7 + out_f + len(x_shape))
    w = torch.randn(out_f, in_f, generator=gen).to(dtype)
    mask = _mask(fmt, out_f, in_f, gen)
    packed = [t.to(device) for t in _pack(fmt, w, mask)]
    x = torch.randn(x_shape, generator=gen).to(device, dtype).requires_grad_()
    b = torch.randn(out_f, generator=gen).to(device, dtype).requires_grad_() if with_bias else None
    if values_grad:
        packed[0].requires_grad_()
    y = _linear(fmt, x, packed, in_f, b)
    g = torch.randn(y.shape, generator=gen).to(device, dtype)
    y.backward(g)

    w64 = (w.double() * mask).to(device).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if with_bias else None
    nn.functional.linear(x64, w64, b64).backward(g.double())
    tol = TOL[dtype]
    assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape
    assert _rel(x.grad, x64.grad) <= tol, (fmt, dtype, x_shape, _rel(x.grad, x64.grad))
    if with_bias:
        assert b.grad.dtype == dtype
        assert _rel(b.grad, b64.grad) <= tol
    if values_grad:
        want = w64.grad[mask.to(device)]  # row-major: the order of bitmap values
        assert packed[0].grad.dtype == dtype and packed[0].grad.shape == packed[0].shape
        assert _rel(packed[0].grad, want) <= tol


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_shape, out_f", [((5, 40), 7), ((2, 3, 600), 9), ((1, 1100), 3), ((0, 40), 5), ((4, 8), 1)])
def test_grads_match_dense_masked(fmt, dtype, x_shape, out_f):
    _check_grads(fmt, dtype, x_shape, out_f, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitmap_values_grad_at_kept_places(dtype):
    _check_grads("bitmap", dtype, (6, 600), 11, "cpu", values_grad=True)
    _check_grads("bitmap", dtype, (3, 40), 5, "cpu", with_bias=False, values_grad=True)


def test_no_bias_and_no_grad_paths():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=gen)
    for fmt in ("bitmap", "2:4"):
        packed = _pack(fmt, w, _mask(fmt, 6, 40, gen))
        x = torch.randn(3, 40, generator=gen, requires_grad=True)
        with torch.no_grad():
            assert _linear(fmt, x, packed, 40, None).grad_fn is None
        assert _linear(fmt, x.detach(), packed, 40, None).grad_fn is None
        y = _linear(fmt, x, packed, 40, None)
        assert y.grad_fn is not None
        y.sum().backward()
        assert x.grad is not None


def test_sparse24_values_grad_is_refused():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 16, generator=gen)
    values, metadata = ops.sparse24_pack(w, _mask("2:4", 4, 16, gen))
    values.requires_grad_()
    y = ops.sparse24_linear(torch.randn(2, 16, generator=gen), values, metadata, None)
    with pytest.raises(RuntimeError, match="not differentiable with respect to values"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_with_grad(dtype):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(9, 600, generator=gen).to(dtype)
    for fmt, op in (("bitmap", torch.ops.multiflow.bitmap_linear.default),
                    ("2:4", torch.ops.multiflow.sparse24_linear.default)):
        packed = _pack(fmt, w, _mask(fmt, 9, 600, gen))
        x = torch.randn(2, 3, 600, generator=gen).to(dtype).requires_grad_()
        b = torch.randn(9, generator=gen).to(dtype).requires_grad_()
        args = (x, *packed, 600, b) if fmt == "bitmap" else (x, *packed, b)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_layer_in_front_of_a_frozen_sparse_layer_trains(fmt):
    """An adapter before a sparsified layer gets the gradient the dense masked model gives it
    (before, the sparse op stopped it: no gradient reached the adapter or the bias)."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    mask = _mask(fmt, 8, 64, torch.Generator().manual_seed(3))
    sparse = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), mk.SparseLinear.from_dense(dense[2], mask, format=fmt))
    sparse[0].load_state_dict(dense[0].state_dict())
    with torch.no_grad():
        dense[2].weight.mul_(mask)
    x = torch.randn(10, 16)
    for model in (dense, sparse):
        model(x).pow(2).mean().backward()
    assert _rel(sparse[0].weight.grad, dense[0].weight.grad.double()) <= 1e-5
    assert _rel(sparse[2].bias.grad, dense[2].bias.grad.double()) <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_grads_match_dense_masked(fmt, dtype):
    for x_shape, out_f in (((5, 40), 7), ((2, 3, 1100), 9), ((1, 600), 3)):
        _check_grads(fmt, dtype, x_shape, out_f, "cuda", values_grad=fmt == "bitmap")


def _penalty_grads(fmt, penalized, values_leaf, x_shape=(2, 3, 8), out_f=5):
    """Second-order gradients (create_graph=True) of ``|d sum(y^2) / d penalized|^2`` with
    respect to x, bias and (values_leaf) bitmap's values, from the op in float32 and from the
    dense masked expression in float64 (W = the kept values scattered into the mask)."""
    in_f = x_shape[-1]
    gen = torch.Generator().manual_seed(in_f * 7 + out_f)
    w = torch.randn(out_f, in_f, generator=gen)
    mask = _mask(fmt, out_f, in_f, gen)
    packed = _pack(fmt, w, mask)
    x = torch.randn(x_shape, generator=gen)
    b = torch.randn(out_f, generator=gen)
    values = packed[0]  # bitmap: row-major kept weights, the order of w[mask]

    def op(xs, bs, *vs):
        return _linear(fmt, xs, (*vs, *packed[1:]) if vs else packed, in_f, bs)

    def dense(xs, bs, *vs):
        wm = torch.zeros(out_f, in_f, dtype=xs.dtype).masked_scatter(mask, vs[0]) if vs else (w * mask).to(xs.dtype)
        return nn.functional.linear(xs, wm, bs)

    grads = []
    for linear, dtype in ((op, torch.float32), (dense, torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (x, b, *((values,) if values_leaf else ()))]
        first = torch.autograd.grad(linear(*leaves).pow(2).sum(), leaves[penalized], create_graph=True)[0]
        grads.append(torch.autograd.grad(first.pow(2).sum(), leaves))
    return grads


@pytest.mark.filterwarnings("error::UserWarning")  # torch's "autograd kernel was not registered" fallback
@pytest.mark.parametrize("fmt, penalized, values_leaf", [
    ("bitmap", 0, False), ("bitmap", 1, True), ("bitmap", 2, True), ("2:4", 0, False), ("2:4", 1, False)
], ids=["bitmap-grad_x", "bitmap-grad_bias", "bitmap-grad_values", "2:4-grad_x", "2:4-grad_bias"])
def test_double_backward_matches_dense_masked(fmt, penalized, values_leaf):
    """The C++ backward is differentiable ATen on grad_y and x (create_graph=True records
    it), so a gradient penalty's gradients of x, bias (and bitmap's values, where the
    penalized gradient does not go through the decoded W; through it: the next test) match
    the dense masked expression. float32 (the ops have no float64) against float64."""
    got, want = _penalty_grads(fmt, penalized, values_leaf)
    for name, g, w in zip(("x", "bias", "values"), got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert w.abs().max() > 0
        assert _rel(g, w) <= 1e-5, (fmt, penalized, name, _rel(g, w))


@pytest.mark.filterwarnings("error:.*an autograd kernel was not registered")
def test_bitmap_double_backward_through_grad_x_to_values():
    """grad_x = grad_y @ bitmap_unpack(values): bitmap_unpack's own autograd formula carries a
    penalty on grad_x back to values (without it torch warned and the gradient missed its
    grad_y^T-term, relative error 0.47)."""
    got, want = _penalty_grads("bitmap", 0, True)
    assert _rel(got[2], want[2]) <= 1e-5, _rel(got[2], want[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitmap_unpack_gradient_is_the_kept_places(dtype):
    """bitmap_unpack is linear in values: d values = dW at the kept places, row-major."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 37, generator=gen).to(dtype)
    mask = torch.rand(5, 37, generator=gen) > 0.6
    values, bits, row_ptr, block_ptr = ops.bitmap_pack(w, mask)
    values = values.clone().requires_grad_(True)
    r = torch.randn(5, 37, generator=gen).to(dtype)
    (ops.bitmap_unpack(values, bits, row_ptr, block_ptr, 37) * r).sum().backward()
    assert torch.equal(values.grad, r[mask])
    torch.library.opcheck(torch.ops.multiflow.bitmap_unpack.default, (values, bits, row_ptr, block_ptr, 37))
