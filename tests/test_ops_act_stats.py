"""multiflow::sq_sum_accumulate_ (calibration's activation statistic) against its
plain-torch twin, on CPU and, where there is a GPU, CUDA.

Tolerances are earned: the exact answer is computed in float64, and the kernel
may be off by at most a small multiple of what plain torch (float32) is off by,
plus a few float32 ulps of the result.
"""

from __future__ import annotations

import pytest
import torch
from _isa_harness import isas_of_this_cpu, results_at_thread_counts, run_with_isa

import multiflow_kernels  # noqa: F401  (registers the ops)
from multiflow_kernels import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FEATURES = [1, 3, 17, 1000, 4097]
LEADING = [(0, 5), (1,), (3, 7), (2, 3, 5)]
MASKS = ["none", "random", "all_false", "all_true"]
EPS32 = torch.finfo(torch.float32).eps


def make_mask(kind: str, shape: tuple[int, ...], gen: torch.Generator, device="cpu") -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "random":
        return (torch.rand(shape, generator=gen) < 0.6).to(device)
    return torch.full(shape, kind == "all_true", dtype=torch.bool, device=device)


def random_acc(n_features: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    # A running total from earlier batches: positive, and never zeros.
    return (torch.rand(n_features, generator=gen) * 10 + 0.5).to(device)


def exact_result(acc_in: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """acc_in + sum of squares over the kept tokens, in float64 (exact for these sizes)."""
    f = x.shape[-1]
    tokens = x.detach().cpu().double().reshape(-1, f) if x.numel() else torch.zeros(0, f, dtype=torch.float64)
    if mask is not None:
        tokens = tokens[mask.cpu().reshape(-1)]
    return acc_in.cpu().double() + tokens.square().sum(0)


def assert_earned(acc_in, x, mask, out):
    """out (the kernel's acc) is within a small multiple of plain torch's own error."""
    exact = exact_result(acc_in, x, mask)
    ref = acc_in.clone()
    reference.sq_sum_accumulate_(ref, x, mask)
    ref_err = (ref.cpu().double() - exact).abs().max().item() if exact.numel() else 0.0
    err = (out.cpu().double() - exact).abs().max().item() if exact.numel() else 0.0
    scale = exact.abs().max().item() if exact.numel() else 0.0
    bound = 4 * ref_err + 8 * EPS32 * scale
    assert err <= bound, f"kernel error {err:.3g} > bound {bound:.3g} (plain torch error {ref_err:.3g})"


def run_op(acc_in, x, mask):
    out = acc_in.clone()
    ret = ops.sq_sum_accumulate_(out, x, mask)
    assert ret is None
    return out


# ----------------------------------------------------------------------------- CPU: values


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("n_features", FEATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_cpu(dtype, n_features, leading, mask_kind):
    gen = torch.Generator().manual_seed(n_features * 131 + len(leading))
    x = torch.randn(*leading, n_features, generator=gen).to(dtype)
    mask = make_mask(mask_kind, leading, gen)
    acc_in = random_acc(n_features, gen)
    out = run_op(acc_in, x, mask)
    assert_earned(acc_in, x, mask, out)
    if mask_kind == "all_false" or 0 in leading:
        assert torch.equal(out, acc_in), "no kept tokens must leave acc unchanged"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "random"])
def test_many_tokens_several_chunks_and_column_blocks(dtype, mask_kind):
    # 3000 tokens x 600 features: several token chunks (partial buffer + reduction)
    # and several column blocks (with a ragged last one).
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 1000, 600, generator=gen) * 3).to(dtype)
    mask = make_mask(mask_kind, (3, 1000), gen)
    acc_in = random_acc(600, gen)
    assert_earned(acc_in, x, mask, run_op(acc_in, x, mask))


def test_one_dimensional_x_is_one_token():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, generator=gen)
    acc_in = random_acc(37, gen)
    assert_earned(acc_in, x, None, run_op(acc_in, x, None))
    keep, drop = torch.tensor(True), torch.tensor(False)
    assert_earned(acc_in, x, keep, run_op(acc_in, x, keep))
    assert torch.equal(run_op(acc_in, x, drop), acc_in)


def test_zero_features_is_a_no_op():
    acc = torch.zeros(0)
    ops.sq_sum_accumulate_(acc, torch.randn(4, 0), torch.ones(4, dtype=torch.bool))
    assert acc.shape == (0,)


def test_accumulates_across_calls():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, 33, generator=gen), torch.randn(20, 33, generator=gen)
    acc_in = random_acc(33, gen)
    acc = acc_in.clone()
    ops.sq_sum_accumulate_(acc, a)
    ops.sq_sum_accumulate_(acc, b)
    assert_earned(acc_in, torch.cat([a, b]), None, acc)


def test_sq_sum_allocates_float32():
    x = torch.randn(6, 9, dtype=torch.bfloat16)
    got = ops.sq_sum(x)
    assert got.dtype == torch.float32 and got.shape == (9,)
    torch.testing.assert_close(got, reference.sq_sum(x), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- CPU: layouts


def _layouts(gen):
    """(name, x) pairs of non-contiguous x, all of logical shape (..., F)."""
    base = torch.randn(40, 2 * 70 + 3, generator=gen)
    yield "transposed", torch.randn(70, 40, generator=gen).t()  # features strided
    yield "feature_stride_2", base[:, :140:2]  # features strided
    yield "feature_slice", base[:, 3 : 3 + 70]  # rows padded: a view, no copy
    yield "token_slice", base[5:30:3, :70]  # every third token
    yield "leading_slice_3d", torch.randn(4, 9, 70, generator=gen)[:, 2:7, :]  # leading dims don't flatten
    yield "expanded", torch.randn(70, generator=gen).expand(11, 70)  # row stride 0
    yield "channels_last_like", torch.randn(2, 70, 5, 6, generator=gen).permute(0, 2, 3, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_mask", [False, True])
def test_non_contiguous_x(dtype, with_mask):
    gen = torch.Generator().manual_seed(3)
    for name, x in _layouts(gen):
        x = x.to(dtype)
        mask = make_mask("random", tuple(x.shape[:-1]), gen) if with_mask else None
        acc_in = random_acc(x.shape[-1], gen)
        out = run_op(acc_in, x, mask)
        try:
            assert_earned(acc_in, x, mask, out)
        except AssertionError as e:
            raise AssertionError(f"layout {name}: {e}") from None


def test_non_contiguous_mask():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, 20, generator=gen)
    mask = (torch.rand(8, 6, generator=gen) < 0.5).t()
    acc_in = random_acc(20, gen)
    assert_earned(acc_in, x, mask, run_op(acc_in, x, mask))


def test_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 40, generator=gen, dtype=torch.float32)
    mask = torch.rand(9, generator=gen) < 0.5
    x0, mask0 = x.clone(), mask.clone()
    ops.sq_sum_accumulate_(torch.zeros(40), x, mask)
    assert torch.equal(x, x0) and torch.equal(mask, mask0)


# ----------------------------------------------------------------------------- CPU: determinism and ISAs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic_across_thread_counts(dtype):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5000, 700, generator=gen).to(dtype)
    mask = torch.rand(5000, generator=gen) < 0.7
    acc_in = random_acc(700, gen)
    results = results_at_thread_counts(lambda: run_op(acc_in, x, mask))
    assert all(torch.equal(results[0], r) for r in results[1:])


_ISA_SCRIPT = r"""
import sys, torch
import multiflow_kernels
from multiflow_kernels import ops
inputs = torch.load(sys.argv[1])
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for name, x in inputs["x"].items():
    out[name] = ops.sq_sum(x, inputs["mask"])
torch.save(out, sys.argv[2])
"""


@pytest.mark.parametrize("isa", isas_of_this_cpu())
def test_every_isa_path_matches_reference(isa, tmp_path):
    # The tiles are compiled per ISA and picked from torch's CPU capability,
    # which ATEN_CPU_CAPABILITY overrides: run each path in its own process.
    # The inputs travel by file (torch.randn itself differs between ISAs).
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(700, 300, generator=gen)
    mask = torch.rand(700, generator=gen) < 0.5
    xs = {str(dtype).removeprefix("torch."): x.to(dtype) for dtype in DTYPES}
    got = run_with_isa(isa, _ISA_SCRIPT, {"x": xs, "mask": mask}, tmp_path)
    for name, xd in xs.items():
        assert_earned(torch.zeros(300), xd, mask, got[name])


# ----------------------------------------------------------------------------- opcheck and errors


def _opcheck_samples(device="cpu"):
    gen = torch.Generator().manual_seed(8)
    for dtype in DTYPES:
        x = torch.randn(3, 5, 17, generator=gen).to(dtype).to(device)
        yield random_acc(17, gen, device), x, None
        yield random_acc(17, gen, device), x, make_mask("random", (3, 5), gen, device)
    yield random_acc(8, gen, device), torch.randn(8, generator=gen).to(device), None


@pytest.mark.parametrize("sample", range(7))
def test_opcheck_cpu(sample):
    acc, x, mask = list(_opcheck_samples())[sample]
    torch.library.opcheck(torch.ops.multiflow.sq_sum_accumulate_.default, (acc, x, mask))


def test_compiles_with_torch_compile():
    def calibrate_step(acc, x, mask):
        ops.sq_sum_accumulate_(acc, x * 2, mask)
        return acc

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 6, 10, generator=gen)
    mask = torch.rand(4, 6, generator=gen) < 0.5
    acc_in = random_acc(10, gen)
    got = torch.compile(calibrate_step, fullgraph=True, backend="aot_eager")(acc_in.clone(), x, mask)
    assert_earned(acc_in, x * 2, mask, got)


@pytest.mark.parametrize(
    "acc, x, mask, match",
    [
        (torch.zeros(8, dtype=torch.float64), torch.randn(3, 8), None, r"acc \(the accumulator\) must be float32"),
        (torch.zeros(8, dtype=torch.float16), torch.randn(3, 8), None, r"acc \(the accumulator\) must be float32"),
        (torch.zeros(7), torch.randn(3, 8), None, r"acc must have shape \(F,\) where F = x.shape\[-1\] = 8"),
        (torch.zeros(2, 4), torch.randn(3, 8), None, r"acc must have shape \(F,\)"),
        (torch.zeros(16)[::2], torch.randn(3, 8), None, r"acc must be contiguous"),
        (torch.zeros(8), torch.randn(3, 4, 8), torch.ones(3, 5, dtype=torch.bool), r"token_mask must have shape"),
        (torch.zeros(8), torch.randn(3, 4, 8), torch.ones(12, dtype=torch.bool), r"token_mask must have shape"),
        (torch.zeros(8), torch.randn(3, 8), torch.ones(3), r"token_mask must be a bool tensor, got Float"),
        (torch.zeros(8), torch.randint(0, 5, (3, 8)), None, r"x must be float32, float16 or bfloat16, got Long"),
        (torch.zeros(8), torch.randn(3, 8, dtype=torch.float64), None, r"x must be float32, float16 or bfloat16"),
        (torch.zeros(1), torch.tensor(1.0), None, r"x must have shape \(\.\.\., F\)"),
    ],
    ids=[
        "acc_float64",
        "acc_float16",
        "acc_wrong_F",
        "acc_2d",
        "acc_strided",
        "mask_wrong_shape",
        "mask_flattened",
        "mask_not_bool",
        "x_int",
        "x_float64",
        "x_0d",
    ],
)
def test_errors_name_the_argument(acc, x, mask, match):
    with pytest.raises(RuntimeError, match=match):
        ops.sq_sum_accumulate_(acc, x, mask)


# ----------------------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("leading", LEADING + [(3, 1000)], ids=str)
@pytest.mark.parametrize("n_features", FEATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_cuda(dtype, n_features, leading, mask_kind):
    gen = torch.Generator().manual_seed(n_features * 131 + len(leading))
    x = torch.randn(*leading, n_features, generator=gen).to(dtype).cuda()
    mask = make_mask(mask_kind, leading, gen, "cuda")
    acc_in = random_acc(n_features, gen, "cuda")
    out = run_op(acc_in, x, mask)
    assert_earned(acc_in, x, mask, out)
    if mask_kind == "all_false" or 0 in leading:
        assert torch.equal(out, acc_in)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_layouts_and_determinism(dtype):
    gen = torch.Generator().manual_seed(3)
    for name, x in _layouts(gen):
        x = x.to(dtype).cuda()
        mask = make_mask("random", tuple(x.shape[:-1]), gen, "cuda")
        acc_in = random_acc(x.shape[-1], gen, "cuda")
        out = run_op(acc_in, x, mask)
        assert_earned(acc_in, x, mask, out)
        assert torch.equal(out, run_op(acc_in, x, mask)), f"layout {name}: not deterministic"
    # Many tokens: several chunks, partial buffer and the second kernel.
    x = torch.randn(300_000, 96, generator=gen).to(dtype).cuda()
    mask = make_mask("random", (300_000,), gen, "cuda")
    acc_in = random_acc(96, gen, "cuda")
    out = run_op(acc_in, x, mask)
    assert_earned(acc_in, x, mask, out)
    assert torch.equal(out, run_op(acc_in, x, mask))


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_16_byte_path_layouts(dtype):
    """x made on the GPU in its dtype (so views keep their strides): padded rows whose data
    stays 16-byte aligned (the 16-byte-load kernel, with a row stride), a view one element
    off and a row stride that is not a multiple of the vector width (the one-element kernel),
    token counts that are not multiples of a load batch, and many tokens with padded rows
    (several chunks). With a mask: the same layouts, inf / NaN in masked-out tokens only
    (and in the padding between rows)."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    base = torch.randn(37, 200, generator=gen, device="cuda").to(dtype)
    big = torch.randn(20_001, 264, generator=gen, device="cuda").to(dtype)
    odd_stride = torch.randn(37, 202, generator=gen, device="cuda").to(dtype)  # aligned start, stride % 8 != 0
    views = {"padded_rows": base[:, :96], "aligned_offset": base[:, 8:104], "one_off": base[:, 1:97],
             "stride_not_multiple": odd_stride[:, :96], "few_tokens": base[:5, :64],
             "many_tokens_padded": big[:, :256], "odd_tokens": big[:1001, 8:256]}
    for name, view in views.items():
        for mask in (None, torch.rand(view.shape[0], generator=gen, device="cuda") < 0.7):
            x = view
            if mask is not None:
                # the same layout (strides, offset) in a NaN-filled buffer; masked-out tokens
                # set to inf / NaN: they are not read, so they change nothing
                n = x.storage_offset() + (x.shape[0] - 1) * x.stride(0) + x.shape[1]
                x = torch.full((n,), float("nan"), dtype=dtype, device="cuda").as_strided(
                    x.shape, x.stride(), x.storage_offset()).copy_(x)
                dropped = (~mask).nonzero().flatten()
                x[dropped[: len(dropped) // 2]] = float("inf")
                x[dropped[len(dropped) // 2 :]] = float("nan")
                assert x.stride() == view.stride() and x.storage_offset() == view.storage_offset()
            acc_in = (torch.rand(x.shape[-1], generator=gen, device="cuda") * 10 + 0.5)
            out = run_op(acc_in, x, mask)
            assert torch.isfinite(out).all(), name
            assert_earned(acc_in, x, mask, out)
            assert torch.equal(out, run_op(acc_in, x, mask)), f"{name}: not deterministic"


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("sample", range(7))
def test_opcheck_cuda(sample):
    acc, x, mask = list(_opcheck_samples("cuda"))[sample]
    torch.library.opcheck(torch.ops.multiflow.sq_sum_accumulate_.default, (acc, x, mask))


@pytest.mark.cuda
@cuda_only
def test_cuda_device_mismatch_names_the_argument():
    with pytest.raises(RuntimeError, match="acc and x must be on the same device"):
        ops.sq_sum_accumulate_(torch.zeros(8, device="cuda"), torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="token_mask and x must be on the same device"):
        ops.sq_sum_accumulate_(torch.zeros(8, device="cuda"), torch.randn(3, 8, device="cuda"), torch.ones(3, dtype=torch.bool))
