"""The Triton kernels (multiflow_kernels/triton/) against the plain-torch twins.

Without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1, set below
before any kernel module is imported; multiflow_kernels imports them lazily) on CPU
tensors, so small shapes only. With a GPU they run compiled on CUDA tensors.
The flow kernels must be exact (torch.equal), as the CPU kernels are.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import multiflow_kernels  # noqa: E402, F401
from multiflow_kernels import reference  # noqa: E402
from multiflow_kernels.triton import act_stats as triton_act_stats  # noqa: E402
from multiflow_kernels.triton import flow as triton_flow  # noqa: E402
from test_ops_act_stats import assert_earned, make_mask, random_acc  # noqa: E402
from test_ops_flow import BAD_FLOW_ARGS, BAD_FLOW_IDS, DTYPES, assert_equal_lists, make_layers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_kernels_run_where_this_machine_can():
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(triton_flow._importance_kernel, InterpretedFunction)
    assert interpreted == (DEVICE == "cpu"), "without a GPU the kernels must run under the interpreter"


def check_triton_flow(weights, acts):
    imp_out, imp_in, w_scale = triton_flow.flow_importance_triton(weights, acts)
    ref_out, ref_in, ref_scale = reference.flow_importance(weights, acts)
    assert w_scale.device == weights[0].device and torch.equal(w_scale, ref_scale), f"{w_scale} vs {ref_scale}"
    assert_equal_lists(imp_out, ref_out, "imp_out")
    assert_equal_lists(imp_in, ref_in, "imp_in")
    assert_equal_lists(triton_flow.flow_scores_triton(weights, acts), reference.flow_scores(weights, acts), "scores")


# ----------------------------------------------------------------------------- flow_importance / flow_scores


def test_flow_mixed_shapes_and_dtypes_in_one_launch():
    # 1x1, a row, a column, empty either way, several row tiles (64 rows) and column
    # blocks (128 columns) with ragged edges: all layers through one launch per pass.
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 1), (1, 130), (70, 1), (0, 4), (3, 0), (130, 300), (65, 129)]
    check_triton_flow(*make_layers(shapes, DTYPES, gen, DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flow_one_dtype(dtype):
    gen = torch.Generator().manual_seed(1)
    check_triton_flow(*make_layers([(17, 33), (200, 9)], [dtype], gen, DEVICE))


def test_flow_extreme_scales_zero_statistics_and_layouts():
    gen = torch.Generator().manual_seed(2)
    weights = [
        torch.randn(20, 30, generator=gen) * 1e-10,
        torch.randn(20, 30, generator=gen) * 1e-39,  # subnormal float32 weights
        torch.randn(20, 30, generator=gen) * 1e30,
        torch.randn(20, 30, generator=gen),
        torch.randn(20, 30, generator=gen),
        torch.zeros(6, 7),
        torch.randn(30, 20, generator=gen).t(),  # transposed
        torch.randn(40, 50, generator=gen)[::2, 5:35],  # padded rows
        (torch.randn(20, 30, generator=gen) * 1e-39).bfloat16(),  # bfloat16 subnormals (and a few zeros)
        (torch.randn(20, 30, generator=gen) * 1e-6).half(),  # float16 subnormals
    ]
    acts = [
        torch.rand(30, generator=gen),
        torch.rand(30, generator=gen),
        torch.rand(30, generator=gen) * 1e-40,
        torch.zeros(30),  # all-zero importances (the contract: the layer scores 0)
        -torch.rand(30, generator=gen),  # clamps to zero: the same
        torch.rand(7, generator=gen),
        torch.rand(30, generator=gen),
        torch.rand(30, generator=gen)[::1],
        torch.rand(30, generator=gen),
        torch.rand(30, generator=gen),
    ]
    check_triton_flow([w.to(DEVICE) for w in weights], [a.to(DEVICE) for a in acts])


def test_flow_nan_propagates():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(9, 11, generator=gen)
    w[2, 3] = float("nan")
    a = torch.rand(11, generator=gen)
    a[4] = float("nan")
    check_triton_flow([w.to(DEVICE), torch.randn(4, 11, generator=gen).to(DEVICE)], [torch.rand(11).to(DEVICE), a.to(DEVICE)])


def test_flow_launcher_checks_and_empty_list():
    assert triton_flow.flow_scores_triton([], []) == []
    imp_out, imp_in, w_scale = triton_flow.flow_importance_triton([], [])
    assert imp_out == [] and imp_in == [] and w_scale.shape == (0,)
    with pytest.raises(RuntimeError, match=r"weights and act_sq_norms must have the same length"):
        triton_flow.flow_importance_triton([torch.randn(2, 3, device=DEVICE)], [])
    with pytest.raises(RuntimeError, match=r"act_sq_norms\[0\] must have shape \(in,\) where in = "):
        triton_flow.flow_scores_triton([torch.randn(2, 3, device=DEVICE)], [torch.rand(4, device=DEVICE)])


def test_flow_layout_cache_hits_with_each_calls_pointers():
    # Same shapes, other tensors: the second call reuses the cached layout, fills in its
    # own pointers, and leaves the cached table unwritten (its pointer fields stay 0).
    gen = torch.Generator().manual_seed(5)
    shapes = [(70, 130), (3, 5), (0, 4)]
    triton_flow._layout.cache_clear()
    check_triton_flow(*make_layers(shapes, DTYPES, gen, DEVICE))
    misses = triton_flow._layout.cache_info().misses
    check_triton_flow(*make_layers(shapes, DTYPES, gen, DEVICE))
    info = triton_flow._layout.cache_info()
    assert info.misses == misses and info.hits >= 2, info
    key = ((70, 130, 130, torch.float32), (3, 5, 5, torch.float16), (0, 4, 4, torch.bfloat16))
    layout = triton_flow._layout(key)
    assert triton_flow._layout.cache_info().misses == misses, "the launchers' key is (rows, cols, stride, dtype)"
    rows = layout.table[: layout.n_layers * triton_flow._NF.value].view(layout.n_layers, -1)
    assert not rows[:, : triton_flow._N_POINTERS].any()


def test_flow_layout_cache_keys_do_not_collide_and_are_capped():
    key = ((70, 130, 130, torch.float32), (65, 129, 129, torch.float16))
    other_keys = [
        ((70, 130, 200, torch.float32), (65, 129, 129, torch.float16)),  # another row stride
        ((70, 130, 130, torch.float32), (65, 129, 129, torch.bfloat16)),  # another dtype
        ((65, 129, 129, torch.float16), (70, 130, 130, torch.float32)),  # another order
        ((70, 130, 130, torch.float32),),  # a prefix
    ]
    triton_flow._layout.cache_clear()
    tables = [triton_flow._layout(k).table for k in [key, *other_keys]]
    assert all(not torch.equal(tables[0], t) for t in tables[1:])
    assert triton_flow._layout(key).table is tables[0]  # a hit
    triton_flow._layout.cache_clear()
    assert torch.equal(triton_flow._layout(key).table, tables[0])  # built again: the same table
    cap = triton_flow._LAYOUT_CACHE_SIZE
    for n in range(1, cap + 10):
        triton_flow._layout(((n, 1, 1, torch.float32),))
    assert triton_flow._layout.cache_info().currsize == cap


@pytest.mark.parametrize("launcher", ["flow_importance_triton", "flow_scores_triton"])
@pytest.mark.parametrize("args, match", BAD_FLOW_ARGS, ids=BAD_FLOW_IDS)
def test_flow_launchers_name_the_argument(launcher, args, match):
    # the launchers' plain-Python fast check must send every bad input to the named checks
    # (whose Python messages print shapes and dtypes unlike the C++ ones: up to ", got")
    weights, acts = ([t.to(DEVICE) for t in ts] for ts in args)
    with pytest.raises(RuntimeError, match=match.split(", got")[0]):
        getattr(triton_flow, launcher)(weights, acts)


# ----------------------------------------------------------------------------- sq_sum_accumulate_ (not registered)


@pytest.mark.parametrize("mask_kind", ["none", "random", "all_false"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_act_stats_matches_reference(dtype, mask_kind):
    gen = torch.Generator().manual_seed(4)
    for leading, n_features in [((1,), 1), ((3, 7), 33), ((2, 5), 130)]:
        x = torch.randn(*leading, n_features, generator=gen).to(dtype).to(DEVICE)
        mask = make_mask(mask_kind, leading, gen, DEVICE)
        acc_in = random_acc(n_features, gen, DEVICE)
        acc = acc_in.clone()
        assert triton_act_stats.sq_sum_accumulate_triton(acc, x, mask) is None
        assert_earned(acc_in, x, mask, acc)
        if mask_kind == "all_false":
            assert torch.equal(acc, acc_in)


def test_act_stats_several_chunks_layouts_and_edge_cases():
    gen = torch.Generator().manual_seed(5)
    # 1100 tokens: 3 chunks of 512 (partial buffer + second kernel); strided features.
    x = torch.randn(1100, 40, generator=gen)[:, ::2].to(DEVICE)
    mask = make_mask("random", (1100,), gen, DEVICE)
    acc_in = random_acc(20, gen, DEVICE)
    acc = acc_in.clone()
    triton_act_stats.sq_sum_accumulate_triton(acc, x, mask)
    assert_earned(acc_in, x, mask, acc)
    # 1-D x is one token; no tokens and no features are no-ops.
    x1 = torch.randn(9, generator=gen).to(DEVICE)
    acc = acc_in[:9].clone()
    triton_act_stats.sq_sum_accumulate_triton(acc, x1)
    assert_earned(acc_in[:9], x1, None, acc)
    acc = acc_in.clone()
    triton_act_stats.sq_sum_accumulate_triton(acc, torch.randn(0, 20, device=DEVICE))
    assert torch.equal(acc, acc_in)
    triton_act_stats.sq_sum_accumulate_triton(torch.zeros(0, device=DEVICE), torch.randn(3, 0, device=DEVICE))
    with pytest.raises(RuntimeError, match=r"acc must have shape \(F,\)"):
        triton_act_stats.sq_sum_accumulate_triton(torch.zeros(7, device=DEVICE), torch.randn(3, 8, device=DEVICE))
