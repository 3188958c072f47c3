"""CLIP (transformers ``CLIPModel``) adapter and the built-in ``clip-tiny`` model.

Modalities: ``vision_model.*`` is ``vision``, ``text_model.*`` is ``text`` (CLIP has no fusion
layers). Not prunable: ``visual_projection`` and ``text_projection``, the heads that map each
tower into the shared embedding space (as BLIP's ``vision_proj`` / ``text_proj``). Only
``nn.Linear`` weights are pruned. Vision layers keep all their tokens; text layers drop the
padding (DESIGN.md's statistic), decided by the layer's name, never by a sequence length that
happens to equal the text's. Batches are dicts with ``pixel_values``, ``input_ids`` and
``attention_mask``; the loss for gradient methods (SNIP) is CLIP's own contrastive loss.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from . import MODEL_BUILDERS, ModelAdapter, image_text_inputs, register_adapter

_NOT_PRUNABLE = re.compile(r"^(visual_projection|text_projection)\.")

# The built-in tiny CLIP: the vocabulary and special ids of multiflow.data.SimpleTokenizer
# (pad 0, bos 1, eos / sep 2), 64-pixel images in 16-pixel patches (17 image tokens).
TINY_CONFIG = {
    "text_config": {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "max_position_embeddings": 64, "pad_token_id": 0,
                    "bos_token_id": 1, "eos_token_id": 2},
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "image_size": 64, "patch_size": 16},
    "projection_dim": 32,
}


def _is_clip(model: nn.Module) -> bool:
    return any(cls.__name__ == "CLIPModel" and cls.__module__.startswith("transformers.")
               for cls in type(model).__mro__)


@register_adapter
class ClipAdapter(ModelAdapter):
    """transformers ``CLIPModel`` (and subclasses)."""

    name = "clip"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_clip(model)

    def modality(self, param_name: str) -> Optional[str]:
        if _NOT_PRUNABLE.match(param_name):
            return None
        if param_name.startswith("vision_model."):
            return "vision"
        if param_name.startswith("text_model."):
            return "text"
        return None

    def keeps_all_tokens(self, param_name: str) -> bool:
        return param_name.startswith("vision_model.")

    def forward(self, model: nn.Module, batch):
        pixel_values, input_ids, attention_mask = image_text_inputs(batch, "CLIP")
        return model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        pixel_values, input_ids, attention_mask = image_text_inputs(batch, "CLIP")
        return model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                     return_loss=True).loss


def tiny_config():
    """The ``clip-tiny`` CLIPConfig."""
    from transformers import CLIPConfig

    return CLIPConfig(**TINY_CONFIG)


def build_clip_tiny(task: Optional[str] = None, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny ``CLIPModel`` (eval mode); ``task`` must be None or
    ``retrieval`` (CLIP is a contrastive image-text model)."""
    from transformers import CLIPModel

    if task not in (None, "retrieval"):
        raise ValueError(f"clip-tiny has no {task!r} task: CLIP is an image-text retrieval model (task retrieval)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(tiny_config())
    return model.eval()


MODEL_BUILDERS["clip-tiny"] = build_clip_tiny
