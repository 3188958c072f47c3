"""Masks: save / load / apply / summary / reference import, and bad files."""
import json
import os

import pytest
import torch

import multiflow
from multiflow import Masks


@pytest.fixture(scope="module")
def blip_masks(blip_factory, calib_batches):
    model = blip_factory("retrieval")
    return model, multiflow.prune(model, calib_batches, 0.63, progress=False)


def test_save_load_roundtrip(tmp_path, blip_masks):
    _, masks = blip_masks
    path = masks.save(tmp_path / "m.safetensors")
    loaded = Masks.load(path)
    assert list(loaded) == list(masks)
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    for key in ("method", "sparsity", "layer_sparsity", "modality_sparsity", "calibration_samples", "modalities"):
        assert loaded.metadata[key] == masks.metadata[key], key
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_apply_zeroes_pruned_only(blip_factory, blip_masks):
    _, masks = blip_masks
    model = blip_factory("retrieval")
    before = {n: p.clone() for n, p in model.named_parameters()}
    masks.apply(model)
    for n, p in model.named_parameters():
        if n in masks:
            assert (p[~masks[n]] == 0).all()
            assert torch.equal(p[masks[n]], before[n][masks[n]])
        else:
            assert torch.equal(p, before[n])


def test_apply_to_wrong_model_lists_names(blip_masks):
    _, masks = blip_masks
    bad = Masks({"nope.weight": torch.ones(2, 2, dtype=torch.bool),
                 "vision_model.encoder.layers.0.mlp.fc1.weight": torch.ones(3, 3, dtype=torch.bool)})
    model = blip_masks[0]
    with pytest.raises(ValueError, match="nope.weight") as e:
        bad.apply(model)
    assert "mis-shaped" in str(e.value) and "fc1.weight" in str(e.value)


def test_summary_is_readable(blip_masks):
    _, masks = blip_masks
    text = masks.summary()
    assert "vision" in text and "text" in text and "total" in text
    assert "vision_model.encoder.layers.0.self_attn.qkv.weight" in text


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        Masks.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="bad.safetensors"):
        Masks.load(bad)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2, 2, dtype=torch.bool)}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(ValueError, match="not a multiflow mask file"):
        Masks.load(tmp_path / "nometa.safetensors")
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "float.safetensors"), metadata={"multiflow": "{}"})
    with pytest.raises(ValueError, match="non-boolean"):
        Masks.load(tmp_path / "float.safetensors")
    for i, meta in enumerate(("[1, 2]", '"abc"', "3", "null")):  # JSON, but not an object
        save_file({"w": torch.ones(2, 2, dtype=torch.bool)}, str(tmp_path / f"m{i}.safetensors"),
                  metadata={"multiflow": meta})
        with pytest.raises(ValueError, match=f"m{i}.safetensors has corrupt metadata"):
            Masks.load(tmp_path / f"m{i}.safetensors")
    # valid JSON objects whose fields have the wrong types: refused naming the field (inspect and
    # summary used to raise AttributeError / TypeError, or a format error naming neither)
    for i, (meta, field) in enumerate((({"modalities": [1, 2]}, "modalities"), ({"nm": 5}, "nm"),
                                       ({"nm": [2, True]}, "nm"), ({"allocated_sparsity": [0.5]}, "allocated_sparsity"),
                                       ({"layer_sparsity": {"w": "x"}}, "layer_sparsity"), ({"sparsity": "x"}, "sparsity"),
                                       ({"seed": 1.5}, "seed"), ({"method": 3}, "method"))):
        f = tmp_path / f"t{i}.safetensors"
        save_file({"w": torch.ones(2, 2, dtype=torch.bool)}, str(f), metadata={"multiflow": json.dumps(meta)})
        with pytest.raises(ValueError, match=f"t{i}.safetensors has corrupt metadata: '{field}' must be"):
            Masks.load(f)
    with pytest.raises(ValueError, match=r"cannot save mask file .*metadata 'model' must be a string"):
        Masks({"w": torch.ones(2, 2, dtype=torch.bool)}, {"model": {"name": "x"}}).save(tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()
    f = tmp_path / "ok.safetensors"
    save_file({"w": torch.ones(2, 2, dtype=torch.bool)}, str(f),
              metadata={"multiflow": json.dumps({"nm": None, "sparsity": 0.5, "seed": 3, "modalities": {"w": "text"}})})
    assert Masks.load(f).metadata["modalities"] == {"w": "text"}


def test_failed_save_leaves_existing_file(tmp_path, monkeypatch, blip_masks):
    _, masks = blip_masks
    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"old")
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        masks.save(path)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["keep.safetensors"]
    with pytest.raises(FileNotFoundError):
        Masks({}).save(tmp_path / "no" / "such" / "dir.safetensors")


def test_from_reference_maps_original_blip_names(tmp_path, blip_factory):
    model = blip_factory("retrieval")
    g = torch.Generator().manual_seed(0)
    ref = {}
    expected = {}
    for i in range(4):
        for orig, hf in (
            (f"visual_encoder.blocks.{i}.attn.qkv.weight", f"vision_model.encoder.layers.{i}.self_attn.qkv.weight"),
            (f"visual_encoder.blocks.{i}.attn.proj.weight", f"vision_model.encoder.layers.{i}.self_attn.projection.weight"),
            (f"visual_encoder.blocks.{i}.mlp.fc1.weight", f"vision_model.encoder.layers.{i}.mlp.fc1.weight"),
            (f"text_encoder.encoder.layer.{i}.attention.self.query.weight", f"text_encoder.encoder.layer.{i}.attention.self.query.weight"),
        ):
            shape = dict(model.named_parameters())[hf].shape
            m = torch.rand(shape, generator=g) > 0.5
            ref[orig + "_pruning_mask"] = m
            expected[hf] = m
    ref["visual_encoder_m.blocks.0.attn.qkv.weight_pruning_mask"] = torch.ones(3, 3, dtype=torch.bool)
    path = tmp_path / "ref.pth"
    torch.save(ref, path)
    masks = Masks.from_reference(path, model)
    assert set(masks) == set(expected)
    assert all(torch.equal(masks[n], expected[n]) for n in expected)
    assert masks.report["unmatched"] == ["visual_encoder_m.blocks.0.attn.qkv.weight"]
    assert masks.metadata["modalities"]["vision_model.encoder.layers.0.mlp.fc1.weight"] == "vision"
    with pytest.raises(FileNotFoundError):
        Masks.from_reference(tmp_path / "nope.pth", model)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth"):
        Masks.from_reference(tmp_path / "junk.pth", model)
    name = "visual_encoder.blocks.0.mlp.fc1.weight"
    shape = expected["vision_model.encoder.layers.0.mlp.fc1.weight"].shape
    for t in (torch.full(shape, 0.5), torch.full(shape, 0.5 + 0.5j), torch.full(shape, 2, dtype=torch.int8)):
        torch.save({name + "_pruning_mask": t}, path)
        with pytest.raises(ValueError, match="not boolean"):
            Masks.from_reference(path, model)
    torch.save({name + "_pruning_mask": torch.ones(shape, dtype=torch.complex64)}, path)  # 0/1 of any dtype: a mask
    assert Masks.from_reference(path, model)["vision_model.encoder.layers.0.mlp.fc1.weight"].all()


def test_non_boolean_masks_rejected():
    with pytest.raises(ValueError, match="boolean"):
        Masks({"w": torch.ones(2)})


def test_apply_zeroes_nan_at_pruned_places():
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[0, 0] = False
    Masks({"weight": keep}).apply(lin)
    assert lin.weight[0, 0] == 0 and torch.isfinite(lin.weight).all()
