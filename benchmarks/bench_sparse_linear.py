"""Sparse linear layers against the baselines: dense ``F.linear``, ``torch.sparse.mm`` with a
CSR weight, our ``masked_linear`` and ``bitmap_linear``; time vs rows of x per format.

Several weight buffers are rotated so the cache does not hold the weight between calls.
Prints a table, writes JSON (machine, versions, date, commit) and a PNG plot (time vs rows)
to --out (default $OUT or benchmarks/results/) as sparse_linear_<device>.{json,png}.

    .venv/bin/python benchmarks/bench_sparse_linear.py [--device cpu] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import results_dir, write_json  # noqa: E402

SHAPES = {"768x768": (768, 768), "2304x768": (2304, 768), "3072x768": (3072, 768), "768x3072": (768, 3072),
          "4096x4096": (4096, 4096), "11008x4096": (11008, 4096)}


def _median_time(fn, device, min_seconds=0.3, max_runs=200):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_seconds and len(times) < max_runs):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_case(shape, sparsity, rows, dtype, device, n_buffers):
    from multiflow_kernels import ops

    out_f, in_f = shape
    g = torch.Generator().manual_seed(0)
    bufs = []
    for _ in range(n_buffers):
        w = torch.randn(out_f, in_f, generator=g)
        scores = torch.rand(out_f, in_f, generator=g)
        k = int(sparsity * scores.numel())
        mask = scores > scores.flatten().kthvalue(k).values if k else torch.ones_like(scores, dtype=torch.bool)
        w = (w * mask).to(dtype=dtype, device=device)
        mask = mask.to(device)
        entry = {"dense": w, "bits": ops.pack_mask(mask), "bitmap": ops.bitmap_pack(w, mask)}
        if dtype == torch.float32:
            entry["csr"] = w.to_sparse_csr()
        bufs.append(entry)
    x = torch.randn(rows, in_f, generator=g).to(dtype=dtype, device=device)
    it = iter(range(10**12))

    def pick():
        return bufs[next(it) % n_buffers]

    fns = {
        "dense": lambda: F.linear(x, pick()["dense"]),
        "masked": lambda: ops.masked_linear(x, pick()["dense"], pick()["bits"], None),
        "bitmap": lambda: ops.bitmap_linear(x, *pick()["bitmap"], in_f, None),
    }
    if dtype == torch.float32:
        fns["csr"] = lambda: torch.sparse.mm(pick()["csr"], x.t())
    res = {name: _median_time(fn, device) for name, fn in fns.items()}
    values, bits, row_ptr, block_ptr = bufs[0]["bitmap"]
    res["bitmap_bytes_ratio"] = sum(t.numel() * t.element_size() for t in (values, bits, row_ptr, block_ptr)) / (
        bufs[0]["dense"].numel() * bufs[0]["dense"].element_size())
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes / rows (a couple of minutes on 2 cores)")
    p.add_argument("--out", default=str(results_dir()))
    args = p.parse_args()
    import multiflow_kernels  # noqa: F401

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

    device = torch.device(args.device)
    if args.quick:
        shapes, rows_list, sparsities = ["768x3072", "4096x4096"], [1, 16, 128], [0.75]
    else:
        shapes, rows_list, sparsities = list(SHAPES), [1, 4, 16, 64, 256, 2048], [0.63, 0.75, 0.9]
    n_buffers = 4 if device.type == "cpu" else 8
    results = []
    print(f"{'shape':>11} {'sparsity':>8} {'rows':>5} {'dense ms':>9} {'csr ms':>8} {'masked ms':>10} "
          f"{'bitmap ms':>10} {'bitmap/dense':>13} {'bytes':>6}")
    for shape_name in shapes:
        for s in sparsities:
            for rows in rows_list:
                r = bench_case(SHAPES[shape_name], s, rows, torch.float32, device, n_buffers)
                r.update(shape=shape_name, sparsity=s, rows=rows, dtype="float32")
                results.append(r)
                print(f"{shape_name:>11} {s:>8.2f} {rows:>5} {r['dense'] * 1e3:>9.3f} {r.get('csr', float('nan')) * 1e3:>8.3f} "
                      f"{r['masked'] * 1e3:>10.3f} {r['bitmap'] * 1e3:>10.3f} {r['dense'] / r['bitmap']:>12.2f}x "
                      f"{r['bitmap_bytes_ratio']:>6.3f}")
    out = Path(args.out)
    path = write_json(out, f"sparse_linear_{device.type}", {"benchmark": "sparse_linear", "device": str(device),
                                                             "n_weight_buffers": n_buffers, "results": results})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
        for ax, shape_name in zip(axes[0], shapes):
            rs = [r for r in results if r["shape"] == shape_name and r["sparsity"] == 0.75]
            for fmt in ("dense", "csr", "masked", "bitmap"):
                ax.plot([r["rows"] for r in rs], [r.get(fmt, float("nan")) * 1e3 for r in rs], marker="o", label=fmt)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{shape_name}, 75% sparse, float32, {device.type}")
            ax.set_xlabel("rows of x")
            ax.set_ylabel("ms")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"sparse_linear_{device.type}.png", dpi=110)
    except ImportError:
        pass
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
