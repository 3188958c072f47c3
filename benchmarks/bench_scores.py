"""Scoring: multiflow::flow_importance + flow_scores vs their plain-torch twins, on the
linear layers of a BLIP-base-sized model (~198M weights in 168 layers).

    vision: 12 x (qkv 2304x768, proj 768x768, fc1 3072x768, fc2 768x3072)
    text:   12 x (self-attn q, k, v, o 768x768; cross-attn q, k, v, o 768x768;
                  intermediate 3072x768, output 768x3072)

Each op is called once for the whole list (that is how the pruner calls it). The
outputs are checked equal to the reference's once, then timed (median of --repeats
after a warm-up). Prints a table and writes JSON (machine, versions, date, commit) to
--out (default $OUT or benchmarks/results/) as scores.json (scores_cuda.json with --device
cuda, where the ops run the Triton kernels; the Triton act-stat kernel is then timed against
the CUDA C++ one).

    .venv/bin/python benchmarks/bench_scores.py [--dtypes float32 bfloat16] [--repeats 3] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import multiflow_kernels  # noqa: F401  (registers the ops)
from multiflow_kernels import ops, reference

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT_HELP, results_dir, write_json  # noqa: E402

D, FF, LAYERS = 768, 3072, 12
VISION = [(3 * D, D), (D, D), (FF, D), (D, FF)]
TEXT = [(D, D)] * 8 + [(FF, D), (D, FF)]
BLIP_BASE_SHAPES = VISION * LAYERS + TEXT * LAYERS


def make_model(dtype: torch.dtype, device: str, seed: int = 0, shapes=BLIP_BASE_SHAPES):
    gen = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(s, generator=gen) * 0.02).to(dtype).to(device) for s in shapes]
    acts = [(torch.rand(s[1], generator=gen) * 50).to(device) for s in shapes]
    return weights, acts


def timed(fn, repeats: int, device: str) -> list[float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()  # warm-up (and Triton compilation)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def check_equal(weights, acts) -> None:
    got, want = ops.flow_importance(weights, acts), reference.flow_importance(weights, acts)
    assert torch.equal(got[2], want[2]), "w_scale differs from the reference"
    assert all(torch.equal(a, b) for a, b in zip(got[0] + got[1], want[0] + want[1])), "importances differ"
    assert all(torch.equal(a, b) for a, b in zip(ops.flow_scores(weights, acts), reference.flow_scores(weights, acts)))


def bench_act_stats_cuda(repeats: int) -> list[dict]:
    """The Triton act-stat kernel against the registered CUDA C++ one (calibration shapes)."""
    from multiflow_kernels.triton.act_stats import sq_sum_accumulate_triton

    rows = []
    for tokens, feats, dtype in [(32 * 577, 768, torch.bfloat16), (32 * 577, 3072, torch.bfloat16), (64 * 35, 768, torch.float32)]:
        x = torch.randn(tokens, feats, device="cuda").to(dtype)
        mask = torch.rand(tokens, device="cuda") < 0.8
        acc = torch.zeros(feats, device="cuda")
        for name, fn in [("cuda_cpp", ops.sq_sum_accumulate_), ("triton", sq_sum_accumulate_triton)]:
            t = timed(lambda fn=fn: fn(acc, x, mask), repeats * 10, "cuda")
            rows.append({"op": "sq_sum_accumulate_", "impl": name, "shape": [tokens, feats], "dtype": str(dtype)[6:],
                         "median_ms": statistics.median(t) * 1e3})
    return rows


def run(device: str = "cpu", quick: bool = False, out=None, dtypes=None, repeats: int | None = None,
        threads: int | None = None, check: bool = True) -> Path:
    """The ``scores`` family: prints the table, writes scores.json (scores_cuda.json) to ``out``.
    ``quick``: one vision and one text block (14 weights), float32, one repeat."""
    if threads:
        torch.set_num_threads(threads)
    if repeats is None:
        repeats = 1 if quick else (20 if device == "cuda" else 3)
    dtypes = dtypes or (["float32"] if quick else ["float32", "bfloat16"])
    shapes = VISION + TEXT if quick else BLIP_BASE_SHAPES
    n_params = sum(r * c for r, c in shapes)
    print(f"BLIP-base-sized: {len(shapes)} weights, {n_params / 1e6:.1f}M params, device {device}, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print(f"{'op':<34} {'dtype':<9} {'kernel ms':>10} {'reference ms':>13} {'speedup':>8}")
    results = []
    for dtype_name in dtypes:
        weights, acts = make_model(getattr(torch, dtype_name), device, shapes=shapes)
        if check:
            check_equal(weights, acts)
        for name, kernel, twin in [
            ("flow_importance", ops.flow_importance, reference.flow_importance),
            ("flow_scores (importance + scores)", ops.flow_scores, reference.flow_scores),
        ]:
            k = timed(lambda: kernel(weights, acts), repeats, device)
            r = timed(lambda: twin(weights, acts), repeats, device)
            row = {"op": name, "dtype": dtype_name, "kernel_ms": statistics.median(k) * 1e3,
                   "reference_ms": statistics.median(r) * 1e3, "kernel_times_s": k, "reference_times_s": r}
            row["speedup"] = row["reference_ms"] / row["kernel_ms"]
            results.append(row)
            print(f"{name:<34} {dtype_name:<9} {row['kernel_ms']:>10.1f} {row['reference_ms']:>13.1f} "
                  f"{row['speedup']:>7.1f}x")
        del weights, acts

    act_rows = []
    if device == "cuda":
        try:
            act_rows = bench_act_stats_cuda(repeats)
        except NotImplementedError as e:  # an extension built without its CUDA kernels
            print(f"sq_sum_accumulate_: no CUDA C++ kernel to compare with ({str(e).splitlines()[0]})")
    for r in act_rows:
        print(f"sq_sum_accumulate_ {r['impl']:<9} {r['dtype']:<9} {str(r['shape']):<14} {r['median_ms']:.3f} ms")

    result = {
        "benchmark": "flow_scores",
        "family": "scores",
        "quick": quick,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "config": {"model": "BLIP-base-sized linear layers (vision 12 x 4, text 12 x 10)"
                   + (": one block of each (quick)" if quick else ""), "weights": len(shapes),
                   "params": n_params, "device": device, "repeats": repeats, "checked_equal_to_reference": check},
        "results": results,
        "act_stats": act_rows,
    }
    path = write_json(Path(out or results_dir(quick=quick)), "scores" if device == "cpu" else f"scores_{device}", result)
    print(f"wrote {path}")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="one vision and one text block, float32, one repeat")
    p.add_argument("--no-check", action="store_true", help="skip the equality check against the reference")
    p.add_argument("--out", help=OUT_HELP)
    args = p.parse_args()
    run(args.device, args.quick, args.out, None if args.quick else args.dtypes, args.repeats, args.threads,
        not args.no_check)


if __name__ == "__main__":
    main()
