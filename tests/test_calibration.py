"""Streaming calibration: the statistic, the padding rule, batching, hooks and bad input."""
import pytest
import torch
from torch import nn

import multiflow


class TextToy(nn.Module):
    """Embedding -> Linear -> Linear; batches are dicts like a processor's."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.fc2(torch.relu(self.fc1(self.emb(input_ids))))


def _text_batches(n_batches=3, b=4, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(4, 50, (b, t), generator=g)
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        am = (torch.arange(t)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids.masked_fill(am == 0, 0), "attention_mask": am})
    return out


def _toy_pruner(model, **kw):
    return multiflow.Pruner(model, exclude=["unused"], **kw)


def test_statistic_matches_definition():
    torch.manual_seed(0)
    model = TextToy()
    batches = _text_batches()
    pruner = _toy_pruner(model).calibrate(batches, progress=False)
    # in-test: a_j = (1/S) sum over samples, non-padding tokens, of x_j^2
    with torch.no_grad():
        sums = torch.zeros(6, dtype=torch.float64)
        s = 0
        for b in batches:
            x = model.emb(b["input_ids"]).double()
            keep = b["attention_mask"].bool()
            sums += (x[keep] ** 2).sum(0)
            s += b["input_ids"].shape[0]
    a = pruner.act_sq_norms["fc1.weight"]
    assert a.dtype == torch.float32
    torch.testing.assert_close(a.double(), sums / s, rtol=1e-5, atol=0)
    assert pruner.samples["fc1.weight"] == 12
    assert pruner.tokens["fc1.weight"] == sum(int(b["attention_mask"].sum()) for b in batches)
    assert "unused.weight" not in pruner.layers


def test_padding_values_do_not_change_statistic():
    torch.manual_seed(0)
    model = TextToy()
    batches = _text_batches()
    other = [{"input_ids": b["input_ids"].masked_fill(b["attention_mask"] == 0, 17), "attention_mask": b["attention_mask"]} for b in batches]
    a1 = _toy_pruner(model).calibrate(batches, progress=False).act_sq_norms
    a2 = _toy_pruner(model).calibrate(other, progress=False).act_sq_norms
    for n in a1:
        torch.testing.assert_close(a1[n], a2[n], rtol=1e-6, atol=0)


def test_streaming_equals_one_big_batch_and_repeated_calls():
    torch.manual_seed(0)
    model = TextToy()
    batches = _text_batches(n_batches=4)
    big = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    a_big = _toy_pruner(model).calibrate([big], progress=False).act_sq_norms
    a_stream = _toy_pruner(model).calibrate(batches, progress=False).act_sq_norms
    p = _toy_pruner(model)
    p.calibrate(batches[:1], progress=False).calibrate(batches[1:], progress=False)
    for n in a_big:
        torch.testing.assert_close(a_stream[n], a_big[n], rtol=1e-5, atol=0)
        torch.testing.assert_close(p.act_sq_norms[n], a_big[n], rtol=1e-5, atol=0)
    assert p.calibration_samples == 16


@pytest.mark.parametrize("task", ["retrieval", "caption", "vqa"])
def test_blip_padding_rule(task, blip_factory, calib_batches):
    """Changing the ids under padding changes no BLIP statistic (text layers drop padding).
    For vqa the answer decoder cross-attends to the padded question: transformers drops that
    mask, so the adapter restores it (without that, these statistics moved by ~20%)."""
    model = blip_factory(task)
    b = calib_batches[0]
    assert (b["attention_mask"] == 0).any(), "the test needs padded captions"
    other = dict(b, input_ids=b["input_ids"].masked_fill(b["attention_mask"] == 0, 77))
    a1 = multiflow.Pruner(model).calibrate([b], progress=False).act_sq_norms
    a2 = multiflow.Pruner(model).calibrate([other], progress=False).act_sq_norms
    for n in a1:
        torch.testing.assert_close(a1[n], a2[n], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("task", ["retrieval", "caption", "vqa"])
def test_blip_streaming_equals_one_batch(task, blip_factory, calib_batches):
    model = blip_factory(task)
    from multiflow.data import BuiltinCalibrationSet, calibration_batches

    ds = BuiltinCalibrationSet(num_samples=8, image_size=64, seed=0)
    one = calibration_batches(ds, batch_size=8, image_size=64)
    four = calibration_batches(ds, batch_size=2, image_size=64)
    a1 = multiflow.Pruner(model).calibrate(one, progress=False).act_sq_norms
    a4 = multiflow.Pruner(model).calibrate(four, progress=False).act_sq_norms
    for n in a1:
        torch.testing.assert_close(a1[n], a4[n], rtol=1e-4, atol=1e-10)


def test_cross_attention_keys_keep_image_tokens(blip_factory, calib_batches):
    model = blip_factory("retrieval")
    p = multiflow.Pruner(model).calibrate(calib_batches[:1], progress=False)
    n_img = (64 // 8) ** 2 + 1
    b = calib_batches[0]
    key = "text_encoder.encoder.layer.0.crossattention.self.key.weight"
    query = "text_encoder.encoder.layer.0.crossattention.self.query.weight"
    vis = "vision_model.encoder.layers.0.self_attn.qkv.weight"
    assert p.tokens[key] == b["pixel_values"].shape[0] * n_img
    assert p.tokens[vis] == b["pixel_values"].shape[0] * n_img
    assert p.tokens[query] == int(b["attention_mask"].sum())


def test_weights_unchanged_and_hooks_removed(blip_factory, calib_batches):
    model = blip_factory("retrieval")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    model.train()
    multiflow.prune(model, calib_batches, 0.5, progress=False)
    multiflow.prune(model, calib_batches, 0.5, "snip", progress=False)
    assert model.training
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_hooks_removed_on_exception():
    torch.manual_seed(0)
    model = TextToy()
    calls = {"n": 0}

    def failing_forward(m, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return m(**batch)

    p = _toy_pruner(model, forward_fn=failing_forward)
    with pytest.raises(RuntimeError, match="boom"):
        p.calibrate(_text_batches(), progress=False)
    assert all(not m._forward_hooks for m in model.modules())
    # a failed call leaves no partial statistics
    assert p.calibration_samples == 0 and not p.sq_sums


def test_no_batches():
    with pytest.raises(ValueError, match="no batches"):
        _toy_pruner(TextToy()).calibrate([], progress=False)


def test_nan_activation_names_layer():
    model = TextToy()
    with torch.no_grad():
        model.fc1.bias[0] = float("nan")
    with pytest.raises(ValueError, match="fc2.weight"):
        _toy_pruner(model).calibrate(_text_batches(1), progress=False)


def test_layer_that_saw_no_tokens_is_named():
    model = TextToy()
    p = multiflow.Pruner(model)
    with pytest.raises(ValueError, match="unused.weight"):
        p.calibrate(_text_batches(1), progress=False)
    with pytest.raises(ValueError, match="unused.weight"):
        p.masks(0.5)
    with pytest.raises(ValueError, match="unused.weight"):
        multiflow.prune(TextToy(), _text_batches(1), 0.5, progress=False)
    # a layer whose tokens are all padding saw no tokens either
    model = TextToy()
    pad_only = [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4, dtype=torch.long)}]
    with pytest.raises(ValueError, match="fc1.weight"):
        _toy_pruner(model).calibrate(pad_only, progress=False)


def test_no_prunable_layers():
    with pytest.raises(ValueError, match="no prunable layers"):
        multiflow.Pruner(nn.Sequential(nn.ReLU(), nn.Conv2d(1, 1, 1)))
    with pytest.raises(ValueError, match="no prunable layers"):
        multiflow.Pruner(TextToy(), exclude=["fc*", "unused"])


def test_masks_before_calibration():
    with pytest.raises(ValueError, match="calibrate"):
        _toy_pruner(TextToy()).masks(0.5)
    # data-free methods need no calibration
    m = _toy_pruner(TextToy(), method="omp").masks(0.5)
    assert set(m) == {"fc1.weight", "fc2.weight"}


def test_calibrate_once_many_sparsities_equals_masks_from_stats():
    torch.manual_seed(0)
    model = TextToy()
    p = _toy_pruner(model).calibrate(_text_batches(), progress=False)
    for s in (0.3, 0.63, 0.9):
        m = p.masks(s)
        ref = multiflow.masks_from_stats(
            {n: mod.weight for n, mod in p.layers.items()}, p.act_sq_norms, p.modalities, s
        )
        assert all(torch.equal(m[n], ref[n]) for n in ref)
        assert m.metadata["sparsity"] == s and m.metadata["method"] == "multiflow"
        assert m.metadata["calibration_samples"] == 12


def test_vision_layers_keep_tokens_when_lengths_coincide(calib_batches):
    """Image and text of the same length: vision layers still keep every token."""
    import json

    from transformers import BlipConfig, BlipForImageTextRetrieval

    from multiflow.models.blip import tiny_config

    cfg = json.loads(json.dumps(tiny_config().to_dict()))
    cfg["vision_config"].update(image_size=32, patch_size=8)  # 16 patches + CLS = 17 tokens
    model = BlipForImageTextRetrieval(BlipConfig(**{k: cfg[k] for k in ("vision_config", "text_config", "projection_dim", "image_text_hidden_size")}))
    b = calib_batches[0]
    t = 17
    B = b["pixel_values"].shape[0]
    lengths = torch.tensor([5, 9, 17, 12][:B])
    am = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = torch.randint(4, 1000, (B, t), generator=torch.Generator().manual_seed(0)).masked_fill(am == 0, 0)
    batch = {"pixel_values": torch.nn.functional.interpolate(b["pixel_values"], size=32), "input_ids": ids, "attention_mask": am}
    assert (am == 0).any()
    p = multiflow.Pruner(model).calibrate([batch], progress=False)
    assert p.tokens["vision_model.encoder.layers.0.mlp.fc1.weight"] == B * t
    assert p.tokens["text_encoder.encoder.layer.0.crossattention.self.key.weight"] == B * t
    assert p.tokens["text_encoder.encoder.layer.0.attention.self.query.weight"] == int(am.sum())


def test_float64_model():
    torch.manual_seed(0)
    model = TextToy().double()
    masks = multiflow.prune(model, _text_batches(), 0.5, exclude=["unused"], progress=False)
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    assert masks.sparsity == pytest.approx(0.5, abs=0.02)


def test_nm_masks_record_the_sparsity_they_prune():
    """With nm=(N, M) the sparsity argument is ignored: the metadata and summary give the
    1 - N / M the masks prune, not the ignored number."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    masks = multiflow.prune(net, [torch.randn(4, 8)], 0.9, nm=(2, 4), progress=False)
    assert masks.metadata["sparsity"] == 0.5 and masks.metadata["nm"] == [2, 4]
    assert abs(masks.sparsity - 0.5) < 1e-12
    assert "target sparsity=0.5000" in masks.summary()


def test_nonfinite_activations_name_the_layer_whose_weight_caused_them():
    """An Inf weight in layer a makes b's activations Inf: the error names a's weight first."""
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("a", torch.nn.Linear(6, 6))
    net.add_module("b", torch.nn.Linear(6, 3))
    with torch.no_grad():
        net.a.weight[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"weights of layers \['a.weight'\] contain NaN/Inf; NaN/Inf in the activations "
                                         r"of layers: \['b.weight'\]"):
        multiflow.Pruner(net).calibrate([torch.randn(4, 6)], progress=False)
    with pytest.raises(ValueError, match=r"^NaN/Inf in the activations of layers: \['0.weight', '1.weight'\]"):
        multiflow.Pruner(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 2))).calibrate(
            [torch.full((2, 6), float("nan"))], progress=False)


def test_masks_of_another_method_refuse_statistics_from_snip_loss_passes(blip_factory, calib_batches):
    """SNIP's calibration runs loss passes (each sample twice, with shifted negatives): its
    activation sums are not MULTIFLOW's / Wanda's statistic, so asking those masks of that
    Pruner is refused instead of silently mixing calibrations; magnitude methods still work."""
    model = blip_factory()
    pruner = multiflow.Pruner(model, "snip")
    pruner.calibrate(calib_batches[:1], progress=False)
    for method in ("multiflow", "wanda"):
        with pytest.raises(ValueError, match="calibrated with 'snip'.s loss passes"):
            pruner.masks(0.5, method=method)
    assert pruner.masks(0.5, method="omp").metadata["method"] == "omp"
