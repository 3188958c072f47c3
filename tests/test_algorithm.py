"""masks_from_stats against straightforward in-test implementations of DESIGN.md's equations."""
import functools
import math
from fractions import Fraction

import pytest
import torch

import multiflow
from multiflow.pruners import compute_masks as _compute_masks


@pytest.fixture(params=["kernels", "reference"])
def backend(request):
    """Every test runs on our kernels and on their plain-torch twins."""
    return request.param


def _mfs(backend):
    return functools.partial(multiflow.masks_from_stats, backend=backend)


def _cm(backend):
    return functools.partial(_compute_masks, backend=backend)


def _layers(seed=0, scales=(1.0, 0.3, 2.0)):
    g = torch.Generator().manual_seed(seed)
    shapes = [(12, 16), (8, 12), (20, 8)]
    weights = {f"l{i}.weight": torch.randn(s, generator=g) * sc for i, (s, sc) in enumerate(zip(shapes, scales))}
    acts = {n: torch.rand(w.shape[1], generator=g) * 3 + 0.01 for n, w in weights.items()}
    mods = {"l0.weight": "vision", "l1.weight": "vision", "l2.weight": "text"}
    return weights, acts, mods


# ---- straightforward implementations of the contract -------------------------------
def naive_flow(w, a):
    A = w.abs() * a.sqrt()[None, :]
    return A.mean(1)[:, None] * w.abs() * A.mean(0)[None, :]


def naive_prior(weights, mods, s):
    out = {}
    for mod in set(mods.values()):
        names = [n for n in weights if mods[n] == mod]
        pool = torch.cat([weights[n].abs().flatten() for n in names])
        k = int(s * pool.numel())
        for n in names:
            if k < 1:
                out[n] = 0.0
            else:
                t = torch.kthvalue(pool, k).values
                # the fraction exactly (a float c / n times n can come out under c)
                out[n] = Fraction(int((weights[n].abs() <= t).sum()), weights[n].numel())
    return out


def naive_mask(score, s_l):
    k = int(s_l * score.numel())  # exact when s_l is a Fraction
    if k < 1:
        return torch.ones_like(score, dtype=torch.bool)
    return score > torch.kthvalue(score.flatten(), k).values


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.63, 0.9, 0.999])
def test_multiflow_equals_equations(sparsity, backend):
    weights, acts, mods = _layers()
    masks = _mfs(backend)(weights, acts, mods, sparsity)
    prior = naive_prior(weights, mods, sparsity)
    for n, w in weights.items():
        expected = naive_mask(naive_flow(w, acts[n]), prior[n])
        assert torch.equal(masks[n], expected), n
        assert masks[n].dtype == torch.bool and masks[n].shape == w.shape


def test_prior_count_survives_floating_point(backend):
    """A layer's prior is a count c of its |W| at or below the modality's threshold; s_l = c / n
    times n comes out under c in floating point for some (c, n) (15 / 22 * 22 < 15): the layer
    must still prune c weights, not c - 1."""
    assert 15 / 22 * 22 < 15
    w = torch.arange(1, 23, dtype=torch.float32).reshape(2, 11)
    names = {"l.weight": w}
    masks = _mfs(backend)(names, {"l.weight": torch.ones(11)}, {"l.weight": "v"}, 15 / 22 + 1e-9)
    assert int((~masks["l.weight"]).sum()) == 15


def test_prior_is_per_modality(backend):
    weights, acts, mods = _layers(scales=(1.0, 0.01, 1.0))
    _, allocated = _cm(backend)(weights, acts, mods, 0.5)
    # the small-magnitude vision layer takes almost all of the vision budget
    assert allocated["l1.weight"] > 0.95
    assert allocated["l0.weight"] < 0.5
    # vision pool: exactly int(0.5 * n) weights at or below the threshold (no ties here)
    n_vis = weights["l0.weight"].numel() + weights["l1.weight"].numel()
    pruned_vis = sum(allocated[n] * weights[n].numel() for n in ("l0.weight", "l1.weight"))
    assert round(pruned_vis) == int(0.5 * n_vis)
    # the text modality alone is pruned to its own target
    assert allocated["l2.weight"] == pytest.approx(int(0.5 * weights["l2.weight"].numel()) / weights["l2.weight"].numel())


def test_tie_rule_prunes_every_tie_at_threshold(backend):
    w = torch.tensor([[1.0, 1.0, 1.0, 2.0], [1.0, 3.0, 4.0, 5.0]])
    a = torch.ones(4)
    # scores with ties: all weights equal to 1 in row 0 tie
    masks, allocated = _cm(backend)({"w": w}, {"w": a}, {"w": "x"}, 0.25)
    # prior: k = int(0.25*8) = 2, threshold = 1.0, 4 weights <= 1.0 -> s_l = 0.5
    assert allocated["w"] == 0.5
    score = naive_flow(w, a)
    t = torch.kthvalue(score.flatten(), 4).values
    assert torch.equal(masks["w"], score > t)


def test_scale_robust_tiny_layers(backend):
    weights, acts, mods = _layers()
    tiny_w = {n: w * 1e-10 for n, w in weights.items()}
    tiny_a = {n: a * 1e-30 for n, a in acts.items()}
    ref = _mfs(backend)(weights, acts, mods, 0.75)
    for w_set, a_set in ((tiny_w, acts), (weights, tiny_a), (tiny_w, tiny_a)):
        got, allocated = _cm(backend)(w_set, a_set, mods, 0.75)
        for n in weights:
            assert torch.equal(got[n], ref[n]), n
            # never pruned beyond the prior
            assert 1 - got[n].float().mean().item() <= allocated[n] + 1e-9


def test_denormal_weights_do_not_collapse(backend):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 16, generator=g) * 1e-39  # denormal float32 magnitudes
    a = torch.rand(16, generator=g) * 1e-40
    masks, allocated = _cm(backend)({"w": w}, {"w": a}, {"w": "v"}, 0.5)
    assert 1 - masks["w"].float().mean().item() <= allocated["w"] + 1e-9


def test_all_zero_statistic_prunes_the_whole_layer(backend):
    """S = 0 everywhere: every weight ties at t = 0 and ties are pruned (the contract's rule),
    even past the prior's count; with k_l = 0 nothing is pruned."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 8, generator=g)
    masks, allocated = _cm(backend)({"w": w}, {"w": torch.zeros(8)}, {"w": "v"}, 0.5)
    assert int(allocated["w"] * 64) == 32 and not masks["w"].any()
    masks, _ = _cm(backend)({"w": w}, {"w": torch.zeros(8)}, {"w": "v"}, 0.01)
    assert masks["w"].all()


def test_zero_activation_columns_are_pruned_first(backend):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, generator=g)
    a = torch.rand(8, generator=g) + 0.5
    a[2] = 0.0
    masks = _mfs(backend)({"w": w}, {"w": a}, {"w": "v"}, 0.125)
    # k = int(0.125*64) = 8 lowest magnitudes overall, prior = 0.125 -> 8 pruned: the whole column 2 scores 0
    assert not masks["w"][:, 2].any()


# ---- baselines ---------------------------------------------------------------------
def _pruned_fraction(m):
    return 1 - m.float().mean().item()


def test_omp_is_global_magnitude(backend):
    weights, acts, mods = _layers()
    masks = _mfs(backend)(weights, None, mods, 0.6, "omp")
    pool = torch.cat([w.abs().flatten() for w in weights.values()])
    t = torch.kthvalue(pool, int(0.6 * pool.numel())).values
    for n, w in weights.items():
        assert torch.equal(masks[n], w.abs() > t)


def test_layer_magnitude(backend):
    weights, _, mods = _layers()
    masks = _mfs(backend)(weights, None, mods, 0.6, "layer_magnitude")
    for n, w in weights.items():
        assert torch.equal(masks[n], naive_mask(w.abs(), 0.6))


def test_l2_normalised_global(backend):
    weights, _, mods = _layers()
    masks = _mfs(backend)(weights, None, mods, 0.5, "l2")
    sc = {n: (w.double().abs() / w.double().norm()) for n, w in weights.items()}
    pool = torch.cat([s.flatten() for s in sc.values()])
    t = torch.kthvalue(pool, int(0.5 * pool.numel())).values
    for n in weights:
        assert torch.equal(masks[n], sc[n] > t)


def _lamp_loop(w):
    flat = w.double().flatten()
    sq = flat**2
    out = torch.empty_like(sq)
    order = sorted(range(len(sq)), key=lambda i: (sq[i].item(), i))
    for pos, i in enumerate(order):
        denom = sum(sq[j].item() for j in order[pos:])
        out[i] = sq[i] / denom
    return out.view_as(w)


def test_lamp_against_definition(backend):
    weights, _, mods = _layers()
    masks = _mfs(backend)(weights, None, mods, 0.7, "lamp")
    sc = {n: _lamp_loop(w) for n, w in weights.items()}
    pool = torch.cat([s.flatten().float() for s in sc.values()])
    t = torch.kthvalue(pool, int(0.7 * pool.numel())).values
    for n in weights:
        assert torch.equal(masks[n], sc[n].float() > t)
    # the largest weight of every layer has LAMP score 1 and survives
    for n, w in weights.items():
        assert masks[n].flatten()[w.abs().argmax()]


def test_random_is_layerwise_and_seeded(backend):
    weights, _, mods = _layers()
    a = _mfs(backend)(weights, None, mods, 0.5, "random", seed=1)
    b = _mfs(backend)(weights, None, mods, 0.5, "random", seed=1)
    c = _mfs(backend)(weights, None, mods, 0.5, "random", seed=2)
    for n, w in weights.items():
        assert torch.equal(a[n], b[n])
        assert int((~a[n]).sum()) == int(0.5 * w.numel())
    assert any(not torch.equal(a[n], c[n]) for n in weights)


def test_snip_is_global_grad_times_weight(backend):
    weights, _, mods = _layers()
    g = torch.Generator().manual_seed(5)
    grads = {n: torch.randn(w.shape, generator=g) for n, w in weights.items()}
    masks = _mfs(backend)(weights, None, mods, 0.5, "snip", grads=grads)
    sc = {n: (grads[n].double() * w.double()).abs().float() for n, w in weights.items()}
    pool = torch.cat([s.flatten() for s in sc.values()])
    t = torch.kthvalue(pool, int(0.5 * pool.numel())).values
    for n in weights:
        assert torch.equal(masks[n], sc[n] > t)


def test_wanda_is_per_row(backend):
    weights, acts, mods = _layers()
    masks = _mfs(backend)(weights, acts, mods, 0.5, "wanda")
    for n, w in weights.items():
        s = w.abs() * acts[n].sqrt()[None, :]
        k = int(0.5 * w.shape[1])
        t = torch.kthvalue(s, k, dim=1, keepdim=True).values
        assert torch.equal(masks[n], s > t)
        assert (masks[n].sum(1) == w.shape[1] - k).all()


@pytest.mark.parametrize("method", sorted(multiflow.METHODS))
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 4), (1, 2)])
def test_nm_masks_exact(method, nm, backend):
    weights, acts, mods = _layers()
    g = torch.Generator().manual_seed(2)
    grads = {n: torch.randn(w.shape, generator=g) for n, w in weights.items()}
    masks = _mfs(backend)(weights, acts, mods, None, method, nm=nm, grads=grads)
    n_keep, m = nm
    for n, w in weights.items():
        per_group = masks[n].reshape(w.shape[0], -1, m).sum(-1)
        assert (per_group == n_keep).all(), n


def test_nm_keeps_best_and_breaks_ties_by_lower_index(backend):
    w = torch.tensor([[1.0, 5.0, 3.0, 2.0, 7.0, 7.0, 7.0, 7.0]])
    masks = _mfs(backend)({"w": w}, None, {"w": "x"}, None, "layer_magnitude", nm=(2, 4))
    assert masks["w"].tolist() == [[False, True, True, False, True, True, False, False]]


def test_nm_rejects_indivisible_layers_naming_them(backend):
    w = {"odd.weight": torch.randn(4, 6)}
    with pytest.raises(ValueError, match="odd.weight"):
        _mfs(backend)(w, None, {"odd.weight": "x"}, None, "omp", nm=(2, 4))


# ---- bad input ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, torch.tensor([0.5]), torch.tensor(1.0)])
def test_bad_sparsity(bad, backend):
    weights, acts, mods = _layers()
    with pytest.raises(ValueError, match="sparsity"):
        _mfs(backend)(weights, acts, mods, bad)


def test_sparsity_as_numpy_or_tensor_number(backend):
    import numpy as np

    weights, acts, mods = _layers()
    want = _mfs(backend)(weights, acts, mods, 0.5)
    for s in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        got = _mfs(backend)(weights, acts, mods, s)
        assert all(torch.equal(got[n], want[n]) for n in want), type(s)


def test_nonfinite_statistic_names_layer(backend):
    weights, acts, mods = _layers()
    acts["l1.weight"][3] = math.inf
    with pytest.raises(ValueError, match="l1.weight"):
        _mfs(backend)(weights, acts, mods, 0.5)
    # the offenders and only they (the check reads all layers at once, then names them)
    last = list(acts)[-1]
    acts[last][0] = math.nan
    with pytest.raises(ValueError) as e:
        _mfs(backend)(weights, acts, mods, 0.5)
    named = str(e.value).split(":", 1)[1]
    assert "l1.weight" in named and last in named
    assert all(n not in named for n in acts if n not in ("l1.weight", last))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_name_layer(bad, backend):
    weights, acts, mods = _layers()
    weights["l2.weight"][1, 2] = bad
    for method in ("multiflow", "omp", "wanda"):
        with pytest.raises(ValueError, match="l2.weight"):
            _mfs(backend)(weights, acts, mods, 0.5, method)


def test_input_errors_keep_their_order(backend):
    # non-finite weights are named before a check that needs no device work (a missing
    # modality, a missing or misshapen statistic), and those before non-finite statistics
    weights, acts, mods = _layers()
    weights["l2.weight"][0, 0] = math.nan
    acts["l0.weight"][0] = math.inf
    no_l1_mod = {n: m for n, m in mods.items() if n != "l1.weight"}
    for bad_mods, bad_acts in ((no_l1_mod, acts), (mods, {**acts, "l1.weight": torch.ones(3)})):
        with pytest.raises(ValueError, match=r"weights contain NaN/Inf in layers: \['l2.weight'\]"):
            _mfs(backend)(weights, bad_acts, bad_mods, 0.5)
    weights["l2.weight"][0, 0] = 0.0
    with pytest.raises(ValueError, match="no modality given for layers"):
        _mfs(backend)(weights, acts, no_l1_mod, 0.5)
    with pytest.raises(ValueError, match=r"activation statistic has NaN/Inf for layers: \['l0.weight'\]"):
        _mfs(backend)(weights, acts, mods, 0.5)


def test_multiflow_reads_the_device_twice(monkeypatch):
    # Each read of a tensor's value on the host (tolist, item, bool, int, float) waits for
    # the device on CUDA. MULTIFLOW needs two: the input checks, then the prior's counts
    # (every modality's at once) for the ranks; the rest stays queued on the device. The
    # Python code counted here is the CUDA path's (the CUDA ops themselves never wait).
    weights, acts, mods = _layers()
    mods = {**mods, "l1.weight": "fusion"}  # three modalities
    want = multiflow.masks_from_stats(weights, acts, mods, 0.5)
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    got = multiflow.masks_from_stats(weights, acts, mods, 0.5)
    monkeypatch.undo()
    assert reads == ["tolist", "tolist"], reads
    assert all(torch.equal(got[n], want[n]) for n in weights)


def test_other_dtypes_are_accepted(backend):
    weights, acts, mods = _layers()
    ref = _mfs(backend)(weights, acts, mods, 0.6)
    got = _mfs(backend)({n: w.double() for n, w in weights.items()}, {n: a.double() for n, a in acts.items()}, mods, 0.6)
    assert all(torch.equal(ref[n], got[n]) for n in weights)
    half = _mfs(backend)({n: w.half() for n, w in weights.items()}, acts, mods, 0.6)
    assert all(h.shape == w.shape and h.dtype == torch.bool for h, w in zip(half.values(), weights.values()))


def test_missing_statistic_and_unknown_method(backend):
    weights, acts, mods = _layers()
    del acts["l2.weight"]
    with pytest.raises(ValueError, match="l2.weight"):
        _mfs(backend)(weights, acts, mods, 0.5)
    with pytest.raises(ValueError, match="unknown pruning method"):
        _mfs(backend)(weights, None, mods, 0.5, "nope")
    with pytest.raises(ValueError, match="no prunable layers"):
        _mfs(backend)({}, {}, {}, 0.5)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_a_layer_whose_inputs_are_all_zero_is_pruned_whole(backend):
    """a = 0 gives A = |W| sqrt(a) = 0, so every flow score of the layer is 0: all tie at the
    threshold t = kthvalue(S, k_l) = 0 and ties are pruned (DESIGN.md's mask rule)."""
    g = torch.Generator().manual_seed(3)
    weights = {"z": torch.randn(8, 16, generator=g), "o": torch.randn(8, 16, generator=g)}
    acts = {"z": torch.zeros(16), "o": torch.rand(16, generator=g) + 0.1}
    masks = multiflow.masks_from_stats(weights, acts, {"z": "x", "o": "x"}, 0.5, backend=backend)
    assert not masks["z"].any()
    # layer o: its prior count (|W| pooled over the modality, threshold at k = 128) of its
    # lowest flow scores, as usual
    pooled = torch.cat([weights["z"].abs().flatten(), weights["o"].abs().flatten()])
    t = torch.kthvalue(pooled, 128).values
    k_o = int((weights["o"].abs() <= t).sum())
    assert int((~masks["o"]).sum()) == k_o and 0 < k_o < 128
