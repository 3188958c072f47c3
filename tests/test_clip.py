"""The CLIP adapter (transformers CLIPModel) and the built-in clip-tiny model."""
import pytest
import torch

import multiflow
import multiflow_kernels as mk
from multiflow.cli import main
from multiflow.models import build_model, get_adapter


def _batch(length, pad_extra=0, seed=0):
    """Three texts of ``length`` tokens (one padded) and their images; ``pad_extra`` more
    padding columns appended to the same batch."""
    g = torch.Generator().manual_seed(seed)
    b = 3
    ids = torch.randint(3, 1000, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, length - 5:] = 0  # a padded row
    ids = ids.masked_fill(mask == 0, 0)
    ids[torch.arange(b), mask.sum(1) - 1] = 2  # eos ends each text
    pixel_values = torch.randn(b, 3, 64, 64, generator=g)
    ids = torch.cat([ids, torch.zeros(b, pad_extra, dtype=ids.dtype)], 1)
    mask = torch.cat([mask, torch.zeros(b, pad_extra, dtype=mask.dtype)], 1)
    return {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask}


def test_adapter_modalities_and_heads():
    model = build_model("clip-tiny")
    adapter = get_adapter(model)
    assert adapter.name == "clip"
    names = dict(adapter.prunable_parameters(model))
    assert {adapter.modality(n) for n in names} == {"vision", "text"}
    assert not any(n.startswith(("visual_projection", "text_projection")) for n in names)
    assert all(adapter.keeps_all_tokens(n) == n.startswith("vision_model.") for n in names)
    with pytest.raises(ValueError, match="no 'caption' task"):
        build_model("clip-tiny", task="caption")


def test_vision_layers_keep_all_tokens_even_when_the_text_is_as_long():
    """17 image tokens (64 px, 16 px patches) and texts of 17 tokens: the text's padding
    mask must not reach the vision layers (the generic adapter decided by sequence length,
    so it did); an extra padding column changes no statistic."""
    model = build_model("clip-tiny")
    stats = []
    for extra in (0, 1):
        pruner = multiflow.Pruner(model, "multiflow")
        pruner.calibrate([_batch(17, extra)], progress=False)
        stats.append((pruner.act_sq_norms, dict(pruner.tokens)))
    (a0, t0), (a1, t1) = stats
    vision = [n for n in a0 if n.startswith("vision_model.")]
    text = [n for n in a0 if n.startswith("text_model.")]
    assert vision and text
    assert all(t0[n] == t1[n] == 3 * 17 for n in vision)
    assert all(t0[n] == t1[n] == 3 * 17 - 5 for n in text)
    for n in vision + text:
        torch.testing.assert_close(a0[n], a1[n], rtol=1e-5, atol=1e-7)


def test_prune_and_sparsify_clip_tiny(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--model", "clip-tiny", "--no-progress", "--sparsity", "0.75", "--batches", "2",
                 "--out", str(out)]) == 0
    maskfile = out / "masks_multiflow_s0.75.safetensors"
    masks = multiflow.Masks.load(maskfile)
    assert set(masks.metadata["modality_sparsity"]) == {"text", "vision"}
    assert main(["sparsify", "clip-tiny", str(maskfile), "--out", str(tmp_path / "m.safetensors")]) == 0
    dense = build_model("clip-tiny")
    with torch.no_grad():
        for name, m in masks.items():
            dense.get_parameter(name).mul_(m)
    sparse = mk.load_sparse(mk.sparsify(build_model("clip-tiny"), masks), tmp_path / "m.safetensors")
    batch = _batch(12, seed=1)
    with torch.no_grad():
        want, got = dense(**batch), sparse(**batch)
    torch.testing.assert_close(got.logits_per_image, want.logits_per_image, rtol=1e-5, atol=1e-5)
