"""BLIP (transformers) adapter and the built-in ``blip-tiny`` model.

Modalities follow the original BLIP setup: ``vision_model.*`` is ``vision``; ``text_encoder.*``
and ``text_decoder.*`` are ``text``. Not prunable: ``vision_proj``, ``text_proj``,
``itm_head``, ``text_decoder.cls.*``. Only ``nn.Linear`` weights are pruned.
"""
from __future__ import annotations

import contextlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import MODEL_BUILDERS, ModelAdapter, image_text_inputs, itm_loss_with_shifted_negatives, register_adapter

TASKS = {
    "retrieval": "BlipForImageTextRetrieval",
    "caption": "BlipForConditionalGeneration",
    "vqa": "BlipForQuestionAnswering",
}
_CLASS_TO_TASK = {v: k for k, v in TASKS.items()}

_NOT_PRUNABLE = re.compile(r"^(vision_proj|text_proj|itm_head|text_decoder\.cls)\.")
_CROSS_KV = re.compile(r"\.crossattention\.self\.(key|value)\.weight$")

# original BLIP (ViT of timm style) names -> transformers BLIP names
_REFERENCE_RULES = [
    (re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\."), r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\."), r"vision_model.encoder.layers.\1.self_attn.projection."),
    (re.compile(r"^visual_encoder\.blocks\.(\d+)\.mlp\.fc(\d)\."), r"vision_model.encoder.layers.\1.mlp.fc\2."),
    (re.compile(r"^visual_encoder\.blocks\.(\d+)\.norm(\d)\."), r"vision_model.encoder.layers.\1.layer_norm\2."),
    (re.compile(r"^visual_encoder\.norm\."), r"vision_model.post_layernorm."),
]


@contextlib.contextmanager
def _masked_cross_attention(model: nn.Module):
    """Within the block, BLIP's text cross-attention gets the encoder's padding mask.

    transformers (5.x) drops it: ``BlipTextLayer`` hands the encoder mask to its cross-attention
    as ``attention_mask``, ``BlipTextAttention`` passes that on as ``attention_mask``, and
    ``BlipTextSelfAttention`` then takes ``encoder_attention_mask`` (None) for cross-attention.
    The image tokens have no padding, but ``BlipForQuestionAnswering``'s answer decoder
    cross-attends to the padded question encoding, so padded positions leaked into every
    kept token's activations (the statistic then depended on the padding's values and on how
    the samples were batched). A pre-hook restores the mask as the original BLIP applies it;
    where transformers passes ``encoder_attention_mask`` itself, the hook changes nothing."""

    def pass_mask(module, args, kwargs):
        if (kwargs.get("encoder_hidden_states") is not None and kwargs.get("encoder_attention_mask") is None
                and kwargs.get("attention_mask") is not None):
            return args, {**kwargs, "encoder_attention_mask": kwargs["attention_mask"]}
        return None

    handles = [m.register_forward_pre_hook(pass_mask, with_kwargs=True)
               for m in model.modules() if type(m).__name__ == "BlipTextSelfAttention"]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _blip_task(model: nn.Module) -> Optional[str]:
    for cls in type(model).__mro__:
        if cls.__name__ in _CLASS_TO_TASK and cls.__module__.startswith("transformers."):
            return _CLASS_TO_TASK[cls.__name__]
    return None


@register_adapter
class BlipAdapter(ModelAdapter):
    """transformers ``BlipForImageTextRetrieval`` / ``BlipForConditionalGeneration`` /
    ``BlipForQuestionAnswering``; batches are dicts with ``pixel_values``, ``input_ids``,
    ``attention_mask`` (what a BLIP processor returns)."""

    name = "blip"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.task = _blip_task(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _blip_task(model) is not None

    def modality(self, param_name: str) -> Optional[str]:
        if _NOT_PRUNABLE.match(param_name):
            return None
        if param_name.startswith("vision_model."):
            return "vision"
        if param_name.startswith(("text_encoder.", "text_decoder.")):
            return "text"
        return None

    def keeps_all_tokens(self, param_name: str) -> bool:
        # Vision layers see image tokens only. Cross-attention keys/values read image tokens,
        # except in the VQA answer decoder, whose cross-attention reads the (padded) question.
        if param_name.startswith("vision_model."):
            return True
        if not _CROSS_KV.search(param_name):
            return False
        return not (self.task == "vqa" and param_name.startswith("text_decoder."))

    @staticmethod
    def _inputs(batch):
        return image_text_inputs(batch, "BLIP")

    def _call(self, model: nn.Module, pixel_values, input_ids, attention_mask, **extra):
        with _masked_cross_attention(model):
            return self._call_model(model, pixel_values, input_ids, attention_mask, **extra)

    def _call_model(self, model: nn.Module, pixel_values, input_ids, attention_mask, **extra):
        if self.task == "retrieval":
            return model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         use_itm_head=True, **extra)
        if self.task == "caption":
            return model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **extra)
        # vqa: the question through the encoder, the same text as the answer through the decoder
        return model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                     decoder_input_ids=input_ids, decoder_attention_mask=attention_mask, **extra)

    def forward(self, model: nn.Module, batch):
        return self._call(model, *self._inputs(batch))

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        pixel_values, input_ids, attention_mask = self._inputs(batch)
        if self.task == "retrieval":
            return itm_loss_with_shifted_negatives(
                lambda pv: self._call(model, pv, input_ids, attention_mask).itm_score, pixel_values
            )
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
        return self._call(model, pixel_values, input_ids, attention_mask, labels=labels).loss

    def from_reference_name(self, name: str) -> str:
        for pattern, repl in _REFERENCE_RULES:
            if pattern.match(name):
                return pattern.sub(repl, name)
        return name


def _blip_class(task: str):
    import transformers

    if task not in TASKS:
        raise ValueError(f"unknown BLIP task {task!r}; choose one of {sorted(TASKS)}")
    return getattr(transformers, TASKS[task])


def tiny_config():
    """The ``blip-tiny`` BlipConfig (from ``multiflow/configs/blip-tiny.json``)."""
    from transformers import BlipConfig

    text = resources.files("multiflow").joinpath("configs/blip-tiny.json").read_text()
    return BlipConfig(**json.loads(text))


def build_blip_tiny(task: Optional[str] = None, seed: int = 0) -> nn.Module:
    """A small randomly initialised BLIP (init range 0.02 in both towers), for tests, the
    CLI default and benchmarks. Deterministic for a given ``seed``."""
    cls = _blip_class(task or "retrieval")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(tiny_config())
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def load_blip(path: str, task: Optional[str] = None) -> nn.Module:
    """Load a local transformers BLIP checkpoint folder (no network)."""
    import transformers

    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no config.json in model folder {folder}")
    if task is None:
        try:
            cfg = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {cfg_file}: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"cannot read {cfg_file}: a JSON object expected, got {type(cfg).__name__}")
        archs = cfg.get("architectures") or []
        archs = [a for a in (archs if isinstance(archs, list) else [archs]) if isinstance(a, str)]
        known = [a for a in archs if a in _CLASS_TO_TASK]
        if not known:
            raise ValueError(
                f"{cfg_file} names architectures {archs}; expected one of {sorted(_CLASS_TO_TASK)} "
                "(or pass task=...)"
            )
        cls = getattr(transformers, known[0])
    else:
        cls = _blip_class(task)
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True)
    except (MemoryError, ImportError):
        raise
    except Exception as e:  # transformers' and safetensors' own errors (a truncated file, a bad config, ...)
        raise ValueError(f"cannot load the BLIP checkpoint in {folder} as {cls.__name__}: "
                         f"{type(e).__name__}: {e}") from e
    return model.eval()


MODEL_BUILDERS["blip-tiny"] = build_blip_tiny
