"""The linear ops' eager entry points (csrc/python_eager.cpp, called first by ops.py): the same
dispatcher call as torch.ops.multiflow.<op>.default for plain tensors, NotImplemented (and so
the torch.ops path) for anything Python-level dispatch could apply to, the ops' own errors, and
autograd, autocast and dispatch modes behind them as behind torch.ops."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from multiflow_kernels import _C, formats, ops

IN, OUT = 40, 24  # IN: a multiple of 4 (2:4), not of 32 (a partial mask word)
FORMATS = ["masked", "bitmap", "2:4"]
OP = {"masked": "masked_linear", "bitmap": "bitmap_linear", "2:4": "sparse24_linear"}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _args(fmt, dtype=torch.float32, bias=True, rows=3, device="cpu"):
    """The positional arguments of fmt's linear op (x first, bias last), on device."""
    args = _cpu_args(fmt, dtype, bias, rows)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _cpu_args(fmt, dtype, bias, rows):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=gen).to(dtype)
    scores = torch.rand(OUT, IN, generator=gen)
    mask = ops.nm_mask(scores, 2, 4) if fmt == "2:4" else scores > 0.6
    x = torch.randn(rows, IN, generator=gen).to(dtype)
    b = torch.randn(OUT, generator=gen).to(dtype) if bias else None
    if fmt == "masked":
        return (x, w, ops.pack_mask(mask), b)
    packed = formats.pack(fmt, w, mask)
    if fmt == "bitmap":
        return (x, *formats._args(fmt, packed), IN, b)
    return (x, *formats._args(fmt, packed), b)


def _torch_ops(fmt):
    return getattr(torch.ops.multiflow, OP[fmt]).default


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 37])  # the few-row and the tiled kernels
def test_entry_point_equals_torch_ops(device, fmt, dtype, bias, rows):
    args = _args(fmt, dtype, bias, rows, device)
    got = getattr(_C, OP[fmt])(*args)
    assert got is not NotImplemented
    assert torch.equal(got, _torch_ops(fmt)(*args))
    assert torch.equal(getattr(ops, OP[fmt])(*args), got)


class _Tagged(torch.Tensor):
    """A tensor subclass with a __torch_function__ of its own (counts the calls it sees)."""

    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        _Tagged.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("fmt", FORMATS)
def test_subclass_argument_takes_torch_ops(fmt):
    args = list(_args(fmt))
    expect = _torch_ops(fmt)(*args)
    for i in [0, 1, len(args) - 1]:  # x, the weight / values, the bias
        sub = list(args)
        sub[i] = args[i].as_subclass(_Tagged)
        assert getattr(_C, OP[fmt])(*sub) is NotImplemented
        before = _Tagged.calls
        got = getattr(ops, OP[fmt])(*sub)
        assert _Tagged.calls > before, "the subclass's __torch_function__ was bypassed"
        assert torch.equal(got.as_subclass(torch.Tensor), expect)


def test_parameter_is_a_plain_tensor():
    x, w, bits, b = _args("masked")
    got = _C.masked_linear(x, torch.nn.Parameter(w), bits, torch.nn.Parameter(b))
    assert got is not NotImplemented and got.requires_grad
    assert torch.equal(got.detach(), _torch_ops("masked")(x, w, bits, b))


def test_other_argument_kinds_take_torch_ops():
    args = _args("bitmap")
    x, values, bits, row_ptr, block_ptr, in_f, b = args
    for bad in [
        (x, values, bits, row_ptr, block_ptr, True, b),  # a bool, not an int
        (x, values, bits, row_ptr, block_ptr, 2**70, b),  # does not fit int64
        (x, values, bits, row_ptr, block_ptr, in_f),  # too few arguments
        (x, values, bits, row_ptr, block_ptr, in_f, b, None),  # too many
        (x, values, bits, row_ptr, block_ptr, in_f, 1.0),  # bias neither a tensor nor None
        (x.tolist(), values, bits, row_ptr, block_ptr, in_f, b),  # x not a tensor
    ]:
        assert _C.bitmap_linear(*bad) is NotImplemented
    assert _C.masked_linear(*_args("masked")[:3]) is NotImplemented
    assert _C.sparse24_linear(*_args("2:4"), None) is NotImplemented


class _Count(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_function_mode_sees_the_op(fmt):
    args = _args(fmt)
    with _Count() as mode:
        assert getattr(_C, OP[fmt])(*args) is NotImplemented
        got = getattr(ops, OP[fmt])(*args)
    assert _torch_ops(fmt) in mode.funcs
    assert torch.equal(got, _torch_ops(fmt)(*args))


class _Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dispatch_mode_sees_the_op_through_the_entry_point(fmt):
    args = _args(fmt)
    with _Log() as mode:
        got = getattr(_C, OP[fmt])(*args)
    assert got is not NotImplemented and _torch_ops(fmt) in mode.funcs
    assert torch.equal(got, _torch_ops(fmt)(*args))


@pytest.mark.parametrize("fmt", FORMATS)
def test_errors_are_the_ops_own(fmt):
    args = list(_args(fmt))
    args[0] = args[0][:, :-4]  # x with the wrong number of features
    with pytest.raises(RuntimeError, match="in_features") as via_entry:
        getattr(_C, OP[fmt])(*args)
    with pytest.raises(RuntimeError) as via_ops:
        _torch_ops(fmt)(*args)
    assert type(via_entry.value) is type(via_ops.value) and str(via_entry.value) == str(via_ops.value)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_linear_autograd_through_the_entry_point(device):
    x, w, bits, b = _args("masked", device=device)
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = _C.masked_linear(x, w, bits, b)
    assert y is not NotImplemented and y.grad_fn is not None
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    _torch_ops("masked")(x, w, bits, b).square().sum().backward()
    for got, t in zip(grads, (x, w, b)):
        assert torch.equal(got, t.grad)
    assert torch.all(grads[1][ops.unpack_mask(bits, IN) == 0] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_inference_format_gradients_through_the_entry_point(device, fmt):
    """bitmap_linear / sparse24_linear's C++ autograd (x and bias) behind the entry point."""
    args = list(_args(fmt, device=device))
    args[0] = args[0].clone().requires_grad_()
    args[-1] = args[-1].clone().requires_grad_()
    y = getattr(_C, OP[fmt])(*args)
    assert y is not NotImplemented and y.grad_fn is not None
    gx, gb = torch.autograd.grad(y.square().sum(), (args[0], args[-1]))
    ex, eb = torch.autograd.grad(_torch_ops(fmt)(*args).square().sum(), (args[0], args[-1]))
    assert torch.equal(gx, ex) and torch.equal(gb, eb)


@pytest.mark.parametrize("fmt", FORMATS)
def test_autocast_behind_the_entry_point(fmt):
    args = _args(fmt)  # float32 weights and x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = getattr(_C, OP[fmt])(*args)
        expect = _torch_ops(fmt)(*args)
    assert got is not NotImplemented and got.dtype == torch.bfloat16
    assert torch.equal(got, expect)


def _live_tensors():
    import gc
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # isinstance on some torch module attributes warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("fmt", FORMATS)
def test_cpp_warning_becomes_a_python_warning_and_an_error_leaks_nothing(fmt):
    """vmap over the op takes torch's batching fallback, which warns (TORCH_WARN): through the
    entry point that is a Python UserWarning; under an "error" filter it raises, and the
    output made before the warning was raised is released."""
    import warnings

    args = _args(fmt)
    xs = torch.stack([args[0], 2 * args[0]])

    def call(x):
        return getattr(_C, OP[fmt])(x, *args[1:])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.vmap(call)(xs)
    assert any("batching rule" in str(w.message) for w in caught), [str(w.message) for w in caught]
    expect = torch.stack([_torch_ops(fmt)(x, *args[1:]) for x in xs])
    assert torch.equal(got, expect)
    def raising_calls(n):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(n):
                with pytest.raises(UserWarning, match="batching rule"):
                    torch.vmap(call)(xs)

    raising_calls(1)  # warm-up: state made lazily on the first call stays alive
    before = _live_tensors()
    raising_calls(20)
    assert _live_tensors() - before < 5
