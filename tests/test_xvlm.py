"""X-VLM: the model with original parameter names, its checkpoints, and three-modality MULTIFLOW."""
import json

import pytest
import torch

import multiflow
from multiflow import Masks
from multiflow.models import build_model, get_adapter
from multiflow.models.xvlm import XVLM, XVLMConfig, build_xvlm_tiny
from test_algorithm import naive_flow, naive_mask, naive_prior  # the equations of DESIGN.md, in plain torch

NOT_PRUNABLE = ("vision_proj.", "text_proj.", "itm_head.", "bbox_head.", "text_encoder.cls.")


def original_xvlm_keys(cfg: XVLMConfig) -> dict[str, tuple]:
    """State-dict keys and shapes of the original X-VLM code (CLIP ViT + BertForMaskedLM with
    cross-attention from ``fusion_start``), written from the architecture, not from our model."""
    V, T, E = cfg.vision_width, cfg.text_width, cfg.embed_dim
    n_img = (cfg.image_size // cfg.patch_size) ** 2 + 1
    keys = {
        "vision_encoder.embeddings.class_embedding": (V,),
        "vision_encoder.embeddings.patch_embedding.weight": (V, 3, cfg.patch_size, cfg.patch_size),
        "vision_encoder.embeddings.position_embedding.weight": (n_img, V),
        "vision_encoder.pre_layrnorm.weight": (V,), "vision_encoder.pre_layrnorm.bias": (V,),
    }
    for i in range(cfg.vision_layers):
        p = f"vision_encoder.encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            keys[p + f"self_attn.{proj}.weight"], keys[p + f"self_attn.{proj}.bias"] = (V, V), (V,)
        keys[p + "mlp.fc1.weight"], keys[p + "mlp.fc1.bias"] = (cfg.vision_mlp, V), (cfg.vision_mlp,)
        keys[p + "mlp.fc2.weight"], keys[p + "mlp.fc2.bias"] = (V, cfg.vision_mlp), (V,)
        for ln in ("layer_norm1", "layer_norm2"):
            keys[p + f"{ln}.weight"], keys[p + f"{ln}.bias"] = (V,), (V,)
    keys["vision_encoder.post_layernorm.weight"], keys["vision_encoder.post_layernorm.bias"] = (V,), (V,)
    b = "text_encoder.bert."
    keys[b + "embeddings.word_embeddings.weight"] = (cfg.vocab_size, T)
    keys[b + "embeddings.position_embeddings.weight"] = (cfg.max_position_embeddings, T)
    keys[b + "embeddings.token_type_embeddings.weight"] = (cfg.type_vocab_size, T)
    keys[b + "embeddings.LayerNorm.weight"], keys[b + "embeddings.LayerNorm.bias"] = (T,), (T,)
    for i in range(cfg.text_layers):
        p = f"{b}encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if i >= cfg.fusion_start else [])
        for blk in blocks:
            kv_in = V if blk == "crossattention" else T
            for proj, fan_in in (("query", T), ("key", kv_in), ("value", kv_in)):
                keys[p + f"{blk}.self.{proj}.weight"], keys[p + f"{blk}.self.{proj}.bias"] = (T, fan_in), (T,)
            keys[p + f"{blk}.output.dense.weight"], keys[p + f"{blk}.output.dense.bias"] = (T, T), (T,)
            keys[p + f"{blk}.output.LayerNorm.weight"], keys[p + f"{blk}.output.LayerNorm.bias"] = (T,), (T,)
        keys[p + "intermediate.dense.weight"], keys[p + "intermediate.dense.bias"] = (cfg.text_mlp, T), (cfg.text_mlp,)
        keys[p + "output.dense.weight"], keys[p + "output.dense.bias"] = (T, cfg.text_mlp), (T,)
        keys[p + "output.LayerNorm.weight"], keys[p + "output.LayerNorm.bias"] = (T,), (T,)
    c = "text_encoder.cls.predictions."
    keys[c + "bias"] = (cfg.vocab_size,)
    keys[c + "transform.dense.weight"], keys[c + "transform.dense.bias"] = (T, T), (T,)
    keys[c + "transform.LayerNorm.weight"], keys[c + "transform.LayerNorm.bias"] = (T,), (T,)
    keys[c + "decoder.weight"], keys[c + "decoder.bias"] = (cfg.vocab_size, T), (cfg.vocab_size,)
    keys["vision_proj.weight"], keys["vision_proj.bias"] = (E, V), (E,)
    keys["text_proj.weight"], keys["text_proj.bias"] = (E, T), (E,)
    keys["temp"] = ()
    for head, out in (("itm_head", 2), ("bbox_head", 4)):
        keys[f"{head}.0.weight"], keys[f"{head}.0.bias"] = (2 * T, T), (2 * T,)
        keys[f"{head}.1.weight"], keys[f"{head}.1.bias"] = (2 * T,), (2 * T,)
        keys[f"{head}.3.weight"], keys[f"{head}.3.bias"] = (out, 2 * T), (out,)
    return keys


@pytest.fixture(scope="module")
def tiny():
    return build_xvlm_tiny()


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---- model ----------------------------------------------------------------------------
def test_tiny_forward_shapes(tiny, calib_batches):
    cfg = tiny.config
    b = calib_batches[0]
    B, L = b["input_ids"].shape
    with torch.no_grad():
        out = tiny(b["pixel_values"], b["input_ids"], b["attention_mask"])
    assert out.itm_logits.shape == (B, 2)
    assert out.itc_logits.shape == (B, B)
    assert out.image_embeds.shape == (B, cfg.num_image_tokens, cfg.vision_width)
    assert out.text_embeds.shape == out.fusion_embeds.shape == (B, L, cfg.text_width)
    assert tiny.mlm_logits(out.fusion_embeds).shape == (B, L, cfg.vocab_size)
    box = tiny.predict_bbox(out.fusion_embeds)
    assert box.shape == (B, 4) and ((box >= 0) & (box <= 1)).all()


def test_padding_does_not_change_real_tokens(tiny, calib_batches):
    b = calib_batches[0]
    am = b["attention_mask"]
    i = int(am.sum(1).argmin())  # the shortest caption: padded
    n = int(am[i].sum())
    assert n < am.shape[1]
    with torch.no_grad():
        full = tiny(b["pixel_values"][i:i + 1], b["input_ids"][i:i + 1], am[i:i + 1])
        cut = tiny(b["pixel_values"][i:i + 1], b["input_ids"][i:i + 1, :n], am[i:i + 1, :n])
    torch.testing.assert_close(full.fusion_embeds[:, :n], cut.fusion_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.itm_logits, cut.itm_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [XVLMConfig.tiny(), XVLMConfig.base()], ids=["tiny", "base"])
def test_names_and_shapes_are_the_original_ones(cfg):
    with torch.device("meta"):
        model = XVLM(cfg)
    assert _shapes(model) == original_xvlm_keys(cfg)


def test_base_config_is_the_paper_setup():
    cfg = XVLMConfig.base()
    assert (cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers) == (224, 16, 768, 12)
    assert (cfg.text_width, cfg.text_layers, cfg.fusion_start, cfg.vocab_size) == (768, 12, 6, 30522)


# ---- checkpoints ----------------------------------------------------------------------
# X-VLM's own CLIPVisionTransformer names for the vision embeddings (models/clip_vit.py)
XVLM_CODE_NAMES = {
    "vision_encoder.embeddings.patch_embedding.weight": "vision_encoder.patch_embed.weight",
    "vision_encoder.embeddings.position_embedding.weight": "vision_encoder.pos_embed.weight",
    "vision_encoder.embeddings.class_embedding": "vision_encoder.class_embedding",
    "vision_encoder.embeddings.position_ids": "vision_encoder.position_ids",
}


def _synthetic_checkpoint(cfg, seed=1, prefix=""):
    g = torch.Generator().manual_seed(seed)
    sd = {prefix + k: torch.randn(s, generator=g) for k, s in original_xvlm_keys(cfg).items()}
    # BertForMaskedLM ties the decoder to the word embeddings and to cls.predictions.bias
    c = prefix + "text_encoder.cls.predictions."
    sd[c + "decoder.weight"] = sd[prefix + "text_encoder.bert.embeddings.word_embeddings.weight"].clone()
    sd[c + "decoder.bias"] = sd[c + "bias"].clone()
    # the original code saved the position ids as (persistent) buffers
    sd[prefix + "vision_encoder.embeddings.position_ids"] = torch.arange(cfg.num_image_tokens)[None]
    sd[prefix + "text_encoder.bert.embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    return sd


@pytest.mark.parametrize("prefix", ["", "module."])
@pytest.mark.parametrize("vision_names", ["transformers", "xvlm-code"])
def test_original_checkpoint_loads_fully(tmp_path, prefix, vision_names):
    cfg = XVLMConfig.tiny()
    sd = _synthetic_checkpoint(cfg, prefix=prefix)
    saved = dict(sd)
    if vision_names == "xvlm-code":
        saved = {prefix + XVLM_CODE_NAMES.get(k[len(prefix):], k[len(prefix):]): v for k, v in sd.items()}
        assert prefix + "vision_encoder.patch_embed.weight" in saved
    path = tmp_path / "xvlm.pth"
    torch.save({"model": saved, "config": {"image_res": 64}}, path)
    model = XVLM(cfg)
    report = model.load_checkpoint(path, strict=True)
    assert report.ok and report.missing == [] and report.unexpected == [] and report.mis_shaped == []
    assert sorted(report.ignored) == ["text_encoder.bert.embeddings.position_ids", "vision_encoder.embeddings.position_ids"]
    own = model.state_dict()
    for k, v in original_xvlm_keys(cfg).items():
        assert torch.equal(own[k], sd[prefix + k]), k
    # the MLM decoder is tied to the word embeddings and cls.predictions.bias, as in BERT
    assert model.text_encoder.cls.predictions.decoder.weight is model.text_encoder.bert.embeddings.word_embeddings.weight


def test_checkpoint_report_names_extra_and_missing_keys(tmp_path):
    cfg = XVLMConfig.tiny()
    sd = _synthetic_checkpoint(cfg)
    del sd["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"]
    sd["text_encoder.bert.encoder.layer.9.attention.self.query.weight"] = torch.zeros(64, 64)
    sd["vision_proj.weight"] = torch.zeros(7, 7)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    model = XVLM(cfg)
    report = model.load_checkpoint(path)
    assert report.missing == ["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"]
    assert report.unexpected == ["text_encoder.bert.encoder.layer.9.attention.self.query.weight"]
    assert len(report.mis_shaped) == 1 and report.mis_shaped[0].startswith("vision_proj.weight")
    text = str(report)
    assert "layer.3.crossattention.self.key.weight" in text and "layer.9.attention.self.query.weight" in text
    with pytest.raises(ValueError, match="layer.3.crossattention.self.key.weight"):
        XVLM(cfg).load_checkpoint(path, strict=True)
    with pytest.raises(FileNotFoundError):
        model.load_checkpoint(tmp_path / "nope.pth")


def test_build_model_xvlm_prefix(tmp_path, monkeypatch):
    from multiflow.models import xvlm as xvlm_mod

    cfg = XVLMConfig.tiny()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": _synthetic_checkpoint(cfg)}, path)
    monkeypatch.setattr(XVLMConfig, "base", classmethod(lambda cls: XVLMConfig.tiny()))  # keep it small
    model = build_model(f"xvlm:{path}")
    assert isinstance(model, xvlm_mod.XVLM) and model.checkpoint_report.ok
    sd = _synthetic_checkpoint(cfg)
    del sd["vision_proj.bias"]
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match="vision_proj.bias"):
        build_model(f"xvlm:{path}")
    sd = _synthetic_checkpoint(cfg)
    sd["itm_head.extra.weight"] = torch.zeros(2)
    torch.save({"model": sd}, path)
    with pytest.warns(UserWarning, match=r"1 key\(s\) the model lacks were not loaded: itm_head.extra.weight"):
        model = build_model(f"xvlm:{path}")
    assert model.checkpoint_report.unexpected == ["itm_head.extra.weight"]
    sd = _synthetic_checkpoint(cfg)  # an MLM decoder weight untied from the word embeddings
    sd["text_encoder.cls.predictions.decoder.weight"] = sd["text_encoder.cls.predictions.decoder.weight"] + 1
    torch.save({"model": sd}, path)
    with pytest.warns(UserWarning, match=r"decoder\.weight \(differs from .*word_embeddings\.weight, tied to it here"):
        build_model(f"xvlm:{path}")
    with pytest.raises(ValueError, match="--task"):
        build_model("xvlm-tiny", task="vqa")


# ---- MULTIFLOW on X-VLM ---------------------------------------------------------------
def test_modality_split(tiny):
    cfg = tiny.config
    ad = get_adapter(tiny)
    assert ad.name == "xvlm"
    prunable = dict(ad.prunable_parameters(tiny))
    linear = [f"{n}.weight" for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(prunable) == sorted(n for n in linear if not n.startswith(NOT_PRUNABLE))
    mods = {n: ad.modality(n) for n in prunable}
    # vision: q,k,v,out,fc1,fc2 per layer; text: q,k,v,out,inter,out; fusion: + cross q,k,v,out
    counts = {m: sum(v == m for v in mods.values()) for m in ("vision", "text", "fusion")}
    n_fusion = cfg.text_layers - cfg.fusion_start
    assert counts == {"vision": 6 * cfg.vision_layers, "text": 6 * cfg.fusion_start, "fusion": 10 * n_fusion}
    assert ad.modality("text_encoder.bert.encoder.layer.1.output.dense.weight") == "text"
    assert ad.modality("text_encoder.bert.encoder.layer.2.attention.self.query.weight") == "fusion"
    for name in ("vision_proj.weight", "text_proj.weight", "itm_head.0.weight", "itm_head.3.weight",
                 "bbox_head.0.weight", "text_encoder.cls.predictions.transform.dense.weight",
                 "text_encoder.cls.predictions.decoder.weight"):
        assert ad.modality(name) is None, name
    assert ad.keeps_all_tokens("vision_encoder.encoder.layers.0.mlp.fc1.weight")
    assert ad.keeps_all_tokens("text_encoder.bert.encoder.layer.3.crossattention.self.value.weight")
    assert not ad.keeps_all_tokens("text_encoder.bert.encoder.layer.3.crossattention.self.query.weight")
    assert not ad.keeps_all_tokens("text_encoder.bert.encoder.layer.0.attention.self.key.weight")
    # base: 12 vision layers, text layers 0-5, fusion layers 6-11
    with torch.device("meta"):
        base = XVLM(XVLMConfig.base())
    bmods = [get_adapter(base).modality(n) for n, _ in get_adapter(base).prunable_parameters(base)]
    assert (bmods.count("vision"), bmods.count("text"), bmods.count("fusion")) == (72, 36, 60)


def test_padding_rule_token_counts(tiny, calib_batches):
    pruner = multiflow.Pruner(tiny).calibrate(calib_batches, progress=False)
    n_img = tiny.config.num_image_tokens
    B = sum(b["input_ids"].shape[0] for b in calib_batches)
    real = sum(int(b["attention_mask"].sum()) for b in calib_batches)
    padded = sum(b["attention_mask"].numel() for b in calib_batches)
    assert real < padded  # the batches do hold padding
    t = pruner.tokens
    for n in pruner.layers:
        s = pruner.samples[n]
        assert s == B, n
        if n.startswith("vision_encoder."):
            assert t[n] == B * n_img, n
        elif ".crossattention.self.key." in n or ".crossattention.self.value." in n:
            assert t[n] == B * n_img, n
        else:  # text and fusion layers reading text tokens drop padding
            assert t[n] == real, n
    # the statistic itself: recompute one text layer by hand
    name = "text_encoder.bert.encoder.layer.0.attention.self.query.weight"
    seen = []
    h = pruner.layers[name].register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    try:
        acc = torch.zeros(tiny.config.text_width)
        with torch.no_grad():
            for b in calib_batches:
                seen.clear()
                tiny(b["pixel_values"], b["input_ids"], b["attention_mask"])
                acc += (seen[0][b["attention_mask"].bool()] ** 2).sum(0)
    finally:
        h.remove()
    torch.testing.assert_close(pruner.act_sq_norms[name], acc / B, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_masks_equal_the_equations(tiny, calib_batches, sparsity):
    pruner = multiflow.Pruner(tiny).calibrate(calib_batches, progress=False)
    masks = pruner.masks(sparsity)
    weights = {n: m.weight.detach() for n, m in pruner.layers.items()}
    acts = pruner.act_sq_norms
    ref = multiflow.masks_from_stats(weights, acts, pruner.modalities, sparsity, backend="reference")
    prior = naive_prior(weights, pruner.modalities, sparsity)
    assert set(pruner.modalities.values()) == {"vision", "text", "fusion"}
    for n, w in weights.items():
        assert masks.metadata["allocated_sparsity"][n] == pytest.approx(prior[n], abs=1e-12), n
        assert torch.equal(masks[n], ref[n]), n
        assert torch.equal(masks[n], naive_mask(naive_flow(w, acts[n]), prior[n])), n
    ms = masks.metadata["modality_sparsity"]
    assert set(ms) == {"vision", "text", "fusion"}
    for mod, s in ms.items():  # the prior gives each modality its own target
        assert s == pytest.approx(sparsity, abs=2e-3), mod


def test_snip_and_wanda_run(tiny, calib_batches):
    for method in ("snip", "wanda"):
        masks = multiflow.prune(tiny, calib_batches[:1], 0.5, method, progress=False)
        assert masks.sparsity == pytest.approx(0.5, abs=1e-3)
        assert set(masks.metadata["modality_sparsity"]) == {"vision", "text", "fusion"}
    # SNIP's gradient reaches every prunable layer of all three modalities
    p = multiflow.Pruner(tiny, "snip").calibrate(calib_batches[:1], progress=False)
    assert set(p.grads) == set(p.layers) and all(bool(g.abs().sum() > 0) for g in p.grads.values())


def test_cli_prune_xvlm_tiny(tmp_path, capsys):
    from multiflow.cli import main

    out = tmp_path / "run"
    argv = ["prune", "--model", "xvlm-tiny", "--out", str(out), "--no-progress", "--batches", "2", "--batch-size", "2"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model_class"] == "XVLM" and report["calibration_samples"] == 4
    for label, r in report["results"].items():
        assert set(r["modality_sparsity"]) == {"vision", "text", "fusion"}, label
    md = (out / "report.md").read_text()
    for mod in ("vision", "text", "fusion"):
        assert mod in md
    m = Masks.load(out / "masks_multiflow_s0.75.safetensors")
    assert set(m.metadata["modality_sparsity"]) == {"vision", "text", "fusion"}
    model = build_xvlm_tiny()
    m.apply(model)
    params = dict(model.named_parameters())
    for n, mk in m.items():
        assert (params[n][~mk] == 0).all() and (params[n][mk] != 0).all()
    assert "fusion=" in capsys.readouterr().out


def test_reference_masks_import(tiny, tmp_path):
    """The original code's X-VLM mask files use the model's own names (also under DDP's ``module.``)."""
    ad = get_adapter(tiny)
    g = torch.Generator().manual_seed(0)
    orig = {n: torch.rand(m.weight.shape, generator=g) > 0.5 for n, m in ad.prunable_parameters(tiny)}
    for prefix in ("", "module."):
        path = tmp_path / f"ref{prefix or '_'}pth"
        torch.save({f"{prefix}{n}_pruning_mask": m.float() for n, m in orig.items()}, path)
        masks = Masks.from_reference(path, tiny)
        assert masks.report["unmatched"] == [] and masks.report["uncovered"] == []
        assert set(masks) == set(orig) and all(torch.equal(masks[n], orig[n]) for n in orig)
        assert set(masks.metadata["modality_sparsity"]) == {"vision", "text", "fusion"}
    # X-VLM's fine-tuning models hold the text side as a BertModel: text_encoder.encoder.layer.N
    path = tmp_path / "ref_finetune.pth"
    torch.save({f"{n.replace('text_encoder.bert.', 'text_encoder.')}_pruning_mask": m for n, m in orig.items()}, path)
    masks = Masks.from_reference(path, tiny)
    assert masks.report["unmatched"] == [] and set(masks) == set(orig)
