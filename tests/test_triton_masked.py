"""The Triton masked_linear kernels (multiflow_kernels/triton/masked_linear.py) against
plain torch, with the tolerances of tests/test_ops_masked_linear.py.

Without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1, set before
the kernel module is imported) on CPU tensors, so small shapes only; with a GPU they
run compiled on CUDA tensors (the ops' CUDA implementation when MULTIFLOW_MASKED_CUDA=triton;
the default is cuBLAS, tests/test_masked_cublas.py).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

import multiflow_kernels  # noqa: E402, F401
from multiflow_kernels import ops  # noqa: E402
from multiflow_kernels.triton import masked_linear as triton_masked  # noqa: E402
from test_ops_masked_linear import DTYPES, assert_earned, assert_grads_earned, make_case  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (leading, in, out): edges in every dimension (BLOCK_M = BLOCK_N = 64, BLOCK_K = 32).
SHAPES = [((), 1, 1), ((3,), 31, 7), ((2, 5), 33, 65), ((70,), 100, 7)]


def test_kernels_run_where_this_machine_can():
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(triton_masked._forward_kernel, InterpretedFunction)
    assert interpreted == (DEVICE == "cpu"), "without a GPU the kernels must run under the interpreter"


def on_device(*ts):
    return [t.to(DEVICE) if t is not None else None for t in ts]


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward(shape, dtype, with_bias):
    leading, n_in, n_out = shape
    x, w, mask, b = make_case(leading, n_in, n_out, dtype, with_bias, seed=11)
    bits = ops.pack_mask(mask)
    xd, wd, bitsd, bd = on_device(x, w, bits, b)
    y = triton_masked.masked_linear_triton(xd, wd, bitsd, bd).cpu()
    x64, w64 = x.double(), w.double() * mask
    exact = F.linear(x64, w64, None if b is None else b.double())
    scale = F.linear(x64.abs(), w64.abs(), None if b is None else b.double().abs())
    assert_earned(y, exact, F.linear(x, w * mask.to(dtype), b), scale, dtype, "y")
    if n_out > 1:  # row 0 is all pruned: exactly the bias (or 0)
        expect = b[0] if b is not None else torch.zeros((), dtype=dtype)
        assert torch.equal(y[..., 0], expect.expand(y[..., 0].shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward(shape, dtype):
    leading, n_in, n_out = shape
    x, w, mask, b = make_case(leading, n_in, n_out, dtype, True, seed=12)
    bits = ops.pack_mask(mask)
    g = torch.randn(*leading, n_out, generator=torch.Generator().manual_seed(3)).to(dtype)
    gd, xd, wd, bitsd = on_device(g, x, w, bits)
    grads = [t.cpu() for t in triton_masked.masked_linear_backward_triton(gd, xd, wd, bitsd, [True, True, True])]
    assert_grads_earned(grads, x, w, mask, b, g)


def test_backward_output_mask():
    x, w, mask, b = make_case((4,), 40, 9, torch.float32, True)
    gd, xd, wd, bitsd = on_device(torch.randn(4, 9), x, w, ops.pack_mask(mask))
    full = triton_masked.masked_linear_backward_triton(gd, xd, wd, bitsd, [True, True, True])
    got = triton_masked.masked_linear_backward_triton(gd, xd, wd, bitsd, [False, True, False])
    assert got[0].shape == (0,) and got[2].shape == (0,)
    assert torch.equal(got[1], full[1])


def test_bad_inputs_name_the_argument():
    x, w, mask, b = make_case((3,), 40, 5, torch.float32, True)
    bits = ops.pack_mask(mask)
    with pytest.raises(RuntimeError, match="mask_bits must have shape"):
        triton_masked.masked_linear_triton(x, w, bits[:, :1], b)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        triton_masked.masked_linear_triton(x.half(), w, bits, b)


@pytest.mark.cuda
def test_cuda_op_dispatches_to_triton_with_autograd(monkeypatch):
    monkeypatch.setenv("MULTIFLOW_MASKED_CUDA", "triton")  # the default is cuBLAS (masked_cublas.py)
    x, w, mask, b = make_case((2, 50), 100, 65, torch.float16, True, seed=13)
    bits = ops.pack_mask(mask)
    xd, wd, bitsd, bd = on_device(x, w, bits, b)
    wd.requires_grad_()
    y = ops.masked_linear(xd, wd, bitsd, bd)
    assert torch.equal(y, triton_masked.masked_linear_triton(xd, wd.detach(), bitsd, bd))
    y.float().sum().backward()
    assert torch.equal(wd.grad.cpu()[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float16))
