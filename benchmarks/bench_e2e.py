"""End to end (family ``e2e``): a BLIP-base-sized model pruned with MULTIFLOW, sparsified with
``multiflow_kernels.sparsify`` in each format, against the dense model: weight memory
(``memory_report``) and the latency of the model's forward.

The model is transformers' ``BlipForImageTextRetrieval`` built from the BLIP-base config
(ViT-B/16 at 384 px, BERT-base text encoder with cross-attention; 224M parameters) with random
weights (init range 0.02 in both towers), nothing downloaded. Masks come from MULTIFLOW's fast
path, ``multiflow.masks_from_stats``, on synthetic activation statistics (the kernels' speed
does not depend on which weights are kept, only on how many). The timed forward is the ITM
forward: the vision tower on the image(s), then the text encoder cross-attending to the image
tokens (32 text tokens), at batch 1 and 8 (and 64 on CUDA); float32 on CPU, float32 and float16
on CUDA. Each sparsified model's ITM score is checked against the dense model with the masks
applied. Prints a table, writes JSON (machine, versions, date, commit) to --out as
e2e_<device>.json. ``--quick`` uses a small BLIP (384 hidden, 6 + 6 layers, 224 px).

    .venv/bin/python benchmarks/bench_e2e.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_calibration import SMALL_BLIP  # noqa: E402
from common import family_main, results_dir, time_call, torch_dtypes, write_json  # noqa: E402

BLIP_BASE = {"vision_config": {"initializer_range": 0.02}}  # BlipConfig's defaults are BLIP-base
TEXT_TOKENS = 32
SPARSITIES = (0.63, 0.75)

# format -> the masks it runs on: a target sparsity (unstructured MULTIFLOW masks) or "N:M".
# A new format is one line here.
FORMATS = {
    "masked": SPARSITIES,
    "bitmap": SPARSITIES,
    "2:4": ("2:4",),
}
MASK_SPECS = list(dict.fromkeys(spec for specs in FORMATS.values() for spec in specs))


def build_model(config: dict):
    from transformers import BlipConfig, BlipForImageTextRetrieval
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    return BlipForImageTextRetrieval(BlipConfig(**config)).eval()


def synthetic_stats(model, seed=0):
    """The prunable weights, synthetic activation statistics and modalities, as the pruner
    would hand them to ``masks_from_stats``."""
    from multiflow.models import get_adapter

    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    weights, acts, mods = {}, {}, {}
    for name, linear in adapter.prunable_parameters(model):
        weights[name] = linear.weight.detach()
        acts[name] = torch.rand(linear.in_features, generator=g) * 4
        mods[name] = adapter.modality(name)
    return weights, acts, mods


def make_masks(spec, weights, acts, mods):
    import multiflow

    if isinstance(spec, str):  # "N:M"
        n, m = (int(v) for v in spec.split(":"))
        return multiflow.masks_from_stats(weights, acts, mods, None, nm=(n, m))
    return multiflow.masks_from_stats(weights, acts, mods, spec)


def make_inputs(config, batch, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    size = config.vision_config.image_size
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g).to(device, dtype),
            "input_ids": torch.randint(3, vocab, (batch, TEXT_TOKENS), generator=g).to(device),
            "attention_mask": torch.ones(batch, TEXT_TOKENS, dtype=torch.long, device=device)}


def itm_forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_itm_head=True).itm_score


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run(device: str = "cpu", quick: bool = False, out=None, dtypes=None) -> Path:
    """The ``e2e`` family: prints the table, writes e2e_<device>.json to ``out``."""
    import multiflow_kernels as mk

    device = torch.device(device)
    cuda = device.type == "cuda"
    dtypes = torch_dtypes(dtypes, cuda)
    batches = [1, 8, 64] if cuda and not quick else [1, 8]
    # timed rounds per batch size; on CPU only the first batch size gets a warm-up round (a
    # BLIP-base forward at batch 8 takes seconds there: the run stays at a few minutes)
    runs = {1: 20, 8: 20, 64: 10} if cuda else ({1: 2, 8: 1} if quick else {1: 3, 8: 3})

    t0 = time.perf_counter()
    model = build_model(SMALL_BLIP if quick else BLIP_BASE)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    weights, acts, mods = synthetic_stats(model)
    masks, mask_info = {}, {}
    for spec in MASK_SPECS:
        t = time.perf_counter()
        masks[spec] = make_masks(spec, weights, acts, mods)
        kept = sum(int(m.sum()) for m in masks[spec].values())
        mask_info[str(spec)] = {"seconds": time.perf_counter() - t, "sparsity": 1 - kept / sum(w.numel() for w in weights.values())}
    del weights
    desc = (f"BlipForImageTextRetrieval {'small (quick)' if quick else 'BLIP-base'}: {n_params / 1e6:.1f}M parameters, "
            f"{len(masks[next(iter(masks))])} prunable linears, vision {cfg.vision_config.hidden_size} x "
            f"{cfg.vision_config.num_hidden_layers} at {cfg.vision_config.image_size} px, text "
            f"{cfg.text_config.hidden_size} x {cfg.text_config.num_hidden_layers}, {TEXT_TOKENS} text tokens")
    print(f"{desc}; model + masks in {time.perf_counter() - t0:.1f} s; {device}, {torch.get_num_threads()} threads")
    print("memory: prunable linear weights (memory_report) and all parameters + buffers; latency: median ITM forward")
    bs_cols = " ".join(f"{f'bs{b} ms':>10} {'speedup':>7}" for b in batches)
    print(f"{'dtype':>8} {'format':>7} {'sparsity':>8} {'weights MiB':>11} {'ratio':>6} {'model MiB':>9} {bs_cols} {'rel err':>8}")

    results = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        base = model.to(device, dtype) if (not cuda and dtype == torch.float32) else copy.deepcopy(model).to(device, dtype)
        inputs = {b: make_inputs(cfg, b, device, dtype) for b in batches}
        prunable = [base.get_submodule(n[: -len(".weight")]).weight for n in masks[next(iter(masks))]]
        dense = {"dtype": dname, "format": "dense", "weight_bytes": _bytes(prunable),
                 "model_bytes": _bytes(list(base.parameters()) + list(base.buffers()))}
        variants = [(dense, base)]
        results.append(dense)
        for spec in MASK_SPECS:
            ref = copy.deepcopy(base)
            with torch.no_grad():
                for n, m in masks[spec].items():
                    ref.get_submodule(n[: -len(".weight")]).weight.mul_(m.to(device))
            want = itm_forward(ref, inputs[1]).float()
            del ref
            for fmt in (f for f, specs in FORMATS.items() if spec in specs):
                row = {"dtype": dname, "format": fmt, "masks": str(spec), "sparsity": mask_info[str(spec)]["sparsity"]}
                results.append(row)
                try:
                    sparse = mk.sparsify(copy.deepcopy(base), masks[spec], format=fmt)
                    got = itm_forward(sparse, inputs[1]).float()
                except (NotImplementedError, RuntimeError) as e:  # e.g. no kernel for this device yet
                    row["unavailable"] = str(e).splitlines()[0][:200]
                    continue
                rep = mk.memory_report(sparse)
                row.update(weight_bytes=rep["total"]["sparse_bytes"], dense_weight_bytes=rep["total"]["dense_bytes"],
                           model_bytes=rep["total"]["model_bytes"],
                           max_rel_err=float((got - want).abs().max() / want.abs().max()))
                variants.append((row, sparse))
        # every model once per round, so load from other processes hits them all alike
        for b in batches:
            times = [[] for _ in variants]
            warmup = 1 if cuda or b == batches[0] else 0
            for rnd in range(warmup + runs[b]):
                for i, (_, m) in enumerate(variants):
                    t = time_call(lambda: itm_forward(m, inputs[b]), device)
                    if rnd >= warmup:
                        times[i].append(t)
            for (row, _), ts in zip(variants, times):
                row.setdefault("latency_s", {})[b] = statistics.median(ts)
                row.setdefault("latency_runs_s", {})[b] = ts
        for row in [r for r in results if r["dtype"] == dname]:
            _print_row(row, dense, batches)
        del variants, base
        # after each dtype, so a run cut short (gpu_check's time caps) keeps the dtypes it finished
        path = write_json(Path(out or results_dir(quick=quick)), f"e2e_{device.type}", {
            "benchmark": "e2e", "family": "e2e", "device": str(device), "quick": quick, "partial": dtype is not dtypes[-1],
            "model": desc, "params": n_params, "text_tokens": TEXT_TOKENS, "batches": batches, "timed_rounds": runs,
            "warmup_rounds": "one before every batch size" if cuda else f"one before batch {batches[0]} only",
            "masks": mask_info,
            "note": "weight_bytes: the prunable linear weights (sparse storage for sparsified rows); model_bytes: all "
                    "parameters and buffers; latency_s: median seconds of the ITM forward per batch size; max_rel_err: "
                    "max |itm_score - dense-with-masks itm_score| / max |dense-with-masks itm_score| at batch 1",
            "results": results})
    print(f"wrote {path}")
    return path


def _print_row(row, dense, batches):
    if "unavailable" in row:
        print(f"{row['dtype']:>8} {row['format']:>7} {row['sparsity']:>8.3f}  not run: {row['unavailable']}")
        return
    cells = []
    for b in batches:
        t = row.get("latency_s", {}).get(b)
        cells.append(f"{t * 1e3:>10.1f} {dense['latency_s'][b] / t:>6.2f}x" if t else f"{'-':>10} {'-':>7}")
    sparsity = f"{row['sparsity']:.3f}" if "sparsity" in row else "-"
    err = f"{row['max_rel_err']:.1e}" if "max_rel_err" in row else "-"
    print(f"{row['dtype']:>8} {row['format']:>7} {sparsity:>8} {row['weight_bytes'] / 2**20:>11.1f} "
          f"{row['weight_bytes'] / dense['weight_bytes']:>6.3f} {row['model_bytes'] / 2**20:>9.1f} {' '.join(cells)} {err:>8}")


def main():
    family_main(run, __doc__, "a small BLIP (384 hidden, 6 + 6 layers, 224 px)")


if __name__ == "__main__":
    main()
