"""Property-based tests (hypothesis): every op against its plain-torch twin on random shapes
(including sizes that are not multiples of any block), dtypes and heavy ties.

Profiles: ``ci`` (default, quick) and ``long`` (``HYPOTHESIS_PROFILE=long pytest
tests/test_properties.py``) for a deeper search on demand.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multiflow
from multiflow_kernels import ops
from multiflow_kernels import reference as R

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
dims = st.integers(min_value=1, max_value=70)


def _tensor(seed, shape, dtype, ties):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: heavy ties
        t = torch.randint(-3, 4, shape, generator=g).float() * 0.5
    else:
        t = torch.randn(shape, generator=g)
    return t.to(dtype)


@st.composite
def groups(draw, min_members=1):
    n = draw(st.integers(min_members, 4))
    shapes = [(draw(st.integers(0, 40)), draw(dims)) for _ in range(n)]
    dtype = draw(st.sampled_from(DTYPES))
    ties = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return [_tensor(seed + i, s, dtype, ties) for i, s in enumerate(shapes)]


@given(groups(), st.booleans(), st.floats(0, 1))
def test_kth_smallest_group_equals_kthvalue(values, absolute, frac):
    total = sum(v.numel() for v in values)
    if total == 0:
        return
    k = max(1, min(total, int(frac * total) or 1))
    flat = torch.cat([v.float().flatten() for v in values])
    expected = torch.kthvalue(flat.abs() if absolute else flat, k).values
    assert ops.kth_smallest_group(values, k, absolute).item() == expected.item()


@given(groups(), st.booleans(), st.data())
def test_kth_smallest_each_equals_reference(values, absolute, data):
    ks = [data.draw(st.integers(0, v.numel())) for v in values]
    assert torch.equal(ops.kth_smallest_each(values, ks, absolute), R.kth_smallest_each(values, ks, absolute))
    t = R.kth_smallest_group(values, max(1, sum(v.numel() for v in values)), absolute) if any(
        v.numel() for v in values) else torch.tensor(0.0)
    assert torch.equal(ops.count_at_most(values, t, absolute), R.count_at_most(values, t, absolute))


@given(groups(), st.booleans(), st.integers(0, 2**31 - 1))
def test_flow_ops_equal_reference(weights, zero_acts, seed):
    g = torch.Generator().manual_seed(seed)
    acts = [torch.zeros(w.shape[1]) if zero_acts else torch.rand(w.shape[1], generator=g) * 10 for w in weights]
    got = ops.flow_importance(weights, acts)
    ref = R.flow_importance(weights, acts)
    assert all(torch.equal(a, b) for a, b in zip(got[0], ref[0]))
    assert all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))
    assert torch.equal(got[2], ref[2])
    ks = [w.numel() // 2 for w in weights]
    th = ops.flow_kth_each(weights, *got, ks)
    assert torch.equal(th, R.flow_kth_each(weights, *ref, ks))
    masks = ops.flow_masks(weights, *got, th)
    assert all(torch.equal(a, b) for a, b in zip(masks, R.flow_masks(weights, *ref, th)))


@given(st.integers(1, 30), st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 3)]),
       st.integers(1, 6), st.sampled_from(DTYPES), st.booleans(), st.integers(0, 2**31 - 1))
def test_nm_mask_equals_reference(rows, nm, groups_per_row, dtype, ties, seed):
    n, m = nm
    scores = _tensor(seed, (rows, m * groups_per_row), dtype, ties)
    got = ops.nm_mask(scores, n, m)
    assert torch.equal(got, R.nm_mask(scores, n, m))
    assert (got.reshape(rows, -1, m).sum(-1) == n).all()


@given(st.integers(0, 20), st.integers(0, 100), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(rows, cols, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    bits = ops.pack_mask(mask)
    assert torch.equal(bits, R.pack_mask(mask))
    assert torch.equal(ops.unpack_mask(bits, cols), mask)


@given(st.lists(st.integers(1, 5), min_size=0, max_size=3), dims, st.sampled_from(DTYPES), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_sq_sum_equals_reference(lead, feats, dtype, masked, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, feats, generator=g).to(dtype)
    mask = (torch.rand(tuple(lead), generator=g) > 0.4) if masked else None
    acc = torch.rand(feats, generator=g)
    expected = acc.double().clone()
    xs = x.double().reshape(-1, feats)
    keep = mask.reshape(-1) if mask is not None else torch.ones(xs.shape[0], dtype=torch.bool)
    expected += (xs[keep] ** 2).sum(0)
    ops.sq_sum_accumulate_(acc, x, mask)
    torch.testing.assert_close(acc.double(), expected, rtol=1e-5, atol=1e-6)


@st.composite
def layer_sets(draw):
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    weights, acts, mods = {}, {}, {}
    for i in range(n):
        shape = (draw(st.integers(1, 24)), 4 * draw(st.integers(1, 6)))
        weights[f"l{i}.weight"] = torch.randn(shape, generator=g) * float(10 ** draw(st.integers(-6, 1)))
        acts[f"l{i}.weight"] = torch.rand(shape[1], generator=g)
        mods[f"l{i}.weight"] = draw(st.sampled_from(["vision", "text", "fusion"]))
    return weights, acts, mods


@given(layer_sets(), st.sampled_from(sorted(set(multiflow.METHODS) - {"snip"})), st.floats(0, 0.99),
       st.booleans())
def test_masks_from_stats_kernels_equal_reference(layers, method, sparsity, nm):
    weights, acts, mods = layers
    kw = {"nm": (2, 4)} if nm else {}
    s = None if nm else sparsity
    a = multiflow.masks_from_stats(weights, acts, mods, s, method, backend="kernels", **kw)
    b = multiflow.masks_from_stats(weights, acts, mods, s, method, backend="reference", **kw)
    assert all(torch.equal(a[n], b[n]) for n in weights)


@pytest.mark.parametrize("threads", [1, 2])
def test_masks_bit_identical_across_thread_counts(threads):
    from multiflow.pruners import compute_masks

    g = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(300, 257, generator=g) for i in range(3)}
    acts = {n: torch.rand(257, generator=g) for n in weights}
    mods = {n: "vision" if i else "text" for i, n in enumerate(weights)}
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = compute_masks(weights, acts, mods, 0.7)[0]
        torch.set_num_threads(threads)
        got = compute_masks(weights, acts, mods, 0.7)[0]
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(ref[n], got[n]) for n in weights)


@given(st.lists(st.integers(1, 40), min_size=2, max_size=4), st.integers(1, 5), st.floats(0, 1),
       st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**31 - 1),
       st.sampled_from(["masked", "bitmap", "2:4"]))
def test_sparsify_equals_masked_dense(widths, batch, density, dtype, seed, format):
    import copy

    import multiflow_kernels as mk

    torch.manual_seed(seed)
    if format == "2:4":  # in_features a multiple of 4, masks keeping at most 2 of every 4
        widths = [4 * w for w in widths]
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers).to(dtype)
    masks = {f"{i}.weight": torch.rand(m.weight.shape) < density
             for i, m in enumerate(model) if isinstance(m, torch.nn.Linear)}
    if format == "2:4":  # torch.manual_seed(seed) above makes these draws replayable
        masks = {n: m & ops.nm_mask(torch.rand(m.shape), 2, 4) for n, m in masks.items()}
    dense = copy.deepcopy(model)
    multiflow.Masks(masks).apply(dense)
    mk.sparsify(model, masks, format=format)
    x = torch.randn(batch, widths[0]).to(dtype)
    with torch.no_grad():
        got, ref = model(x).double(), dense(x).double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got - ref).norm() <= tol * max(ref.norm(), 1e-6)


@st.composite
def linear_problems(draw, multiple_of=1):
    """x (lead..., in), a weight (out, in) and a keep-mask of a given density, a bias or None."""
    out_f = draw(st.integers(1, 40))
    in_f = draw(st.integers(1, 70)) * multiple_of
    lead = draw(st.lists(st.integers(0, 5), min_size=1, max_size=2))
    dtype = draw(st.sampled_from(DTYPES))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    mask = torch.rand(out_f, in_f, generator=g) < density
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype) if draw(st.booleans()) else None
    return x, w, mask, bias


@given(linear_problems())
def test_masked_linear_equals_reference(problem):
    from _earned import assert_linear_earned

    x, w, mask, bias = problem
    got = ops.masked_linear(x, w, ops.pack_mask(mask), bias)
    assert_linear_earned(got, x, w.masked_fill(~mask, 0), bias, "masked_linear")


@given(linear_problems())
def test_bitmap_ops_equal_reference(problem):
    from _earned import assert_linear_earned

    x, w, mask, bias = problem
    packed = ops.bitmap_pack(w, mask)
    assert all(torch.equal(a, b) for a, b in zip(packed, R.bitmap_pack(w, mask)))
    assert torch.equal(ops.bitmap_unpack(*packed, w.shape[1]), w.masked_fill(~mask, 0))
    assert_linear_earned(ops.bitmap_linear(x, *packed, w.shape[1], bias), x, w.masked_fill(~mask, 0), bias,
                         "bitmap_linear")


@given(linear_problems(multiple_of=4))
def test_sparse24_ops_equal_reference(problem):
    from _earned import assert_linear_earned

    x, w, mask, bias = problem
    mask &= ops.nm_mask(torch.rand(mask.shape, generator=torch.Generator().manual_seed(mask.numel())), 2, 4)
    values, meta = ops.sparse24_pack(w, mask)
    pv, pm = R.sparse24_pack_python(w, mask)
    assert torch.equal(values.view(torch.int16 if w.element_size() == 2 else torch.int32),
                       pv.view(torch.int16 if w.element_size() == 2 else torch.int32)) and torch.equal(meta, pm)
    assert torch.equal(ops.sparse24_unpack(values, meta), w.masked_fill(~mask, 0))
    assert_linear_earned(ops.sparse24_linear(x, values, meta, bias), x, w.masked_fill(~mask, 0), bias,
                         "sparse24_linear")
