"""multiflow::masked_linear / masked_linear_backward on CPU against plain torch.

Tolerances are earned: the exact result is the dense masked expression in float64;
the kernel's error must be within a small multiple of plain torch's own error in the
test dtype (F.linear on the dense masked weight, and its autograd), plus a few units
of rounding of the output dtype relative to sum |x| |w|.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _earned import assert_earned
from _isa_harness import isas_of_this_cpu, results_at_thread_counts, run_with_isa

import multiflow_kernels  # noqa: F401  (registers the ops)
from multiflow_kernels import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IN_FEATURES = [1, 31, 33, 100]
OUT_FEATURES = [1, 7, 65]
LEADING = [(), (3,), (2, 5)]


def make_case(leading, n_in, n_out, dtype, with_bias, seed=0, kind="mixed"):
    """Fresh random x, weight, bias; a random mask whose row 0 is all pruned and last row
    all kept (kind="mixed"), or a mask that is all kept / all pruned."""
    gen = torch.Generator().manual_seed(seed * 7919 + n_in * 101 + n_out * 13 + len(leading))
    x = torch.randn(*leading, n_in, generator=gen).to(dtype)
    w = torch.randn(n_out, n_in, generator=gen).to(dtype)
    b = torch.randn(n_out, generator=gen).to(dtype) if with_bias else None
    if kind == "mixed" and n_out > 0:
        mask = torch.rand(n_out, n_in, generator=gen) < 0.5
        mask[0] = False
        mask[-1] = True
    else:
        mask = torch.full((n_out, n_in), kind != "all_pruned")
    return x, w, mask, b


def dense_forward(x, w, mask, b):
    return F.linear(x, w * mask.to(w.dtype), b)


def check_forward(x, w, mask, b):
    bits = ops.pack_mask(mask)
    y = ops.masked_linear(x, w, bits, b)
    x64, w64 = x.double(), w.double() * mask
    exact = F.linear(x64, w64, None if b is None else b.double())
    scale = F.linear(x64.abs(), w64.abs(), None if b is None else b.double().abs())
    assert_earned(y, exact, dense_forward(x, w, mask, b), scale, x.dtype, "y")
    ref = reference.masked_linear(x, w, bits, b)
    assert_earned(ref, exact, dense_forward(x, w, mask, b), scale, x.dtype, "reference y")
    return y


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("n_out", OUT_FEATURES)
@pytest.mark.parametrize("n_in", IN_FEATURES)
def test_forward_matches_dense_masked_linear(n_in, n_out, leading, dtype, with_bias):
    x, w, mask, b = make_case(leading, n_in, n_out, dtype, with_bias)
    y = check_forward(x, w, mask, b)
    assert y.shape == (*leading, n_out)
    if n_out == 1:
        return  # its one row is the all-kept row
    # A pruned-everywhere row gives exactly the bias (or 0).
    expect_row0 = b[0] if b is not None else torch.zeros((), dtype=dtype)
    assert torch.equal(y[..., 0], expect_row0.expand(y[..., 0].shape))


@pytest.mark.parametrize("kind", ["all_kept", "all_pruned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_uniform_masks(kind, dtype):
    x, w, mask, b = make_case((4,), 70, 9, dtype, True, kind=kind)
    check_forward(x, w, mask, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_large_blocks(dtype):
    """Several row, column and depth blocks of the CPU kernel, none of them full."""
    x, w, mask, b = make_case((3, 67), 600, 300, dtype, True, seed=3)
    check_forward(x, w, mask, b)


def test_non_contiguous_inputs():
    x, w, mask, b = make_case((6,), 40, 9, torch.float32, True)
    x_nc = torch.randn(40, 6).T  # stride (1, 6)
    w_nc = torch.randn(40, 9).T
    bits = ops.pack_mask(mask)
    bits_nc = torch.stack([bits, bits], dim=2).reshape(bits.shape[0], -1)[:, ::2]
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or bits_nc.is_contiguous())
    got = ops.masked_linear(x_nc, w_nc, bits_nc, b)
    want = ops.masked_linear(x_nc.contiguous(), w_nc.contiguous(), bits, b)
    assert torch.equal(got, want)


def test_empty_shapes():
    for leading, n_in, n_out in [((0,), 5, 3), ((2,), 0, 3), ((2,), 5, 0)]:
        x, w, mask, b = make_case(leading, n_in, n_out, torch.float32, True)
        y = ops.masked_linear(x, w, ops.pack_mask(mask), b)
        assert y.shape == (*leading, n_out)
        assert torch.equal(y, dense_forward(x, w, mask, b))


# ----------------------------------------------------------------------------- backward


def assert_grads_earned(grads, x, w, mask, b, g):
    """(grad_x, grad_weight, grad_bias or None) of masked_linear for upstream g, against
    autograd of F.linear(x, w * mask, b) in float64 (exact) and in x's dtype (plain):
    each within a small multiple of plain torch's own error; grad_weight exactly 0 where
    pruned."""
    gx, gw, gb = grads

    def dense_grads(dtype):  # fresh leaves (x.to(x.dtype) would be x itself)
        xd = x.detach().to(dtype, copy=True).requires_grad_()
        wd = w.detach().to(dtype, copy=True).requires_grad_()
        bd = b.detach().to(dtype, copy=True).requires_grad_() if b is not None else None
        y = F.linear(xd, wd * mask.to(dtype), bd)
        y.backward(g.to(dtype))
        return xd.grad, wd.grad, bd.grad if b is not None else None

    exact = dense_grads(torch.float64)
    plain = dense_grads(x.dtype)
    g64, x64, w64 = g.double().abs(), x.double().abs(), (w.double() * mask).abs()
    scale_x = g64.reshape(-1, w.shape[0]) @ w64
    scale_w = g64.reshape(-1, w.shape[0]).T @ x64.reshape(-1, w.shape[1])
    scale_b = g64.reshape(-1, w.shape[0]).sum(0)
    assert gx.shape == x.shape and gw.shape == w.shape
    assert_earned(gx, exact[0], plain[0], scale_x, x.dtype, "grad_x")
    assert_earned(gw, exact[1], plain[1], scale_w, x.dtype, "grad_weight")
    assert torch.equal(gw[~mask], torch.zeros_like(gw[~mask])), "grad_weight must be exactly 0 where pruned"
    if b is not None:
        assert gb.shape == b.shape
        assert_earned(gb, exact[2], plain[2], scale_b, x.dtype, "grad_bias")


def check_backward(x, w, mask, b):
    bits = ops.pack_mask(mask)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    bs = b.clone().requires_grad_() if b is not None else None
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(*x.shape[:-1], w.shape[0], generator=gen).to(x.dtype)
    ops.masked_linear(xs, ws, bits, bs).backward(g)
    assert_grads_earned((xs.grad, ws.grad, bs.grad if b is not None else None), x, w, mask, b, g)
    ref = reference.masked_linear_backward(g, x, w, bits, [True, True, b is not None])  # the twin too
    assert_grads_earned((ref[0], ref[1], ref[2] if b is not None else None), x, w, mask, b, g)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("n_out", OUT_FEATURES)
@pytest.mark.parametrize("n_in", IN_FEATURES)
def test_backward_matches_autograd_of_dense_masked_linear(n_in, n_out, leading, dtype, with_bias):
    check_backward(*make_case(leading, n_in, n_out, dtype, with_bias, seed=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_large_blocks(dtype):
    check_backward(*make_case((2, 150), 300, 260, dtype, True, seed=4))


def test_backward_output_mask_skips_outputs():
    x, w, mask, b = make_case((4,), 40, 9, torch.float32, True)
    bits = ops.pack_mask(mask)
    g = torch.randn(4, 9)
    full = ops.masked_linear_backward(g, x, w, bits, [True, True, True])
    for output_mask in ([True, False, False], [False, True, False], [False, False, True]):
        got = ops.masked_linear_backward(g, x, w, bits, output_mask)
        for i, on in enumerate(output_mask):
            if on:
                assert torch.equal(got[i], full[i])
            else:
                assert got[i].shape == (0,)
    # Only the gradients that autograd asks for are computed (x without requires_grad).
    ws = w.clone().requires_grad_()
    ops.masked_linear(x, ws, bits, None).sum().backward()
    assert torch.equal(ws.grad, ops.masked_linear_backward(torch.ones(4, 9), x, w, bits, [False, True, False])[1])


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.Adam(p, lr=0.01)],
                         ids=["sgd", "adam"])
def test_training_never_revives_pruned_weights(make_opt):
    x, w, mask, b = make_case((8,), 50, 12, torch.float32, True, seed=9)
    bits = ops.pack_mask(mask)
    w0 = w.clone()
    w = torch.nn.Parameter(w)
    b = torch.nn.Parameter(b)
    opt = make_opt([w, b])
    for step in range(3):
        opt.zero_grad()
        loss = (ops.masked_linear(x * (step + 1), w, bits, b) ** 2).mean()
        loss.backward()
        opt.step()
    assert torch.equal(w.detach()[~mask], w0[~mask]), "a pruned weight moved"
    assert not torch.equal(w.detach()[mask], w0[mask]), "kept weights should train"


# ----------------------------------------------------------------------------- opcheck, errors, determinism


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_opcheck(dtype, with_bias):
    x, w, mask, b = make_case((2, 3), 33, 7, dtype, with_bias)
    bits = ops.pack_mask(mask)
    x.requires_grad_()
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    torch.library.opcheck(torch.ops.multiflow.masked_linear.default, (x, w, bits, b))
    g = torch.randn(2, 3, 7).to(dtype)
    for output_mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(
            torch.ops.multiflow.masked_linear_backward.default,
            (g, x.detach(), w.detach(), bits, output_mask),
        )


def test_bad_inputs_name_the_argument():
    x, w, mask, b = make_case((3,), 40, 5, torch.float32, True)
    bits = ops.pack_mask(mask)
    cases = [
        ((x, w, bits[:, :1], b), "mask_bits must have shape"),
        ((x, w, bits[:4], b), "mask_bits must have shape"),
        ((x, w, bits.to(torch.int64), b), "mask_bits must be an int32"),
        ((x.half(), w, bits, b), "weight must have x's dtype"),
        ((x[:, :30], w, bits, b), "in_features mismatch"),
        ((x.double(), w.double(), bits, b), "x must be float32, float16 or bfloat16"),
        ((x, w, bits, b[:3]), "bias must have shape"),
        ((x, w, bits, b.half()), "bias must have x's dtype"),
        ((x, w[0], bits, b), "weight must have shape"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.masked_linear(*args)
    g = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        ops.masked_linear_backward(g[:2], x, w, bits, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_out must have x's dtype"):
        ops.masked_linear_backward(g.half(), x, w, bits, [True, True, True])


def test_same_result_at_any_thread_count():
    x, w, mask, b = make_case((257,), 700, 300, torch.float32, True, seed=2)
    bits = ops.pack_mask(mask)
    g = torch.randn(257, 300)

    def run():
        return ops.masked_linear(x, w, bits, b), ops.masked_linear_backward(g, x, w, bits, [True, True, True])

    first, *rest = results_at_thread_counts(run, (1, 2, 1))
    for other in rest:
        assert torch.equal(first[0], other[0])
        for a, c in zip(first[1], other[1]):
            assert torch.equal(a, c)


ISA_SCRIPT = """
import sys, torch
import multiflow_kernels
from multiflow_kernels import ops
x, w, bits, b, g = torch.load(sys.argv[1])
y = ops.masked_linear(x, w, bits, b)
grads = ops.masked_linear_backward(g, x, w, bits, [True, True, True])
torch.save({"capability": torch.backends.cpu.get_cpu_capability(), "y": y, "grads": grads}, sys.argv[2])
"""


@pytest.mark.parametrize("isa", isas_of_this_cpu())
def test_every_isa_path(isa, tmp_path):
    x, w, mask, b = make_case((37,), 300, 70, torch.float32, True, seed=6)
    bits = ops.pack_mask(mask)
    g = torch.randn(37, 70)
    got = run_with_isa(isa, ISA_SCRIPT, (x, w, bits, b, g), tmp_path)
    exact = F.linear(x.double(), w.double() * mask, b.double())
    scale = F.linear(x.double().abs(), (w.double() * mask).abs(), b.double().abs())
    assert_earned(got["y"], exact, dense_forward(x, w, mask, b), scale, torch.float32, f"y ({isa})")
    ref = reference.masked_linear_backward(g, x, w, bits, [True, True, True])
    for got_g, ref_g in zip(got["grads"], ref):
        torch.testing.assert_close(got_g, ref_g, rtol=1e-4, atol=1e-4)
    assert torch.equal(got["grads"][1][~mask], torch.zeros(int((~mask).sum())))
