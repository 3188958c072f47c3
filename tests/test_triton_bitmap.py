"""The bitmap format's CUDA implementation against the reference and the CPU ops:
bitmap_linear in Triton (multiflow_kernels/triton/bitmap_linear.py, both paths) and
bitmap_pack / bitmap_unpack as compositions of torch ops (triton/bitmap_format.py).

Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set
before the kernel module is imported) on CPU tensors, so small shapes only; the
compositions are plain torch and run on CPU tensors as they are. The cuda-marked
tests call the ops on CUDA tensors, where these are the registered kernels.

bitmap_linear's tolerance is earned (tests/_earned.py): the exact result is the
dense masked expression in float64; plain torch's error is the reference's
(reference.bitmap_linear: float32 sums rounded once to the dtype).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from _bitmap_inputs import assert_linear_earned, make_weight, make_x  # noqa: E402

import multiflow_kernels  # noqa: E402, F401  (registers the ops)
from multiflow_kernels import ops  # noqa: E402
from multiflow_kernels.triton import bitmap_format  # noqa: E402
from multiflow_kernels.triton import bitmap_linear as triton_bitmap  # noqa: E402
from multiflow_kernels.triton import BITMAP_CUDA_ENV  # noqa: E402


@pytest.fixture(autouse=True)
def _public_op_runs_triton(monkeypatch):
    """The public bitmap_linear runs the CUDA C++ kernel on CUDA by default; the CUDA tests
    here call it to check the Triton kernel (the C++ one: test_cuda_bitmap.py)."""
    monkeypatch.setenv(BITMAP_CUDA_ENV, "triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = list(triton_bitmap.PATHS)
# (leading, in, out): ragged edges of every block (gemv: 4 weight rows x 32-512 columns
# by up to 16 rows of x; tiled: 16-64 rows of x by 64 x 64 weight tiles; block_ptr: 512
# columns), 1 to 90 rows of x (several row blocks of x on both paths), 1 to 70 of W.
SHAPES = [((), 1, 1), ((3,), 33, 3), ((2, 2), 100, 17), ((1,), 515, 5), ((65,), 70, 3), ((3, 6), 1100, 2), ((9, 10), 130, 70)]


def on_device(*ts):
    return [t.to(DEVICE) if t is not None else None for t in ts]


def run_triton(x, fmt, n_in, b, path):
    return triton_bitmap.bitmap_linear_triton(*on_device(x, *fmt), n_in, *on_device(b), path=path).cpu()


def test_kernels_run_where_this_machine_can():
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(triton_bitmap._kernel, InterpretedFunction)
    assert interpreted == (DEVICE == "cpu"), "without a GPU the kernel must run under the interpreter"


# ----------------------------------------------------------------------------- bitmap_linear (Triton)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear(shape, path, dtype, with_bias):
    leading, n_in, n_out = shape
    w, mask = make_weight(n_out, n_in, dtype, seed=1)
    fmt = ops.bitmap_pack(w, mask)
    x, b = make_x(leading, n_in, n_out, dtype, with_bias, seed=1)
    y = run_triton(x, fmt, n_in, b, path)
    assert y.shape == (*leading, n_out)
    assert_linear_earned(y, x, fmt, n_in, b, f"y ({path})")
    if n_out >= 3:  # row 0 is all pruned: exactly the bias (or 0)
        expect = b[0] if b is not None else torch.zeros((), dtype=dtype)
        assert torch.equal(y[..., 0], expect.expand(y[..., 0].shape))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("path", PATHS)
def test_linear_sparsities(sparsity, path):
    # 600 columns: two block_ptr blocks, the second partial.
    for dtype in DTYPES:
        w, mask = make_weight(9, 600, dtype, sparsity, seed=2)
        fmt = ops.bitmap_pack(w, mask)
        x, b = make_x((3,), 600, 9, dtype, True, seed=2)
        y = run_triton(x, fmt, 600, b, path)
        assert_linear_earned(y, x, fmt, 600, b, f"y ({path}, {dtype}, sparsity {sparsity})")
        if sparsity == 1.0:  # nnz = 0: exactly the bias
            assert fmt[0].numel() == 0
            assert torch.equal(y, b.expand(3, 9))


def test_path_none_chooses_by_rows_of_x():
    w, mask = make_weight(5, 70, torch.float32, seed=3)
    fmt = ops.bitmap_pack(w, mask)
    for m, path in ((triton_bitmap.GEMV_MAX_M, "gemv"), (triton_bitmap.GEMV_MAX_M + 1, "tiled")):
        x, b = make_x((m,), 70, 5, torch.float32, True, seed=m)
        assert torch.equal(run_triton(x, fmt, 70, b, None), run_triton(x, fmt, 70, b, path)), f"m = {m}"


@pytest.mark.parametrize("path", PATHS)
def test_empty_shapes(path):
    for n_out, n_in, m in [(4, 10, 0), (0, 10, 3), (3, 0, 2), (0, 0, 2)]:
        w, mask = make_weight(n_out, n_in, torch.float32)
        fmt = ops.bitmap_pack(w, mask)
        x, b = make_x((m,), n_in, n_out, torch.float32, True)
        y = run_triton(x, fmt, n_in, b, path)
        assert y.shape == (m, n_out)
        assert torch.equal(y, b.expand(m, n_out)), f"{(n_out, n_in, m)}: no columns, so y = bias"


def test_non_contiguous_inputs():
    w, mask = make_weight(7, 40, torch.float16, seed=4)
    values, bits, row_ptr, block_ptr = ops.bitmap_pack(w, mask)
    x = torch.randn(40, 3).to(torch.float16).T
    b = torch.randn(14).to(torch.float16)[::2]
    got = run_triton(x, (values, bits, row_ptr, block_ptr), 40, b, None)
    assert torch.equal(got, run_triton(x.contiguous(), (values, bits, row_ptr, block_ptr), 40, b.contiguous(), None))


def test_bad_inputs_name_the_argument():
    w, mask = make_weight(5, 40, torch.float32)
    values, bits, row_ptr, block_ptr = ops.bitmap_pack(w, mask)
    x, b = make_x((3,), 40, 5, torch.float32, True)
    cases = [
        ((x, values, bits[:, :1], row_ptr, block_ptr, 40, b), "bits must have shape"),
        ((x, values, bits, row_ptr.long(), block_ptr, 40, b), "row_ptr must be an int32"),
        ((x, values, bits, row_ptr, block_ptr[:3], 40, b), "block_ptr must have shape"),
        ((x.half(), values, bits, row_ptr, block_ptr, 40, b), "x must have values' dtype"),
        ((x[:, :30], values, bits, row_ptr, block_ptr, 40, b), "in_features mismatch"),
        ((x, values, bits, row_ptr, block_ptr, 40, b[:3]), "bias must have shape"),
        ((x, values, bits, row_ptr, block_ptr, 40, b.to("meta")), "bias is on meta but x is on cpu"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            triton_bitmap.bitmap_linear_triton(*args)
        with pytest.raises(RuntimeError, match=message):
            ops.bitmap_linear(*args)  # the CPU op: the same message
    with pytest.raises(ValueError, match="path must be one of"):
        triton_bitmap.bitmap_linear_triton(x, values, bits, row_ptr, block_ptr, 40, b, path="dense")


# ----------------------------------------------------------------------------- bitmap_pack / bitmap_unpack (torch)


def assert_same_bits(got, want, what):
    """Equal dtypes, shapes and bits (NaN payloads and -0.0 included)."""
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {tuple(got.shape)} vs {want.dtype} {tuple(want.shape)}"
    if got.is_floating_point():
        as_int = torch.int16 if got.element_size() == 2 else torch.int32
        got, want = got.view(as_int), want.view(as_int)
    assert torch.equal(got, want), what


def pack_torch(w, mask):
    return bitmap_format.bitmap_pack_torch(*on_device(w, mask))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_unpack_match_the_cpu_ops(dtype):
    shapes = [(1, 1), (3, 31), (7, 33), (5, 513), (4, 1100), (0, 5), (3, 0), (0, 0)]
    for (n_out, n_in), sparsity in zip(shapes * 3, [0.0] * len(shapes) + [0.75] * len(shapes) + [1.0] * len(shapes)):
        w, mask = make_weight(n_out, n_in, dtype, sparsity)
        want = ops.bitmap_pack(w, mask)
        got = pack_torch(w, mask)
        for name, g, r in zip(("values", "bits", "row_ptr", "block_ptr"), got, want):
            assert_same_bits(g.cpu(), r, f"{name} of {(n_out, n_in)} at sparsity {sparsity}")
        dense = bitmap_format.bitmap_unpack_torch(*got, n_in).cpu()
        assert_same_bits(dense, ops.bitmap_unpack(*want, n_in), f"unpack of {(n_out, n_in)} at sparsity {sparsity}")


def test_pack_unpack_keep_bits_of_special_values():
    w = torch.tensor([[-0.0, float("nan"), float("inf"), 1.0]] * 2)
    w[1, 1] = torch.tensor(0x7FC01234, dtype=torch.int32).view(torch.float32)  # a NaN with a payload
    mask = torch.tensor([[True, True, True, False], [False, True, False, True]])
    got = pack_torch(w, mask)
    want = ops.bitmap_pack(w, mask)
    for g, r in zip(got, want):
        assert_same_bits(g.cpu(), r, "special values")
    assert_same_bits(bitmap_format.bitmap_unpack_torch(*got, 4).cpu(), ops.bitmap_unpack(*want, 4), "special values")


def test_unpack_rejects_padding_bits_as_the_cpu_op():
    # A bit past in_features (never set by pack_mask), even with row_ptr counting it.
    w, mask = make_weight(3, 40, torch.float32, seed=5)
    values, bits, row_ptr, block_ptr = ops.bitmap_pack(w, mask)
    bits = bits.clone()
    bits[1, 1] |= 1 << 20  # column 52 of row 1
    row_ptr = row_ptr.clone()
    row_ptr[2:] += 1
    at = int(row_ptr[2]) - 1  # the padding bit's value: last of row 1
    values = torch.cat([values[:at], torch.tensor([123.0]), values[at:]])
    fmt = (values, bits, row_ptr, block_ptr)
    message = r"bits sets bits past in_features = 40 in row 1 \(the last word's padding bits must be 0"
    with pytest.raises(RuntimeError, match=message):
        ops.bitmap_unpack(*fmt, 40)
    with pytest.raises(RuntimeError, match=message):
        bitmap_format.bitmap_unpack_torch(*on_device(*fmt), 40)


def test_pack_unpack_bad_inputs_as_the_cpu_ops():
    w, mask = make_weight(5, 40, torch.float32)
    values, bits, row_ptr, block_ptr = ops.bitmap_pack(w, mask)
    pack_cases = [
        ((w.double(), mask), "weight must be float32, float16 or bfloat16"),
        ((w[0], mask[0]), "weight must have shape"),
        ((w, mask.int()), "mask must be a bool"),
        ((w, mask[:4]), "mask must have weight's shape"),
        ((w, mask.to("meta")), "mask is on meta but weight is on cpu"),
    ]
    for args, message in pack_cases:
        with pytest.raises(RuntimeError, match=message):
            bitmap_format.bitmap_pack_torch(*args)
        with pytest.raises(RuntimeError, match=message):
            ops.bitmap_pack(*args)
    shifted = row_ptr.clone()
    shifted[1] += 1
    shifted[2:] += 1
    nonzero_head = row_ptr + 1
    unpack_cases = [
        ((values.double(), bits, row_ptr, block_ptr, 40), "values must be float32"),
        ((values, bits[:, :1], row_ptr, block_ptr, 40), "bits must have shape"),
        ((values, bits, row_ptr[:-1], block_ptr, 40), "row_ptr must have shape"),
        ((values, bits, row_ptr, block_ptr.long(), 40), "block_ptr must be an int32"),
        ((values, bits, row_ptr, block_ptr, -1), "in_features must be >= 0"),
        ((values, bits, nonzero_head, block_ptr, 40), "row_ptr\\[0\\] must be 0, got 1"),
        ((values[:-1], bits, row_ptr, block_ptr, 40), "values must have row_ptr\\[-1\\]"),
        ((torch.cat([values, values[:1]]), bits, shifted, block_ptr, 40), "row_ptr does not match bits: row 0 has"),
    ]
    for args, message in unpack_cases:
        with pytest.raises(RuntimeError, match=message):
            bitmap_format.bitmap_unpack_torch(*args)
        with pytest.raises(RuntimeError, match=message):
            ops.bitmap_unpack(*args)


# ----------------------------------------------------------------------------- the ops on CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ops_match_reference(dtype):
    """Fresh random inputs through torch.ops.multiflow.* on CUDA: the Triton kernel is
    what runs (same bits as calling it), for 1 to 300 rows of x (both paths)."""
    for (n_out, n_in), sparsity in (((768, 3072), 0.75), ((3072, 768), 0.9), ((77, 1100), 0.5), ((5, 33), 1.0)):
        w, mask = make_weight(n_out, n_in, dtype, sparsity, seed=n_out)
        wd, maskd = w.cuda(), mask.cuda()
        fmt = ops.bitmap_pack(wd, maskd)
        for name, g, r in zip(("values", "bits", "row_ptr", "block_ptr"), fmt, ops.bitmap_pack(w, mask)):
            assert_same_bits(g.cpu(), r, f"pack {name} of {(n_out, n_in)}")
        assert_same_bits(ops.bitmap_unpack(*fmt, n_in).cpu(), torch.where(mask, w, torch.zeros((), dtype=dtype)), "unpack")
        for leading in ((), (1,), (3,), (4,), (5,), (2, 150)):
            x, b = make_x(leading, n_in, n_out, dtype, True, seed=len(leading) + sum(leading))
            xd, bd = x.cuda(), b.cuda()
            y = ops.bitmap_linear(xd, *fmt, n_in, bd)
            assert torch.equal(y, triton_bitmap.bitmap_linear_triton(xd, *fmt, n_in, bd))
            assert_linear_earned(y.cpu(), x, [t.cpu() for t in fmt], n_in, b, f"y {(n_out, n_in)}, x {leading}")
            for path in PATHS:
                y_path = triton_bitmap.bitmap_linear_triton(xd, *fmt, n_in, None, path=path)
                assert_linear_earned(y_path.cpu(), x, [t.cpu() for t in fmt], n_in, None, f"{path} {(n_out, n_in)}, x {leading}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_opcheck(dtype):
    w, mask = make_weight(70, 600, dtype, seed=6)
    wd, maskd = w.cuda(), mask.cuda()
    torch.library.opcheck(torch.ops.multiflow.bitmap_pack.default, (wd, maskd))
    fmt = ops.bitmap_pack(wd, maskd)
    torch.library.opcheck(torch.ops.multiflow.bitmap_unpack.default, (*fmt, 600))
    for leading in ((2,), (3, 11)):
        x = torch.randn(*leading, 600, device="cuda").to(dtype)
        for b in (None, torch.randn(70, device="cuda").to(dtype)):
            torch.library.opcheck(torch.ops.multiflow.bitmap_linear.default, (x, *fmt, 600, b))


@pytest.mark.cuda
def test_cuda_bad_inputs_name_the_argument():
    w, mask = make_weight(5, 40, torch.float32)
    values, bits, row_ptr, block_ptr = (t.cuda() for t in ops.bitmap_pack(w, mask))
    x = torch.randn(3, 40, device="cuda")
    with pytest.raises(RuntimeError, match="mask is on cpu but weight is on cuda"):
        ops.bitmap_pack(w.cuda(), mask)
    with pytest.raises(RuntimeError, match="x is on cpu but values is on cuda"):
        ops.bitmap_linear(x.cpu(), values, bits, row_ptr, block_ptr, 40, None)
    with pytest.raises(RuntimeError, match="bits must have shape"):
        ops.bitmap_linear(x, values, bits[:, :1], row_ptr, block_ptr, 40, None)
    with pytest.raises(RuntimeError, match="values must have row_ptr\\[-1\\]"):
        ops.bitmap_unpack(values[:-1], bits, row_ptr, block_ptr, 40)
    shifted = row_ptr.clone()
    shifted[1:] += 1
    with pytest.raises(RuntimeError, match="row_ptr does not match bits: row 0"):
        ops.bitmap_unpack(torch.cat([values, values[:1]]), bits, shifted, block_ptr, 40)
    # bitmap_linear does not read row_ptr on the host: a wrong one must not read outside values.
    y = ops.bitmap_linear(x, values[:3], bits, row_ptr, block_ptr, 40, None)
    torch.cuda.synchronize()
    assert y.shape == (3, 5)
