"""X-VLM (Zeng et al., ICML 2022) as in MULTIFLOW's setup, its adapter, and ``xvlm-tiny``.

The model: a CLIP ViT vision tower (``vision_encoder``) and a BERT text side
(``text_encoder.bert``, a ``BertForMaskedLM`` with ``text_encoder.cls``) whose first
``fusion_start`` layers are text-only and whose remaining layers are fusion layers that
cross-attend to the image tokens; ITC projections (``vision_proj``, ``text_proj``, ``temp``),
the ITM head and the bbox head. Module and parameter names follow the original X-VLM code, so
the released checkpoints (a torch file whose ``model`` entry is the state dict) load with
every key matched: :meth:`XVLM.load_checkpoint`. The vision embeddings use transformers' names
(``vision_encoder.embeddings.{class_embedding,patch_embedding,position_embedding}``); the
original code's ``vision_encoder.{class_embedding,patch_embed,pos_embed}`` and the fine-tuning
models' ``text_encoder.{embeddings,encoder}.*`` (no ``bert.``) are mapped on load
(:func:`original_to_ours`). Every prunable ``nn.Linear`` has the original name.

Modalities (the original MULTIFLOW setup): ``vision_encoder.*`` is ``vision``;
``text_encoder.bert.encoder.layer.N.*`` is ``text`` for ``N < fusion_start`` and ``fusion``
otherwise. Not prunable: ``vision_proj``, ``text_proj``, ``itm_head``, ``bbox_head``,
``text_encoder.cls``. Only ``nn.Linear`` weights are pruned.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import MODEL_BUILDERS, ModelAdapter, image_text_inputs, itm_loss_with_shifted_negatives, register_adapter

__all__ = ["XVLMConfig", "XVLM", "XVLMOutput", "CheckpointReport", "XVLMAdapter", "build_xvlm_tiny", "load_xvlm",
           "original_to_ours"]


@dataclass
class XVLMConfig:
    """X-VLM hyper-parameters; the defaults are X-VLM base with a CLIP ViT-B/16 at 224 px
    (4M pretraining setup) and a BERT-base text side fused from layer 6 on."""

    # vision tower (CLIP ViT)
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    vision_act: str = "quick_gelu"
    vision_layer_norm_eps: float = 1e-5
    # text side (BERT)
    vocab_size: int = 30522
    text_width: int = 768
    text_layers: int = 12
    fusion_start: int = 6
    text_heads: int = 12
    text_mlp: int = 3072
    text_act: str = "gelu"
    text_layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    # heads
    embed_dim: int = 256
    temp: float = 0.07
    initializer_range: float = 0.02
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        if not 0 < self.fusion_start < self.text_layers:
            raise ValueError(
                f"XVLMConfig: fusion_start must be in [1, text_layers); got {self.fusion_start} "
                f"with text_layers={self.text_layers}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"XVLMConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @classmethod
    def base(cls) -> "XVLMConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "XVLMConfig":
        """Small config for tests and the CLI; the vision width differs from the text width
        so that cross-attention keys/values read a vision-width input as in any X-VLM."""
        return cls(image_size=64, patch_size=16, vision_width=48, vision_layers=2, vision_heads=4, vision_mlp=96,
                   vocab_size=1024, text_width=64, text_layers=4, fusion_start=2, text_heads=4, text_mlp=128,
                   max_position_embeddings=64, embed_dim=32)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def vision_config(self):
        """The transformers ``CLIPVisionConfig`` of the vision tower."""
        from transformers import CLIPVisionConfig

        cfg = CLIPVisionConfig(
            hidden_size=self.vision_width, intermediate_size=self.vision_mlp, num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads, image_size=self.image_size, patch_size=self.patch_size,
            hidden_act=self.vision_act, layer_norm_eps=self.vision_layer_norm_eps, attention_dropout=0.0,
        )
        cfg._attn_implementation = self.attn_implementation
        return cfg

    @property
    def text_config(self):
        """The transformers ``BertConfig`` of the text side."""
        from transformers import BertConfig

        cfg = BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.text_width, num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads, intermediate_size=self.text_mlp, hidden_act=self.text_act,
            max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.text_layer_norm_eps, pad_token_id=self.pad_token_id,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        cfg._attn_implementation = self.attn_implementation
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- vision
class XVLMVisionEncoder(nn.Module):
    """CLIP ViT with the names of X-VLM's ``CLIPVisionTransformer``: ``embeddings``,
    ``pre_layrnorm``, ``encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1,
    mlp.fc2, layer_norm2}``, ``post_layernorm`` (applied to every token)."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings

        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        hidden = self.encoder(inputs_embeds=hidden).last_hidden_state
        return self.post_layernorm(hidden)


# ---------------------------------------------------------------------------- text
def _additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(B, L) keep-mask -> (B, 1, 1, L) additive attention mask."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class XVLMBertAttention(nn.Module):
    """``self.{query,key,value}`` + ``output.{dense,LayerNorm}`` (transformers' BERT blocks);
    for cross-attention the key/value read inputs of width ``encoder_width``."""

    def __init__(self, config, *, cross: bool = False, encoder_width: Optional[int] = None):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertCrossAttention, BertSelfAttention, BertSelfOutput

        self.cross = cross
        self.self = BertCrossAttention(config) if cross else BertSelfAttention(config)
        if cross and encoder_width is not None and encoder_width != config.hidden_size:
            self.self.key = nn.Linear(encoder_width, self.self.all_head_size)
            self.self.value = nn.Linear(encoder_width, self.self.all_head_size)
        self.output = BertSelfOutput(config)

    def forward(self, hidden, attention_mask=None, encoder_hidden=None, encoder_mask=None):
        if self.cross:
            out, _ = self.self(hidden, encoder_hidden_states=encoder_hidden, attention_mask=encoder_mask)
        else:
            out, _ = self.self(hidden, attention_mask=attention_mask)
        return self.output(out, hidden)


class XVLMBertLayer(nn.Module):
    """X-VLM's BERT layer: self-attention, cross-attention to the image tokens (fusion layers
    only; bidirectional, unlike transformers' ``BertLayer`` which needs ``is_decoder``), FFN."""

    def __init__(self, config, *, fusion: bool, encoder_width: int):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        self.attention = XVLMBertAttention(config)
        self.has_cross_attention = fusion
        if fusion:
            self.crossattention = XVLMBertAttention(config, cross=True, encoder_width=encoder_width)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden, attention_mask=None, encoder_hidden=None, encoder_mask=None):
        hidden = self.attention(hidden, attention_mask)
        if self.has_cross_attention:
            if encoder_hidden is None:
                raise ValueError("a fusion layer needs the image tokens (encoder_hidden)")
            hidden = self.crossattention(hidden, encoder_hidden=encoder_hidden, encoder_mask=encoder_mask)
        return self.output(self.intermediate(hidden), hidden)


class XVLMBertEncoder(nn.Module):
    def __init__(self, config, fusion_start: int, encoder_width: int):
        super().__init__()
        self.fusion_start = fusion_start
        self.layer = nn.ModuleList(
            XVLMBertLayer(config, fusion=i >= fusion_start, encoder_width=encoder_width)
            for i in range(config.num_hidden_layers)
        )

    def forward(self, hidden, attention_mask=None, encoder_hidden=None, encoder_mask=None, *, mode: str = "text"):
        """``mode``: ``text`` (layers before ``fusion_start``), ``fusion`` (the rest) or ``all``."""
        start, stop = {"text": (0, self.fusion_start), "fusion": (self.fusion_start, len(self.layer)),
                       "all": (0, len(self.layer))}[mode]
        for layer in self.layer[start:stop]:
            hidden = layer(hidden, attention_mask, encoder_hidden, encoder_mask)
        return hidden


class XVLMBertModel(nn.Module):
    def __init__(self, config, fusion_start: int, encoder_width: int):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertEmbeddings

        self.embeddings = BertEmbeddings(config)
        self.encoder = XVLMBertEncoder(config, fusion_start, encoder_width)


class XVLMTextEncoder(nn.Module):
    """X-VLM's ``BertForMaskedLM``: ``bert`` (no pooler) and the MLM head ``cls`` (decoder
    weight tied to the word embeddings, decoder bias tied to ``cls.predictions.bias``)."""

    def __init__(self, config, fusion_start: int, encoder_width: int):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead

        self.bert = XVLMBertModel(config, fusion_start, encoder_width)
        self.cls = BertOnlyMLMHead(config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias


def build_mlp(input_dim: int, output_dim: int) -> nn.Sequential:
    """X-VLM's head: Linear(d, 2d), LayerNorm, GELU, Linear(2d, out) (keys ``0``, ``1``, ``3``)."""
    return nn.Sequential(nn.Linear(input_dim, input_dim * 2), nn.LayerNorm(input_dim * 2), nn.GELU(),
                         nn.Linear(input_dim * 2, output_dim))


# ---------------------------------------------------------------------------- model
@dataclass
class XVLMOutput:
    itm_logits: torch.Tensor          # (B, 2): [no match, match] for the given pairs
    itc_logits: torch.Tensor          # (B, B): image-to-text similarities / temp
    image_embeds: torch.Tensor        # (B, n_img, vision_width)
    text_embeds: torch.Tensor         # (B, L, text_width), after the text-only layers
    fusion_embeds: torch.Tensor       # (B, L, text_width), after the fusion layers
    loss: Optional[torch.Tensor] = None


@dataclass
class CheckpointReport:
    """What :meth:`XVLM.load_checkpoint` matched."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)       # model keys absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)    # checkpoint keys the model lacks
    mis_shaped: list[str] = field(default_factory=list)    # "key: checkpoint (..) vs model (..)"
    ignored: list[str] = field(default_factory=list)       # buffers the model rebuilds (position_ids)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mis_shaped)

    def __str__(self) -> str:
        lines = [f"{self.path}: {len(self.loaded)} tensors loaded"]
        for what, names in (("missing from the checkpoint", self.missing),
                            ("unexpected (not in the model)", self.unexpected),
                            ("shape mismatch (not loaded)", self.mis_shaped),
                            ("ignored buffers", self.ignored)):
            if names:
                shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
                lines.append(f"  {what}: {shown}")
        return "\n".join(lines)


class XVLM(nn.Module):
    """X-VLM for image-text matching/contrast (and MLM, bbox) with the original names.

    ``model(pixel_values, input_ids, attention_mask)`` runs the vision encoder, the text-only
    layers on the text, the fusion layers (cross-attention to the image tokens) and returns an
    :class:`XVLMOutput` with the ITM logits of the given pairs and the ITC logits.
    """

    def __init__(self, config: Optional[XVLMConfig] = None):
        super().__init__()
        self.config = config = config or XVLMConfig()
        text_cfg = config.text_config
        self.vision_encoder = XVLMVisionEncoder(config.vision_config)
        self.text_encoder = XVLMTextEncoder(text_cfg, config.fusion_start, config.vision_width)
        self.vision_proj = nn.Linear(config.vision_width, config.embed_dim)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temp)))
        self.itm_head = build_mlp(config.text_width, 2)
        self.bbox_head = build_mlp(config.text_width, 4)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.vision_encoder.embeddings.class_embedding, std=std)
        nn.init.zeros_(self.text_encoder.cls.predictions.bias)
        self.temp.fill_(self.config.temp)

    # -- encoders ------------------------------------------------------------------
    def get_vision_embeds(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens (B, n_img, vision_width) and their all-ones attention mask."""
        embeds = self.vision_encoder(pixel_values)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    def get_text_embeds(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        bert = self.text_encoder.bert
        hidden = bert.embeddings(input_ids=input_ids)
        return bert.encoder(hidden, _additive_mask(attention_mask, hidden.dtype), mode="text")

    def get_cross_embeds(self, image_embeds, image_atts, text_embeds, text_atts=None) -> torch.Tensor:
        dtype = text_embeds.dtype
        return self.text_encoder.bert.encoder(text_embeds, _additive_mask(text_atts, dtype), image_embeds,
                                              _additive_mask(image_atts, dtype), mode="fusion")

    def get_features(self, image_embeds=None, text_embeds=None):
        """L2-normalised ITC features of the CLS tokens."""
        image_feat = None if image_embeds is None else F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_feat = None if text_embeds is None else F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)
        return image_feat, text_feat

    # -- heads ----------------------------------------------------------------------
    def itm_logits(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        return self(pixel_values, input_ids, attention_mask).itm_logits

    def mlm_logits(self, fusion_embeds: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.cls(fusion_embeds)

    def predict_bbox(self, fusion_embeds: torch.Tensor) -> torch.Tensor:
        """(cx, cy, w, h) in [0, 1] from the fusion CLS token."""
        return self.bbox_head(fusion_embeds[:, 0]).sigmoid()

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> XVLMOutput:
        image_embeds, image_atts = self.get_vision_embeds(pixel_values)
        text_embeds = self.get_text_embeds(input_ids, attention_mask)
        fusion = self.get_cross_embeds(image_embeds, image_atts, text_embeds, attention_mask)
        image_feat, text_feat = self.get_features(image_embeds, text_embeds)
        itc = image_feat @ text_feat.t() / self.temp.clamp(min=1e-3)
        return XVLMOutput(itm_logits=self.itm_head(fusion[:, 0]), itc_logits=itc, image_embeds=image_embeds,
                          text_embeds=text_embeds, fusion_embeds=fusion)

    # -- checkpoints ----------------------------------------------------------------
    def load_checkpoint(self, path: str | Path, *, strict: bool = False) -> CheckpointReport:
        """Load an original X-VLM checkpoint (a torch file whose ``model`` entry is the state
        dict, or a bare state dict; a ``module.`` prefix is stripped; names are mapped with
        :func:`original_to_ours`). Tensors whose name and
        shape match are copied; the rest is reported. ``strict=True`` raises ValueError
        unless every key matched."""
        from ..masks import read_torch_file

        obj = read_torch_file(path, "X-VLM checkpoint")
        if isinstance(obj, dict):
            for key in ("model", "state_dict"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"X-VLM checkpoint {path} does not hold a state dict (a 'model' entry of tensors)")
        ckpt = {original_to_ours(str(k).removeprefix("module.")): v for k, v in obj.items()}
        own = self.state_dict()
        buffers = {n for n, _ in self.named_buffers(remove_duplicate=False)}
        report = CheckpointReport(str(path))
        to_load = {}
        for k, v in ckpt.items():
            if k not in own:
                (report.ignored if k in buffers else report.unexpected).append(k)
            elif tuple(v.shape) != tuple(own[k].shape):
                report.mis_shaped.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
            else:
                to_load[k] = v
        report.missing = [k for k in own if k not in ckpt]
        # tied tensors (MLM decoder weight/bias = word embeddings / cls bias): load the first name only
        first: dict[int, str] = {}
        for k, v in own.items():
            alias_of = first.setdefault(v.data_ptr(), k) if v.numel() else k
            if alias_of != k:
                if k in report.missing and alias_of in to_load:
                    report.missing.remove(k)
                if k in to_load and alias_of in to_load and not torch.equal(to_load[k], to_load[alias_of]):
                    # untied in the checkpoint: this model ties them, so only alias_of's values load
                    report.unexpected.append(f"{k} (differs from {alias_of}, tied to it here: not loaded)")
                to_load.pop(k, None)
        report.loaded = list(to_load)
        if strict and not report.ok:
            raise ValueError(f"X-VLM checkpoint does not match the model:\n{report}")
        self.load_state_dict(to_load, strict=False)
        return report


# ---------------------------------------------------------------------------- names
# X-VLM's own CLIPVisionTransformer keeps the patch/position/class embeddings at the top of
# vision_encoder, and its fine-tuning models use a BertModel as text_encoder (no ``bert.``).
_ORIGINAL_RULES = [
    (re.compile(r"^vision_encoder\.patch_embed\.weight$"), "vision_encoder.embeddings.patch_embedding.weight"),
    (re.compile(r"^vision_encoder\.pos_embed\.weight$"), "vision_encoder.embeddings.position_embedding.weight"),
    (re.compile(r"^vision_encoder\.class_embedding$"), "vision_encoder.embeddings.class_embedding"),
    (re.compile(r"^vision_encoder\.position_ids$"), "vision_encoder.embeddings.position_ids"),
    (re.compile(r"^text_encoder\.(embeddings|encoder)\."), r"text_encoder.bert.\1."),
]


def original_to_ours(name: str) -> str:
    """Map a parameter name of the original X-VLM code onto :class:`XVLM`'s (identity for
    every ``nn.Linear`` of the pretraining model)."""
    for pattern, repl in _ORIGINAL_RULES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


# ---------------------------------------------------------------------------- adapter
_LAYER = re.compile(r"^text_encoder\.bert\.encoder\.layer\.(\d+)\.")
_CROSS_KV = re.compile(r"\.crossattention\.self\.(key|value)\.weight$")


@register_adapter
class XVLMAdapter(ModelAdapter):
    """:class:`XVLM`: three modalities (vision / text / fusion); batches are dicts with
    ``pixel_values``, ``input_ids``, ``attention_mask``."""

    name = "xvlm"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.fusion_start = model.config.fusion_start

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, XVLM)

    def modality(self, param_name: str) -> Optional[str]:
        if param_name.startswith("vision_encoder."):
            return "vision"
        m = _LAYER.match(param_name)
        if m:
            return "text" if int(m.group(1)) < self.fusion_start else "fusion"
        return None  # projections, heads, text_encoder.cls, embeddings

    def from_reference_name(self, name: str) -> str:
        return original_to_ours(name)

    def keeps_all_tokens(self, param_name: str) -> bool:
        # vision layers and the fusion cross-attention keys/values see image tokens only
        return param_name.startswith("vision_encoder.") or bool(_CROSS_KV.search(param_name))

    @staticmethod
    def _inputs(batch):
        return image_text_inputs(batch, "X-VLM")

    def forward(self, model: nn.Module, batch):
        return model(*self._inputs(batch))

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """ITM with in-batch negatives (images shifted by one)."""
        pixel_values, input_ids, attention_mask = self._inputs(batch)
        return itm_loss_with_shifted_negatives(
            lambda pv: model(pv, input_ids, attention_mask).itm_logits, pixel_values
        )


# ---------------------------------------------------------------------------- builders
def build_xvlm_tiny(task: Optional[str] = None, seed: int = 0) -> XVLM:
    """A small randomly initialised X-VLM (init std 0.02), deterministic for a given ``seed``."""
    _no_task(task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = XVLM(XVLMConfig.tiny())
    return model.eval()


def load_xvlm(path: str | Path, config: Optional[XVLMConfig] = None, *, task: Optional[str] = None) -> XVLM:
    """X-VLM base (or ``config``) with the weights of an original checkpoint file. Raises
    ValueError when model keys are missing or mis-shaped; unexpected keys are tolerated
    (they are listed in ``model.checkpoint_report`` and named in a ``UserWarning``, which the
    CLI prints)."""
    _no_task(task)
    model = XVLM(config or XVLMConfig.base())
    report = model.load_checkpoint(path)
    if report.missing or report.mis_shaped:
        raise ValueError(f"X-VLM checkpoint does not fit the {'given' if config else 'base'} config:\n{report}")
    if report.unexpected:
        shown = ", ".join(report.unexpected[:10]) + (f", ... ({len(report.unexpected)} in all)"
                                                    if len(report.unexpected) > 10 else "")
        warnings.warn(f"X-VLM checkpoint {path}: {len(report.unexpected)} key(s) the model lacks were not "
                      f"loaded: {shown}", stacklevel=2)
    model.checkpoint_report = report
    return model.eval()


def _no_task(task: Optional[str]) -> None:
    if task is not None:
        raise ValueError(f"X-VLM has one pretraining model; --task ({task!r}) is for BLIP only")


MODEL_BUILDERS["xvlm-tiny"] = build_xvlm_tiny
