"""multiflow::masked_linear / masked_linear_backward on CPU against plain torch.

Tolerances are earned: the exact result is the dense masked expression in float64;
the kernel's error must be within a small multiple of plain torch's own error in the
test dtype (F.linear on the dense masked weight, and its autograd), plus a few units
of rounding of the output dtype relative to sum |x| |w|.
"""

from __future__ import annotations

import math

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
        check_backward(x, w, mask, b)  # the op's gradients and the twin's, at zero size too


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
    rows = math.prod(x.shape[:-1])  # not reshape(-1, n): that fails for n = 0
    scale_x = g64.reshape(rows, w.shape[0]) @ w64
    scale_w = g64.reshape(rows, w.shape[0]).T @ x64.reshape(rows, w.shape[1])
    scale_b = g64.reshape(rows, w.shape[0]).sum(0)
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


def test_backward_grad_out_on_another_device_is_refused():
    """A meta grad_out must not reach the fake kernel's outputs (uninitialised CPU tensors)."""
    x, w, mask, _ = make_case((3,), 4, 5, torch.float32, False)
    with pytest.raises(RuntimeError, match="grad_out is on meta but x is on cpu"):
        ops.masked_linear_backward(torch.zeros(3, 5, device="meta"), x, w, ops.pack_mask(mask), [True, True, False])


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


# ----------------------------------------------------------------------------- double backward, torch.compile
# The ops take float32 / float16 / bfloat16 only (no float64), so gradgradcheck runs in
# float32 with a finite-difference step and tolerances to match; the second-order gradients
# themselves are held to the earned bound against the dense masked expression in float64.

SECOND_ORDER_SHAPES = [((2, 3), 7, 5), ((4,), 33, 6), ((1,), 1, 1)]


def op_and_dense(mask):
    """masked_linear and the dense masked expression, each as a function of (x, weight, bias)."""
    bits = ops.pack_mask(mask)
    return (lambda x, w, b: ops.masked_linear(x, w, bits, b)), (lambda x, w, b: dense_forward(x, w, mask, b))


def gradient_penalty_grads(linear, x, w, b, wrt):
    """Gradients of (x, weight[, bias]) of ``|d sum(y^2) / d wrt|^2`` with y = linear(x, w, b),
    on fresh leaves: a second-order gradient (create_graph=True). Every term of it is a
    product of inputs with a positive coefficient, so the same call on |x|, |w|, |b| in
    float64 bounds the sum of the terms' magnitudes (the earned check's scale)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    xs, ws, bs = (*leaves, None)[:3]
    first = torch.autograd.grad(linear(xs, ws, bs).pow(2).sum(), leaves[wrt], create_graph=True)[0]
    return torch.autograd.grad(first.pow(2).sum(), leaves)


@pytest.mark.filterwarnings("error::UserWarning")  # torch's "autograd kernel was not registered" fallback
@pytest.mark.parametrize("with_bias, wrt", [(False, 0), (False, 1), (True, 0), (True, 1), (True, 2)],
                         ids=["nobias-grad_x", "nobias-grad_weight", "bias-grad_x", "bias-grad_weight", "bias-grad_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leading, n_in, n_out", SECOND_ORDER_SHAPES, ids=str)
def test_double_backward_matches_dense_masked_linear(leading, n_in, n_out, dtype, with_bias, wrt):
    """Second-order gradients of x, weight and bias, for a penalty on each first-order
    gradient (wrt: its index in (x, weight, bias)); before the fix: silently all 0."""
    x, w, mask, b = make_case(leading, n_in, n_out, dtype, with_bias, seed=11)
    op, dense = op_and_dense(mask)
    b64 = None if b is None else b.double()
    got = gradient_penalty_grads(op, x, w, b, wrt)
    exact = gradient_penalty_grads(dense, x.double(), w.double(), b64, wrt)
    plain = gradient_penalty_grads(dense, x, w, b, wrt)
    scale = gradient_penalty_grads(dense, x.double().abs(), w.double().abs(), None if b is None else b64.abs(), wrt)
    for name, *four in zip(("x", "weight", "bias"), got, exact, plain, scale):
        assert_earned(*four, dtype, f"second-order grad of {name}")
    assert exact[0].abs().max() > 0, "the case must have a non-zero second-order gradient"
    assert torch.equal(got[1][~mask], torch.zeros_like(got[1][~mask])), "pruned weights: exactly 0"


@pytest.mark.filterwarnings("ignore:Input #\\d+ requires gradient and is not a double precision")
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_gradcheck_and_gradgradcheck_float32(with_bias):
    """Finite differences of masked_linear to second order, and (through the first-order
    gradients with create_graph=True) to third order. float32 (the ops have no float64):
    central differences of a polynomial of degree <= 3 with a step of 1e-2 are within
    float32 rounding / step plus step^2 of the truth."""
    x, w, mask, b = make_case((2, 3), 7, 5, torch.float32, with_bias, seed=12)
    bits = ops.pack_mask(mask)
    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b) if t is not None)

    def linear(*args):
        return ops.masked_linear(*args[:2], bits, *args[2:])

    def first_order(*args):
        return torch.autograd.grad(linear(*args).pow(2).sum(), args, create_graph=True)

    tol = dict(eps=1e-2, atol=5e-3, rtol=5e-3)
    assert torch.autograd.gradcheck(linear, inputs, **tol)
    assert torch.autograd.gradgradcheck(linear, inputs, **tol)
    assert torch.autograd.gradgradcheck(first_order, inputs, **tol)


def test_masked_linear_backward_is_differentiable():
    """masked_linear_backward called directly: its gradients, from the kernels, equal
    autograd of its plain-torch twin (reference.py), for each output alone and all three."""
    x, w, mask, b = make_case((2, 3), 33, 6, torch.float32, True, seed=13)
    bits = ops.pack_mask(mask)
    g = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(14))
    for output_mask in ([True, False, False], [False, True, False], [False, False, True], [True, True, True]):
        results = []
        for backward in (ops.masked_linear_backward, reference.masked_linear_backward):
            leaves = [t.clone().requires_grad_() for t in (g, x, w)]
            outs = backward(*leaves, bits, output_mask)
            loss = sum((o * o.detach().sin()).sum() for o, on in zip(outs, output_mask) if on)
            results.append(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
        for got, want, name in zip(*results, ("grad_out", "x", "weight")):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{output_mask}: d/d {name}")


def test_gradient_penalty_training_matches_dense_and_keeps_pruned_weights():
    """A training step that differentiates through gradients (create_graph=True): task loss
    plus a penalty on the input gradient and on the weight gradient, as in gradient-penalty
    or meta-learning training. Same trajectory as the dense masked model; pruned weights
    never move (their second-order gradient is exactly 0 too)."""
    x, w0, mask, b0 = make_case((2, 3), 7, 5, torch.float32, True, seed=15)
    runs = {}
    for name, linear in zip(("op", "dense"), op_and_dense(mask)):
        w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
        opt = torch.optim.SGD([w, b], lr=0.01, momentum=0.9)
        for step in range(4):
            xs = (x * (step + 1)).requires_grad_()
            task = (linear(xs, w, b) - 1).pow(2).mean()
            grad_x, grad_w = torch.autograd.grad(task, (xs, w), create_graph=True)
            loss = task + 0.1 * grad_x.pow(2).sum() + 0.1 * grad_w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs[name] = (w.detach(), b.detach())
    (w_op, b_op), (w_dense, b_dense) = runs["op"], runs["dense"]
    torch.testing.assert_close(w_op, w_dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_op, b_dense, rtol=1e-5, atol=1e-5)
    assert torch.equal(w_op[~mask], w0[~mask]), "a pruned weight moved"


def test_compiled_first_order_training_uses_the_kernels():
    """torch.compile (aot_eager, fullgraph) of a training step: the gradients eager gives,
    and the backward graph calls masked_linear_backward (the kernel), not a dense expression."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm.code
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    x, w, mask, b = make_case((2, 3), 33, 6, torch.float32, True, seed=16)
    bits = ops.pack_mask(mask)

    def loss_of(x, w, b):
        return ops.masked_linear(x, w, bits, b).pow(2).mean()

    grads = []
    for fn in (loss_of, torch.compile(loss_of, fullgraph=True, backend=backend),
               torch.compile(loss_of, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        torch._dynamo.reset()
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for got in grads[1:]:
        for a, c in zip(got, grads[0]):
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    assert "masked_linear_backward" in graphs["backward"], graphs["backward"]
    assert "masked_linear.default" in graphs["forward"], graphs["forward"]


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
    for output_mask in ([True, True, True], [False, True, False], [True, False, True]):
        torch.library.opcheck(
            torch.ops.multiflow.masked_linear_backward.default,
            (g, x.detach(), w.detach(), bits, output_mask),
        )
        # With inputs that require grad: its own autograd formula (double backward).
        torch.library.opcheck(
            torch.ops.multiflow.masked_linear_backward.default,
            (g.clone().requires_grad_(), x, w, bits, output_mask),
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


@pytest.mark.parametrize(("rows", "n_in", "n_out"), [(5, 700, 300), (257, 700, 300), (96 * 33 + 1, 33, 130)])
def test_same_result_at_any_thread_count(rows, n_in, n_out):
    """5 rows: the few-row forward; 257 rows: one task takes all three 96-row blocks at 1
    thread, two take them at 2; 96 * 33 + 1 rows and 2 column blocks of the forward: at 1
    thread a run of 32 row blocks (the most a task multiplies with one weight tile) and a
    short one of 2."""
    x, w, mask, b = make_case((rows,), n_in, n_out, torch.float32, True, seed=2)
    bits = ops.pack_mask(mask)
    g = torch.randn(rows, n_out)

    def run():
        return ops.masked_linear(x, w, bits, b), ops.masked_linear_backward(g, x, w, bits, [True, True, True])

    first, *rest = results_at_thread_counts(run, (1, 2, 1))
    for other in rest:
        assert torch.equal(first[0], other[0])
        for a, c in zip(first[1], other[1]):
            assert torch.equal(a, c)
    check_forward(x, w, mask, b)
    for got, want in zip(first[1], reference.masked_linear_backward(g, x, w, bits, [True, True, True])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


ISA_SCRIPT = """
import sys, torch
import multiflow_kernels
from multiflow_kernels import ops
x, w, bits, b, g = torch.load(sys.argv[1])
y = ops.masked_linear(x, w, bits, b)
grads = ops.masked_linear_backward(g, x, w, bits, [True, True, True])
torch.save({"capability": torch.backends.cpu.get_cpu_capability(), "y": y, "grads": grads}, sys.argv[2])
"""


FEW_ROWS_SCRIPT = """
import sys, torch
import multiflow_kernels
from multiflow_kernels import ops
cases = torch.load(sys.argv[1])
ys = [ops.masked_linear(x, w, bits, b) for x, w, bits, b in cases]
torch.save({"capability": torch.backends.cpu.get_cpu_capability(), "ys": ys}, sys.argv[2])
"""


@pytest.mark.parametrize("isa", isas_of_this_cpu())
def test_few_rows_every_isa_path(isa, tmp_path):
    """The few-row forward (1-16 rows of x: the weight read in place, no tiles) on every ISA
    path and dtype, with row lengths around the vector widths (a partial last word), against
    the exact product; 17 rows take the blocked GEMM."""
    gen = torch.Generator().manual_seed(17)
    cases = []
    for dtype in DTYPES:
        for n_in in (1, 8, 31, 32, 33, 48, 64, 100, 1056):
            for m in (1, 2, 5, 8, 9, 16, 17):
                x = torch.randn(m, n_in, generator=gen).to(dtype)
                w = torch.randn(21, n_in, generator=gen).to(dtype)
                mask = torch.rand(21, n_in, generator=gen) < 0.4
                b = torch.randn(21, generator=gen).to(dtype)
                cases.append((x, w, ops.pack_mask(mask), b, mask))
    got = run_with_isa(isa, FEW_ROWS_SCRIPT, [c[:4] for c in cases], tmp_path)["ys"]
    for (x, w, _, b, mask), y in zip(cases, got):
        x64, w64 = x.double(), w.double() * mask
        exact = F.linear(x64, w64, b.double())
        scale = F.linear(x64.abs(), w64.abs(), b.double().abs())
        assert_earned(y, exact, dense_forward(x, w, mask, b), scale, x.dtype, f"y {tuple(x.shape)} {x.dtype} ({isa})")


@pytest.mark.parametrize("rows", [1, 3, 12, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pruned_non_finite_weights_count_as_zero(rows, dtype):
    """A pruned weight that is inf or NaN adds nothing (it is +0.0, as in reference.masked_weight),
    on the few-row path (<= 16 rows) and the blocked one, forward and backward; an inf in x meets a kept weight as in
    F.linear, and a pruned one gives NaN (0 * inf), as F.linear(x, W * M) with finite W does."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 70, generator=gen).to(dtype)
    w = torch.randn(5, 70, generator=gen).to(dtype)
    mask = torch.rand(5, 70, generator=gen) < 0.5
    mask[:, 3] = False
    w_bad = w.clone()
    w_bad[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype).repeat(70 * 5)[: int((~mask).sum())]
    bits = ops.pack_mask(mask)
    assert torch.equal(ops.masked_linear(x, w_bad, bits, None), ops.masked_linear(x, w.masked_fill(~mask, 0), bits, None))
    g = torch.randn(rows, 5, generator=gen).to(dtype)
    grads_bad = ops.masked_linear_backward(g, x, w_bad, bits, [True, True, False])
    grads = ops.masked_linear_backward(g, x, w.masked_fill(~mask, 0), bits, [True, True, False])
    assert torch.equal(grads_bad[0], grads[0]) and torch.equal(grads_bad[1], grads[1])
    x_inf = x.clone()
    x_inf[:, 3] = float("inf")  # column 3 is pruned in every row
    assert torch.isnan(ops.masked_linear(x_inf, w, bits, None)).all()


PADDING_SCRIPT = """
import sys, torch
import multiflow_kernels
from multiflow_kernels import ops
cases = torch.load(sys.argv[1])
out = []
for x, w, bits, b, g in cases:
    out.append((ops.masked_linear(x, w, bits, b), ops.masked_linear_backward(g, x, w, bits, [True, True, True])))
torch.save({"capability": torch.backends.cpu.get_cpu_capability(), "out": out}, sys.argv[2])
"""


@pytest.mark.parametrize("isa", isas_of_this_cpu())
def test_padding_bits_and_pruned_nan_weights_change_nothing(isa, tmp_path):
    """mask_bits with every padding bit past in_features set, and NaN at every pruned weight:
    forward and all three gradients equal those of the clean mask with zeros there, on every
    ISA path, the few-row forward (1, 9, 16 rows) and the blocked one (17, 100)."""
    gen = torch.Generator().manual_seed(23)
    cases, clean = [], []
    for dtype in DTYPES:
        for m in (1, 9, 16, 17, 100):
            n_in = 77  # a partial last word: 19 padding bits
            x = torch.randn(m, n_in, generator=gen).to(dtype)
            w = torch.randn(11, n_in, generator=gen).to(dtype)
            mask = torch.rand(11, n_in, generator=gen) < 0.5
            b = torch.randn(11, generator=gen).to(dtype)
            g = torch.randn(m, 11, generator=gen).to(dtype)
            bits = ops.pack_mask(mask)
            dirty_bits = bits.clone()
            dirty_bits[:, -1] |= torch.tensor(~((1 << (n_in % 32)) - 1), dtype=torch.int32)
            cases.append((x, w.masked_fill(~mask, float("nan")), dirty_bits, b, g))
            clean.append((x, w.masked_fill(~mask, 0), bits, b, g))
    got = run_with_isa(isa, PADDING_SCRIPT, cases, tmp_path)["out"]
    want = run_with_isa(isa, PADDING_SCRIPT, clean, tmp_path)["out"]
    for (y, grads), (y_ref, grads_ref), (x, *_) in zip(got, want, cases):
        what = f"{tuple(x.shape)} {x.dtype} ({isa})"
        assert torch.equal(y, y_ref), "y " + what
        for name, a, c in zip(("grad_x", "grad_w", "grad_b"), grads, grads_ref):
            assert torch.equal(a, c), f"{name} {what}"


@pytest.mark.skipif("avx512" not in isas_of_this_cpu(), reason="compares the AVX2 and AVX-512 paths: needs AVX-512")
def test_blocked_gemm_same_bits_on_avx2_and_avx512(tmp_path):
    """The blocked GEMM's output elements are each one FMA chain over the depth, whatever the
    register panel (AVX-512 6 x 4 vectors with a 2-vector strip where the columns end, AVX2
    6 x 2): forward and gradients are bit-identical on the two paths (40 rows: the blocked
    path; 96 and 150 outputs: padded 96-column strips)."""
    cases = []
    for n_out in (96, 150):
        x, w, mask, b = make_case((40,), 77, n_out, torch.float32, True, seed=n_out)
        cases.append((x, w, ops.pack_mask(mask), b, torch.randn(40, n_out)))
    out = {}
    for isa in ("avx2", "avx512"):
        (tmp_path / isa).mkdir()
        out[isa] = run_with_isa(isa, PADDING_SCRIPT, cases, tmp_path / isa)["out"]
    for (y2, g2), (y5, g5) in zip(out["avx2"], out["avx512"]):
        assert torch.equal(y2, y5)
        for a, c in zip(g2, g5):
            assert torch.equal(a, c)


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
