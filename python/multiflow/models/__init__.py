"""Model adapters: what is prunable, which modality each layer belongs to, how to run a
calibration forward, which loss SNIP uses, and how the original code names parameters.

``get_adapter(model)`` returns the adapter registered for the model's class (BLIP from
transformers), else the generic one (every ``nn.Linear`` weight, one modality).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelAdapter", "register_adapter", "get_adapter", "build_model", "MODEL_BUILDERS", "move_batch",
           "itm_loss_with_shifted_negatives", "image_text_inputs"]


def move_batch(batch, device):
    """Move every tensor of a batch (dict, list, tuple or tensor) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def image_text_inputs(batch, model_name: str):
    """``(pixel_values, input_ids, attention_mask or None)`` of an image-text batch dict."""
    missing = [k for k in ("pixel_values", "input_ids") if k not in batch]
    if missing:
        raise ValueError(f"{model_name} batches need keys pixel_values, input_ids (attention_mask optional); "
                         f"missing {missing}")
    return batch["pixel_values"], batch["input_ids"], batch.get("attention_mask")


def itm_loss_with_shifted_negatives(itm_logits: Callable[[torch.Tensor], torch.Tensor],
                                    pixel_values: torch.Tensor) -> torch.Tensor:
    """Image-text matching loss for SNIP: the batch's pairs are positives, the images shifted
    by one (``roll(1)``) are negatives (when the batch has more than one pair).
    ``itm_logits(pixel_values)`` returns the (B, 2) ITM logits of those images with the batch's texts."""
    logits = [itm_logits(pixel_values)]
    n = logits[0].shape[0]
    labels = [torch.ones(n, dtype=torch.long)]
    if n > 1:
        logits.append(itm_logits(pixel_values.roll(1, dims=0)))
        labels.append(torch.zeros(n, dtype=torch.long))
    logits_t = torch.cat(logits)
    return F.cross_entropy(logits_t, torch.cat(labels).to(logits_t.device))


class ModelAdapter:
    """Generic adapter: every ``nn.Linear`` weight is prunable, modality ``"default"``;
    the forward is ``model(**batch)`` for dict batches, ``model(batch)`` otherwise."""

    name = "generic"

    def __init__(self, model: nn.Module):
        self.model_class = type(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True

    def modality(self, param_name: str) -> Optional[str]:
        """Modality of a prunable weight, or None when the parameter is not prunable."""
        return "default"

    def keeps_all_tokens(self, param_name: str) -> bool:
        """True for layers fed with image tokens (never drop padding for them)."""
        return False

    def prunable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
        """(weight name, module) for every prunable ``nn.Linear``."""
        for mod_name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                pname = f"{mod_name}.weight" if mod_name else "weight"
                if self.modality(pname) is not None:
                    yield pname, module

    def forward(self, model: nn.Module, batch):
        if isinstance(batch, Mapping):
            return model(**batch)
        return model(batch)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """Scalar loss for gradient-based methods (SNIP)."""
        out = self.forward(model, batch)
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, Mapping):
            loss = out.get("loss")
        if loss is None:
            raise ValueError(
                f"the generic adapter cannot derive a loss from {type(model).__name__}'s output; "
                "pass loss_fn=... to Pruner for gradient-based methods (snip)"
            )
        return loss

    def batch_size(self, batch) -> int:
        if isinstance(batch, torch.Tensor):
            return int(batch.shape[0]) if batch.dim() else 1
        if isinstance(batch, Mapping):
            for key in ("pixel_values", "input_ids"):
                if isinstance(batch.get(key), torch.Tensor):
                    return int(batch[key].shape[0])
            for v in batch.values():
                if isinstance(v, torch.Tensor) and v.dim():
                    return int(v.shape[0])
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            return int(batch[0].shape[0])
        return 1

    def text_attention_mask(self, batch) -> Optional[torch.Tensor]:
        """The batch's text attention mask (padding = 0), if any."""
        if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
            return batch["attention_mask"]
        return None

    def from_reference_name(self, name: str) -> str:
        """Map a parameter name of the original (reference) code onto this model's."""
        return name


_ADAPTERS: list[type[ModelAdapter]] = []
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    _ADAPTERS.append(cls)
    return cls


def get_adapter(model: nn.Module) -> ModelAdapter:
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls(model)
    return ModelAdapter(model)


def build_model(spec: str, *, task: Optional[str] = None, seed: int = 0) -> nn.Module:
    """Build a model from a name (``blip-tiny``, ``xvlm-tiny``, ``clip-tiny``), ``xvlm:PATH`` (X-VLM base with
    an original X-VLM checkpoint file) or a local transformers BLIP checkpoint folder."""
    if spec in MODEL_BUILDERS:
        return MODEL_BUILDERS[spec](task=task, seed=seed)
    from pathlib import Path

    if spec.startswith("xvlm:"):
        from .xvlm import load_xvlm

        return load_xvlm(spec[len("xvlm:"):], task=task)

    if Path(spec).is_dir():
        from .blip import load_blip

        return load_blip(spec, task=task)
    raise ValueError(
        f"unknown model {spec!r}: use one of {sorted(MODEL_BUILDERS)}, xvlm:PATH (an X-VLM checkpoint "
        "file) or a path to a local transformers BLIP checkpoint folder"
    )


from . import blip  # noqa: E402,F401  (registers the BLIP adapter and blip-tiny)
from . import xvlm  # noqa: E402,F401  (registers the X-VLM adapter and xvlm-tiny)
from . import clip  # noqa: E402,F401  (registers the CLIP adapter and clip-tiny)
