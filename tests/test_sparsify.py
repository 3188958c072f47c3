"""SparseLinear (masked format), sparsify, sparse checkpoints and the memory report."""
import copy

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401  (nn.utils.prune)
from torch import nn
from torch.nn import functional as F

import multiflow
import multiflow_kernels as mk
from multiflow.models import get_adapter


def _layer(in_f=45, out_f=13, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f).to(dtype)
    mask = torch.rand(out_f, in_f) > 0.6
    mask[0] = False  # an all-pruned row
    mask[1] = True  # an all-kept row
    return lin, mask


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
def test_forward_equals_masked_dense(dtype, tol):
    lin, mask = _layer(dtype=dtype)
    sp = mk.SparseLinear.from_dense(lin, mask, format="masked")
    x = torch.randn(2, 5, 45).to(dtype)
    ref = nn.functional.linear(x.double(), (lin.weight * mask).double(), lin.bias.double())
    out = sp(x)
    assert out.dtype == dtype and out.shape == (2, 5, 13)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= tol
    assert torch.equal(sp.mask, mask)


def test_pruned_weights_never_revive_under_adam():
    lin, mask = _layer()
    sp = mk.SparseLinear.from_dense(lin, mask, format="masked")
    opt = torch.optim.Adam(sp.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        sp(torch.randn(8, 45)).square().sum().backward()
        assert (sp.weight.grad[~mask] == 0).all()
        opt.step()
    assert (sp.weight.detach()[~mask] == 0).all()
    assert (sp.weight.detach()[mask] != lin.weight.detach()[mask]).any()


def test_storage_state_dict_and_to():
    lin, mask = _layer()
    sp = mk.SparseLinear.from_dense(lin, mask, format="masked")
    assert sp.storage_bytes() == 13 * 45 * 4 + 13 * 2 * 4
    fresh = mk.SparseLinear(45, 13, format="masked")
    fresh.load_state_dict(sp.state_dict())
    x = torch.randn(4, 45)
    assert torch.equal(fresh(x), sp(x))
    half = copy.deepcopy(sp).to(torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16 and half.mask_bits.dtype == torch.int32
    assert half(x.bfloat16()).dtype == torch.bfloat16


def test_unknown_formats():
    lin, mask = _layer()
    with pytest.raises(ValueError, match="pass it to sparsify"):
        mk.SparseLinear.from_dense(lin, mask, format="auto")
    with pytest.raises(ValueError, match="unknown sparse format"):
        mk.SparseLinear.from_dense(lin, mask, format="csr")
    with pytest.raises(ValueError, match="mask shape"):
        mk.SparseLinear.from_dense(lin, mask[:, :3])


def _outputs(model, batch):
    """The model's main output (ITM scores, LM logits) and its loss (which, for VQA, is what
    reaches the answer decoder), flattened into one tensor."""
    adapter = get_adapter(model)
    out = adapter.forward(model, batch)
    parts = [adapter.loss(model, batch).reshape(1)]
    for key in ("itm_score", "logits", "itm_logits"):
        t = getattr(out, key, None)
        if isinstance(t, torch.Tensor):
            parts.append(t.flatten())
    parts.append(out.last_hidden_state.flatten() if hasattr(out, "last_hidden_state") else parts[0])
    return torch.cat(parts)


@pytest.mark.parametrize("fmt", [None, "masked"], ids=["default-bitmap", "masked"])
@pytest.mark.parametrize("task", ["retrieval", "caption", "vqa"])
def test_sparsify_blip_equals_masked_dense(task, fmt, blip_factory, calib_batches):
    model = blip_factory(task)
    masks = multiflow.prune(model, calib_batches, 0.63, progress=False)
    dense = copy.deepcopy(model)
    masks.apply(dense)
    mk.sparsify(model, masks) if fmt is None else mk.sparsify(model, masks, format=fmt)
    assert {m.format for m in model.modules() if isinstance(m, mk.SparseLinear)} == {fmt or "bitmap"}
    assert sum(isinstance(m, mk.SparseLinear) for m in model.modules()) == len(masks)
    assert not any(isinstance(m, nn.Linear) and f"{n}.weight" in masks for n, m in model.named_modules())
    with torch.no_grad():
        got, ref = _outputs(model, calib_batches[0]), _outputs(dense, calib_batches[0])
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5


def test_sparsify_rejects_masks_that_do_not_fit(blip_factory):
    model = blip_factory("retrieval")
    bad = {"nope.weight": torch.ones(2, 2, dtype=torch.bool),
           "vision_model.encoder.layers.0.mlp.fc1.weight": torch.ones(3, 3, dtype=torch.bool),
           "vision_model.embeddings.patch_embedding.weight": torch.ones(1, dtype=torch.bool)}
    with pytest.raises(ValueError) as e:
        mk.sparsify(model, bad)
    msg = str(e.value)
    assert "nope.weight" in msg and "fc1.weight" in msg and "patch_embedding" in msg
    assert not any(isinstance(m, mk.SparseLinear) for m in model.modules())  # nothing changed


def test_save_load_round_trip(tmp_path, blip_factory, calib_batches):
    model = blip_factory("retrieval")
    masks = multiflow.prune(model, calib_batches, 0.75, progress=False)
    mk.sparsify(model, masks)
    path = mk.save_sparse(model, tmp_path / "model.safetensors")
    other = mk.sparsify(blip_factory("retrieval", seed=5), masks)
    mk.load_sparse(other, path)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(_outputs(model, calib_batches[0]), _outputs(other, calib_batches[0]))
    # a model sparsified with other masks does not take the file
    fewer = {n: m for i, (n, m) in enumerate(masks.items()) if i % 2}
    with pytest.raises(ValueError, match="sparsified differently"):
        mk.load_sparse(mk.sparsify(blip_factory("retrieval"), fewer), path)
    with pytest.raises(FileNotFoundError):
        mk.load_sparse(other, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.safetensors"):
        mk.load_sparse(other, tmp_path / "junk.safetensors")


def test_memory_report(blip_factory, calib_batches):
    model = blip_factory("retrieval")
    masks = multiflow.prune(model, calib_batches, 0.5, progress=False)
    mk.sparsify(model, masks, format="masked")
    rep = mk.memory_report(model)
    assert set(rep["layers"]) == {n[: -len(".weight")] for n in masks}
    dense = sum(m.numel() * 4 for m in masks.values())
    assert rep["total"]["dense_bytes"] == dense
    # masked format: the dense weight plus one bit per weight
    assert rep["total"]["sparse_bytes"] == dense + sum(m.shape[0] * ((m.shape[1] + 31) // 32) * 4 for m in masks.values())
    assert "total" in str(rep)


def test_sparsify_xvlm_equals_masked_dense(calib_batches):
    from multiflow.models.xvlm import build_xvlm_tiny

    model = build_xvlm_tiny()
    masks = multiflow.prune(model, calib_batches, 0.75, progress=False)
    assert set(masks.metadata["modality_sparsity"]) == {"vision", "text", "fusion"}
    dense = masks.apply(copy.deepcopy(model))
    mk.sparsify(model, masks)
    with torch.no_grad():
        got, ref = _outputs(model, calib_batches[0]), _outputs(dense, calib_batches[0])
        fused = model(calib_batches[0]["pixel_values"], calib_batches[0]["input_ids"],
                      calib_batches[0]["attention_mask"]).fusion_embeds
        fused_ref = dense(calib_batches[0]["pixel_values"], calib_batches[0]["input_ids"],
                          calib_batches[0]["attention_mask"]).fusion_embeds
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5
    assert ((fused - fused_ref).norm() / fused_ref.norm()).item() <= 1e-5


def _two_layers(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    state = model.state_dict()
    return set(state) == set(before) and all(torch.equal(state[k], before[k]) for k in before)


@pytest.mark.parametrize("fmt", ["bitmap", "masked"])
def test_failed_load_leaves_the_model_untouched(tmp_path, fmt):
    """load_state_dict copies tensor by tensor and raises at the end: load_sparse checks every
    name, shape and dtype first, so a file that does not fit changes nothing."""
    masks = {"0.weight": torch.rand(8, 12) > 0.5, "2.weight": torch.rand(4, 8) > 0.5}
    path = mk.save_sparse(mk.sparsify(_two_layers(), masks, format=fmt), tmp_path / "m.safetensors")

    class Extra(nn.Sequential):  # the same layers plus one parameter the file lacks
        def __init__(self):
            super().__init__(*_two_layers(seed=1))
            self.extra = nn.Parameter(torch.zeros(3))

    cases = {"extra parameter": mk.sparsify(Extra(), masks, format=fmt)}
    other = mk.sparsify(_two_layers(seed=1), {"0.weight": masks["0.weight"]}, format=fmt)
    cases["layout"] = other  # layer 2 not sparse: the layouts differ
    half = mk.sparsify(_two_layers(seed=1), masks, format=fmt)
    half[2].bias.data = half[2].bias.data.half()
    cases["dtype"] = half
    for what, model in cases.items():
        before = _state(model)
        with pytest.raises(ValueError, match="m.safetensors"):
            mk.load_sparse(model, path)
        assert _unchanged(model, before), what
    # the shape of a plain layer that the layout check cannot see
    wide = mk.sparsify(nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 4)),
                       masks, format=fmt)
    path2 = mk.save_sparse(wide, tmp_path / "wide.safetensors")
    narrow = mk.sparsify(nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 2)),
                         masks, format=fmt)
    before = _state(narrow)
    with pytest.raises(ValueError, match=r"3\.weight \(shape \(4, 4\) in the file, \(2, 4\) in the model\)"):
        mk.load_sparse(narrow, path2)
    assert _unchanged(narrow, before)


def test_load_rejects_a_non_integer_format_version(tmp_path):
    import json

    from safetensors.torch import save_file

    model = mk.sparsify(_two_layers(), {"0.weight": torch.rand(8, 12) > 0.5})
    meta = json.dumps({"format_version": "2", "layers": {}})
    path = tmp_path / "v.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"multiflow_kernels": meta})
    with pytest.raises(ValueError, match="format_version '2' is not an integer"):
        mk.load_sparse(model, path)


def test_sparsify_rejects_linear_subclasses_and_tied_weights():
    """nn.MultiheadAttention reads out_proj.weight itself (a SparseLinear there would be skipped,
    and a masked one's pruned weights would train); a tied weight would come apart."""
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match=r"out_proj\.weight \(weight of a NonDynamicallyQuantizableLinear that "
                                         r"nn.MultiheadAttention uses"):
        mk.sparsify(mha, {"out_proj.weight": torch.rand(8, 8) > 0.5}, format="masked")
    assert type(mha.out_proj) is not mk.SparseLinear

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Linear(6, 6), nn.Linear(6, 6)
            self.dec.weight = self.enc.weight

    class Scaled(nn.Linear):  # its own forward: replacing it would drop the scale
        def forward(self, x):
            return 2 * super().forward(x)

    class Tagged(nn.Linear):  # nn.Linear's forward: replaced like a plain one
        tag = "kept"

    mixed = nn.Sequential(Scaled(6, 6), Tagged(6, 6))
    with pytest.raises(ValueError, match=r"0\.weight \(weight of a Scaled that has its own forward"):
        mk.sparsify(mixed, {"0.weight": torch.rand(6, 6) > 0.5})
    mk.sparsify(mixed, {"1.weight": torch.rand(6, 6) > 0.5})
    assert type(mixed[0]) is Scaled and isinstance(mixed[1], mk.SparseLinear)

    # a weight that a forward pre-hook recomputes (torch.nn.utils.prune, weight_norm, spectral_norm):
    # the replacement would keep the hook and fail; a parametrization's weight is baked in
    for reparam in (lambda m: nn.utils.prune.l1_unstructured(m, "weight", amount=0.5),
                    lambda m: nn.utils.weight_norm(m), lambda m: nn.utils.spectral_norm(m)):
        model = nn.Sequential(nn.Linear(6, 6))
        reparam(model[0])
        with pytest.raises(ValueError, match=r"0\.weight \(not a Parameter: a forward pre-hook recomputes it"):
            mk.sparsify(model, {"0.weight": torch.rand(6, 6) > 0.5})
        assert type(model[0]) is nn.Linear
    model = nn.Sequential(nn.Linear(6, 6))
    nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    mask = model[0].weight_mask.bool()
    nn.utils.prune.remove(model[0], "weight")
    x = torch.randn(2, 6)
    want = model(x)
    mk.sparsify(model, {"0.weight": mask})
    torch.testing.assert_close(model(x), want)
    model = nn.Sequential(nn.Linear(6, 6))  # a frozen weight registered as a buffer: no hook, replaced
    w = model[0].weight.detach().clone()
    del model[0].weight
    model[0].register_buffer("weight", w)
    mask = torch.rand(6, 6) > 0.5
    want = F.linear(x, w * mask, model[0].bias)
    mk.sparsify(model, {"0.weight": mask})
    torch.testing.assert_close(model(x), want)
    model = nn.Sequential(nn.Linear(6, 6))
    nn.utils.parametrizations.weight_norm(model[0])
    want = model(x)
    mk.sparsify(model, {"0.weight": torch.ones(6, 6, dtype=torch.bool)}, format="masked")
    torch.testing.assert_close(model(x), want)

    tied = Tied()
    with pytest.raises(ValueError, match=r"enc\.weight \(tied: the same Parameter is also dec\.weight"):
        mk.sparsify(tied, {"enc.weight": torch.rand(6, 6) > 0.5})
    assert not any(isinstance(m, mk.SparseLinear) for m in tied.modules())
    with pytest.raises(ValueError, match="the model itself is the nn.Linear"):
        mk.sparsify(nn.Linear(4, 4), {"weight": torch.rand(4, 4) > 0.5})


def test_sparsify_replaces_a_shared_module_under_every_name():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(10, 10)
            self.again = self.proj  # one module, two names

        def forward(self, x):
            return self.again(torch.relu(self.proj(x)))

    torch.manual_seed(0)
    model = Shared()
    mask = torch.rand(10, 10) > 0.5
    dense = copy.deepcopy(model)
    with torch.no_grad():
        dense.proj.weight.mul_(mask)
    mk.sparsify(model, {"proj.weight": mask})
    assert isinstance(model.proj, mk.SparseLinear) and model.again is model.proj
    x = torch.randn(3, 10)
    torch.testing.assert_close(model(x), dense(x))
    with pytest.raises(ValueError, match="the same module as proj.weight, with a different mask"):
        mk.sparsify(Shared(), {"proj.weight": mask, "again.weight": ~mask})


def test_sparsify_is_all_or_nothing(monkeypatch):
    """A layer that fails to pack after the checks (out of memory, say) leaves every layer as it was."""
    model = _two_layers()
    masks = {"0.weight": torch.rand(8, 12) > 0.5, "2.weight": torch.rand(4, 8) > 0.5}
    real = mk.SparseLinear.from_dense.__func__
    calls = []

    def failing(cls, linear, mask, format="bitmap"):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure while packing")
        return real(cls, linear, mask, format)

    monkeypatch.setattr(mk.SparseLinear, "from_dense", classmethod(failing))
    with pytest.raises(RuntimeError, match="simulated"):
        mk.sparsify(model, masks)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    meta = nn.Sequential(nn.Linear(4, 4, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        mk.sparsify(meta, {"0.weight": torch.rand(4, 4) > 0.5})


@pytest.mark.parametrize("fmt", ["bitmap", "masked", "2:4"])
def test_sparsify_keeps_frozen_and_eval_state(fmt):
    model = _two_layers().requires_grad_(False).eval()
    masks = {"0.weight": torch.rand(8, 12) > 0.5, "2.weight": torch.tensor([1, 0, 1, 0] * 2, dtype=torch.bool).repeat(4, 1)}
    if fmt == "2:4":
        masks["0.weight"] = torch.tensor([0, 1, 1, 0] * 3, dtype=torch.bool).repeat(8, 1)
    mk.sparsify(model, masks, format=fmt)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())
    layer = mk.SparseLinear.from_dense(nn.Linear(12, 8), masks["0.weight"], format=fmt)
    assert layer.training and all(p.requires_grad for p in layer.parameters())


def test_sparse_linear_checks_its_sizes():
    with pytest.raises(ValueError, match="in_features must be >= 0, got -1"):
        mk.SparseLinear(-1, 4)
    with pytest.raises(TypeError, match="out_features must be an int, got float"):
        mk.SparseLinear(4, 2.5)


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_save_load_a_layer_registered_under_two_names(tmp_path, fmt):
    """safetensors saves a shared layer once, under one of its names: load_sparse checks and
    loads it under whichever name the file kept (enc / dec: the file keeps dec)."""

    class Shared(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.enc = nn.Linear(64, 16)
            self.dec = self.enc

        def forward(self, x):
            return self.dec(x)

    mask = torch.tensor([1, 0, 0, 1], dtype=torch.bool).repeat(16, 16) if fmt == "2:4" else torch.rand(16, 64) > 0.5
    model = mk.sparsify(Shared(0), {"enc.weight": mask}, format=fmt)
    path = mk.save_sparse(model, tmp_path / "m.safetensors")
    other = mk.sparsify(Shared(1), {"enc.weight": mask if fmt == "2:4" else torch.rand(16, 64) > 0.5}, format=fmt)
    mk.load_sparse(other, path)
    x = torch.randn(3, 64)
    assert torch.equal(other(x), model(x)) and other.enc is other.dec
    # a skeleton of empty layers (SparseLinear(in, out)): its bitmap values have no bytes, so
    # the second name is matched by module, not by storage
    skeleton = nn.Module()
    skeleton.enc = skeleton.dec = mk.SparseLinear(64, 16, format=fmt)
    mk.load_sparse(skeleton, path)
    assert torch.equal(skeleton.dec(x), model(x))


def test_save_load_a_buffer_that_views_a_parameter(tmp_path):
    """safetensors saves a tensor once and drops a persistent buffer that is a view of part of
    it: load_sparse loads the tensor, and the view follows."""

    class WithView(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.table = nn.Parameter(torch.randn(4, 8))
            self.register_buffer("first_row", self.table.data[0])

    torch.manual_seed(0)
    mask = torch.rand(8, 8) > 0.5
    src = mk.sparsify(WithView(), {"lin.weight": mask})
    path = mk.save_sparse(src, tmp_path / "v.safetensors")
    dst = mk.sparsify(WithView(), {"lin.weight": mask})
    mk.load_sparse(dst, path)
    assert torch.equal(dst.table, src.table) and torch.equal(dst.first_row, src.table[0])
    x = torch.randn(2, 8)
    assert torch.equal(dst.lin(x), src.lin(x))


def test_load_takes_buffers_of_any_safetensors_dtype(tmp_path):
    model = mk.sparsify(_two_layers(), {"0.weight": torch.rand(8, 12) > 0.5})
    model.register_buffer("scale8", torch.ones(3, dtype=torch.float8_e4m3fn))
    model.register_buffer("count", torch.arange(4).to(torch.uint16))
    path = mk.save_sparse(model, tmp_path / "m.safetensors")
    other = mk.sparsify(_two_layers(seed=1), {"0.weight": torch.rand(8, 12) > 0.5})
    other.register_buffer("scale8", torch.zeros(3, dtype=torch.float8_e4m3fn))
    other.register_buffer("count", torch.zeros(4, dtype=torch.uint16))
    mk.load_sparse(other, path)
    assert torch.equal(other.count, model.count) and torch.equal(other.scale8.float(), model.scale8.float())


@pytest.mark.parametrize("fmt", ["bitmap", "masked"])
def test_sparsify_keeps_hooks_and_the_bias_parameter(fmt):
    """The replaced layer's forward hooks still run (a pre-hook that changes the input changes
    the output as before), their handles still remove them, and the bias stays the same
    Parameter (shared with another module, or held by an optimizer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 6))
    model[1].bias = model[0].bias  # a bias shared by two layers
    pre = model[0].register_forward_pre_hook(lambda mod, inp: (inp[0] * 2,))
    seen = []
    post = model[0].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    x = torch.randn(3, 8)
    keep = torch.ones(6, 8, dtype=torch.bool)
    want = model(x)
    bias = model[0].bias
    mk.sparsify(model, {"0.weight": keep}, format=fmt)
    assert isinstance(model[0], mk.SparseLinear)
    torch.testing.assert_close(model(x), want)
    assert len(seen) == 2 and model[0].bias is bias and model[1].bias is bias
    pre.remove()
    post.remove()
    assert not torch.allclose(model(x), want) and len(seen) == 2


def test_sparsify_names_masks_it_cannot_use():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"0.weight \(mask is a meta tensor"):
        mk.sparsify(model, {"0.weight": torch.ones(4, 8, dtype=torch.bool, device="meta")})
    with pytest.raises(ValueError, match=r"0.weight \(mask is a torch.sparse_coo tensor"):
        mk.sparsify(model, {"0.weight": torch.ones(4, 8, dtype=torch.bool).to_sparse()})
    for rows in ("8", 2.5, True, 0):
        with pytest.raises(ValueError, match="rows .* must be an int >= 1"):
            mk.sparsify(model, {"0.weight": torch.ones(4, 8, dtype=torch.bool)}, format="auto", rows=rows)
    mk.sparsify(model, {"0.weight": torch.ones(4, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"0.weight \(the layer is already a SparseLinear, format 'bitmap'\)"):
        mk.sparsify(model, {"0.weight": torch.ones(4, 8, dtype=torch.bool)})


def test_small_reports_and_folder_paths(tmp_path):
    model = mk.sparsify(nn.Sequential(nn.Linear(16, 8)), {"0.weight": torch.rand(8, 16) > 0.5})
    text = str(mk.memory_report(model))
    assert "dense KiB" in text and " 0.500 " in text  # 8 x 16 float32 = 0.5 KiB, not 0.000 MiB
    with pytest.raises(IsADirectoryError, match="is a folder"):
        mk.load_sparse(model, tmp_path)


@pytest.mark.parametrize("target", ["bitmap", "2:4", "masked"])
def test_to_format_after_sparse_fine_tuning(target):
    """A masked layer fine-tuned, then converted for inference: the same outputs; 2:4 needs a
    2:4 mask."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 6)
    mask = mk.ops.nm_mask(lin.weight.detach().abs(), 2, 4)
    layer = mk.SparseLinear.from_dense(lin, mask, format="masked")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(5, 32)
    layer(x).square().sum().backward()
    opt.step()
    out = layer.to_format(target)
    assert out.format == target and out is not layer and layer.format == "masked"
    torch.testing.assert_close(out(x), layer(x), rtol=1e-5, atol=1e-5)
    unstructured = mk.SparseLinear.from_dense(lin, torch.rand(6, 32) > 0.3, format="masked")
    if target == "2:4":
        with pytest.raises(ValueError, match="not 2:4"):
            unstructured.to_format("2:4")


def test_load_sparse_refuses_a_model_on_meta(tmp_path):
    masks = {"0.weight": torch.rand(4, 8) > 0.5}
    path = mk.save_sparse(mk.sparsify(nn.Sequential(nn.Linear(8, 4)), masks), tmp_path / "m.safetensors")
    on_meta = mk.sparsify(nn.Sequential(nn.Linear(8, 4)), masks).to("meta")
    with pytest.raises(ValueError, match="on the meta device.*to_empty"):
        mk.load_sparse(on_meta, path)
