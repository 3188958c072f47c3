"""SparseLinear (masked format), sparsify, sparse checkpoints and the memory report."""
import copy

import pytest
import torch
from torch import nn

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
