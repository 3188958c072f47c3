"""Selection ops on CPU, on a BLIP-base-sized set of layers, against the plain-torch way.

171 weights, about 198.6M parameters in two modalities (vision: 12 blocks of qkv,
proj, fc1, fc2 plus vision_proj; text: 12 blocks of self- and cross-attention
q, k, v, o, intermediate and output, plus text_proj and itm_head), float32, random
values with a per-layer scale. Timed:

- prior: per modality, the k-th smallest |w| of all its layers (k = 50%) and the
  per-layer count at or below it; plain torch: torch.cat + torch.kthvalue, then
  (|w| <= t).sum() per layer;
- per-layer thresholds: the k-th smallest |w| of every layer (k = 50%);
  plain torch: torch.kthvalue per layer;
- flow: MULTIFLOW's per-layer score thresholds and masks with the scores computed
  on the fly; plain torch: scores materialised, kthvalue, score > t;
- a memory-copy baseline of the same bytes (one read + one write per weight);
  each op's rate is counted as the weight bytes it reads once over its time.

Prints a table and writes benchmarks/results/select.json.
Run: PYTHONPATH=.:python python benchmarks/bench_select.py [--repeats N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from multiflow_kernels import ops, reference

RESULTS = Path(__file__).resolve().parent / "results" / "select.json"
D, FF = 768, 3072


def blip_base_layers(gen: torch.Generator) -> dict[str, list[torch.Tensor]]:
    shapes = {"vision": [], "text": []}
    for _ in range(12):
        shapes["vision"] += [(3 * D, D), (D, D), (FF, D), (D, FF)]
        shapes["text"] += [(D, D)] * 8 + [(FF, D), (D, FF)]
    shapes["vision"].append((256, D))  # vision_proj
    shapes["text"] += [(256, D), (2, D)]  # text_proj, itm_head
    layers = {}
    for modality, shape_list in shapes.items():
        layers[modality] = []
        for shape in shape_list:
            scale = 0.02 * (0.5 + float(torch.rand((), generator=gen)))
            layers[modality].append(torch.randn(shape, generator=gen).mul_(scale))
    return layers


def best_of(fn, repeats: int) -> float:
    fn()  # warm up (allocator, thread pool)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def prior_ours(layers, sparsity):
    out = {}
    for modality, ws in layers.items():
        k = int(sparsity * sum(w.numel() for w in ws))
        t = ops.kth_smallest_group(ws, k, absolute=True)
        out[modality] = (t, ops.count_at_most(ws, t, absolute=True))
    return out


def prior_torch(layers, sparsity):
    out = {}
    for modality, ws in layers.items():
        flat = torch.cat([w.abs().flatten() for w in ws])
        k = int(sparsity * flat.numel())
        t = torch.kthvalue(flat, k).values
        del flat
        out[modality] = (t, torch.tensor([int((w.abs() <= t).sum()) for w in ws]))
    return out


def each_torch(ws, ks):
    return torch.stack([torch.kthvalue(w.abs().flatten(), k).values for w, k in zip(ws, ks)])


def flow_torch(ws, imp_out, imp_in, w_scale, ks):
    thresholds, masks = [], []
    for l, (w, o, i) in enumerate(zip(ws, imp_out, imp_in)):
        s = reference.flow_score_of(w, o, i, w_scale[l])
        t = torch.kthvalue(s.flatten(), ks[l]).values
        thresholds.append(t)
        masks.append(s > t)
    return torch.stack(thresholds), masks


def flow_ours(ws, imp_out, imp_in, w_scale, ks):
    t = ops.flow_kth_each(ws, imp_out, imp_in, w_scale, ks)
    return t, ops.flow_masks(ws, imp_out, imp_in, w_scale, t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    layers = blip_base_layers(gen)
    all_w = layers["vision"] + layers["text"]
    n_params = sum(w.numel() for w in all_w)
    n_bytes = 4 * n_params
    ks = [int(args.sparsity * w.numel()) for w in all_w]
    acts = [torch.rand(w.shape[1], generator=gen) for w in all_w]
    imp_out, imp_in, w_scale = reference.flow_importance(all_w, acts)
    print(f"{len(all_w)} weights, {n_params / 1e6:.1f}M parameters, {n_bytes / 2**30:.2f} GiB float32; "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")

    # Agreement first: the benchmark compares equal answers.
    ours_p, torch_p = prior_ours(layers, args.sparsity), prior_torch(layers, args.sparsity)
    for modality in layers:
        assert torch.equal(ours_p[modality][0], torch_p[modality][0]), modality
        assert torch.equal(ours_p[modality][1], torch_p[modality][1]), modality
    assert torch.equal(ops.kth_smallest_each(all_w, ks, absolute=True), each_torch(all_w, ks))
    t_ours, m_ours = flow_ours(all_w, imp_out, imp_in, w_scale, ks)
    t_ref, m_ref = flow_torch(all_w, imp_out, imp_in, w_scale, ks)
    assert torch.equal(t_ours, t_ref) and all(torch.equal(a, b) for a, b in zip(m_ours, m_ref))
    del ours_p, torch_p, m_ours, m_ref

    rows = []

    def record(name, ours_fn, torch_fn):
        ours = best_of(ours_fn, args.repeats)
        plain = best_of(torch_fn, args.repeats) if torch_fn is not None else None
        rows.append({
            "case": name,
            "ours_s": ours,
            "torch_s": plain,
            "speedup": plain / ours if plain else None,
            "ours_gb_per_s": n_bytes / ours / 1e9,
        })
        speed = f"{plain * 1e3:10.1f} {plain / ours:8.1f}x" if plain else f"{'':>10} {'':>9}"
        print(f"{name:<34} {ours * 1e3:10.1f} {speed} {n_bytes / ours / 1e9:9.1f}", flush=True)

    print(f"\n{'case':<34} {'ours ms':>10} {'torch ms':>10} {'speedup':>9} {'GB/s':>9}")
    copies = [torch.empty_like(w) for w in all_w]
    record("memory copy (read+write, baseline)", lambda: [c.copy_(w) for c, w in zip(copies, all_w)], None)
    del copies
    record(
        "prior: threshold + counts / modality",
        lambda: prior_ours(layers, args.sparsity),
        lambda: prior_torch(layers, args.sparsity),
    )
    vis = layers["vision"]
    k_vis = int(args.sparsity * sum(w.numel() for w in vis))
    record(
        "  kth_smallest_group (vision only)",
        lambda: ops.kth_smallest_group(vis, k_vis, absolute=True),
        lambda: torch.kthvalue(torch.cat([w.abs().flatten() for w in vis]), k_vis),
    )
    t_all = ops.kth_smallest_group(all_w, n_params // 2, absolute=True)
    record(
        "  count_at_most (all layers)",
        lambda: ops.count_at_most(all_w, t_all, absolute=True),
        lambda: [int((w.abs() <= t_all).sum()) for w in all_w],
    )
    record(
        "per-layer thresholds (kth_each)",
        lambda: ops.kth_smallest_each(all_w, ks, absolute=True),
        lambda: each_torch(all_w, ks),
    )
    record(
        "flow: kth_each + masks (fused)",
        lambda: flow_ours(all_w, imp_out, imp_in, w_scale, ks),
        lambda: flow_torch(all_w, imp_out, imp_in, w_scale, ks),
    )
    record("  flow_kth_each", lambda: ops.flow_kth_each(all_w, imp_out, imp_in, w_scale, ks), None)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "bench_select",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "torch": torch.__version__,
        "layers": len(all_w),
        "parameters": n_params,
        "sparsity": args.sparsity,
        "repeats": args.repeats,
        "note": "best of `repeats` wall times; GB/s = float32 weight bytes / time (the copy also writes them)",
        "results": rows,
    }, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
