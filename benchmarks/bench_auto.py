"""The measurements behind ``format="auto"`` on CPU (family ``auto``): ``masked_linear`` against
``bitmap_linear`` (and dense ``F.linear`` for scale) at the row counts where the faster kernel
changes, in float32, bfloat16 and float16.

``multiflow_kernels.formats.choose_format`` picks ``masked`` on AVX-512 CPUs from a number of
rows of x that depends on the mask's kept fraction and the dtype (``AUTO_CPU_MASKED_FROM``),
else ``bitmap``; this family times both at 256, 512, 1024 and 2048 rows
on the BLIP shapes and 4096x4096 at 63 / 75 / 90% sparsity, with the same weight rotation and
timing as the ``bitmap`` family (bench_sparse_linear.py), and writes auto_cpu.json: per case the
times and ``masked / bitmap`` (< 1: masked is faster).

    .venv/bin/python benchmarks/bench_auto.py [--quick] [--dtypes float32 bfloat16]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_sparse_linear import SHAPES, bench_weight  # noqa: E402
from common import ROTATION_BYTES, copy_bandwidth, family_main, results_dir, torch_dtypes, write_json  # noqa: E402

FORMATS = ("dense", "masked", "bitmap")


def run(device: str = "cpu", quick: bool = False, out=None, dtypes=None) -> Path | None:
    """The ``auto`` family (CPU only): prints the table, writes auto_cpu.json to ``out``."""
    import multiflow_kernels  # noqa: F401  (registers the ops)

    if torch.device(device).type != "cpu":
        print("auto: CPU only (the CUDA rule's measurements are the bitmap and sparse24 families' CUDA runs)")
        return None
    if quick:
        shapes, rows_list, sparsities = ["768x3072"], [256, 1024], [0.75]
    else:
        shapes, rows_list, sparsities = [s for s in SHAPES if s != "11008x4096"], [256, 512, 1024, 2048], [0.63, 0.75, 0.9]
    dtypes = torch_dtypes(dtypes or ["float32", "bfloat16", "float16"], False)
    timing = {"min_seconds": 0.05 if quick else 0.3, "max_runs": 200}
    bandwidth = copy_bandwidth(device)
    isa = torch.backends.cpu.get_cpu_capability()
    print(f"format='auto' on CPU ({isa}): masked_linear vs bitmap_linear; ms per call (median), each format rotating "
          f"{ROTATION_BYTES['cpu'] >> 20} MiB of its own copies; masked/bitmap < 1: masked is faster")
    print(f"{'shape':>10} {'dtype':>9} {'spars':>5} {'rows':>5} {'dense ms':>9} {'masked ms':>10} {'bitmap ms':>10} "
          f"{'masked/bitmap':>13}")
    out = Path(out or results_dir(quick=quick))
    results = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for shape_name in shapes:
            for s in sparsities:
                case = bench_weight(SHAPES[shape_name], s, rows_list, dtype, device, bandwidth, timing, formats=FORMATS)
                case.update(shape=shape_name, dtype=dname, sparsity=s)
                for r in case["rows"]:
                    t = r["time_s"]
                    r["masked_over_bitmap"] = t["masked"] / t["bitmap"] if "masked" in t and "bitmap" in t else None
                    ratio = f"{r['masked_over_bitmap']:.2f}" if r["masked_over_bitmap"] is not None else "-"
                    print(f"{shape_name:>10} {dname:>9} {s:>5.2f} {r['rows']:>5} "
                          + " ".join(f"{t[f] * 1e3:>{w}.3f}" if f in t else f"{'-':>{w}}"
                                     for f, w in (("dense", 9), ("masked", 10), ("bitmap", 10)))
                          + f" {ratio:>13}", flush=True)
                for fmt, why in case["unavailable"].items():
                    print(f"{'':>10} {fmt} not measured: {why}")
                results.append(case)
    path = write_json(out, "auto_cpu", {
        "benchmark": "auto", "family": "auto", "device": device, "quick": quick, "cpu_capability": isa,
        "rotation_bytes": ROTATION_BYTES["cpu"], "copy_bandwidth_Bps": bandwidth, "timing": timing,
        "note": "time_s: median seconds per call; masked_over_bitmap < 1 means masked_linear is faster",
        "results": results,
    })
    print(f"wrote {path}")
    return path


def main():
    family_main(run, __doc__, "one shape, 256 and 1024 rows, 75% sparse")


if __name__ == "__main__":
    main()
