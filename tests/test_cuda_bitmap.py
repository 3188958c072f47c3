"""multiflow::_bitmap_linear_cuda, bitmap_linear in CUDA C++ (csrc/cuda/bitmap.cu), against
the plain-torch twin (reference.bitmap_linear), and the switch that makes the public
bitmap_linear call it on CUDA (the default; MULTIFLOW_BITMAP_CUDA=triton picks Triton,
multiflow_kernels/triton).

The kernel tests need an NVIDIA GPU (marked ``cuda``; skipped without one). Two paths, both
covered: one pass over the format for few rows of x (gemv_tc_kernel, the default for float16 /
bfloat16: mma.sync with W decoded into the A fragments, 8 or 16 rows of x per template;
gemv_kernel for float32 and under MULTIFLOW_BITMAP_GEMV=v1, up to 8 rows), a dense decode and
cuBLAS above. The kernel tests run under both few-row switches. The fake kernel and the switch run
everywhere.

Tolerances are earned (tests/_earned.py, through _bitmap_inputs.py): the exact result is the dense masked expression
in float64; plain torch's error is the reference's (float32 sums rounded once to the dtype).
Outputs are freshly allocated by the op: the caching allocator is first filled with NaN
(poison_cache), so an element the kernel does not write shows as NaN.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from _bitmap_inputs import assert_linear_earned, make_weight, make_x
from torch._subclasses.fake_tensor import FakeTensorMode

import multiflow_kernels  # noqa: F401  (registers the ops)
import multiflow_kernels.triton as mk_triton
from multiflow_kernels import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (out, in): in not a multiple of 32 / 512 / 1024, one column, one output row, several
# 1024-column passes and (for 8 rows of float32) several staged chunks of x.
SHAPES = [(1, 1), (3, 31), (7, 33), (17, 513), (5, 1025), (40, 1100), (33, 2100), (130, 4096)]
ROWS_OF_X = [1, 2, 3, 5, 8, 9, 12, 16, 17, 64, 300]
# The few-row kernels (MULTIFLOW_BITMAP_GEMV): tc (the default: tensor cores for float16 /
# bfloat16, up to 16 rows of x; float32 takes v1), v1 (up to 8 rows) and tc2 (tc with the
# lean decode); each test of the kernels runs under all three.
GEMV = ["tc", "v1", "tc2"]


@pytest.fixture(params=GEMV)
def gemv(request, monkeypatch):
    monkeypatch.setenv("MULTIFLOW_BITMAP_GEMV", request.param)
    return request.param


def poison_cache(nbytes=1 << 26):
    """Fill free blocks of the CUDA caching allocator with NaN, so a fresh output the kernel
    leaves unwritten is NaN (its memory most likely comes from these blocks)."""
    for size in (nbytes, 1 << 20, 1 << 14):
        t = torch.full((size // 4,), float("nan"), device="cuda")
        del t


def cpp(x, fmt, n_in, b):
    poison_cache()
    return ops._bitmap_linear_cuda(x, *fmt, n_in, b)


def assert_cpp_earned(y, x, fmt, n_in, b, what):
    """No NaN (nothing left unwritten: x, w and b are finite here), then the earned bound."""
    y = y.cpu()
    assert not y.isnan().any(), f"{what}: NaN in the output (an element left unwritten?)"
    assert_linear_earned(y, x.cpu(), [t.cpu() for t in fmt], n_in, None if b is None else b.cpu(), what)


# ----------------------------------------------------------------------------- the kernels (GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, with_bias, gemv):
    n_out, n_in = shape
    w, mask = make_weight(n_out, n_in, dtype, seed=1)
    fmt = [t.cuda() for t in ops.bitmap_pack(w.cuda(), mask.cuda())]
    for m in ROWS_OF_X:
        x, b = make_x((m,), n_in, n_out, dtype, with_bias, seed=m)
        xd, bd = x.cuda(), None if b is None else b.cuda()
        y = cpp(xd, fmt, n_in, bd)
        assert y.shape == (m, n_out) and y.dtype == dtype and y.device == xd.device
        assert_cpp_earned(y, x, fmt, n_in, b, f"{shape} m={m}")
        if n_out >= 3:  # row 0 is all pruned: exactly the bias (or 0)
            expect = b[0] if b is not None else torch.zeros((), dtype=dtype)
            assert torch.equal(y[:, 0].cpu(), expect.expand(m)), f"{shape} m={m}: all-pruned row"
        assert torch.equal(y, cpp(xd, fmt, n_in, bd)), f"{shape} m={m}: not deterministic"


@pytest.mark.cuda
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75, 0.9, 1.0])
def test_sparsities(sparsity, gemv):
    for dtype in DTYPES:
        w, mask = make_weight(9, 1100, dtype, sparsity, seed=2)
        fmt = ops.bitmap_pack(w.cuda(), mask.cuda())
        for m in (1, 4, 8, 9, 16):
            x, b = make_x((m,), 1100, 9, dtype, True, seed=2)
            y = cpp(x.cuda(), fmt, 1100, b.cuda())
            assert_cpp_earned(y, x, fmt, 1100, b, f"{dtype} sparsity {sparsity} m={m}")
            if sparsity == 1.0:  # nnz = 0: exactly the bias
                assert fmt[0].numel() == 0
                assert torch.equal(y.cpu(), b.expand(m, 9))


@pytest.mark.cuda
def test_leading_dims_and_empty_shapes(gemv):
    w, mask = make_weight(6, 70, torch.float16, seed=3)
    fmt = ops.bitmap_pack(w.cuda(), mask.cuda())
    for leading in ((), (2, 3), (3, 4, 2), (2, 150)):
        x, b = make_x(leading, 70, 6, torch.float16, True, seed=len(leading))
        y = cpp(x.cuda(), fmt, 70, b.cuda())
        assert y.shape == (*leading, 6)
        assert_cpp_earned(y.reshape(-1, 6), x.reshape(-1, 70), fmt, 70, b, f"leading {leading}")
    for n_out, n_in, m in [(4, 10, 0), (0, 10, 3), (3, 0, 2), (0, 0, 2), (3, 0, 20)]:
        w, mask = make_weight(n_out, n_in, torch.float32)
        fmt = ops.bitmap_pack(w.cuda(), mask.cuda())
        x, b = make_x((m,), n_in, n_out, torch.float32, True)
        y = cpp(x.cuda(), fmt, n_in, b.cuda())
        assert y.shape == (m, n_out)
        assert torch.equal(y.cpu(), b.expand(m, n_out)), f"{(n_out, n_in, m)}: no columns, so y = bias"


@pytest.mark.cuda
def test_non_contiguous_and_offset_inputs(gemv):
    w, mask = make_weight(7, 40, torch.float16, seed=4)
    values, bits, row_ptr, block_ptr = ops.bitmap_pack(w.cuda(), mask.cuda())
    x = torch.randn(40, 3, device="cuda").to(torch.float16).T
    b = torch.randn(14, device="cuda").to(torch.float16)[::2]
    shifted = torch.cat([values[:1], values])[1:]  # values not 16-byte aligned
    for m_x in (x, torch.cat([x] * 4)):
        got = cpp(m_x, (shifted, bits, row_ptr, block_ptr), 40, b)
        assert torch.equal(got, cpp(m_x.contiguous(), (values, bits, row_ptr, block_ptr), 40, b.contiguous()))
    # values at every misalignment a 16-byte copy can meet (1-7 16-bit elements past a
    # 16-byte boundary), x of an odd width (no 4-byte pairs) and of an even one
    for dtype, n_in in ((torch.float16, 4096), (torch.bfloat16, 1101)):
        w, mask = make_weight(130, n_in, dtype, seed=4)
        fmt = ops.bitmap_pack(w.cuda(), mask.cuda())
        for m in (1, 5, 16):
            x = torch.randn(m, n_in, device="cuda").to(dtype)
            want = cpp(x, fmt, n_in, None)
            for shift in range(1, 8):
                moved = torch.cat([fmt[0][:shift], fmt[0]])[shift:]
                assert moved.data_ptr() % 16 == 2 * shift
                assert torch.equal(cpp(x, (moved, *fmt[1:]), n_in, None), want), f"{dtype} m={m}, shift={shift}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_x_like_f_linear(value, dtype, gemv):
    """An inf / NaN of x at a column that a row prunes reaches that row as 0 * inf = NaN, like
    F.linear on the decoded weight, on both paths, in the first staged chunk or a later one."""
    n_in = 2100
    w, mask = make_weight(9, n_in, dtype, seed=5)
    for col in (40, 2099):
        mask[:, col] = False
        mask[2, col] = True
    fmt = ops.bitmap_pack(w.cuda(), mask.cuda())
    wm = torch.where(mask, w, torch.zeros((), dtype=dtype)).cuda()
    for m, row, col in ((1, 0, 40), (3, None, 40), (8, 7, 2099), (5, 2, 2099), (9, 3, 40), (16, 11, 2099),
                        (20, 17, 2099)):
        x = torch.randn(m, n_in).to(dtype).cuda()
        if row is None:
            x[:, col] = value
        else:
            x[row, col] = value
        y = cpp(x, fmt, n_in, None)
        want = F.linear(x, wm)
        assert torch.equal(y.isnan(), want.isnan()), f"m={m}, row={row}, col={col}"
        assert torch.equal(y.isinf(), want.isinf()), f"m={m}, row={row}, col={col}"


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 3, 9, 14])
def test_non_finite_weights_stay_in_their_rows(m, gemv):
    for dtype in DTYPES:
        gen = torch.Generator().manual_seed(m)
        w = torch.randn(5, 64, generator=gen).to(dtype)
        mask = torch.rand(5, 64, generator=gen) < 0.5
        w[1] = float("inf")
        w[3] = float("nan")
        fmt = ops.bitmap_pack(w.cuda(), mask.cuda())
        x = torch.randn(m, 64, generator=gen).to(dtype)
        y = cpp(x.cuda(), fmt, 64, None).cpu()
        want = F.linear(x.double(), torch.where(mask, w, torch.zeros((), dtype=dtype)).double())
        for r in (0, 2, 4):
            assert torch.isfinite(y[:, r]).all(), f"row {r}: {y[:, r]}"
            assert torch.allclose(y[:, r].double(), want[:, r], rtol=2e-2, atol=2e-2), f"row {r}"
        assert torch.equal(y[:, 1].isnan(), want[:, 1].isnan()) and torch.equal(y[:, 3].isnan(), want[:, 3].isnan())


@pytest.mark.cuda
def test_hostile_offsets_stay_inside_values(gemv):
    """row_ptr / block_ptr are not read on the host: wrong ones give wrong numbers but no
    read outside values. Here: no crash, the right shape; benchmarks/sanitize_calls.py runs
    such cases under compute-sanitizer (each tensor its own allocation), which sees the reads."""
    gen = torch.Generator().manual_seed(7)
    for m in (1, 5, 9, 16):
        w, mask = make_weight(19, 1100, torch.float16, seed=m)
        values, bits, row_ptr, block_ptr = (t.cuda() for t in ops.bitmap_pack(w, mask))
        x = torch.randn(m, 1100, device="cuda").half()
        hostile = [
            (values[:3].clone(), bits, row_ptr, block_ptr),
            (values, bits, torch.randint(-(2**31), 2**31 - 1, row_ptr.shape, generator=gen).int().cuda(), block_ptr),
            (values, bits, row_ptr, torch.randint(-(2**31), 2**31 - 1, block_ptr.shape, generator=gen).int().cuda()),
            (values, bits, torch.full_like(row_ptr, 2**31 - 1), torch.full_like(block_ptr, 2**31 - 1)),
            (values[:0], bits, row_ptr, block_ptr),
        ]
        for fmt in hostile:
            y = ops._bitmap_linear_cuda(x, *fmt, 1100, None)
            torch.cuda.synchronize()
            assert y.shape == (m, 19)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_denser_than_the_staging_buffer(dtype, gemv):
    """gemv_tc sizes a row's slot of staged values by the weight's average density: a
    512-column chunk where some row is far denser than the rest reads its values from
    global memory instead (same numbers). Rows 0 and 5 are dense here, the others about 3%
    kept; 9000 columns (18 chunks, more than one per warp), x of 1 to 16 rows."""
    n_out, n_in = 21, 9000
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(n_out, n_in, generator=gen).to(dtype)
    mask = torch.rand(n_out, n_in, generator=gen) < 0.03
    mask[0] = True
    mask[5, 1000:] = True
    fmt = [t.cuda() for t in ops.bitmap_pack(w.cuda(), mask.cuda())]
    for m in (1, 2, 7, 8, 9, 16):
        x, b = make_x((m,), n_in, n_out, dtype, True, seed=m)
        y = cpp(x.cuda(), fmt, n_in, b.cuda())
        assert_cpp_earned(y, x, fmt, n_in, b, f"{dtype} m={m}")


@pytest.mark.cuda
def test_gemv_switch_rejects_unknown_values(monkeypatch):
    w, mask = make_weight(5, 40, torch.float32)
    fmt = [t.cuda() for t in ops.bitmap_pack(w, mask)]
    x = torch.randn(2, 40, device="cuda")
    monkeypatch.setenv("MULTIFLOW_BITMAP_GEMV", "v3")
    with pytest.raises(ValueError, match="MULTIFLOW_BITMAP_GEMV must be one of tc, v1, tc2"):
        ops._bitmap_linear_cuda(x, *fmt, 40, None)
    monkeypatch.setenv("MULTIFLOW_BITMAP_GEMV", "")
    assert ops._bitmap_linear_cuda(x, *fmt, 40, None).shape == (2, 5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    w, mask = make_weight(70, 600, dtype, seed=6)
    fmt = ops.bitmap_pack(w.cuda(), mask.cuda())
    for leading in ((2,), (3, 11)):
        x = torch.randn(*leading, 600, device="cuda").to(dtype)
        for b in (None, torch.randn(70, device="cuda").to(dtype)):
            torch.library.opcheck(torch.ops.multiflow._bitmap_linear_cuda.default, (x, *fmt, 600, b))


@pytest.mark.cuda
@pytest.mark.skipif(not mk_triton.HAS_TRITON, reason="needs triton")
def test_triton_private_op_opcheck():
    """multiflow::_bitmap_linear_triton, the private op the public op's C++ CUDA kernel calls
    under MULTIFLOW_BITMAP_CUDA=triton: the Triton kernel, through the dispatcher."""
    from multiflow_kernels.triton.bitmap_linear import bitmap_linear_triton

    w, mask = make_weight(40, 300, torch.float16, seed=9)
    fmt = ops.bitmap_pack(w.cuda(), mask.cuda())
    x = torch.randn(3, 300, device="cuda").half()
    b = torch.randn(40, device="cuda").half()
    op = torch.ops.multiflow._bitmap_linear_triton.default
    torch.library.opcheck(op, (x, *fmt, 300, b))
    assert torch.equal(op(x, *fmt, 300, b), bitmap_linear_triton(x, *fmt, 300, b))


@pytest.mark.cuda
def test_bad_inputs_name_the_argument():
    w, mask = make_weight(5, 40, torch.float32)
    values, bits, row_ptr, block_ptr = (t.cuda() for t in ops.bitmap_pack(w, mask))
    x = torch.randn(3, 40, device="cuda")
    cases = [
        ((x.cpu(), values, bits, row_ptr, block_ptr, 40, None), "x is on cpu but values is on cuda"),
        ((x, values, bits[:, :1], row_ptr, block_ptr, 40, None), "bits must have shape"),
        ((x, values, bits, row_ptr.long(), block_ptr, 40, None), "row_ptr must be an int32"),
        ((x.half(), values, bits, row_ptr, block_ptr, 40, None), "x must have values' dtype"),
        ((x, values, bits, row_ptr, block_ptr, 40, torch.randn(3, device="cuda")), "bias must have shape"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match="multiflow::_bitmap_linear_cuda: " + message):
            ops._bitmap_linear_cuda(*args)


@pytest.mark.cuda
def test_public_op_routes_by_the_environment(monkeypatch):
    w, mask = make_weight(30, 700, torch.float16, seed=8)
    fmt = ops.bitmap_pack(w.cuda(), mask.cuda())
    x, b = make_x((4,), 700, 30, torch.float16, True)
    x, b = x.cuda(), b.cuda()
    monkeypatch.delenv(mk_triton.BITMAP_CUDA_ENV, raising=False)  # the default: C++
    assert torch.equal(ops.bitmap_linear(x, *fmt, 700, b), ops._bitmap_linear_cuda(x, *fmt, 700, b))
    monkeypatch.setenv(mk_triton.BITMAP_CUDA_ENV, "cpp")
    assert torch.equal(ops.bitmap_linear(x, *fmt, 700, b), ops._bitmap_linear_cuda(x, *fmt, 700, b))
    monkeypatch.setenv(mk_triton.BITMAP_CUDA_ENV, "triton")
    from multiflow_kernels.triton.bitmap_linear import bitmap_linear_triton

    assert torch.equal(ops.bitmap_linear(x, *fmt, 700, b), bitmap_linear_triton(x, *fmt, 700, b))


# ----------------------------------------------------------------------------- fake kernel and switch (anywhere)


def test_fake_kernel_states_the_contract():
    w, mask = make_weight(5, 40, torch.float16)
    fmt = ops.bitmap_pack(w, mask)
    x, b = make_x((2, 3), 40, 5, torch.float16, True)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, *fmt, b)]
        for name in ("_bitmap_linear_cuda", "_bitmap_linear_triton"):
            op = getattr(torch.ops.multiflow, name).default
            y = op(*fake[:5], 40, fake[5])
            assert y.shape == (2, 3, 5) and y.dtype == torch.float16
            with pytest.raises(RuntimeError, match=f"multiflow::{name}: bits must have shape"):
                op(fake[0], fake[1], fake[2][:, :1], *fake[3:5], 40, None)
            with pytest.raises(RuntimeError, match=f"multiflow::{name}: in_features mismatch"):
                op(fake[0][..., :30], *fake[1:5], 40, None)


def test_switch_chooses_the_kernel(monkeypatch):
    """The public op's registered CUDA kernel (called directly here, so on CPU tensors): the
    C++ op when unset, empty or "cpp" (it has no CPU kernel: the call says so), Triton
    under MULTIFLOW_BITMAP_CUDA=triton, a ValueError naming the variable otherwise. In a
    build without CUDA kernels the default falls back to Triton and "cpp" says why."""
    w, mask = make_weight(5, 40, torch.float32)
    fmt = ops.bitmap_pack(w, mask)
    x, _ = make_x((3,), 40, 5, torch.float32, False)
    calls = []
    # A stand-in for the Triton module (importing the real one here would define its kernels
    # before test_triton_bitmap.py chooses the interpreter).
    stand_in = types.ModuleType("multiflow_kernels.triton.bitmap_linear")
    stand_in.bitmap_linear_triton = lambda *args: calls.append(args) or "triton"
    monkeypatch.setitem(sys.modules, "multiflow_kernels.triton.bitmap_linear", stand_in)
    monkeypatch.setattr(mk_triton, "_has_cpp_bitmap_cuda", lambda: True)  # a CUDA build
    for value in ("cpp", ""):
        monkeypatch.setenv(mk_triton.BITMAP_CUDA_ENV, value)
        assert mk_triton.bitmap_cuda_choice() == "cpp"
        with pytest.raises(NotImplementedError, match="_bitmap_linear_cuda"):  # the C++ op, on CPU tensors
            mk_triton._bitmap_linear_cuda(x, *fmt, 40, None)
    monkeypatch.delenv(mk_triton.BITMAP_CUDA_ENV)
    assert mk_triton.bitmap_cuda_choice() == "cpp"
    monkeypatch.setenv(mk_triton.BITMAP_CUDA_ENV, "triton")
    assert mk_triton.bitmap_cuda_choice() == "triton"
    if mk_triton.HAS_TRITON:
        assert mk_triton._bitmap_linear_cuda(x, *fmt, 40, None) == "triton"
    assert len(calls) == (1 if mk_triton.HAS_TRITON else 0)
    monkeypatch.setenv(mk_triton.BITMAP_CUDA_ENV, "CPP")
    with pytest.raises(ValueError, match="MULTIFLOW_BITMAP_CUDA must be one of"):
        mk_triton._bitmap_linear_cuda(x, *fmt, 40, None)

    monkeypatch.setattr(mk_triton, "_has_cpp_bitmap_cuda", lambda: False)  # a build without CUDA kernels
    monkeypatch.setenv(mk_triton.BITMAP_CUDA_ENV, "cpp")
    with pytest.raises(NotImplementedError, match="built without its CUDA kernels"):
        mk_triton._bitmap_linear_cuda(x, *fmt, 40, None)
    monkeypatch.delenv(mk_triton.BITMAP_CUDA_ENV)
    for has_triton in (True, False):
        monkeypatch.setattr(mk_triton, "HAS_TRITON", has_triton)
        if has_triton:  # the default falls back to Triton
            assert mk_triton._bitmap_linear_cuda(x, *fmt, 40, None) == "triton"
        else:
            with pytest.raises(NotImplementedError, match="install triton"):
                mk_triton._bitmap_linear_cuda(x, *fmt, 40, None)


def test_build_without_cuda_kernels_is_detected():
    """_has_cpp_bitmap_cuda reads the dispatcher: true exactly when _C holds the kernel."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key("multiflow::_bitmap_linear_cuda", "CUDA")
    assert mk_triton._has_cpp_bitmap_cuda() is has
