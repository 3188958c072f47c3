"""masked_linear's default CUDA path (multiflow_kernels/masked_cublas.py: the masked weight
in one pass, then cuBLAS GEMMs) against plain torch, with the tolerances of
tests/test_ops_masked_linear.py, and the MULTIFLOW_MASKED_CUDA switch.

The composite is made of torch ops and multiflow::unpack_mask, so it runs on CPU tensors
too: the numerics, the masking semantics (NaN / inf stored at pruned positions never
reach the output; grad_weight exactly 0 there) and the output_mask contract are tested
here on every machine; on a GPU the same checks run on CUDA through the public op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import multiflow_kernels  # noqa: F401
from multiflow_kernels import ops
from multiflow_kernels import triton as mk_triton
from multiflow_kernels.masked_cublas import masked_linear_backward_cublas, masked_linear_cublas
from test_ops_masked_linear import DTYPES, assert_earned, assert_grads_earned, make_case

SHAPES = [((), 1, 1), ((3,), 31, 7), ((2, 5), 33, 65), ((70,), 100, 7), ((0,), 9, 4)]
# the CUDA cases carry the cuda mark: gpu_check.sh's `pytest -m cuda` selects them
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs an NVIDIA GPU")])]


def _forward(device, x, w, bits, b):
    on = [t.to(device) if t is not None else None for t in (x, w, bits, b)]
    if device == "cuda":  # through the public op: the registered CUDA kernel
        return ops.masked_linear(*on).cpu()
    return masked_linear_cublas(*on).cpu()


def _backward(device, g, x, w, bits, output_mask):
    on = [t.to(device) for t in (g, x, w, bits)]
    if device == "cuda":
        got = torch.ops.multiflow.masked_linear_backward.default(*on, output_mask)
    else:
        got = masked_linear_backward_cublas(*on, output_mask)
    return [t.cpu() for t in got]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward(shape, dtype, with_bias, device):
    leading, n_in, n_out = shape
    x, w, mask, b = make_case(leading, n_in, n_out, dtype, with_bias, seed=21)
    w[~mask] = float("nan")  # stored at pruned positions: must not reach y
    y = _forward(device, x, w, ops.pack_mask(mask), b)
    assert y.shape == (*leading, n_out) and y.dtype == dtype
    wm = torch.where(mask, w, torch.zeros((), dtype=dtype))
    x64, w64 = x.double(), wm.double()
    exact = F.linear(x64, w64, None if b is None else b.double())
    scale = F.linear(x64.abs(), w64.abs(), None if b is None else b.double().abs())
    assert_earned(y, exact, F.linear(x, wm, b), scale, dtype, "y")
    if n_out > 1 and y.numel():  # row 0 is all pruned (and all NaN): exactly the bias (or 0)
        expect = b[0] if b is not None else torch.zeros((), dtype=dtype)
        assert torch.equal(y[..., 0], expect.expand(y[..., 0].shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward(shape, dtype, device):
    leading, n_in, n_out = shape
    x, w, mask, b = make_case(leading, n_in, n_out, dtype, True, seed=22)
    g = torch.randn(*leading, n_out, generator=torch.Generator().manual_seed(5)).to(dtype)
    w_stored = w.clone()
    w_stored[~mask] = float("inf")  # must not reach grad_x
    grads = _backward(device, g, x, w_stored, ops.pack_mask(mask), [True, True, True])
    assert_grads_earned(grads, x, w, mask, b, g)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_output_mask(device):
    x, w, mask, _ = make_case((4,), 40, 9, torch.float32, False, seed=23)
    g, bits = torch.randn(4, 9), ops.pack_mask(mask)
    full = _backward(device, g, x, w, bits, [True, True, True])
    for output_mask in ([False, True, False], [True, False, False], [False, False, True], [False, False, False]):
        got = _backward(device, g, x, w, bits, output_mask)
        for want, t, f in zip(output_mask, got, full):
            assert torch.equal(t, f) if want else t.shape == (0,)
    got = masked_linear_backward_cublas(g, x, w, bits, [False, True, False])
    assert got[0] is not got[2], "outputs left out must be distinct tensors (an op's outputs may not alias)"


def test_bad_inputs_name_the_argument():
    x, w, mask, b = make_case((3,), 40, 5, torch.float32, True)
    bits = ops.pack_mask(mask)
    with pytest.raises(RuntimeError, match="mask_bits must have shape"):
        masked_linear_cublas(x, w, bits[:, :1], b)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        masked_linear_cublas(x.half(), w, bits, b)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        masked_linear_backward_cublas(torch.zeros(3, 4), x, w, bits, [True, True, True])


def test_switch(monkeypatch):
    monkeypatch.delenv(mk_triton.MASKED_CUDA_ENV, raising=False)
    assert mk_triton.masked_cuda_choice() == "cublas"
    for value, want in (("", "cublas"), ("cublas", "cublas"), ("triton", "triton")):
        monkeypatch.setenv(mk_triton.MASKED_CUDA_ENV, value)
        assert mk_triton.masked_cuda_choice() == want
    monkeypatch.setenv(mk_triton.MASKED_CUDA_ENV, "cuda")
    with pytest.raises(ValueError, match="MULTIFLOW_MASKED_CUDA must be one of"):
        mk_triton.masked_cuda_choice()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_default_is_cublas_and_switch_selects_triton(monkeypatch):
    x, w, mask, b = make_case((2, 50), 100, 65, torch.float16, True, seed=24)
    xd, wd, bitsd, bd = x.cuda(), w.cuda().requires_grad_(), ops.pack_mask(mask).cuda(), b.cuda()
    monkeypatch.delenv(mk_triton.MASKED_CUDA_ENV, raising=False)
    y = ops.masked_linear(xd, wd, bitsd, bd)
    assert torch.equal(y, masked_linear_cublas(xd, wd.detach(), bitsd, bd))
    y.float().sum().backward()
    assert torch.equal(wd.grad.cpu()[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float16))
    pytest.importorskip("triton")
    from multiflow_kernels.triton.masked_linear import masked_linear_triton

    monkeypatch.setenv(mk_triton.MASKED_CUDA_ENV, "triton")
    assert torch.equal(ops.masked_linear(xd, wd.detach(), bitsd, bd), masked_linear_triton(xd, wd.detach(), bitsd, bd))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_opcheck(dtype):
    x, w, mask, b = make_case((5,), 48, 17, dtype, True, seed=25)
    args = (x.cuda(), w.cuda().requires_grad_(), ops.pack_mask(mask).cuda(), b.cuda())
    torch.library.opcheck(torch.ops.multiflow.masked_linear.default, args)
    g = torch.randn(5, 17, device="cuda").to(dtype)
    for output_mask in ([True, True, True], [False, True, False], [False, False, False]):
        # outputs left out are (0,)-shaped and must not alias each other
        torch.library.opcheck(torch.ops.multiflow.masked_linear_backward.default,
                              (g, args[0], args[1].detach(), args[2], output_mask))
