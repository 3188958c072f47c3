"""The CUDA kernels of the 2:4 format (csrc/cuda/sparse24.cu) against the CPU op and the
plain-torch twin. Every test here needs an NVIDIA GPU (marked ``cuda``; skipped without one).

sparse24_linear has three CUDA paths, each covered: a warp per output row (rows of x <=
4, any dtype; a half-warp per row under MULTIFLOW_SPARSE24_GEMV=half, the `lanes` fixture), mma.sp sparse tensor cores (float16 / bfloat16, 5 rows or more, in % 16 == 0,
16-byte aligned; 64 x 64 tiles, or 128 x 128 under MULTIFLOW_SPARSE24_GEMM=tile128 / wgmma),
and the row kernel over blocks of 16 rows of x (float32 with more rows,
in % 16 != 0, unaligned x).
"""
import pytest
import torch

import multiflow_kernels  # noqa: F401
from multiflow_kernels import ops
from multiflow_kernels import reference as R

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(64, 64), (70, 48), (33, 100), (130, 1040), (1, 4), (17, 32)]


@pytest.fixture(params=["warp", "half"])
def lanes(request, monkeypatch):
    """The few-row kernel's lanes per output row (MULTIFLOW_SPARSE24_GEMV)."""
    monkeypatch.setenv("MULTIFLOW_SPARSE24_GEMV", request.param)
    return request.param


def _problem(out_f, in_f, dtype, seed=0):
    """A weight and a 2:4 mask whose chunks keep 2, 1 or 0 weights (about 60 / 30 / 10%)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    mask = ops.nm_mask(torch.rand(out_f, in_f, generator=g), 2, 4)
    chunk_keep = torch.rand(out_f, in_f // 4, generator=g)
    one = ops.nm_mask(torch.rand(out_f, in_f, generator=g), 1, 4)
    mask = torch.where((chunk_keep < 0.3).repeat_interleave(4, 1), one, mask)
    mask &= ~(chunk_keep > 0.9).repeat_interleave(4, 1)
    mask[0, : min(in_f, 8)] = False
    return w, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_match_cpu_bitwise(dtype, shape):
    w, mask = _problem(*shape, dtype)
    values, meta = ops.sparse24_pack(w, mask)
    cv, cm = ops.sparse24_pack(w.cuda(), mask.cuda())
    assert torch.equal(cv.cpu(), values) and torch.equal(cm.cpu(), meta)
    dense = ops.sparse24_unpack(cv, cm)
    assert dense.is_cuda and torch.equal(dense.cpu(), w.masked_fill(~mask, 0))


def test_pack_keeps_bits_of_special_values_on_cuda():
    w, mask = _problem(6, 64, torch.float16)
    w[0, 8:16] = float("nan")
    w[1, :] = -0.0
    w[2, :8] = float("inf")
    values, meta = ops.sparse24_pack(w, mask)
    cv, cm = ops.sparse24_pack(w.cuda(), mask.cuda())
    assert torch.equal(cv.cpu().view(torch.int16), values.view(torch.int16)) and torch.equal(cm.cpu(), meta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [3, 40])
def test_linear_multiplies_only_named_positions(dtype, rows, lanes):
    """An inf in x reaches exactly the rows whose metadata names its column (a zero-filled
    position is named: 0 * inf is NaN), never the rows that do not name it, on every CUDA
    path, as on CPU."""
    w, mask = _problem(24, 64, dtype)
    mask[:, 5] = False
    values, meta = ops.sparse24_pack(w, mask)
    x = torch.randn(rows, 64).to(dtype)
    x[:, 5] = float("inf")
    got = ops.sparse24_linear(x.cuda(), values.cuda(), meta.cuda(), None).cpu()
    columns = R.sparse24_positions(meta, 64) + 4 * torch.arange(16)[:, None]  # (24, 16, 2)
    names_5 = (columns == 5).flatten(1).any(1)
    assert 0 < int(names_5.sum()) < 24  # some rows name column 5 (fillers), some do not
    assert torch.equal(~got.isfinite(), names_5.expand(rows, 24))
    want = ops.sparse24_linear(x, values, meta, None)
    keep = ~names_5
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[:, keep].float(), want[:, keep].float(), rtol=tol, atol=tol)


def test_pack_rejects_non_24_mask_on_cuda():
    w, mask = _problem(12, 32, torch.float16)
    mask[3, :4] = True
    mask[7, 28:] = True
    with pytest.raises(ValueError, match=r"mask is not 2:4: rows \[3, 7\]"):
        ops.sparse24_pack(w.cuda(), mask.cuda())


# The lanes switch only reaches the few-row kernel (1-4 rows of x): the other row counts
# run once, under the default.
_ROW_LANES = [(r, "warp") for r in (0, 1, 3, 4, 5, 16, 17, 64, 129)] + [(r, "half") for r in (1, 3, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows, lanes", _ROW_LANES, indirect=["lanes"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_reference(dtype, shape, rows, with_bias, lanes):
    _check_linear(shape, rows, dtype, with_bias, seed=rows)


def _check_linear(shape, rows, dtype, with_bias, seed):
    """sparse24_linear on CUDA against the twin for a random (out, in) = shape problem;
    returns (y, its arguments)."""
    out_f, in_f = shape
    w, mask = _problem(out_f, in_f, dtype, seed=seed)
    values, meta = (t.cuda() for t in ops.sparse24_pack(w, mask))
    x = torch.randn(rows, in_f).to(dtype).cuda()
    bias = torch.randn(out_f).to(dtype).cuda() if with_bias else None
    got = ops.sparse24_linear(x, values, meta, bias)
    want = R.sparse24_linear(x, values, meta, bias)
    assert got.shape == (rows, out_f) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    return got, (x, values, meta, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_leading_dims_and_unaligned_x(dtype):
    w, mask = _problem(96, 128, dtype)
    values, meta = (t.cuda() for t in ops.sparse24_pack(w, mask))
    x = torch.randn(4, 9, 128).to(dtype).cuda()
    torch.testing.assert_close(ops.sparse24_linear(x, values, meta, None).float(),
                               R.sparse24_linear(x, values, meta, None).float(), rtol=2e-2, atol=2e-2)
    flat = torch.randn(40 * 128 + 1).to(dtype).cuda()
    unaligned = flat[1:].view(40, 128)  # 2 bytes off a 16-byte boundary: the row kernel in 16-row blocks
    torch.testing.assert_close(ops.sparse24_linear(unaligned, values, meta, None).float(),
                               R.sparse24_linear(unaligned, values, meta, None).float(), rtol=2e-2, atol=2e-2)


# MULTIFLOW_SPARSE24_GEMM=tile128 / wgmma: the opt-in 128 x 128 tile kernels (mma.sp; Hopper's
# warpgroup wgmma.mma_async.sp, sm_90 only) for every call that takes the tensor-core path
# (16-bit, 5 rows or more, in % 16 == 0). Shapes: out % 8 != 0 (scalar output pieces),
# several feature / token tiles, in = 16 (one stage, shorter than the pipeline), 1040 (a
# last stage of 16 columns).
_TILE128_SHAPES = [(64, 64), (70, 48), (130, 1040), (17, 32), (264, 256), (8, 16)]


@pytest.fixture(params=["tile128", "wgmma"])
def big_gemm(request, monkeypatch):
    """An opt-in tensor-core kernel (MULTIFLOW_SPARSE24_GEMM); wgmma needs an sm_90 GPU and an
    extension built for sm_90a (the default build and gpu_check.sh's are; with plain 9.0 these
    tests fail with the op's error naming it)."""
    if request.param == "wgmma" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma.mma_async.sp is sm_90 (H100 / H200) only")
    monkeypatch.setenv("MULTIFLOW_SPARSE24_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", _TILE128_SHAPES)
@pytest.mark.parametrize("rows", [5, 64, 129, 300])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_tile128_matches_reference(dtype, shape, rows, with_bias, big_gemm, monkeypatch):
    got, args = _check_linear(shape, rows, dtype, with_bias, seed=rows + shape[0])
    monkeypatch.setenv("MULTIFLOW_SPARSE24_GEMM", "tile64")
    torch.testing.assert_close(got.float(), ops.sparse24_linear(*args).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_tile128_multiplies_only_named_positions(dtype, big_gemm):
    w, mask = _problem(136, 128, dtype)
    mask[:, 69] = False
    values, meta = ops.sparse24_pack(w, mask)
    x = torch.randn(40, 128).to(dtype)
    x[:, 69] = float("inf")
    got = ops.sparse24_linear(x.cuda(), values.cuda(), meta.cuda(), None).cpu()
    columns = R.sparse24_positions(meta, 128) + 4 * torch.arange(32)[:, None]
    names_69 = (columns == 69).flatten(1).any(1)
    assert 0 < int(names_69.sum()) < 136
    assert torch.equal(~got.isfinite(), names_69.expand(40, 136))
    keep = ~names_69
    want = ops.sparse24_linear(x, values, meta, None)
    torch.testing.assert_close(got[:, keep].float(), want[:, keep].float(), rtol=2e-2, atol=2e-2)


def test_linear_tile128_deterministic(big_gemm):
    w, mask = _problem(256, 512, torch.float16)
    values, meta = (t.cuda() for t in ops.sparse24_pack(w, mask))
    x = torch.randn(300, 512).half().cuda()
    assert torch.equal(ops.sparse24_linear(x, values, meta, None), ops.sparse24_linear(x, values, meta, None))


def test_big_gemm_kernels_are_the_ones_that_run(big_gemm):
    """The switch really selects the kernel (the other tests would pass on the default too)."""
    w, mask = _problem(256, 512, torch.float16)
    values, meta = (t.cuda() for t in ops.sparse24_pack(w, mask))
    x = torch.randn(300, 512).half().cuda()
    ops.sparse24_linear(x, values, meta, None)  # first call: attributes, probe
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.sparse24_linear(x, values, meta, None)
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    want = {"tile128": "linear_mma128_kernel", "wgmma": "linear_wgmma_kernel"}[big_gemm]
    assert want in names and "linear_mma_kernel" not in names, names[:500]


def test_wgmma_switch_off_hopper_names_the_requirement(monkeypatch):
    if torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("this GPU runs the wgmma kernel")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no tensor-core path before sm_80: the switch is never consulted")
    w, mask = _problem(64, 64, torch.float16)
    values, meta = (t.cuda() for t in ops.sparse24_pack(w, mask))
    monkeypatch.setenv("MULTIFLOW_SPARSE24_GEMM", "wgmma")
    with pytest.raises(RuntimeError, match="needs an sm_90 GPU"):
        ops.sparse24_linear(torch.randn(64, 64).half().cuda(), values, meta, None)
    ops.sparse24_linear(torch.randn(2, 64).half().cuda(), values, meta, None)  # the few-row kernel: any GPU


@pytest.mark.parametrize("var, bad, choices", [("MULTIFLOW_SPARSE24_GEMV", "quarter", "warp, half"),
                                               ("MULTIFLOW_SPARSE24_GEMM", "tile256", "tile64, tile128, wgmma")])
def test_switches_reject_unknown_values(monkeypatch, var, bad, choices):
    """Each switch is read at every call, whatever the path (here the few-row kernel)."""
    w, mask = _problem(8, 16, torch.float16)
    values, meta = (t.cuda() for t in ops.sparse24_pack(w, mask))
    monkeypatch.setenv(var, bad)
    with pytest.raises(ValueError, match=f"{var} must be one of {choices}"):
        ops.sparse24_linear(torch.randn(1, 16).half().cuda(), values, meta, None)


def test_linear_deterministic(lanes):
    w, mask = _problem(256, 512, torch.float16)
    values, meta = (t.cuda() for t in ops.sparse24_pack(w, mask))
    for rows in (2, 300):
        x = torch.randn(rows, 512).half().cuda()
        assert torch.equal(ops.sparse24_linear(x, values, meta, None), ops.sparse24_linear(x, values, meta, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_cuda(dtype):
    w, mask = _problem(40, 64, dtype)
    w, mask = w.cuda(), mask.cuda()
    values, meta = ops.sparse24_pack(w, mask)
    x = torch.randn(20, 64).to(dtype).cuda()
    torch.library.opcheck(torch.ops.multiflow.sparse24_pack.default, (w, mask))
    torch.library.opcheck(torch.ops.multiflow.sparse24_unpack.default, (values, meta))
    torch.library.opcheck(torch.ops.multiflow.sparse24_linear.default, (x, values, meta, None))
