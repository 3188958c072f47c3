"""Run the benchmark families: one entry point for every benchmark script.

    python benchmarks/run.py [--family act|scores|masks|masked_linear|bitmap|bitmap_gemv|sparse24|convert|auto|e2e|all ...]
                             [--device cpu|cuda] [--quick] [--out DIR]

Each family is a script of this folder, called in this process through its ``run(device,
quick, out)`` function; each prints its table and writes its JSON (machine, versions, date,
commit) and plots into --out: default $OUT when set, else benchmarks/results/, or
benchmarks/results/quick/ with --quick (so a smoke run never overwrites the committed full
results). --quick keeps every family small (seconds to about a minute each on 2 CPU cores).
A family that fails is reported and the others still run; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT_HELP, results_dir  # noqa: E402

# family -> (script module, keyword arguments of its run(), what it measures)
FAMILIES = {
    "act": ("bench_pruning", {"family": "act_stats"}, "activation statistic sq_sum_accumulate_ vs torch, GB/s"),
    "scores": ("bench_scores", {}, "flow_importance / flow_scores vs their plain-torch twins"),
    "masks": ("bench_pruning", {"family": "masks"}, "masks_from_stats for BLIP-base vs the plain-torch way"),
    "masked_linear": ("bench_masked_linear", {}, "masked_linear forward / forward+backward vs dense"),
    "bitmap": ("bench_sparse_linear", {}, "bitmap_linear vs dense, CSR, masked; rows 1..2048; roofline"),
    "bitmap_gemv": ("bench_bitmap_gemv", {}, "CUDA only: bitmap_linear's few-row kernels (tensor-core default, v1) vs dense; rows 1..16"),
    "e2e": ("bench_e2e", {}, "BLIP-base pruned + sparsified: weight memory, forward latency"),
    "sparse24": ("bench_sparse24", {}, "sparse24_linear vs dense and torch's 2:4 path; rows 1..8192; roofline"),
    "convert": ("bench_convert", {}, "CPU only: bitmap / 2:4 pack and unpack vs their plain-torch twins and clone()"),
    "auto": ("bench_auto", {}, "CPU only: masked_linear vs bitmap_linear at 256-2048 rows, every dtype (format='auto')"),
}


def run_family(name: str, device: str, quick: bool, out: Path) -> Path:
    module, kwargs, _ = FAMILIES[name]
    return importlib.import_module(module).run(device=device, quick=quick, out=out, **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="families: " + "; ".join(f"{k}: {v[2]}" for k, v in FAMILIES.items()))
    p.add_argument("--family", nargs="+", default=["all"], choices=[*FAMILIES, "all"], metavar="FAMILY",
                   help=f"one or more of {', '.join(FAMILIES)}, or all (default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not numbers to quote")
    p.add_argument("--out", help=OUT_HELP)
    args = p.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("run.py: --device cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    families = list(FAMILIES) if "all" in args.family else list(dict.fromkeys(args.family))
    out = Path(args.out or results_dir(quick=args.quick))
    summary = []
    for name in families:
        print(f"\n===== {name} ({args.device}{', quick' if args.quick else ''}) =====", flush=True)
        t0 = time.perf_counter()
        try:
            path = run_family(name, args.device, args.quick, out)  # None: not for this device
            summary.append((name, "ok" if path else "skip", time.perf_counter() - t0, str(path or "not for this device")))
        except Exception as e:  # report, run the other families
            traceback.print_exc()
            summary.append((name, "FAIL", time.perf_counter() - t0, f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"))
        sys.stdout.flush()
    print("\n===== summary =====")
    for name, status, seconds, what in summary:
        print(f"{name:<14} {status:<5} {seconds:>7.1f} s  {what}")
    return 1 if any(s[1] == "FAIL" for s in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
