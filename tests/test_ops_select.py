"""The selection ops (kth_smallest_group, kth_smallest_each, count_at_most,
flow_kth_each, flow_masks, nm_mask) against their plain-torch twins and
torch.kthvalue, on CPU and, where there is a GPU, CUDA.

Selection is exact, so every comparison is exact: the same float (-0.0 and +0.0
count as equal, as they do for torch.kthvalue; NaN as equal to NaN), the same
counts, the same mask bits.
"""

from __future__ import annotations

import pytest
import torch
from _isa_harness import isas_of_this_cpu, results_at_thread_counts, run_with_isa

import multiflow_kernels  # noqa: F401  (registers the ops)
from multiflow_kernels import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Group members of awkward sizes, an empty one among them; 65537 spans two work
# items and ends in a partial block.
GROUP_SIZES = [1, 7, 0, 1000, 65537]
KINDS = ["randn", "ties", "all_equal", "positive"]

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def make_values(kind: str, n: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    if kind == "randn":  # negative and positive, the usual spread of weights
        x = torch.randn(n, generator=gen) * 0.05
    elif kind == "ties":  # few distinct values, negative ones included
        x = torch.randint(-2, 3, (n,), generator=gen).float() * 0.5
    elif kind == "all_equal":
        x = torch.full((n,), -0.75)
    else:  # positive, spanning many binades
        x = torch.rand(n, generator=gen).pow(8)
    return x.to(dtype)


def assert_same_floats(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, equal_nan=True)


def ks_for(total: int, gen: torch.Generator) -> list[int]:
    middle = torch.randint(1, total + 1, (2,), generator=gen).tolist()
    return sorted({1, total, (total + 1) // 2, *middle})


# ----------------------------------------------------------------------------- k-th smallest of a group


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kth_smallest_group_matches_kthvalue(dtype, kind, absolute):
    gen = torch.Generator().manual_seed(KINDS.index(kind) * 7 + DTYPES.index(dtype))
    values = [make_values(kind, n, gen, dtype) for n in GROUP_SIZES]
    flat = torch.cat([v.float() for v in values])
    flat = flat.abs() if absolute else flat
    for k in ks_for(flat.numel(), gen):
        got = ops.kth_smallest_group(values, k, absolute=absolute)
        assert_same_floats(got, torch.kthvalue(flat, k).values)
        assert_same_floats(got, reference.kth_smallest_group(values, k, absolute))


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_kth_smallest_group_small_and_single(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen)
    for k in range(1, n + 1, max(1, n // 50)):
        assert_same_floats(ops.kth_smallest_group([x], k), torch.kthvalue(x, k).values)


def test_kth_smallest_group_special_values():
    # Signed zeros are one value (+0.0 comes back), infinities order at the ends,
    # subnormals and the extreme normals keep their order.
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), tiny / 4, -tiny / 4, 3.0e38, -3.0e38, 1.0, -1.0, -0.0, 0.0]
    )
    for absolute in (False, True):
        flat = x.abs() if absolute else x
        for k in range(1, x.numel() + 1):
            got = ops.kth_smallest_group([x[:5], x[5:]], k, absolute=absolute)
            assert_same_floats(got, torch.kthvalue(flat, k).values)


def test_kth_smallest_nan_sorts_last_like_kthvalue():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(500, generator=gen)
    x[::7] = float("nan")
    x[3] = -float("nan")  # a NaN with its sign bit set still sorts last
    for k in (1, 200, 428, 429, 430, 500):
        assert_same_floats(ops.kth_smallest_group([x], k), torch.kthvalue(x, k).values)
        assert_same_floats(ops.kth_smallest_each([x], [k]), torch.kthvalue(x, k).values[None])


# ----------------------------------------------------------------------------- k-th smallest of each


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kth_smallest_each_matches_reference(dtype, absolute):
    gen = torch.Generator().manual_seed(11 + DTYPES.index(dtype))
    # Mixed in one call: groups whose remaining passes run on a compact copy
    # (randn, positive) and groups that need full passes (ties, all equal).
    values = [
        make_values("randn", 65537, gen, dtype),
        make_values("ties", 3000, gen, dtype),
        make_values("positive", 1000, gen, dtype),
        torch.empty(0, dtype=dtype),
        make_values("all_equal", 7, gen, dtype),
        make_values("randn", 1, gen, dtype),
        make_values("randn", 200_000, gen, dtype).reshape(400, 500),
    ]
    for trial in range(3):
        ks = [int(torch.randint(0, v.numel() + 1, (), generator=gen)) for v in values]
        if trial == 1:
            ks = [v.numel() for v in values]
        if trial == 2:
            ks = [min(1, v.numel()) for v in values]
            ks[0] = 0
        got = ops.kth_smallest_each(values, ks, absolute=absolute)
        assert_same_floats(got, reference.kth_smallest_each(values, ks, absolute))


def test_kth_smallest_each_of_nothing():
    assert ops.kth_smallest_each([], []).shape == (0,)
    got = ops.kth_smallest_each([torch.empty(0), torch.empty(3, 0)], [0, 0])
    assert_same_floats(got, torch.full((2,), -float("inf")))


# ----------------------------------------------------------------------------- count_at_most


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_count_at_most_matches_reference(dtype, absolute):
    gen = torch.Generator().manual_seed(21)
    values = [make_values(kind, n, gen, dtype) for kind, n in zip(KINDS + ["randn"], GROUP_SIZES)]
    thresholds = [0.0, -0.0, -0.75, 0.5, 0.03, float("inf"), -float("inf"), float("nan")]
    thresholds.append(float(reference.kth_smallest_group(values, 5000, absolute)))
    for t in thresholds:
        th = torch.tensor(t)
        got = ops.count_at_most(values, th, absolute=absolute)
        assert got.dtype == torch.int64
        assert torch.equal(got, reference.count_at_most(values, th, absolute)), t


def test_prior_threshold_and_counts_agree():
    # The multimodal prior: the k-th smallest |w| of a group, then per layer the
    # count at or below it; together at least k (ties), and exactly k without ties.
    gen = torch.Generator().manual_seed(22)
    layers = [torch.randn(s, generator=gen) * (i + 1) for i, s in enumerate([(64, 48), (17, 5), (300, 41)])]
    total = sum(w.numel() for w in layers)
    k = int(0.6 * total)
    t = ops.kth_smallest_group(layers, k, absolute=True)
    assert int(ops.count_at_most(layers, t, absolute=True).sum()) == k


# ----------------------------------------------------------------------------- flow_kth_each, flow_masks


def flow_layers(dtype, gen, shapes=((1, 1), (7, 13), (300, 257), (0, 5), (64, 1024))):
    weights = [(torch.randn(s, generator=gen) * 0.02 * (i + 1)).to(dtype) for i, s in enumerate(shapes)]
    acts = [torch.rand(s[1], generator=gen) * 10 for s in shapes]
    return weights, acts


def assert_flow_ops_match(weights, imp_out, imp_in, w_scale, ks) -> list[torch.Tensor]:
    """flow_kth_each and, at its thresholds, flow_masks equal the reference; returns the masks."""
    got = ops.flow_kth_each(weights, imp_out, imp_in, w_scale, ks)
    assert_same_floats(got, reference.flow_kth_each(weights, imp_out, imp_in, w_scale, ks))
    masks = ops.flow_masks(weights, imp_out, imp_in, w_scale, got)
    want = reference.flow_masks(weights, imp_out, imp_in, w_scale, got)
    for m, w_m, w in zip(masks, want, weights):
        assert m.dtype == torch.bool and m.shape == w.shape and m.is_contiguous()
        assert torch.equal(m.cpu(), w_m.cpu())
    return masks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flow_kth_each_and_masks_match_reference(dtype):
    gen = torch.Generator().manual_seed(31 + DTYPES.index(dtype))
    weights, acts = flow_layers(dtype, gen)
    imp_out, imp_in, w_scale = reference.flow_importance(weights, acts)
    for trial in range(3):
        ks = [int(torch.randint(0, w.numel() + 1, (), generator=gen)) for w in weights]
        if trial == 1:
            ks = [w.numel() for w in weights]
        masks = assert_flow_ops_match(weights, imp_out, imp_in, w_scale, ks)
        # The tie rule: at least k pruned (exactly k where the k-th score is unique).
        for m, k in zip(masks, ks):
            assert int((~m).sum()) >= k


def test_flow_scores_are_bitwise_the_reference():
    # k = every rank of a small layer: each k-th value is one of the reference's
    # scores, so every score the kernel computes equals the reference's bitwise.
    gen = torch.Generator().manual_seed(32)
    w = torch.randn(9, 23, generator=gen) * 3e-3
    imp_out, imp_in, w_scale = reference.flow_importance([w], [torch.rand(23, generator=gen)])
    scores = reference.flow_score_of(w, imp_out[0], imp_in[0], w_scale[0]).flatten()
    got = torch.stack([ops.flow_kth_each([w], imp_out, imp_in, w_scale, [k])[0] for k in range(1, 208)])
    assert torch.equal(got, scores.sort().values)


def test_flow_ops_non_contiguous_weights():
    gen = torch.Generator().manual_seed(33)
    base = torch.randn(80, 130, generator=gen)
    weights = [
        torch.randn(96, 40, generator=gen).t(),  # transposed (columns strided): copied
        base[5:70, 3:120],  # row-strided slice: read in place
        base[::2, ::3],  # both strided
    ]
    acts = [torch.rand(w.shape[1], generator=gen) for w in weights]
    imp_out, imp_in, w_scale = reference.flow_importance(weights, acts)
    imp_in[0] = torch.rand(96, 2, generator=gen)[:, 0]  # a strided importance vector
    assert_flow_ops_match(weights, imp_out, imp_in, w_scale, [w.numel() // 3 for w in weights])


def test_values_non_contiguous():
    gen = torch.Generator().manual_seed(34)
    base = torch.randn(60, 70, generator=gen)
    values = [base.t(), base[::2, 1:50], torch.randn(5, generator=gen).expand(3, 5), base.permute(1, 0)[3:9]]
    total = sum(v.numel() for v in values)
    for absolute in (False, True):
        for k in (1, total // 2, total):
            assert_same_floats(
                ops.kth_smallest_group(values, k, absolute), reference.kth_smallest_group(values, k, absolute)
            )
        ks = [v.numel() // 2 for v in values]
        assert_same_floats(
            ops.kth_smallest_each(values, ks, absolute), reference.kth_smallest_each(values, ks, absolute)
        )
        th = torch.tensor(0.1)
        assert torch.equal(ops.count_at_most(values, th, absolute), reference.count_at_most(values, th, absolute))


# ----------------------------------------------------------------------------- nm_mask


NM_CASES = [(2, 4), (1, 4), (0, 4), (4, 4), (4, 8), (3, 7), (1, 2), (5, 70)]


@pytest.mark.parametrize("n, m", NM_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nm_mask_matches_reference(dtype, n, m):
    gen = torch.Generator().manual_seed(41 + n * 13 + m)
    for rows, groups in ((1, 1), (13, 5), (70, 300)):
        scores = torch.randn(rows, groups * m, generator=gen).to(dtype)
        ties = torch.randint(0, 3, (rows, groups * m), generator=gen).to(dtype)  # many ties
        for s in (scores, ties):
            got = ops.nm_mask(s, n, m)
            assert got.dtype == torch.bool and got.is_contiguous()
            assert torch.equal(got, reference.nm_mask(s, n, m))
            assert torch.equal(got.reshape(rows, groups, m).sum(-1), torch.full((rows, groups), n))


def test_nm_mask_special_values_and_layouts():
    s = torch.tensor([[1.0, float("nan"), -0.0, 0.0, 2.0, 2.0, -float("inf"), float("inf")]])
    for n in range(5):
        assert torch.equal(ops.nm_mask(s, n, 4), reference.nm_mask(s, n, 4))
    gen = torch.Generator().manual_seed(42)
    for x in (torch.randn(24, 9, generator=gen).t(), torch.randn(9, 30, generator=gen)[:, 2:26]):
        assert torch.equal(ops.nm_mask(x, 2, 4), reference.nm_mask(x, 2, 4))
    assert ops.nm_mask(torch.empty(0, 8), 2, 4).shape == (0, 8)
    assert ops.nm_mask(torch.empty(3, 0), 2, 4).shape == (3, 0)


# ----------------------------------------------------------------------------- determinism and ISAs


def test_same_answer_for_any_thread_count():
    gen = torch.Generator().manual_seed(51)
    values = [torch.randn(300_000, generator=gen), torch.randint(0, 5, (100_000,), generator=gen).float()]
    weights, acts = flow_layers(torch.float32, gen)
    imp_out, imp_in, w_scale = reference.flow_importance(weights, acts)
    ks = [w.numel() // 2 for w in weights]

    def run_all():
        kth = ops.kth_smallest_group(values, 123_457, absolute=True)
        return [
            kth,
            ops.kth_smallest_each(values, [1000, 50_000]),
            ops.count_at_most(values, kth, absolute=True),
            ops.flow_kth_each(weights, imp_out, imp_in, w_scale, ks),
            ops.nm_mask(values[1].reshape(1000, 100), 2, 4),
        ]

    results = results_at_thread_counts(run_all)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


_ISA_SCRIPT = r"""
import sys, torch
import multiflow_kernels
from multiflow_kernels import ops, reference
inputs = torch.load(sys.argv[1])
out = {"capability": torch.backends.cpu.get_cpu_capability(), "ok": []}
for name, (values, weights, acts) in inputs.items():
    ks = [v.numel() // 3 for v in values]
    imp_out, imp_in, w_scale = reference.flow_importance(weights, acts)
    fk = [w.numel() // 2 for w in weights]
    thr = ops.flow_kth_each(weights, imp_out, imp_in, w_scale, fk)
    t = torch.tensor(0.01)
    checks = [
        torch.equal(ops.kth_smallest_each(values, ks, True), reference.kth_smallest_each(values, ks, True)),
        torch.equal(ops.kth_smallest_group(values, 999, False), reference.kth_smallest_group(values, 999, False)),
        torch.equal(ops.count_at_most(values, t, True), reference.count_at_most(values, t, True)),
        torch.equal(thr, reference.flow_kth_each(weights, imp_out, imp_in, w_scale, fk)),
        all(torch.equal(a, b) for a, b in zip(ops.flow_masks(weights, imp_out, imp_in, w_scale, thr),
                                              reference.flow_masks(weights, imp_out, imp_in, w_scale, thr))),
        torch.equal(ops.nm_mask(weights[0], 2, 4), reference.nm_mask(weights[0], 2, 4)),
    ]
    out["ok"].append((name, checks))
torch.save(out, sys.argv[2])
"""


@pytest.mark.parametrize("isa", isas_of_this_cpu())
def test_every_isa_path_matches_reference(isa, tmp_path):
    # The inner loops are compiled per ISA and picked from torch's CPU
    # capability, which ATEN_CPU_CAPABILITY overrides: one process per path.
    gen = torch.Generator().manual_seed(52)
    inputs = {}
    for dtype in DTYPES:
        values = [(torch.randn(n, generator=gen) * 0.1).to(dtype) for n in (5, 1037, 20_000)]
        weights = [(torch.randn(s, generator=gen) * 0.1).to(dtype) for s in ((33, 20), (7, 44))]
        acts = [torch.rand(w.shape[1], generator=gen) for w in weights]
        inputs[str(dtype)] = (values, weights, acts)
    got = run_with_isa(isa, _ISA_SCRIPT, inputs, tmp_path)
    for name, checks in got["ok"]:
        assert all(checks), (name, checks)


# ----------------------------------------------------------------------------- opcheck and errors


def _opcheck_samples(device="cpu"):
    gen = torch.Generator().manual_seed(61)
    values = [torch.randn(5, 7, generator=gen).to(device), torch.randn(11, generator=gen).half().to(device)]
    weights, acts = flow_layers(torch.float32, gen, shapes=((6, 8), (3, 5)))
    weights = [w.to(device) for w in weights]
    imp_out, imp_in, w_scale = reference.flow_importance(weights, [a.to(device) for a in acts])
    thresholds = torch.tensor([0.0, -float("inf")], device=device)
    t = torch.tensor(0.2, device=device)
    return [
        (torch.ops.multiflow.kth_smallest_group.default, (values, 17, True)),
        (torch.ops.multiflow.kth_smallest_each.default, (values, [3, 0], False)),
        (torch.ops.multiflow.count_at_most.default, (values, t, True)),
        (torch.ops.multiflow.flow_kth_each.default, (weights, imp_out, imp_in, w_scale, [10, 15])),
        (torch.ops.multiflow.flow_masks.default, (weights, imp_out, imp_in, w_scale, thresholds)),
        (torch.ops.multiflow.nm_mask.default, (torch.randn(6, 12, generator=gen).to(device), 2, 4)),
    ]


@pytest.mark.parametrize("sample", range(6))
def test_opcheck_cpu(sample):
    op, args = _opcheck_samples()[sample]
    torch.library.opcheck(op, args)


def test_compiles_with_torch_compile():
    def prior(ws, k):
        t = ops.kth_smallest_group(ws, k, absolute=True)
        return t, ops.count_at_most(ws, t, absolute=True), ops.nm_mask(ws[0] * 2, 2, 4)

    gen = torch.Generator().manual_seed(62)
    ws = [torch.randn(8, 12, generator=gen), torch.randn(5, 3, generator=gen)]
    got = torch.compile(prior, fullgraph=True, backend="aot_eager")(ws, 50)
    want = prior(ws, 50)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _bad_calls():
    x = torch.randn(10)
    w = torch.randn(4, 6)
    o, i, s = torch.rand(4), torch.rand(6), torch.ones(1)
    th = torch.zeros(1)
    return [
        ("k0", lambda: ops.kth_smallest_group([x], 0), r"k must be in \[1, 10\].*got k = 0"),
        ("k_big", lambda: ops.kth_smallest_group([x, x], 21), r"k must be in \[1, 20\].*got k = 21"),
        ("no_values", lambda: ops.kth_smallest_group([], 1), r"k must be in \[1, 0\]"),
        ("ks_len", lambda: ops.kth_smallest_each([x], [1, 2]), r"ks must have one entry per tensor"),
        ("ks_range", lambda: ops.kth_smallest_each([x], [11]), r"ks\[0\] must be in \[0, 10\]"),
        ("ks_neg", lambda: ops.kth_smallest_each([x], [-1]), r"ks\[0\] must be in \[0, 10\]"),
        ("int", lambda: ops.kth_smallest_group([x, torch.arange(3)], 1), r"values\[1\] must be float32, float16"),
        ("f64", lambda: ops.kth_smallest_each([x.double()], [1]), r"values\[0\] must be float32, float16"),
        ("thr_dtype", lambda: ops.count_at_most([x], torch.tensor(0.0).double()), r"threshold must be float32"),
        ("thr_shape", lambda: ops.count_at_most([x], torch.zeros(1)), r"threshold must be a 0-d tensor"),
        ("flow_len", lambda: ops.flow_kth_each([w], [o, o], [i], s, [1]), r"one entry per layer"),
        ("w_scale", lambda: ops.flow_kth_each([w], [o], [i], torch.ones(2), [1]), r"w_scale must have shape \(L,\)"),
        ("w_scale_f16", lambda: ops.flow_kth_each([w], [o], [i], s.half(), [1]), r"w_scale must be float32"),
        ("w_1d", lambda: ops.flow_kth_each([x], [o], [i], s, [1]), r"weights\[0\] must be 2-D"),
        ("imp_out", lambda: ops.flow_kth_each([w], [i], [i], s, [1]), r"imp_out\[0\] must have shape \(out,\) = \(4,\)"),
        ("imp_in", lambda: ops.flow_kth_each([w], [o], [o], s, [1]), r"imp_in\[0\] must have shape \(in,\) = \(6,\)"),
        ("imp_f16", lambda: ops.flow_kth_each([w], [o.half()], [i], s, [1]), r"imp_out\[0\] must be float32"),
        ("flow_k", lambda: ops.flow_kth_each([w], [o], [i], s, [25]), r"ks\[0\] must be in \[0, 24\]"),
        ("thresholds", lambda: ops.flow_masks([w], [o], [i], s, torch.zeros(2)), r"thresholds must have shape"),
        ("thr_f64", lambda: ops.flow_masks([w], [o], [i], s, th.double()), r"thresholds must be float32"),
        ("nm_cols", lambda: ops.nm_mask(torch.randn(3, 10), 2, 4), r"C = 10 must be a multiple of m = 4"),
        ("nm_n", lambda: ops.nm_mask(torch.randn(3, 8), 5, 4), r"n must be in \[0, m\]"),
        ("nm_m", lambda: ops.nm_mask(torch.randn(3, 8), 0, 0), r"m must be >= 1"),
        ("nm_1d", lambda: ops.nm_mask(torch.randn(8), 2, 4), r"scores must be 2-D"),
        ("nm_int", lambda: ops.nm_mask(torch.ones(2, 8, dtype=torch.int32), 2, 4), r"scores must be float32"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_errors_name_the_argument(case):
    _, call, match = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=match):
        call()


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_selection_matches_reference(dtype):
    gen = torch.Generator().manual_seed(71)
    for kind in KINDS:
        values = [make_values(kind, n, gen, dtype).cuda() for n in GROUP_SIZES + [300_000]]
        for absolute in (False, True):
            flat = torch.cat([v.float() for v in values])
            flat = flat.abs() if absolute else flat
            for k in ks_for(flat.numel(), gen):
                got = ops.kth_smallest_group(values, k, absolute)
                assert got.device.type == "cuda"
                assert_same_floats(got, torch.kthvalue(flat.cpu(), k).values)
            ks = [int(torch.randint(0, v.numel() + 1, (), generator=gen)) for v in values]
            assert_same_floats(
                ops.kth_smallest_each(values, ks, absolute), reference.kth_smallest_each(values, ks, absolute)
            )
            t = ops.kth_smallest_group(values, flat.numel() // 2, absolute)
            assert torch.equal(ops.count_at_most(values, t, absolute), reference.count_at_most(values, t, absolute))


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_flow_and_nm_match_reference(dtype):
    gen = torch.Generator().manual_seed(72)
    weights, acts = flow_layers(dtype, gen)
    weights = [w.cuda() for w in weights] + [torch.randn(40, 96, generator=gen).to(dtype).cuda().t()]
    acts = [a.cuda() for a in acts] + [torch.rand(40, generator=gen).cuda()]
    imp_out, imp_in, w_scale = reference.flow_importance(weights, acts)
    ks = [int(torch.randint(0, w.numel() + 1, (), generator=gen)) for w in weights]
    assert_flow_ops_match(weights, imp_out, imp_in, w_scale, ks)
    for n, m in NM_CASES:
        s = torch.randint(0, 3, (37, 12 * m), generator=gen).to(dtype).cuda()
        assert torch.equal(ops.nm_mask(s, n, m), reference.nm_mask(s, n, m))


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("sample", range(6))
def test_opcheck_cuda(sample):
    op, args = _opcheck_samples("cuda")[sample]
    torch.library.opcheck(op, args)


@pytest.mark.cuda
@cuda_only
def test_cuda_device_mismatch_names_the_argument():
    with pytest.raises(RuntimeError, match="every tensor must be on one device"):
        ops.kth_smallest_group([torch.randn(3, device="cuda"), torch.randn(3)], 1)
    with pytest.raises(RuntimeError, match="threshold must be on the values' device"):
        ops.count_at_most([torch.randn(3, device="cuda")], torch.tensor(0.0))
