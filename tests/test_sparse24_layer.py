"""SparseLinear in the 2:4 format, format="auto", and 2:4 through sparsify / checkpoints / CLI."""
import copy

import pytest
import torch
from torch import nn

import multiflow
import multiflow_kernels as mk
from multiflow_kernels import formats


def _nm_mask(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    return mk.ops.nm_mask(torch.rand(out_f, in_f, generator=g), 2, 4)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(13, 44), (7, 600), (1, 4)])
def test_24_forward_equals_masked_dense(dtype, tol, shape):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0]).to(dtype)
    mask = _nm_mask(*shape)
    mask[0, :8] = False  # groups keeping fewer than 2: padded with zeros
    sp = mk.SparseLinear.from_dense(lin, mask, format="2:4")
    x = torch.randn(3, 2, shape[1]).to(dtype)
    ref = nn.functional.linear(x.double(), (lin.weight * mask).double(), lin.bias.double())
    out = sp(x)
    assert out.dtype == dtype and out.shape == (3, 2, shape[0])
    assert ((out.double() - ref).norm() / max(ref.norm(), 1e-12)).item() <= tol
    assert torch.equal(sp.dense_weight(), lin.weight.detach().masked_fill(~mask, 0))
    stored = sp.mask  # every kept weight is stored; exactly 2 positions per group of 4
    assert bool(stored[mask].all()) and torch.equal(stored.reshape(shape[0], -1, 4).sum(-1),
                                                   torch.full((shape[0], shape[1] // 4), 2))
    assert not hasattr(sp, "weight")


def test_24_storage_goal_fp16():
    lin = nn.Linear(3072, 768).half()
    sp = mk.SparseLinear.from_dense(lin, _nm_mask(768, 3072), format="2:4")
    ratio = sp.storage_bytes() / sp.dense_bytes()
    assert ratio <= 0.57, ratio
    assert sp.storage_bytes() == 768 * 1536 * 2 + 768 * 192 * 2


def test_24_state_dict_and_to():
    lin = nn.Linear(48, 5)
    sp = mk.SparseLinear.from_dense(lin, _nm_mask(5, 48), format="2:4")
    fresh = mk.SparseLinear(48, 5, format="2:4")
    fresh.load_state_dict(sp.state_dict())
    x = torch.randn(4, 48)
    assert torch.equal(fresh(x), sp(x))
    bf = copy.deepcopy(sp).to(torch.bfloat16)
    assert bf.values.dtype == torch.bfloat16 and bf.metadata.dtype == torch.int16
    out = bf(x.bfloat16())
    ref = nn.functional.linear(x.bfloat16().double(), sp.dense_weight().bfloat16().double(), lin.bias.bfloat16().double())
    assert out.dtype == torch.bfloat16 and ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2


def test_24_rejects_masks_that_are_not_24():
    lin = nn.Linear(16, 6)
    mask = _nm_mask(6, 16)
    mask[2, 0:4] = True
    mask[5, 12:15] = True
    with pytest.raises(ValueError, match=r"not 2:4.*rows 2, 5"):
        mk.SparseLinear.from_dense(lin, mask, format="2:4")
    with pytest.raises(ValueError, match="multiple of 4"):
        mk.SparseLinear.from_dense(nn.Linear(10, 3), torch.zeros(3, 10, dtype=torch.bool), format="2:4")
    with pytest.raises(ValueError, match="multiple of 4"):
        mk.SparseLinear(10, 3, format="2:4")


def test_choose_format_rule(monkeypatch):
    unstructured = torch.rand(8, 16) > 0.25
    nm = _nm_mask(8, 16)
    assert formats.choose_format(unstructured, torch.float32, "cpu", 1) == "bitmap"
    assert formats.choose_format(nm, torch.float16, "cpu", 4096) == "2:4"
    sparse_nm = nm & (torch.rand(8, 16) < 0.3)  # 2:4-shaped but keeping ~15%: smaller as a bitmap
    assert formats.choose_format(sparse_nm, torch.float32, "cpu", 1) == "bitmap"
    assert formats.choose_format(torch.zeros(8, 16, dtype=torch.bool), torch.float32, "cpu", 1) == "bitmap"
    assert formats.choose_format(torch.zeros(0, 16, dtype=torch.bool), torch.float32, "cpu", 1) == "bitmap"
    # CPU with AVX-512, many rows: masked_linear's GEMM is the faster kernel for masks keeping
    # >= 25%, from rows that depend on the kept fraction and the dtype; without AVX-512 it is not
    big = 4096
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    all_kept = torch.ones(8, 16, dtype=torch.bool)
    assert formats.choose_format(all_kept, torch.float32, "cpu", big) == "bitmap"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    keeps_quarter = torch.zeros(8, 16, dtype=torch.bool)
    keeps_quarter[:, :4] = True
    keeps_37 = torch.zeros(8, 16, dtype=torch.bool)
    keeps_37[:, :6] = True  # 37.5% kept, not 2:4 (6 of the first 8 columns)
    for mask, dtype, least in [(keeps_quarter, torch.float32, 1024), (keeps_quarter, torch.bfloat16, 1024),
                               (keeps_quarter, torch.float16, 2048), (keeps_37, torch.float32, 512),
                               (keeps_37, torch.bfloat16, 512), (keeps_37, torch.float16, 1024),
                               (all_kept, torch.float32, 512)]:
        assert formats.choose_format(mask, dtype, "cpu", least) == "masked", (mask.float().mean(), dtype, least)
        assert formats.choose_format(mask, dtype, "cpu", least - 1) == "bitmap", (mask.float().mean(), dtype, least)
    just_under_quarter = keeps_quarter.clone()
    just_under_quarter[0, 0] = False  # 24.2% kept: a "75%-sparse" mask, still the >= 24% tier
    assert formats.choose_format(just_under_quarter, torch.float32, "cpu", 1024) == "masked"
    keeps_23 = torch.zeros(100, 100, dtype=torch.bool)
    keeps_23.view(-1)[torch.randperm(10000, generator=torch.Generator().manual_seed(0))[:2399]] = True  # 23.99%
    assert formats.choose_format(keeps_23, torch.float32, "cpu", big) == "bitmap"  # under 24%: bitmap at any rows
    exactly_35 = torch.zeros(4, 20, dtype=torch.bool)
    exactly_35[:, :7] = True  # 7 / 20 (float32's mean of it is 0.34999999: the fraction must be exact)
    assert formats.choose_format(exactly_35, torch.float32, "cpu", 512) == "masked"
    assert formats.choose_format(exactly_35, torch.float16, "cpu", 1024) == "masked"
    assert formats.choose_format(all_kept, torch.float64, "cpu", big) == "bitmap"  # not a dtype the rule measured
    assert formats.choose_format(nm, torch.float32, "cpu", big) == "2:4"
    h100 = (9, 0)
    limit = formats.AUTO_CUDA_24_MAX_ROWS
    assert formats.choose_format(nm, torch.float16, "cuda", 1, h100) == "2:4"
    assert formats.choose_format(nm, torch.bfloat16, "cuda", limit, h100) == "2:4"
    assert formats.choose_format(nm, torch.float16, "cuda", limit + 1, h100) == "bitmap"  # decode + cuBLAS wins
    wide = _nm_mask(8, formats.AUTO_CUDA_24_MAX_IN + 16)  # wider than AUTO_CUDA_24_MAX_IN: 2:4 only for a few rows
    assert formats.choose_format(wide, torch.float16, "cuda", formats.AUTO_CUDA_24_ANY_ROWS, h100) == "2:4"
    assert formats.choose_format(wide, torch.float16, "cuda", formats.AUTO_CUDA_24_ANY_ROWS + 1, h100) == "bitmap"
    edge = _nm_mask(8, formats.AUTO_CUDA_24_MAX_IN)
    assert formats.choose_format(edge, torch.float16, "cuda", limit, h100) == "2:4"
    # the measured cases behind the thresholds (H200, benchmarks/RESULTS.md): BLIP's 768-input
    # layers keep 2:4 up to 256 rows; its 3072-input layer and 4096x4096 switch from 2 rows
    assert formats.choose_format(_nm_mask(8, 768), torch.float16, "cuda", 256, h100) == "2:4"
    assert formats.choose_format(_nm_mask(8, 3072), torch.float16, "cuda", 16, h100) == "bitmap"
    assert formats.choose_format(_nm_mask(8, 4096), torch.float16, "cuda", 4, h100) == "bitmap"
    assert formats.choose_format(nm, torch.float16, "cuda", 1, (7, 5)) == "bitmap"  # no sparse tensor cores
    assert formats.choose_format(_nm_mask(8, 20), torch.float16, "cuda", 1, h100) == "bitmap"  # in % 16 != 0
    assert formats.choose_format(nm, torch.float32, "cuda", 1, h100) == "bitmap"
    assert formats.choose_format(sparse_nm, torch.float16, "cuda", 1, h100) == "bitmap"
    assert formats.choose_format(unstructured, torch.float16, "cuda", 1, h100) == "bitmap"
    assert formats.choose_format(unstructured, torch.float16, "cuda", 4096, h100) == "bitmap"


def test_sparsify_checks_rows_dtype_and_names_the_mask():
    model = nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 3).double())
    masks = {"0.weight": torch.zeros(4, 10, dtype=torch.bool), "1.weight": torch.ones(3, 4, dtype=torch.bool)}
    with pytest.raises(ValueError) as e:
        mk.sparsify(model, masks, format="2:4")
    assert "0.weight: the 2:4 format needs in_features to be a multiple of 4" in str(e.value)
    assert "1.weight (weight dtype torch.float64" in str(e.value)
    assert not any(isinstance(m, mk.SparseLinear) for m in model.modules())
    with pytest.raises(ValueError, match="rows"):
        mk.sparsify(nn.Sequential(nn.Linear(8, 2)), {"0.weight": torch.ones(2, 8, dtype=torch.bool)}, "auto", rows=0)


def test_empty_24_layer_has_valid_metadata():
    layer = mk.SparseLinear(40, 3, format="2:4")  # 10 chunks: 2 full words + 2 chunks
    words = layer.metadata.view(torch.uint16).to(torch.int32)
    assert words[:, :2].eq(0x4444).all() and words[:, 2].eq(0x44).all()
    assert torch.equal(layer(torch.randn(2, 40)), layer.bias.expand(2, 3))


def test_sparsify_24_blip_and_auto(tmp_path, blip_factory, calib_batches):
    model = blip_factory("retrieval")
    masks = multiflow.prune(model, calib_batches, 0.5, nm=(2, 4), progress=False)
    dense = masks.apply(copy.deepcopy(model))
    auto = mk.sparsify(copy.deepcopy(model), masks, format="auto")
    assert {m.format for m in auto.modules() if isinstance(m, mk.SparseLinear)} == {"2:4"}  # CPU rule for 2:4 masks
    mk.sparsify(model, masks, format="2:4")
    b = calib_batches[0]
    with torch.no_grad():
        kw = dict(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"])
        got, ref, got_auto = model(**kw).itm_score, dense(**kw).itm_score, auto(**kw).itm_score
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5
    assert ((got_auto - ref).norm() / ref.norm()).item() <= 1e-5
    path = mk.save_sparse(model, tmp_path / "m.safetensors")
    other = mk.sparsify(blip_factory("retrieval", seed=4), masks, format="2:4")
    mk.load_sparse(other, path)
    for (n, x), (_, y) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(x, y), n


def test_sparsify_24_rejects_unstructured_masks_before_changing_anything(blip_factory, calib_batches):
    model = blip_factory("retrieval")
    masks = multiflow.prune(model, calib_batches, 0.75, progress=False)
    with pytest.raises(ValueError, match="not 2:4"):
        mk.sparsify(model, masks, format="2:4")
    assert not any(isinstance(m, mk.SparseLinear) for m in model.modules())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 64, 300])
def test_24_layer_cuda(dtype, rows):
    torch.manual_seed(0)
    lin = nn.Linear(768, 200).to(dtype).cuda()
    mask = _nm_mask(200, 768).cuda()
    sp = mk.SparseLinear.from_dense(lin, mask, format="2:4")
    x = torch.randn(rows, 768, device="cuda").to(dtype)
    ref = nn.functional.linear(x.double(), (lin.weight * mask).double(), lin.bias.double())
    out = sp(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((out.double() - ref).norm() / ref.norm()).item() <= tol


def test_metadata_sparse24_pack_could_not_write_is_refused_on_load(tmp_path):
    """The kernels trust the metadata (no check per call): a file or a state dict whose
    metadata names a position twice, or out of order, is refused when it is loaded, and the
    model is left as it was."""
    from _sparse_files import tampered_copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 6))
    masks = {"0.weight": _nm_mask(6, 20)}
    mk.sparsify(model, masks, format="2:4")
    path = mk.save_sparse(model, tmp_path / "m.safetensors")

    def every_position_3(tensors):  # the first not below the second
        tensors["0.metadata"][3, 0] = -1

    tensors = tampered_copy(path, tmp_path / "bad.safetensors", every_position_3)
    other = mk.sparsify(nn.Sequential(nn.Linear(20, 6)), masks, format="2:4")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"0\.metadata \(rows \[3\]: not 2:4 metadata\)"):
        mk.load_sparse(other, tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match=r"metadata: rows \[3\] are not 2:4 metadata"):
        other[0].load_state_dict({k[2:]: v for k, v in tensors.items()})
    mk.load_sparse(other, path)  # the good file still loads
    assert torch.equal(other[0].metadata, model[0].metadata)
