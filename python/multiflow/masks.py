"""``Masks``: the result of pruning, a mapping parameter name -> keep-mask (True = kept).

Saved with safetensors; the metadata (method, target sparsity, per-layer and per-modality
sparsity, modalities, calibration sample count) is stored as JSON under the ``multiflow``
metadata key. Files are written atomically (temporary file in the same folder, then rename).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from multiflow_kernels._io import atomic_write

__all__ = ["Masks", "atomic_write", "check_fit", "read_torch_file"]

_META_KEY = "multiflow"
FORMAT_VERSION = 1


def read_torch_file(path: str | os.PathLike, what: str):
    """``torch.load`` (CPU, weights only) with one-line errors naming ``what`` the file is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from None


def check_fit(masks: Mapping[str, torch.Tensor], model: torch.nn.Module, *, what: str = "mask set") -> None:
    """Raise ValueError when masks name parameters the model lacks or whose shapes differ;
    the message lists those and the model's prunable parameters the masks do not cover."""
    params = dict(model.named_parameters())
    extra = [n for n in masks if n not in params]
    shaped = [
        f"{n} (mask {tuple(masks[n].shape)} vs parameter {tuple(params[n].shape)})"
        for n in masks
        if n in params and tuple(masks[n].shape) != tuple(params[n].shape)
    ]
    if extra or shaped:
        from .models import get_adapter

        missing = [n for n, _ in get_adapter(model).prunable_parameters(model) if n not in masks]
        parts = []
        if extra:
            parts.append(f"not in the model: {extra[:20]}{' ...' if len(extra) > 20 else ''} ({len(extra)} names)")
        if shaped:
            parts.append(f"mis-shaped: {shaped[:20]}{' ...' if len(shaped) > 20 else ''}")
        if missing:
            parts.append(f"prunable in the model but missing from the masks: {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''} ({len(missing)} names)")
        raise ValueError(f"{what} does not fit {type(model).__name__}: " + "; ".join(parts))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# The metadata fields Masks and the CLI read, with the type each must have when present (None
# is allowed for each): a file whose JSON is valid but holds other types is refused by name.
_METADATA_TYPES = {
    "method": (lambda v: isinstance(v, str), "a string"),
    "model": (lambda v: isinstance(v, str), "a string"),
    "model_class": (lambda v: isinstance(v, str), "a string"),
    "task": (lambda v: isinstance(v, str), "a string"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "sparsity": (_is_number, "a number"),
    "calibration_samples": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "nm": (lambda v: isinstance(v, list) and len(v) == 2
           and all(_is_number(x) and float(x).is_integer() for x in v), "a list of two integers [n, m]"),
    "modalities": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                   "an object of layer name -> modality name"),
    "layer_sparsity": (lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
                       "an object of layer name -> number"),
    "allocated_sparsity": (lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
                           "an object of layer name -> number"),
    "modality_sparsity": (lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
                          "an object of modality name -> number"),
}


def _check_metadata_types(path: Path, meta: dict, what: str = "") -> None:
    """ValueError naming the first metadata field whose value has the wrong type (``what``:
    "cannot save" when saving, so that no file is written that load would refuse)."""
    for key, (ok, want) in _METADATA_TYPES.items():
        v = meta.get(key)
        if v is not None and not ok(v):
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            head = f"{what} mask file {path}: metadata" if what else f"mask file {path} has corrupt metadata:"
            raise ValueError(f"{head} '{key}' must be {want}, got {type(v).__name__} {shown}")


class Masks(Mapping):
    """Parameter name -> boolean keep-mask, plus ``metadata``.

    ``metadata`` keys written by :class:`multiflow.Pruner`: ``method``, ``sparsity`` (target),
    ``nm``, ``layer_sparsity`` (name -> achieved), ``modality_sparsity`` (modality ->
    achieved), ``allocated_sparsity`` (name -> the sparsity the method allocated, the prior
    for MULTIFLOW), ``modalities`` (name -> modality), ``calibration_samples``.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor], metadata: Optional[dict[str, Any]] = None):
        bad = [n for n, m in masks.items() if not isinstance(m, torch.Tensor) or m.dtype != torch.bool]
        if bad:
            raise ValueError(f"masks must be boolean tensors; not boolean: {bad[:20]}")
        self._masks = dict(masks)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.report: Optional[dict[str, list[str]]] = None

    # Mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return (
            f"Masks({len(self)} layers, method={self.metadata.get('method')!r}, "
            f"sparsity={self.sparsity:.4f})"
        )

    # Statistics
    @property
    def sparsity(self) -> float:
        """Achieved fraction of pruned weights over all masked parameters."""
        total = sum(m.numel() for m in self._masks.values())
        kept = sum(int(m.sum()) for m in self._masks.values())
        return 1.0 - kept / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - float(m.float().mean()) if m.numel() else 0.0 for n, m in self._masks.items()}

    def modality_sparsity(self) -> dict[str, float]:
        modalities = self.metadata.get("modalities") or {}
        totals: dict[str, list[int]] = {}
        for n, m in self._masks.items():
            t = totals.setdefault(modalities.get(n, "?"), [0, 0])
            t[0] += m.numel()
            t[1] += int(m.sum())
        return {k: 1.0 - kept / n if n else 0.0 for k, (n, kept) in totals.items()}

    def summary(self, *, layers: bool = True) -> str:
        """A readable table: per modality, then per layer, then the total."""
        meta = self.metadata
        modalities = meta.get("modalities") or {}
        allocated = meta.get("allocated_sparsity") or {}
        lines = []
        head = f"method={meta.get('method', '?')}"
        if meta.get("nm"):
            head += f"  nm={meta['nm'][0]}:{meta['nm'][1]}"
        if meta.get("sparsity") is not None:
            head += f"  target sparsity={meta['sparsity']:.4f}"
        if meta.get("calibration_samples") is not None:
            head += f"  calibration samples={meta['calibration_samples']}"
        lines.append(head)
        lines.append("")
        counts: dict[str, list[int]] = {}
        for n, m in self._masks.items():
            c = counts.setdefault(modalities.get(n, "?"), [0, 0, 0])
            c[0] += 1
            c[1] += m.numel()
            c[2] += int(m.sum())
        lines.append(f"{'modality':<12} {'layers':>6} {'params':>12} {'kept':>12} {'sparsity':>9}")
        for mod, (nl, total, kept) in counts.items():
            lines.append(f"{mod:<12} {nl:>6} {total:>12,} {kept:>12,} {1 - kept / max(total, 1):>9.4f}")
        total = sum(c[1] for c in counts.values())
        kept = sum(c[2] for c in counts.values())
        lines.append(f"{'total':<12} {len(self):>6} {total:>12,} {kept:>12,} {1 - kept / max(total, 1):>9.4f}")
        if layers:
            width = max([len(n) for n in self._masks] + [5])
            lines.append("")
            lines.append(f"{'layer':<{width}} {'modality':<10} {'shape':>12} {'allocated':>9} {'sparsity':>9}")
            for n, m in self._masks.items():
                shape = "x".join(str(d) for d in m.shape)
                alloc = allocated.get(n)
                alloc_s = f"{alloc:>9.4f}" if alloc is not None else f"{'-':>9}"
                sp = 1.0 - float(m.float().mean()) if m.numel() else 0.0
                lines.append(f"{n:<{width}} {modalities.get(n, '?'):<10} {shape:>12} {alloc_s} {sp:>9.4f}")
        return "\n".join(lines)

    # Files
    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (atomically) with the metadata as JSON."""
        from safetensors.torch import save_file

        meta = dict(self.metadata)
        _check_metadata_types(Path(path), meta, "cannot save")
        meta["format_version"] = FORMAT_VERSION
        meta["names"] = list(self._masks)  # safetensors sorts keys; keep the model order
        tensors = {n: m.detach().to("cpu").contiguous() for n, m in self._masks.items()}
        header = {_META_KEY: json.dumps(meta)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Masks":
        """Read a mask file written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"mask file not found: {path}")
        if path.is_dir():
            raise ValueError(f"mask file is a folder, not a file: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several error types for bad files
            raise ValueError(f"cannot read mask file {path}: not a valid safetensors file ({e})") from None
        if _META_KEY not in header:
            raise ValueError(f"{path} is not a multiflow mask file: its metadata has no '{_META_KEY}' entry")
        try:
            meta = json.loads(header[_META_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"mask file {path} has corrupt metadata: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"mask file {path} has corrupt metadata: '{_META_KEY}' holds a "
                             f"{type(meta).__name__}, not an object")
        bad = [k for k, t in tensors.items() if t.dtype != torch.bool]
        if bad:
            raise ValueError(f"mask file {path} holds non-boolean tensors: {bad[:20]}")
        _check_metadata_types(path, meta)
        meta.pop("format_version", None)
        order = meta.pop("names", None)
        if isinstance(order, list) and sorted(order) == sorted(tensors):
            tensors = {n: tensors[n] for n in order}
        return cls(tensors, meta)

    # Models
    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Zero the pruned weights of ``model`` in place; returns the model."""
        check_fit(self._masks, model)
        params = dict(model.named_parameters())
        for n, m in self._masks.items():
            p = params[n]
            p.masked_fill_(~m.to(p.device), 0)  # not a multiply: NaN/Inf at pruned places become 0 too
        return model

    def for_model(self, model: torch.nn.Module) -> "Masks":
        """Keep the masks whose names and shapes exist in ``model`` (e.g. masks computed on
        BlipForImageTextRetrieval used on BlipForQuestionAnswering).

        The returned object's ``report`` lists ``matched``, ``unmatched`` (not in the model),
        ``mis_shaped`` and ``uncovered`` (prunable model parameters without a mask).
        Raises ValueError when nothing matches.
        """
        params = dict(model.named_parameters())
        matched = [n for n in self._masks if n in params and params[n].shape == self._masks[n].shape]
        unmatched = [n for n in self._masks if n not in params]
        mis_shaped = [n for n in self._masks if n in params and params[n].shape != self._masks[n].shape]
        if not matched:
            raise ValueError(
                f"no mask matches {type(model).__name__}: {len(unmatched)} names not in the model "
                f"(e.g. {unmatched[:3]}), {len(mis_shaped)} mis-shaped"
            )
        from .models import get_adapter

        adapter = get_adapter(model)
        prunable = [n for n, _ in adapter.prunable_parameters(model)]
        uncovered = [n for n in prunable if n not in self._masks]
        meta = dict(self.metadata)
        mods = meta.get("modalities")
        if mods:
            meta["modalities"] = {n: mods.get(n, adapter.modality(n) or "?") for n in matched}
        for key in ("layer_sparsity", "allocated_sparsity"):
            if isinstance(meta.get(key), dict):
                meta[key] = {n: v for n, v in meta[key].items() if n in matched}
        out = Masks({n: self._masks[n] for n in matched}, meta)
        out.metadata["modality_sparsity"] = out.modality_sparsity()
        out.report = {"matched": matched, "unmatched": unmatched, "mis_shaped": mis_shaped, "uncovered": uncovered}
        return out

    @classmethod
    def from_reference(cls, path: str | os.PathLike, model: torch.nn.Module) -> "Masks":
        """Import a mask file written by the original MULTIFLOW code: a torch file of
        ``<param>_pruning_mask`` tensors named after the original model code (for BLIP,
        e.g. ``visual_encoder.blocks.0.attn.qkv.weight_pruning_mask``), mapped onto
        ``model``'s parameter names. ``report`` says what matched."""
        path = Path(path)
        obj = read_torch_file(path, "reference mask file")
        if isinstance(obj, Mapping) and not any(str(k).endswith("_pruning_mask") for k in obj):
            for key in ("model", "state_dict", "masks"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
        if not isinstance(obj, Mapping):
            raise ValueError(f"reference mask file {path} does not hold a dict of tensors")
        raw = {str(k)[: -len("_pruning_mask")]: v for k, v in obj.items() if str(k).endswith("_pruning_mask")}
        if not raw:
            raise ValueError(f"reference mask file {path} has no '<param>_pruning_mask' entries")
        from .models import get_adapter

        adapter = get_adapter(model)
        masks: dict[str, torch.Tensor] = {}
        for orig, t in raw.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{path}: entry {orig}_pruning_mask is not a tensor")
            if t.dtype != torch.bool:
                if not bool(((t == 0) | (t == 1)).all()):  # complex too: 0.5+0.5j is not a mask value
                    raise ValueError(f"{path}: entry {orig}_pruning_mask is not boolean (values other than 0/1)")
                t = t != 0
            masks[adapter.from_reference_name(orig.removeprefix("module."))] = t
        params = dict(model.named_parameters())
        modalities = {n: adapter.modality(n) or "?" for n in masks if n in params}
        base = cls(masks, {"method": "reference", "source": str(path), "modalities": modalities})
        return base.for_model(model)
