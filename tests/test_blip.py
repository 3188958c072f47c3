"""The BLIP adapter end to end on tiny configs: the three classes, modalities, transfer."""
import json

import pytest
import torch

import multiflow
from multiflow.models import get_adapter
from multiflow.models.blip import tiny_config

TASKS = ["retrieval", "caption", "vqa"]
NOT_PRUNABLE = ("vision_proj.", "text_proj.", "itm_head.", "text_decoder.cls.")


def _linear_weights(model):
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("task", TASKS)
def test_three_classes_end_to_end(task, blip_factory, calib_batches):
    model = blip_factory(task)
    masks = multiflow.prune(model, calib_batches, 0.75, progress=False)
    expected = [n for n in _linear_weights(model) if not n.startswith(NOT_PRUNABLE)]
    assert sorted(masks) == sorted(expected)
    mods = masks.metadata["modalities"]
    assert {mods[n] for n in masks} == {"vision", "text"}
    assert all((mods[n] == "vision") == n.startswith("vision_model.") for n in masks)
    # the prior gives each modality its own target sparsity (no ties with random init)
    for mod, s in masks.metadata["modality_sparsity"].items():
        assert s == pytest.approx(0.75, abs=1e-3), mod
    # every layer reached by the forward: no layer saw zero tokens
    assert masks.metadata["calibration_samples"] == 8
    for n, m in masks.items():
        assert m.shape == dict(model.named_parameters())[n].shape


@pytest.mark.parametrize("task", TASKS)
def test_snip_has_a_loss_for_every_class(task, blip_factory, calib_batches):
    model = blip_factory(task)
    masks = multiflow.prune(model, calib_batches[:1], 0.5, "snip", progress=False)
    assert masks.sparsity == pytest.approx(0.5, abs=1e-3)


def test_uninitialised_vision_tower_never_pruned_beyond_prior(calib_batches):
    """A BLIP whose vision init range is transformers' default 1e-10."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    cfg = json.loads(json.dumps(tiny_config().to_dict()))
    cfg["vision_config"]["initializer_range"] = 1e-10
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(BlipConfig(**{k: cfg[k] for k in ("vision_config", "text_config", "projection_dim", "image_text_hidden_size")}))
    pruner = multiflow.Pruner(model).calibrate(calib_batches, progress=False)
    # the naive float32 formula underflows to all-zero scores in parts of the vision tower
    underflowed = []
    for n, mod in pruner.layers.items():
        w, a = mod.weight.detach(), pruner.act_sq_norms[n]
        A = w.abs() * a.sqrt()
        if not (A.mean(1)[:, None] * w.abs() * A.mean(0)[None, :]).any():
            underflowed.append(n)
    assert underflowed and all(n.startswith("vision_model.") for n in underflowed)
    masks = pruner.masks(0.75)
    alloc = masks.metadata["allocated_sparsity"]
    for n, m in masks.items():
        assert int((~m).sum()) == int(alloc[n] * m.numel()), n


def test_masks_transfer_between_classes(blip_factory, calib_batches):
    ret = blip_factory("retrieval")
    masks = multiflow.prune(ret, calib_batches, 0.6, progress=False)
    vqa = blip_factory("vqa", seed=1)
    moved = masks.for_model(vqa)
    assert set(moved.report["matched"]) == set(masks)  # vision + text_encoder exist in VQA
    assert moved.report["unmatched"] == []
    assert all(n.startswith("text_decoder.") for n in moved.report["uncovered"])
    moved.apply(vqa)
    for n, m in moved.items():
        assert (dict(vqa.named_parameters())[n][~m] == 0).all()

    cap = blip_factory("caption")
    moved_cap = masks.for_model(cap)
    assert all(n.startswith("vision_model.") for n in moved_cap)
    assert len(moved_cap.report["unmatched"]) > 0


def test_adapter_modalities(blip_factory):
    model = blip_factory("vqa")
    ad = get_adapter(model)
    assert ad.name == "blip" and ad.task == "vqa"
    assert ad.modality("vision_model.encoder.layers.0.mlp.fc1.weight") == "vision"
    assert ad.modality("text_decoder.bert.encoder.layer.0.attention.self.query.weight") == "text"
    assert ad.modality("text_decoder.cls.predictions.transform.dense.weight") is None
    assert ad.modality("itm_head.weight") is None
    assert ad.keeps_all_tokens("text_encoder.encoder.layer.1.crossattention.self.value.weight")
    # the VQA answer decoder cross-attends to the padded question
    assert not ad.keeps_all_tokens("text_decoder.bert.encoder.layer.1.crossattention.self.value.weight")


@pytest.mark.parametrize("method", ["multiflow", "omp", "layer_magnitude", "lamp", "wanda"])
def test_kernels_and_reference_give_identical_masks(method, blip_factory, calib_batches):
    from multiflow.pruners import compute_masks

    model = blip_factory("caption")
    p = multiflow.Pruner(model, method).calibrate(calib_batches, progress=False)
    weights = {n: m.weight.detach() for n, m in p.layers.items()}
    for s, nm in ((0.63, None), (0.9, None), (None, (2, 4))):
        a, alloc_a = compute_masks(weights, p.act_sq_norms, p.modalities, s, method, nm=nm, backend="kernels",
                                   max_group_elements=50_000)
        b, alloc_b = compute_masks(weights, p.act_sq_norms, p.modalities, s, method, nm=nm, backend="reference")
        assert alloc_a == alloc_b
        assert all(torch.equal(a[n], b[n]) for n in weights)
