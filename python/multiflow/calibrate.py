"""``Pruner``: streaming calibration with forward hooks, then masks at any sparsity.

Calibration adds, per prunable layer, the float32 sum of squares of its input features over
the non-padding tokens, and counts the samples (batch items) that reached the layer; no
layer input is stored. ``a_j = sum_sq_j / samples`` is the statistic of DESIGN.md.
"""
from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Mapping
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .masks import Masks
from .models import ModelAdapter, get_adapter, move_batch
from .pruners import compute_masks, get_method

__all__ = ["Pruner", "prune"]


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    total = len(iterable) if hasattr(iterable, "__len__") else None
    return tqdm(iterable, desc=desc, total=total, unit="batch", leave=False)


def _all_reduce_stats(layers, sums, samples, tokens, grads, gradients, n_batches, n_samples):
    """Sum one calibration call's statistics over the ranks, in place; returns the global
    batch and sample counts. Three collectives in all: counts, sums, gradients."""
    dist = torch.distributed
    on_gpu = dist.get_backend() == "nccl"
    comm = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    names = list(layers)
    counts = torch.tensor([n_batches, n_samples] + [samples[n] for n in names], dtype=torch.int64, device=comm)
    counts = torch.cat([counts, torch.stack([tokens[n].to(comm) for n in names])])
    dist.all_reduce(counts)
    flat = torch.cat([sums[n].to(comm) for n in names])
    dist.all_reduce(flat)
    for n, part in zip(names, flat.split([sums[n].numel() for n in names])):
        sums[n] = part.to(sums[n].device)
    counts = counts.tolist()
    for i, n in enumerate(names):
        samples[n] = counts[2 + i]
        tokens[n] = torch.tensor(counts[2 + len(names) + i])
    if gradients:
        for n in names:  # a rank that ran no batch contributes zeros
            g = grads.get(n)
            g = torch.zeros_like(layers[n].weight, dtype=torch.float32) if g is None else g
            g = g.to(comm)
            dist.all_reduce(g)
            grads[n] = g.to(layers[n].weight.device)
    return counts[0], counts[1]


def _excluded(name: str, patterns: Sequence[str]) -> bool:
    module_name = name.rsplit(".", 1)[0]
    return any(
        fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module_name, p) or name.startswith(p + ".") or name == p
        for p in patterns
    )


class Pruner:
    """Calibrate once, ask for masks at many sparsities.

    Args:
        model: the model to prune; its weights are never changed.
        method: a name from ``multiflow.METHODS`` (``multiflow``, ``omp``, ``layer_magnitude``,
            ``l2``, ``lamp``, ``random``, ``snip``, ``wanda``).
        modality_fn: ``param_name -> modality | None`` (None = not prunable); defaults to the
            model adapter's (BLIP: vision / text).
        forward_fn: ``(model, batch) -> output``, the calibration forward; defaults to the
            adapter's.
        loss_fn: ``(model, batch) -> scalar`` for ``snip``; defaults to the adapter's.
        exclude: parameter or module names / glob patterns never pruned.
        seed: seed of the ``random`` method.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "multiflow",
        *,
        modality_fn: Optional[Callable[[str], Optional[str]]] = None,
        forward_fn: Optional[Callable] = None,
        loss_fn: Optional[Callable] = None,
        exclude: Optional[Iterable[str]] = None,
        seed: int = 0,
    ):
        self.model = model
        self.method = get_method(method).name
        self.adapter: ModelAdapter = get_adapter(model)
        self.modality_fn = modality_fn or self.adapter.modality
        self.forward_fn = forward_fn or self.adapter.forward
        self.loss_fn = loss_fn or self.adapter.loss
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
        self.seed = seed

        self.layers: dict[str, nn.Linear] = {}
        self.modalities: dict[str, str] = {}
        for mod_name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            pname = f"{mod_name}.weight" if mod_name else "weight"
            if _excluded(pname, self.exclude):
                continue
            modality = self.modality_fn(pname)
            if modality is None:
                continue
            self.layers[pname] = module
            self.modalities[pname] = str(modality)
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no prunable layers (nn.Linear weights with a modality, "
                f"not excluded by {self.exclude})"
            )
        self.sq_sums: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {n: 0 for n in self.layers}
        self.tokens: dict[str, int] = {n: 0 for n in self.layers}
        self.grads: dict[str, torch.Tensor] = {}
        # whether the activation statistics came from the loss passes of a gradient method
        # (snip: every sample twice, with shifted negatives): not MULTIFLOW's / Wanda's statistic
        self._stats_from_loss = False
        self.calibration_samples = 0
        self.calibration_seconds = 0.0

    # ------------------------------------------------------------------ calibration
    def calibrate(
        self,
        batches: Iterable,
        progress: bool = True,
        *,
        gradients: Optional[bool] = None,
        distributed: Optional[bool] = None,
    ) -> "Pruner":
        """Run the model on ``batches`` and accumulate the activation statistics (and, for
        gradient-based methods, the gradients). May be called several times: statistics add up.

        The statistics of one call are merged only when the whole call succeeds, and every
        hook is removed, also when an exception is raised mid-way.

        Distributed (default: whenever ``torch.distributed`` is initialised): every rank
        iterates the same ``batches`` and runs batch ``i`` when ``i % world_size == rank``;
        the sums, counts and gradients are all-reduced once at the end of the call, so every
        rank ends with the same statistics, and the same masks. Float sums are added in
        another order than in one process, so they agree with a single-process run up to
        float32 rounding.
        """
        from multiflow_kernels.ops import sq_sum_accumulate_

        if gradients is None:
            gradients = get_method(self.method).needs_gradients
        dist = torch.distributed
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized()
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("calibrate(distributed=True) needs torch.distributed.init_process_group() first")
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        device = next(iter(self.layers.values())).weight.device
        sums = {n: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device) for n, m in self.layers.items()}
        samples = {n: 0 for n in self.layers}
        # token counts stay on the device during the pass (no host sync per hook call)
        tokens = {n: torch.zeros((), dtype=torch.int64, device=m.weight.device) for n, m in self.layers.items()}
        grads: dict[str, torch.Tensor] = {}
        state: dict[str, Optional[torch.Tensor]] = {"attention_mask": None}

        def make_hook(name: str, keep_all: bool):
            def hook(module, args, output):
                x = args[0] if args else None
                if not isinstance(x, torch.Tensor):
                    return
                x = x.detach()
                if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    x = x.float()  # e.g. a float64 model: the statistic is float32 anyway
                token_mask = None
                am = state["attention_mask"]
                if not keep_all and am is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(am.shape):
                    token_mask = am
                sq_sum_accumulate_(sums[name], x, token_mask)
                samples[name] += int(x.shape[0]) if x.dim() >= 2 else 1
                if token_mask is not None:
                    tokens[name] += token_mask.sum()
                else:
                    tokens[name] += x.numel() // max(x.shape[-1], 1) if x.dim() else 0

            return hook

        handles = [
            module.register_forward_hook(make_hook(name, self.adapter.keeps_all_tokens(name)))
            for name, module in self.layers.items()
        ]
        was_training = self.model.training
        requires_grad = {n: m.weight.requires_grad for n, m in self.layers.items()}
        n_batches = 0
        n_samples = 0
        t0 = time.perf_counter()
        try:
            self.model.eval()
            for index, batch in enumerate(_progress(batches, progress and rank == 0, "calibrating")):
                if index % world != rank:
                    continue
                batch = move_batch(batch, device)
                am = self.adapter.text_attention_mask(batch)
                state["attention_mask"] = None if am is None else am.to(device).bool()
                if gradients:
                    for m in self.layers.values():
                        m.weight.requires_grad_(True)
                    with torch.enable_grad():
                        loss = self.loss_fn(self.model, batch)
                        weights = [m.weight for m in self.layers.values()]
                        gs = torch.autograd.grad(loss, weights, allow_unused=True)
                    for name, g in zip(self.layers, gs):
                        if g is not None:
                            g = g.detach().float()
                            grads[name] = grads[name] + g if name in grads else g
                else:
                    with torch.no_grad():
                        self.forward_fn(self.model, batch)
                n_batches += 1
                n_samples += self.adapter.batch_size(batch)
        finally:
            for h in handles:
                h.remove()
            for n, m in self.layers.items():
                m.weight.requires_grad_(requires_grad[n])
            self.model.train(was_training)
            state["attention_mask"] = None
        if distributed:
            n_batches, n_samples = _all_reduce_stats(self.layers, sums, samples, tokens, grads, gradients,
                                                     n_batches, n_samples)
        if n_batches == 0:
            raise ValueError("calibrate() got no batches: pass at least one batch")
        nonfinite = [n for n, s in sums.items() if not bool(torch.isfinite(s).all())]
        if nonfinite:
            # a NaN / Inf weight upstream is the usual cause: name those layers first
            bad_weights = [n for n, m in self.layers.items() if not bool(torch.isfinite(m.weight).all())]
            cause = f"the weights of layers {bad_weights} contain NaN/Inf; " if bad_weights else ""
            raise ValueError(f"{cause}NaN/Inf in the activations of layers: {nonfinite}")
        # merge only now: a failed call leaves earlier statistics untouched
        for n in self.layers:
            self.sq_sums[n] = self.sq_sums[n] + sums[n] if n in self.sq_sums else sums[n]
            self.samples[n] += samples[n]
            self.tokens[n] += int(tokens[n])
        for n, g in grads.items():
            self.grads[n] = self.grads[n] + g if n in self.grads else g
        self.calibration_samples += n_samples
        self.calibration_seconds += time.perf_counter() - t0
        self._stats_from_loss = self._stats_from_loss or gradients
        if get_method(self.method).needs_activations:
            self._check_all_layers_seen()
        return self

    def _check_all_layers_seen(self) -> None:
        unseen = [n for n in self.layers if self.tokens[n] == 0]
        if unseen:
            raise ValueError(
                f"these prunable layers saw no tokens during calibration: {unseen} (is the forward "
                "reaching them? exclude=... leaves them out; the statistics gathered so far are kept)"
            )

    @property
    def act_sq_norms(self) -> dict[str, torch.Tensor]:
        """Layer -> ``a = sum of squares / samples`` (float32, length in_features)."""
        return {n: self.sq_sums[n] / self.samples[n] for n in self.layers if n in self.sq_sums and self.samples[n] > 0}

    # ------------------------------------------------------------------ masks
    def masks(
        self,
        sparsity: Optional[float] = None,
        *,
        nm: Optional[tuple[int, int]] = None,
        method: Optional[str] = None,
    ) -> Masks:
        """Keep-masks at ``sparsity`` (or N:M with ``nm=(2, 4)``) for every prunable layer."""
        m = get_method(method or self.method)
        weights = {n: mod.weight.detach() for n, mod in self.layers.items()}
        act = None
        if m.needs_activations:
            if self.calibration_samples == 0:
                raise ValueError(f"method {m.name!r} needs calibration: call calibrate(batches) first")
            if self._stats_from_loss:
                raise ValueError(
                    f"method {m.name!r} needs the activation statistic of plain forward passes, but this Pruner "
                    f"calibrated with {self.method!r}'s loss passes (each sample twice, with shifted negatives): "
                    f"calibrate a Pruner(model, {m.name!r}) for it")
            self._check_all_layers_seen()
            act = self.act_sq_norms
        if m.needs_gradients:
            if not self.grads:
                raise ValueError(f"method {m.name!r} needs gradients: call calibrate(batches) first")
            unseen = [n for n in self.layers if n not in self.grads]
            if unseen:
                raise ValueError(f"these prunable layers got no gradient during calibration: {unseen}")
        t0 = time.perf_counter()
        masks, allocated = compute_masks(
            weights, act, self.modalities, sparsity, m.name, nm=nm, grads=self.grads or None, seed=self.seed
        )
        seconds = time.perf_counter() - t0
        masks = {n: mk.cpu() for n, mk in masks.items()}
        metadata = {
            "method": m.name,
            # N:M masks prune exactly 1 - N / M whatever `sparsity` says (it is ignored then)
            "sparsity": 1.0 - nm[0] / nm[1] if nm is not None else None if sparsity is None else float(sparsity),
            "nm": [int(v) for v in nm] if nm is not None else None,
            "modalities": dict(self.modalities),
            "allocated_sparsity": allocated,
            "calibration_samples": self.calibration_samples,
            "model_class": type(self.model).__name__,
            "timings": {"calibration_s": self.calibration_seconds, "masks_s": seconds},
        }
        out = Masks(masks, metadata)
        out.metadata["layer_sparsity"] = out.layer_sparsity()
        out.metadata["modality_sparsity"] = out.modality_sparsity()
        return out


def prune(
    model: nn.Module,
    batches: Iterable,
    sparsity: Optional[float],
    method: str = "multiflow",
    *,
    nm: Optional[tuple[int, int]] = None,
    progress: bool = True,
    **kw,
) -> Masks:
    """Calibrate ``model`` on ``batches`` and return its masks at ``sparsity``.

    Shorthand for ``Pruner(model, method, **kw).calibrate(batches).masks(sparsity)``.
    Data-free methods (omp, layer_magnitude, l2, lamp, random) skip the calibration pass.
    """
    pruner = Pruner(model, method, **kw)
    m = get_method(method)
    if sparsity is not None:
        from .selection import check_sparsity

        check_sparsity(sparsity)
    if m.needs_activations or m.needs_gradients:
        pruner.calibrate(batches, progress=progress)
    return pruner.masks(sparsity, nm=nm)
