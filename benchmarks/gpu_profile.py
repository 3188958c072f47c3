"""Where the time goes on CUDA: torch.profiler over the calls whose benchmarks miss their goals.

    python benchmarks/gpu_profile.py [--only NAME ...] > profile.log

For each target (masks_from_stats on the BLIP-base layer set; bitmap_linear (the public
op: the CUDA C++ kernel; under MULTIFLOW_BITMAP_GEMV=tc2 its lean decode; the Triton kernel
beside it) and sparse24_linear at a few row counts (also under MULTIFLOW_SPARSE24_GEMM=tile128 and, on sm_90, wgmma); sq_sum_accumulate_), prints to stdout the
median time per call
(CUDA events, after warm-up) and the profiler's table of the ops and kernels it ran, sorted
by device time, with host-side sync / copy calls counted: the first thing to read before
changing a kernel. A diagnostic, not a benchmark: its numbers are not kept in RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def _median_ms(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _profile(name, fn, calls=3, rows=14):
    try:
        _profile_one(name, fn, calls, rows)
    except Exception as e:  # report and go on: one failing target must not hide the others
        print(f"\n### {name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


def _profile_one(name, fn, calls, rows):
    from torch.profiler import ProfilerActivity, profile

    ms = _median_ms(fn)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    avgs = prof.key_averages()
    sort = "device_time_total" if hasattr(avgs[0], "device_time_total") else "cuda_time_total"
    host = {e.key: e.count // calls for e in avgs
            if any(k in e.key for k in ("Synchronize", "Memcpy", "cudaLaunchKernel", "cuLaunchKernel", "item"))}
    print(f"\n### {name}: {ms:.3f} ms per call (median of 20, CUDA events); per call: {host}")
    print(avgs.table(sort_by=sort, row_limit=rows, max_name_column_width=60), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help="masks bitmap bitmap_tc2 bitmap_triton sparse24 sparse24_t128 act")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA GPU visible", file=sys.stderr)
        return 2
    import multiflow
    import multiflow_kernels  # noqa: F401
    from bench_pruning import blip_base_layers
    from multiflow_kernels import ops

    dev = torch.device("cuda")
    want = set(args.only or ["masks", "bitmap", "bitmap_tc2", "bitmap_triton", "sparse24", "sparse24_t128", "act"])
    g = torch.Generator(device=dev).manual_seed(0)

    if "masks" in want:
        weights, acts, mods = blip_base_layers(dev)
        _profile("masks_from_stats BLIP-base 0.75", lambda: multiflow.masks_from_stats(weights, acts, mods, 0.75))
        del weights, acts

    if want & {"bitmap", "bitmap_tc2", "bitmap_triton"}:
        out_f, in_f = 11008, 4096
        w = torch.randn(out_f, in_f, device=dev, generator=g)
        mask = torch.rand(out_f, in_f, device=dev, generator=g) >= 0.75
        dense = (w * mask).half()
        packed = ops.bitmap_pack(dense, mask)
        for rows in (1, 16, 256):
            x = torch.randn(rows, in_f, device=dev, generator=g).half()
            print(f"\n### dense F.linear 11008x4096 fp16 rows={rows}: "
                  f"{_median_ms(lambda: torch.nn.functional.linear(x, dense)):.4f} ms per call", flush=True)
            if "bitmap" in want:
                _profile(f"bitmap_linear (public op: CUDA C++) 11008x4096 fp16 75% rows={rows}",
                         lambda: ops.bitmap_linear(x, *packed, in_f, None))
            if "bitmap_tc2" in want and rows <= 16:  # the lean decode is a few-row kernel
                os.environ["MULTIFLOW_BITMAP_GEMV"] = "tc2"
                try:
                    _profile(f"bitmap_linear, MULTIFLOW_BITMAP_GEMV=tc2, 11008x4096 fp16 75% rows={rows}",
                             lambda: ops.bitmap_linear(x, *packed, in_f, None))
                finally:
                    os.environ.pop("MULTIFLOW_BITMAP_GEMV")
            if "bitmap_triton" in want:
                from multiflow_kernels.triton.bitmap_linear import bitmap_linear_triton

                _profile(f"bitmap_linear_triton 11008x4096 fp16 75% rows={rows}",
                         lambda: bitmap_linear_triton(x, *packed, in_f, None))
        del w, mask, dense, packed

    if want & {"sparse24", "sparse24_t128"}:
        out_f, in_f = 4096, 4096
        w = torch.randn(out_f, in_f, device=dev, generator=g).half()
        mask = ops.nm_mask(w.float().abs(), 2, 4)  # keep the 2 largest of every 4
        packed = ops.sparse24_pack(w, mask)
        for rows in (16, 2048):
            x = torch.randn(rows, in_f, device=dev, generator=g).half()
            if "sparse24" in want:
                _profile(f"sparse24_linear 4096x4096 fp16 rows={rows}", lambda: ops.sparse24_linear(x, *packed, None))
            kinds = ["tile128", "wgmma"] if torch.cuda.get_device_capability() == (9, 0) else ["tile128"]
            for kind in kinds if "sparse24_t128" in want else []:
                os.environ["MULTIFLOW_SPARSE24_GEMM"] = kind
                try:
                    _profile(f"sparse24_linear, MULTIFLOW_SPARSE24_GEMM={kind}, 4096x4096 fp16 rows={rows}",
                             lambda: ops.sparse24_linear(x, *packed, None))
                finally:
                    os.environ.pop("MULTIFLOW_SPARSE24_GEMM", None)

    if "act" in want:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(36928, 768, device=dev, generator=g).to(dtype)
            m = torch.rand(36928, device=dev, generator=g) < 0.8
            acc = torch.zeros(768, device=dev)
            _profile(f"sq_sum_accumulate_ [36928, 768] {dtype}", lambda: ops.sq_sum_accumulate_(acc, x, m))

    return 0


if __name__ == "__main__":
    sys.exit(main())
