"""Pruning methods: a score rule plus how the sparsity budget is allocated.

A method is a small scoring function registered with :func:`register_method`; everything
else (thresholds, the tie rule, the modality prior, N:M) is shared machinery. Allocations:

``modality_prior``  per-layer sparsity from the multimodal magnitude prior (MULTIFLOW)
``global``          one threshold over the scores of every prunable layer (OMP, L2, LAMP, SNIP)
``layer``           every layer pruned to the target sparsity (layer-wise magnitude, random)
``row``             every output row pruned to the target sparsity (Wanda)
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from . import scores
from .prior import modality_prior
from .selection import check_sparsity, get_impl, kth_smallest, nm_mask, threshold_mask

__all__ = ["Method", "METHODS", "register_method", "get_method", "masks_from_stats", "compute_masks"]

ALLOCATIONS = ("modality_prior", "global", "layer", "row")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Method:
    """A pruning method: ``score(w, a=..., grad=..., generator=..., impl=...) -> Tensor`` and an
    allocation. ``fused(weights, acts, ks, impl) -> masks`` optionally selects the ``ks[l]``
    lowest scores of every layer without writing the scores out."""

    name: str
    score: Callable[..., torch.Tensor]
    allocation: str
    needs_activations: bool = False
    needs_gradients: bool = False
    fused: Optional[Callable[..., list]] = None


METHODS: dict[str, Method] = {}


def register_method(name: str, allocation: str, *, activations: bool = False, gradients: bool = False,
                    fused: Optional[Callable[..., list]] = None):
    """Decorator registering a scoring function as pruning method ``name``."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")

    def wrap(fn):
        METHODS[name] = Method(name, fn, allocation, activations, gradients, fused)
        return fn

    return wrap


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {sorted(METHODS)}") from None


def _multiflow_fused(weights, acts, ks, impl):
    # node importances once, then the k-th flow score and the masks with the scores
    # computed on the fly (never materialised)
    imp_out, imp_in, w_scale = impl.flow_importance(weights, acts)
    thresholds = impl.flow_kth_each(weights, imp_out, imp_in, w_scale, ks)
    return impl.flow_masks(weights, imp_out, imp_in, w_scale, thresholds)


@register_method("multiflow", "modality_prior", activations=True, fused=_multiflow_fused)
def _multiflow(w, a, impl, **_):
    return impl.flow_scores([w], [a])[0]


@register_method("omp", "global")
def _omp(w, **_):
    return scores.magnitude_scores(w)


@register_method("layer_magnitude", "layer")
def _layer_magnitude(w, **_):
    return scores.magnitude_scores(w)


@register_method("l2", "global")
def _l2(w, **_):
    return scores.l2_normalised_scores(w)


@register_method("lamp", "global")
def _lamp(w, **_):
    return scores.lamp_scores(w)


@register_method("random", "layer")
def _random(w, generator, **_):
    return scores.random_scores(w, generator)


@register_method("snip", "global", gradients=True)
def _snip(w, grad, **_):
    return scores.snip_scores(w, grad)


@register_method("wanda", "row", activations=True)
def _wanda(w, a, **_):
    return scores.wanda_scores(w, a)


def _layer_generator(seed: int, name: str) -> torch.Generator:
    # seeded from the layer's name, so a layer's random scores do not depend on the others
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _layer_groups(weights: Mapping[str, torch.Tensor], max_elements: int) -> list[list[str]]:
    """Consecutive layers in groups of at most ``max_elements`` weights (one layer at least)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, w in weights.items():
        if groups[-1] and size + w.numel() > max_elements:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += w.numel()
    return groups


def _on(device: torch.device, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` on ``device`` (the list itself when they are all there already: a
    ``.to`` per layer costs host time even when it moves nothing)."""
    if all(t.device == device for t in tensors):
        return tensors
    return [t.to(device) for t in tensors]


def _check_names_and_shapes(weights, act_sq_norms, modalities, method: Method) -> None:
    """The checks of :func:`_check_inputs` that need no device work, in their order."""
    missing_mod = [n for n in weights if n not in modalities]
    if missing_mod:
        raise ValueError(f"no modality given for layers: {missing_mod}")
    if method.needs_activations:
        if act_sq_norms is None:
            raise ValueError(f"method {method.name!r} needs activation statistics (act_sq_norms)")
        missing = [n for n in weights if n not in act_sq_norms]
        if missing:
            raise ValueError(f"no activation statistic for layers: {missing}")
        shape = [n for n in weights if act_sq_norms[n].shape != (weights[n].shape[1],)]
        if shape:
            raise ValueError(
                "activation statistic must have length in_features; wrong for layers: "
                + ", ".join(f"{n} ({tuple(act_sq_norms[n].shape)} vs in_features {weights[n].shape[1]})" for n in shape)
            )


def _raise_if_nonfinite_weights(weights, finite: list[bool]) -> None:
    nonfinite_w = [n for n, ok in zip(weights, finite) if not ok]
    if nonfinite_w:
        raise ValueError(f"weights contain NaN/Inf in layers: {nonfinite_w}")


def _check_inputs(weights, act_sq_norms, modalities, grads, method: Method) -> None:
    """Raise ValueError naming the layers of the first failed check: 2-D weights, finite
    weights, a modality per layer, activation statistics (present, of length in_features,
    finite) and gradients where the method needs them.

    The finiteness checks run on the weights' device and are read back together: each
    read makes the host wait for the device, so one read, not one per check. When a
    check that needs no device work fails, the weights' finiteness is read first, so
    that the errors keep the order above."""
    if not weights:
        raise ValueError("no prunable layers: the weights mapping is empty")
    bad = [n for n, w in weights.items() if w.dim() != 2]
    if bad:
        raise ValueError(f"weights must be 2-D (out x in); not 2-D: {bad}")
    first = next(iter(weights.values())).device
    with torch.no_grad():
        # a NaN or Inf anywhere makes a layer's float32 L1 norm non-finite: one
        # multi-tensor reduction (a few launches, not one per layer: 171 on BLIP-base)
        norms = torch._foreach_norm(list(weights.values()), 1, dtype=torch.float32)
        finite = [torch.isfinite(torch.stack(_on(first, norms)))]
        try:
            _check_names_and_shapes(weights, act_sq_norms, modalities, method)
        except ValueError:
            _raise_if_nonfinite_weights(weights, finite[0].tolist())
            raise
        if method.needs_activations:
            # all statistics at once (three launches, not two a layer); the layers are
            # named only when one is bad
            stats = _on(first, [act_sq_norms[n] for n in weights])
            finite.append(torch.isfinite(torch.cat(stats)).all().reshape(1))
        ok = torch.cat(finite).tolist()
    _raise_if_nonfinite_weights(weights, ok[: len(weights)])
    if method.needs_activations and not ok[-1]:
        nonfinite = [n for n, s in zip(weights, stats) if not bool(torch.isfinite(s).all())]
        raise ValueError(f"activation statistic has NaN/Inf for layers: {nonfinite}")
    if method.needs_gradients:
        if grads is None:
            raise ValueError(f"method {method.name!r} needs gradients (grads)")
        missing = [n for n in weights if n not in grads]
        if missing:
            raise ValueError(f"no gradient for layers: {missing}")


def compute_masks(
    weights: Mapping[str, torch.Tensor],
    act_sq_norms: Optional[Mapping[str, torch.Tensor]],
    modalities: Mapping[str, str],
    sparsity: Optional[float],
    method: str = "multiflow",
    *,
    nm: Optional[tuple[int, int]] = None,
    grads: Optional[Mapping[str, torch.Tensor]] = None,
    seed: int = 0,
    backend: str = "kernels",
    max_group_elements: int = 1 << 26,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Masks plus the per-layer sparsity each layer was allocated (the prior, for MULTIFLOW).

    ``backend="reference"`` runs the plain-torch twins instead of our kernels (same masks).
    Layers are processed in groups of at most ``max_group_elements`` weights (at least one
    layer per group), so per-layer temporaries never exist for the whole model at once.
    """
    m = get_method(method)
    impl = get_impl(backend)
    # the kernels take float32/float16/bfloat16 weights and float32 statistics
    weights = {n: w if w.dtype in _KERNEL_DTYPES else w.float() for n, w in weights.items()}
    if act_sq_norms is not None:
        act_sq_norms = {n: a.detach().float() for n, a in act_sq_norms.items()}
    if nm is not None:
        n_keep, group = (int(v) for v in nm)
        if not (0 < n_keep <= group):
            raise ValueError(f"nm must be (N, M) with 0 < N <= M, got {nm}")
    if sparsity is None:
        if nm is None:
            raise ValueError("sparsity is required unless nm is given")
    else:
        sparsity = check_sparsity(sparsity)
    _check_inputs(weights, act_sq_norms, modalities, grads, m)

    def score_of(name: str) -> torch.Tensor:
        return m.score(
            weights[name].detach(),
            a=None if act_sq_norms is None else act_sq_norms.get(name),
            grad=None if grads is None else grads.get(name),
            generator=_layer_generator(seed, name),
            impl=impl,
        )

    masks: dict[str, torch.Tensor] = {}
    if nm is not None:
        bad = [f"{n} (in_features {w.shape[1]})" for n, w in weights.items() if w.shape[1] % group]
        if bad:
            raise ValueError(f"{n_keep}:{group} masks need in_features divisible by {group}; not so for: {bad}")
        for name in weights:
            masks[name] = nm_mask(score_of(name), n_keep, group, impl=impl)
        return masks, {name: 1.0 - n_keep / group for name in weights}

    if m.allocation in ("modality_prior", "layer"):
        if m.allocation == "modality_prior":
            allocated = modality_prior(weights, modalities, sparsity, impl=impl)
        else:
            allocated = {name: sparsity for name in weights}
        if m.allocation == "modality_prior":
            # s_l = c_l / numel with c_l an integer count; (c_l / numel) * numel can come out a
            # hair under c_l in floating point, and int() would then prune one weight fewer
            # than the prior's count: round it instead (exact: the error is far below 0.5)
            ks = {name: round(allocated[name] * w.numel()) for name, w in weights.items()}
        else:
            ks = {name: int(allocated[name] * w.numel()) for name, w in weights.items()}
        for names in _layer_groups(weights, max_group_elements):
            if m.fused is not None:
                got = m.fused([weights[n].detach() for n in names], [act_sq_norms[n] for n in names],
                              [ks[n] for n in names], impl)
                masks.update(zip(names, got))
            else:
                for name in names:
                    masks[name] = threshold_mask(score_of(name), ks[name], impl=impl)
    elif m.allocation == "row":
        allocated = {name: sparsity for name in weights}
        for name, w in weights.items():
            s = score_of(name)
            k = int(sparsity * w.shape[1])
            if k < 1:
                masks[name] = torch.ones(w.shape, dtype=torch.bool, device=w.device)
            else:
                t = torch.kthvalue(s, k, dim=1, keepdim=True).values
                masks[name] = s > t
    else:  # global
        all_scores = {name: score_of(name) for name in weights}
        k = int(sparsity * sum(w.numel() for w in weights.values()))
        if k < 1:
            masks = {n: torch.ones(s.shape, dtype=torch.bool, device=s.device) for n, s in all_scores.items()}
        else:
            t = kth_smallest(list(all_scores.values()), k, impl=impl)
            masks = {n: s > t for n, s in all_scores.items()}
        allocated = {n: 1.0 - float(mk.float().mean()) for n, mk in masks.items()}
    return masks, allocated


def masks_from_stats(
    weights: Mapping[str, torch.Tensor],
    act_sq_norms: Optional[Mapping[str, torch.Tensor]],
    modalities: Mapping[str, str],
    sparsity: Optional[float],
    method: str = "multiflow",
    *,
    nm: Optional[tuple[int, int]] = None,
    grads: Optional[Mapping[str, torch.Tensor]] = None,
    seed: int = 0,
    backend: str = "kernels",
) -> dict[str, torch.Tensor]:
    """Keep-masks (True = kept) for every layer in ``weights``: the pure function behind
    :meth:`multiflow.Pruner.masks`.

    Args:
        weights: name -> 2-D weight (out x in).
        act_sq_norms: name -> float32 activation statistic ``a`` (length in_features) of
            DESIGN.md; needed by ``multiflow`` and ``wanda``.
        modalities: name -> modality string; the prior pools layers per modality.
        sparsity: target fraction of pruned weights in [0, 1); ignored when ``nm`` is given.
        method: one of ``multiflow.METHODS``.
        nm: ``(N, M)`` for N:M masks (keep the N best of every M consecutive inputs).
        grads: name -> accumulated gradient (``snip``).
        seed: seed of the ``random`` method.
        backend: ``"kernels"`` (multiflow_kernels ops) or ``"reference"`` (their plain-torch
            twins); both give the same masks.
    """
    return compute_masks(
        weights, act_sq_norms, modalities, sparsity, method, nm=nm, grads=grads, seed=seed, backend=backend
    )[0]
