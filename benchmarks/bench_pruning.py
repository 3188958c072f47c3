"""Pruning-side kernels on a BLIP-base-sized set of layers: activation statistic, flow
scores, selection, and the whole ``masks_from_stats`` against the plain-torch way.

Families (``--family``, default all):
  act_stats   sq_sum_accumulate_ (C++ / CUDA C++, and the Triton kernel on CUDA) vs torch,
              in GB/s against a device copy of the same bytes
  masks       multiflow.masks_from_stats at sparsity 0.63 and 0.75 with our kernels vs the
              plain-torch way (concatenate per modality + torch.kthvalue, per-layer
              torch.kthvalue), same masks checked, GB/s against a copy of the weight bytes

Works on CPU and CUDA (``--device``). Prints tables, writes JSON to --out (default $OUT or
benchmarks/results/) as pruning_<family>_<device>.json. ``benchmarks/run.py`` runs the two
families as ``act`` and ``masks``.

    .venv/bin/python benchmarks/bench_pruning.py [--device cpu|cuda] [--family masks] [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT_HELP, median_time, results_dir, write_json  # noqa: E402


def blip_base_layers(device, dtype=torch.float32, seed=0, scale_layers=True):
    """The 171 linear weights of BLIP-base's BlipForImageTextRetrieval (ViT-B/16 vision tower,
    BERT-base text encoder with cross-attention, vision_proj / text_proj / itm_head), about
    177M parameters, two modalities; random weights with per-layer scales."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = []
    for i in range(12):
        shapes += [(f"vision.{i}.qkv", (2304, 768)), (f"vision.{i}.proj", (768, 768)),
                   (f"vision.{i}.fc1", (3072, 768)), (f"vision.{i}.fc2", (768, 3072))]
    for i in range(12):
        shapes += [(f"text.{i}.{n}", (768, 768)) for n in ("q", "k", "v", "o", "xq", "xk", "xv", "xo")]
        shapes += [(f"text.{i}.fc1", (3072, 768)), (f"text.{i}.fc2", (768, 3072))]
    shapes += [("vision.proj_head", (256, 768)), ("text.proj_head", (256, 768)), ("text.itm_head", (2, 768))]
    weights, acts, mods = {}, {}, {}
    for name, shape in shapes:
        scale = float(torch.empty(1).uniform_(0.5, 2.0, generator=g)) if scale_layers else 1.0
        weights[name] = (torch.randn(shape, generator=g) * 0.02 * scale).to(device=device, dtype=dtype)
        acts[name] = (torch.rand(shape[1], generator=g) * 4).to(device)
        mods[name] = name.split(".")[0]
    return weights, acts, mods


def timeit(fn, device, repeats=5, warmup=1):
    """Median of ``repeats`` timed calls after ``warmup``."""
    return median_time(fn, device, min_seconds=0, min_runs=repeats, max_runs=repeats, warmup=warmup)


def plain_torch_masks(weights, acts, mods, sparsity):
    """The way one would write it without our kernels (float32 scores, torch.kthvalue)."""
    from multiflow_kernels import reference as R

    out = {}
    for mod in sorted(set(mods.values())):
        names = [n for n in weights if mods[n] == mod]
        pool = torch.cat([weights[n].abs().flatten().float() for n in names])
        t = torch.kthvalue(pool, int(sparsity * pool.numel())).values
        del pool
        for n in names:
            s_l = int((weights[n].abs().float() <= t).sum()) / weights[n].numel()
            score = R.flow_scores([weights[n]], [acts[n]])[0]
            k = int(s_l * score.numel())
            out[n] = score > torch.kthvalue(score.flatten(), k).values if k >= 1 else torch.ones_like(score, dtype=torch.bool)
    return out


def bench_masks(device, small, repeats):
    import multiflow

    weights, acts, mods = blip_base_layers(device)
    if small:
        keep = list(weights)[::8]
        weights = {n: weights[n] for n in keep}
    n_params = sum(w.numel() for w in weights.values())
    nbytes = sum(w.numel() * w.element_size() for w in weights.values())
    flat = torch.empty(n_params, device=device)
    copy_s = timeit(lambda: torch.cat([w.flatten() for w in weights.values()], out=flat), device, repeats)
    rows = []
    for s in (0.63, 0.75):
        ours = multiflow.masks_from_stats(weights, acts, mods, s)
        plain = plain_torch_masks(weights, acts, mods, s)
        same = all(torch.equal(ours[n], plain[n]) for n in weights)
        t_ours = timeit(lambda: multiflow.masks_from_stats(weights, acts, mods, s), device, repeats)
        t_plain = timeit(lambda: plain_torch_masks(weights, acts, mods, s), device, max(1, min(3, repeats // 2)), warmup=0)
        rows.append({"sparsity": s, "ours_s": t_ours, "plain_torch_s": t_plain, "speedup": t_plain / t_ours,
                     "ours_GBps_of_weights": nbytes / t_ours / 1e9, "copy_s": copy_s,
                     "copy_GBps": 2 * nbytes / copy_s / 1e9, "passes_equiv": t_ours / copy_s, "same_masks": same})
    print(f"\nmasks_from_stats, {len(weights)} layers, {n_params / 1e6:.1f}M params, {device}")
    print(f"{'sparsity':>8} {'ours s':>9} {'plain s':>9} {'speedup':>8} {'GB/s':>7} {'copy s':>8} {'x copy':>7} same")
    for r in rows:
        print(f"{r['sparsity']:>8.2f} {r['ours_s']:>9.4f} {r['plain_torch_s']:>9.3f} {r['speedup']:>7.1f}x "
              f"{r['ours_GBps_of_weights']:>7.1f} {r['copy_s']:>8.4f} {r['passes_equiv']:>7.1f} {r['same_masks']}")
    return {"layers": len(weights), "params": n_params, "rows": rows}


def bench_act_stats(device, small, repeats):
    from multiflow_kernels import ops
    from multiflow_kernels import reference as R

    rows = []
    shapes = [(64 * 577, 768), (64 * 35, 768), (64 * 577, 3072)] if not small else [(4096, 768)]
    for dtype in (torch.float32, torch.bfloat16):
        for tokens, feats in shapes:
            bufs = [torch.randn(tokens, feats, device=device, dtype=dtype) for _ in range(3)]
            mask = torch.rand(tokens, device=device) > 0.2
            acc = torch.zeros(feats, device=device)
            nbytes = bufs[0].numel() * bufs[0].element_size()
            it = iter(range(10**9))

            def ours():
                ops.sq_sum_accumulate_(acc, bufs[next(it) % 3], mask)

            def torch_way():
                R.sq_sum_accumulate_(acc, bufs[next(it) % 3], mask)

            dst = torch.empty_like(bufs[0])
            t_copy = timeit(lambda: dst.copy_(bufs[next(it) % 3]), device, repeats * 4)
            t_ours = timeit(ours, device, repeats * 4)
            t_torch = timeit(torch_way, device, repeats)
            row = {"dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "features": feats,
                   "ours_s": t_ours, "torch_s": t_torch, "ours_GBps": nbytes / t_ours / 1e9,
                   "copy_GBps": 2 * nbytes / t_copy / 1e9}
            row["fraction_of_copy"] = row["ours_GBps"] / row["copy_GBps"]
            if device.type == "cuda":
                try:
                    from multiflow_kernels.triton.act_stats import sq_sum_accumulate_triton

                    t_tri = timeit(lambda: sq_sum_accumulate_triton(acc, bufs[next(it) % 3], mask), device, repeats * 4)
                    row["triton_s"] = t_tri
                    row["triton_GBps"] = nbytes / t_tri / 1e9
                except ImportError:
                    pass
            rows.append(row)
    print(f"\nsq_sum_accumulate_ (token mask keeps ~80%), {device}; GB/s = input bytes / time, copy = read+write")
    print(f"{'dtype':>9} {'tokens':>7} {'F':>5} {'ours ms':>8} {'torch ms':>9} {'GB/s':>7} {'copy GB/s':>10} {'of copy':>8}"
          + (" triton GB/s" if device.type == "cuda" else ""))
    for r in rows:
        print(f"{r['dtype']:>9} {r['tokens']:>7} {r['features']:>5} {r['ours_s'] * 1e3:>8.3f} {r['torch_s'] * 1e3:>9.3f} "
              f"{r['ours_GBps']:>7.1f} {r['copy_GBps']:>10.1f} {r['fraction_of_copy']:>7.0%}"
              + (f" {r.get('triton_GBps', float('nan')):>11.1f}" if device.type == "cuda" else ""))
    return {"rows": rows}


FAMILIES = {"act_stats": bench_act_stats, "masks": bench_masks}


def run(device: str = "cpu", quick: bool = False, out=None, family: str = "masks", repeats: int | None = None) -> Path:
    """One family (``act_stats`` or ``masks``): prints its table, writes
    pruning_<family>_<device>.json to ``out``. ``quick``: a fraction of the layers / one shape."""
    import multiflow_kernels  # noqa: F401

    device = torch.device(device)
    if repeats is None:
        repeats = 3 if quick else (20 if device.type == "cuda" else 5)
    result = {"benchmark": "pruning", "family": family, "device": str(device), "quick": quick, "repeats": repeats,
              family: FAMILIES[family](device, quick, repeats)}
    path = write_json(Path(out or results_dir(quick=quick)), f"pruning_{family}_{device.type}", result)
    print(f"wrote {path}")
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--family", choices=sorted(FAMILIES), action="append")
    p.add_argument("--small", "--quick", dest="quick", action="store_true",
                   help="a fraction of the layers / one shape (quick check)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--out", help=OUT_HELP)
    args = p.parse_args()
    for fam in args.family or sorted(FAMILIES):
        run(args.device, args.quick, args.out, fam, args.repeats)


if __name__ == "__main__":
    main()
