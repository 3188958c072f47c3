"""multiflow::flow_importance and multiflow::flow_scores (scoring) against their
plain-torch twins, on CPU and, where there is a GPU, CUDA (the Triton kernels).

The contract is exact: imp_out / imp_in / w_scale and the scores must be EQUAL
(torch.equal) to reference.py's, not merely close. The float32 products are the
reference's bit for bit; only the float64 sums run in another order, which changes
the float32 means with odds of ~1e-7 per element (csrc/cpu/flow.cpp), so a mismatch
here is a bug to investigate, not a tolerance to loosen.
"""

from __future__ import annotations

import pytest
import torch
from _isa_harness import isas_of_this_cpu, results_at_thread_counts, run_with_isa

import multiflow_kernels  # noqa: F401  (registers the ops)
from multiflow_kernels import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 1x1, one row, one column, empty (either way), prime sizes, several row blocks
# (65536 / 100 = 655 rows per tile), several column blocks (4096 columns per tile).
SHAPES = [(1, 1), (1, 300), (300, 1), (0, 5), (5, 0), (37, 53), (1500, 100), (3, 4100), (70, 8193)]


def make_layers(shapes, dtypes, gen, device="cpu", w_std=0.05):
    """Weights of the given shapes (dtypes cycled) and positive activation statistics."""
    weights, acts = [], []
    for k, (rows, cols) in enumerate(shapes):
        dtype = dtypes[k % len(dtypes)]
        weights.append((torch.randn(rows, cols, generator=gen) * w_std).to(dtype).to(device))
        acts.append((torch.rand(cols, generator=gen) * 20).to(device))
    return weights, acts


def assert_equal_lists(got, want, what):
    assert len(got) == len(want), f"{what}: {len(got)} tensors, expected {len(want)}"
    for l, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32 and g.shape == w.shape and g.device == w.device, (
            f"{what}[{l}]: {g.dtype} {tuple(g.shape)} on {g.device}, expected float32 {tuple(w.shape)} on {w.device}"
        )
        if not torch.equal(g, w):
            bad = (g != w) & ~(g.isnan() & w.isnan())
            if bad.any():
                i = tuple(bad.nonzero()[0].tolist())
                raise AssertionError(
                    f"{what}[{l}] differs at {bad.sum().item()} of {g.numel()} elements, first at {i}: "
                    f"{g[i].item()!r} vs reference {w[i].item()!r}"
                )


def check_against_reference(weights, acts):
    imp_out, imp_in, w_scale = ops.flow_importance(weights, acts)
    ref_out, ref_in, ref_scale = reference.flow_importance(weights, acts)
    assert w_scale.dtype == torch.float32 and w_scale.shape == (len(weights),)
    assert torch.equal(w_scale, ref_scale), f"w_scale {w_scale} vs reference {ref_scale}"
    assert_equal_lists(imp_out, ref_out, "imp_out")
    assert_equal_lists(imp_in, ref_in, "imp_in")
    assert_equal_lists(ops.flow_scores(weights, acts), reference.flow_scores(weights, acts), "scores")


# ----------------------------------------------------------------------------- CPU: values


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_cpu(dtype, shape):
    gen = torch.Generator().manual_seed(shape[0] * 1009 + shape[1])
    check_against_reference(*make_layers([shape], [dtype], gen))


def test_many_random_layers_mixed_dtypes_one_call():
    # Many small layers of random shapes and mixed dtypes in one call (tiles of many
    # layers in one parallel pass): every importance equal to the reference's.
    gen = torch.Generator().manual_seed(12)
    for _ in range(3):
        shapes = [tuple(torch.randint(1, 400, (2,), generator=gen).tolist()) for _ in range(40)]
        check_against_reference(*make_layers(shapes, DTYPES, gen))


def test_realistic_layer_sizes():
    # BLIP-like layers: several row tiles, exact means over 768 / 3072 terms.
    gen = torch.Generator().manual_seed(13)
    weights, acts = make_layers([(3072, 768), (768, 3072), (2304, 768)], DTYPES, gen, w_std=0.02)
    check_against_reference(weights, acts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "w_mag, a_mag",
    [(1e-10, 1.0), (1e-39, 1.0), (1e30, 1.0), (1.0, 1e-40), (1.0, 1e36), (1e-20, 1e-30)],
    ids=["w1e-10", "w1e-39_subnormal", "w1e30", "a1e-40", "a1e36", "both_tiny"],
)
def test_extreme_scales(dtype, w_mag, a_mag):
    # pow2 scaling must keep tiny layers from underflowing (and huge ones from
    # overflowing) exactly as the reference does; weights that the dtype cannot hold
    # (1e-39 in float16) round to zero and must give a zero layer, as in the reference.
    gen = torch.Generator().manual_seed(14)
    weights = [(torch.randn(33, 70, generator=gen) * w_mag).to(dtype), (torch.randn(5, 9, generator=gen)).to(dtype)]
    acts = [torch.rand(70, generator=gen) * a_mag, torch.rand(9, generator=gen)]
    check_against_reference(weights, acts)


def test_zero_and_negative_statistics_and_zero_weights():
    gen = torch.Generator().manual_seed(15)
    weights = [torch.randn(20, 30, generator=gen) for _ in range(4)] + [torch.zeros(6, 7)]
    acts = [
        torch.zeros(30),  # all-zero inputs: all-zero importances (the contract's formulas)
        -torch.rand(30, generator=gen),  # negative statistics clamp to 0: the same
        torch.where(torch.rand(30, generator=gen) < 0.5, torch.rand(30, generator=gen), torch.zeros(30)),
        torch.full((30,), -0.0),
        torch.rand(7, generator=gen),
    ]
    check_against_reference(weights, acts)
    imp_out, imp_in, w_scale = ops.flow_importance(weights, acts)
    assert w_scale[-1] == 1.0 and not imp_out[-1].any() and not imp_in[-1].any()
    for l in (0, 1):  # A = |W| sqrt(a) = 0: every importance, so every flow score, is 0
        assert not imp_out[l].any() and not imp_in[l].any()
        assert not ops.flow_scores([weights[l]], [acts[l]])[0].any()


def test_empty_weights_give_zero_importances_and_unit_scale():
    weights = [torch.zeros(0, 5), torch.zeros(4, 0), torch.zeros(0, 0)]
    acts = [torch.rand(5), torch.zeros(0), torch.zeros(0)]
    imp_out, imp_in, w_scale = ops.flow_importance(weights, acts)
    assert [tuple(t.shape) for t in imp_out] == [(0,), (4,), (0,)]
    assert [tuple(t.shape) for t in imp_in] == [(5,), (0,), (0,)]
    assert torch.equal(imp_in[0], torch.zeros(5)) and torch.equal(imp_out[1], torch.zeros(4))
    assert torch.equal(w_scale, torch.ones(3))
    check_against_reference(weights, acts)


def test_non_finite_values_propagate_like_the_reference():
    gen = torch.Generator().manual_seed(16)
    w_nan, w_inf = torch.randn(9, 11, generator=gen), torch.randn(9, 11, generator=gen)
    w_nan[2, 3], w_inf[4, 5] = float("nan"), float("inf")
    a_nan = torch.rand(11, generator=gen)
    a_nan[7] = float("nan")
    check_against_reference([w_nan, w_inf, torch.randn(9, 11, generator=gen)], [torch.rand(11), torch.rand(11), a_nan])


def test_empty_list():
    imp_out, imp_in, w_scale = ops.flow_importance([], [])
    assert imp_out == [] and imp_in == [] and w_scale.shape == (0,) and w_scale.dtype == torch.float32
    assert ops.flow_scores([], []) == []


# ----------------------------------------------------------------------------- CPU: layouts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    gen = torch.Generator().manual_seed(17)
    big = torch.randn(90, 160, generator=gen).to(dtype)
    weights = [
        torch.randn(70, 40, generator=gen).to(dtype).t(),  # transposed: copied
        big[5:60, 3:103],  # rows padded: read in place
        big[::3, :77],  # every third row
        big[:, ::2],  # strided columns
        torch.randn(1, 50, generator=gen).to(dtype).expand(6, 50),  # row stride 0
    ]
    acts_base = torch.rand(400, generator=gen)
    acts = [acts_base[: w.shape[1] * 2 : 2] for w in weights]  # strided statistics
    check_against_reference(weights, acts)


def test_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(18)
    weights, acts = make_layers([(30, 40), (7, 9)], DTYPES, gen)
    acts[1] = acts[1] - 10  # negative entries must not be clamped in place
    before = [t.clone() for t in weights + acts]
    ops.flow_scores(weights, acts)
    assert all(torch.equal(a, b) for a, b in zip(weights + acts, before))


# ----------------------------------------------------------------------------- CPU: determinism and ISAs


def test_bitwise_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(19)
    weights, acts = make_layers([(1500, 300), (3, 9000), (100, 100), (700, 5)], DTYPES, gen)

    def run_all():
        imp_out, imp_in, w_scale = ops.flow_importance(weights, acts)
        return imp_out + imp_in + [w_scale] + ops.flow_scores(weights, acts)

    results = results_at_thread_counts(run_all)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))


_ISA_SCRIPT = r"""
import sys, torch
import multiflow_kernels
from multiflow_kernels import ops, reference
inp = torch.load(sys.argv[1])
w, a = inp["weights"], inp["acts"]
torch.save({
    "capability": torch.backends.cpu.get_cpu_capability(),
    "got": ops.flow_importance(w, a), "want": reference.flow_importance(w, a),
    "got_scores": ops.flow_scores(w, a), "want_scores": reference.flow_scores(w, a),
}, sys.argv[2])
"""


@pytest.mark.parametrize("isa", isas_of_this_cpu())
def test_every_isa_path_matches_reference(isa, tmp_path):
    # The tiles are compiled per ISA and picked from torch's CPU capability, which
    # ATEN_CPU_CAPABILITY overrides: run each path in its own process, with the
    # reference computed in that process too (torch's own sqrt may differ by ISA).
    gen = torch.Generator().manual_seed(20)
    weights, acts = make_layers([(200, 300), (33, 17), (1, 5000)], DTYPES, gen)
    out = run_with_isa(isa, _ISA_SCRIPT, {"weights": weights, "acts": acts}, tmp_path)
    (got_out, got_in, got_scale), (want_out, want_in, want_scale) = out["got"], out["want"]
    assert torch.equal(got_scale, want_scale)
    assert_equal_lists(got_out, want_out, "imp_out")
    assert_equal_lists(got_in, want_in, "imp_in")
    assert_equal_lists(out["got_scores"], out["want_scores"], "scores")


# ----------------------------------------------------------------------------- opcheck and errors


def _opcheck_samples(device="cpu"):
    gen = torch.Generator().manual_seed(21)
    yield make_layers([(5, 7)], [torch.float32], gen, device)
    yield make_layers([(5, 7), (3, 1), (1, 4)], DTYPES, gen, device)
    yield make_layers([(0, 3), (4, 0), (130, 70)], [torch.bfloat16], gen, device)


@pytest.mark.parametrize("op", ["flow_importance", "flow_scores"])
@pytest.mark.parametrize("sample", range(3))
def test_opcheck_cpu(op, sample):
    weights, acts = list(_opcheck_samples())[sample]
    torch.library.opcheck(getattr(torch.ops.multiflow, op).default, (weights, acts))


def test_compiles_with_torch_compile():
    def score(weights, acts):
        return ops.flow_scores([w * 2 for w in weights], acts)

    gen = torch.Generator().manual_seed(22)
    weights, acts = make_layers([(6, 10), (4, 3)], DTYPES, gen)
    got = torch.compile(score, fullgraph=True, backend="aot_eager")(weights, acts)
    assert_equal_lists(got, reference.flow_scores([w * 2 for w in weights], acts), "scores")


def _bad(w_shapes, a_specs, w_dtype=torch.float32):
    weights = [torch.randn(*s).to(w_dtype) for s in w_shapes]
    acts = [torch.rand(n).to(dt) for n, dt in a_specs]
    return weights, acts


F32 = torch.float32


# (weights, act_sq_norms), the error's pattern: shared with the Triton launchers' tests
BAD_FLOW_ARGS = [
    (_bad([(3, 4), (2, 2)], [(4, F32)]), r"weights and act_sq_norms must have the same length.*2 weights and 1"),
    (_bad([], [(4, F32)]), r"weights and act_sq_norms must have the same length.*0 weights and 1"),
    (_bad([(3, 4), (2, 2)], [(4, F32), (3, F32)]), r"act_sq_norms\[1\] must have shape \(in,\) where in = "
     r"weights\[1\].shape\[1\] = 2, got shape \[3\]"),
    (_bad([(3, 4)], [(4, torch.float16)]), r"act_sq_norms\[0\] must be float32, got Half"),
    (_bad([(3, 4)], [(4, torch.float64)]), r"act_sq_norms\[0\] must be float32, got Double"),
    (_bad([(3, 4, 1)], [(4, F32)]), r"weights\[0\] must be 2-D \(out, in\), got shape \[3, 4, 1\]"),
    (_bad([(4,)], [(4, F32)]), r"weights\[0\] must be 2-D"),
    (_bad([(3, 4)], [(4, F32)], torch.float64), r"weights\[0\] must be float32, float16 or bfloat16, got Double"),
    (([torch.randint(0, 3, (3, 4))], [torch.rand(4)]), r"weights\[0\] must be float32, float16 or bfloat16"),
    (([torch.randn(3, 4)], [torch.rand(4, 1)]), r"act_sq_norms\[0\] must have shape \(in,\)"),
]
BAD_FLOW_IDS = ["len_mismatch", "no_weights", "act_wrong_len", "act_half", "act_double", "w_3d", "w_1d", "w_double",
                "w_int", "act_2d"]


@pytest.mark.parametrize("op", [ops.flow_importance, ops.flow_scores], ids=["flow_importance", "flow_scores"])
@pytest.mark.parametrize("args, match", BAD_FLOW_ARGS, ids=BAD_FLOW_IDS)
def test_errors_name_the_argument(op, args, match):
    with pytest.raises(RuntimeError, match=match):
        op(*args)


def test_device_mismatch_names_the_argument():
    # meta tensors stand in for a second device here (the fake kernel checks them).
    with pytest.raises(RuntimeError, match=r"weights\[1\] is on meta but weights\[0\] is on cpu"):
        ops.flow_importance([torch.randn(2, 3), torch.randn(2, 3, device="meta")], [torch.rand(3), torch.rand(3)])
    with pytest.raises(RuntimeError, match=r"act_sq_norms\[0\] must be on the device of weights\[0\] \(cpu\)"):
        ops.flow_scores([torch.randn(2, 3)], [torch.rand(3, device="meta")])
    # flow_masks' thresholds: a meta tensor sends the call to the fake kernel, which returned
    # uninitialised masks before it checked this argument's device
    w, o, i, scale = [torch.randn(3, 4)], [torch.rand(3)], [torch.rand(4)], torch.ones(1)
    with pytest.raises(RuntimeError, match=r"thresholds must be on the weights' device cpu, got meta"):
        ops.flow_masks(w, o, i, scale, torch.zeros(1, device="meta"))


# ----------------------------------------------------------------------------- CUDA (the Triton kernels)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("shape", SHAPES + [(3072, 768), (768, 3072)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_cuda(dtype, shape):
    gen = torch.Generator().manual_seed(shape[0] * 1009 + shape[1])
    check_against_reference(*make_layers([shape], [dtype], gen, "cuda"))


@pytest.mark.cuda
@cuda_only
def test_cuda_many_layers_scales_layouts_and_determinism():
    gen = torch.Generator().manual_seed(23)
    shapes = [tuple(torch.randint(1, 400, (2,), generator=gen).tolist()) for _ in range(40)]
    weights, acts = make_layers(shapes, DTYPES, gen, "cuda")
    weights += [(torch.randn(33, 70, generator=gen) * 1e-39).cuda(), torch.randn(70, 40, generator=gen).cuda().t()]
    weights += [torch.zeros(0, 5, device="cuda"), torch.randn(20, 30, generator=gen).cuda()]
    acts += [torch.rand(70, generator=gen).cuda(), torch.rand(70, generator=gen).cuda()]
    acts += [torch.rand(5, device="cuda"), torch.zeros(30, device="cuda")]
    check_against_reference(weights, acts)
    first = ops.flow_scores(weights, acts)
    assert all(torch.equal(a, b) for a, b in zip(first, ops.flow_scores(weights, acts)))


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("op", ["flow_importance", "flow_scores"])
@pytest.mark.parametrize("sample", range(3))
def test_opcheck_cuda(op, sample):
    weights, acts = list(_opcheck_samples("cuda"))[sample]
    torch.library.opcheck(getattr(torch.ops.multiflow, op).default, (weights, acts))


@pytest.mark.cuda
@cuda_only
def test_cuda_device_mismatch_names_the_argument():
    with pytest.raises(RuntimeError, match=r"weights\[1\] is on cpu but weights\[0\] is on cuda"):
        ops.flow_importance(
            [torch.randn(2, 3, device="cuda"), torch.randn(2, 3)], [torch.rand(3, device="cuda"), torch.rand(3)]
        )
    with pytest.raises(RuntimeError, match=r"act_sq_norms\[0\] must be on the device of weights\[0\]"):
        ops.flow_scores([torch.randn(2, 3, device="cuda")], [torch.rand(3)])


def test_ops_without_a_derivative_refuse_backward():
    """A backward through a non-differentiable op raises (torch's default for custom ops only
    warned and returned None gradients); without inputs that require grad nothing changes."""
    w = torch.randn(3, 4, requires_grad=True)
    a = torch.rand(4)
    scores = ops.flow_scores([w], [a])[0]
    with pytest.raises(RuntimeError, match="derivative for multiflow::flow_scores is not implemented"):
        scores.sum().backward()
    imp_out, imp_in, scale = ops.flow_importance([w], [a])
    with pytest.raises(RuntimeError, match="derivative for multiflow::flow_importance is not implemented"):
        imp_out[0].sum().backward()
    with pytest.raises(RuntimeError, match="derivative for multiflow::kth_smallest_each is not implemented"):
        ops.kth_smallest_each([w], [2])[0].backward()
    acc = torch.zeros(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="sq_sum_accumulate_ is not differentiable"):
        ops.sq_sum_accumulate_(acc, torch.randn(2, 4), None)
    # x requiring grad: the x**2 added to acc would carry no gradient (before, silently)
    x = torch.randn(2, 4, requires_grad=True)
    plain_acc = torch.zeros(4)
    with pytest.raises(RuntimeError, match="sq_sum_accumulate_ is not differentiable"):
        ops.sq_sum_accumulate_(plain_acc, x, None)
    assert torch.equal(plain_acc, torch.zeros(4))  # refused before writing
    with torch.no_grad():
        ops.sq_sum_accumulate_(plain_acc, x, None)
    version = plain_acc._version
    ops.sq_sum_accumulate_(plain_acc, x.detach(), None)
    assert torch.allclose(plain_acc, 2 * (x.detach() ** 2).sum(0)) and plain_acc._version > version
    plain = ops.flow_scores([w.detach()], [a])[0]
    assert not plain.requires_grad and torch.equal(plain, scores.detach())
