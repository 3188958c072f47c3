"""The few-row regime of ``bitmap_linear`` on CUDA (family ``bitmap_gemv``): the two CUDA C++
few-row kernels against cuBLAS dense, the memory-bound case the issue's CUDA goal is about.

Columns (ms per call, median; weights rotated over 512 MiB so L2 does not hold them):
``dense`` ``F.linear``; ``bitmap`` the public op (its default for float16 / bfloat16,
gemv_tc: W decoded into mma.sync fragments, up to 16 rows of x); ``bitmap_v1`` the public op
under ``MULTIFLOW_BITMAP_GEMV=v1`` (the warp-per-row CUDA-core kernel, up to 8 rows; 9+ rows
go through a dense decode and cuBLAS); ``bitmap_tc2`` the public op under
``MULTIFLOW_BITMAP_GEMV=tc2`` (gemv_tc with the lean decode: a byte of each weight row per lane,
one 16-byte x load per word; opt-in until measured); ``private`` the private op ``_bitmap_linear_cuda``
called directly (the default kernel), to show the public op's host cost. Also each kernel's bytes over the measured copy bandwidth ("% roof":
the weight's storage + x + y at copy bandwidth / measured time) and the speed against dense.
float16 at 75% by default; the goal: at least 2.5x faster than dense at 1-16 rows on
4096x4096 and 11008x4096. Writes bitmap_gemv_cuda.json (machine, versions, date, commit).

    python benchmarks/bench_bitmap_gemv.py --device cuda [--quick] [--dtypes float16 ...] [--out DIR]
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (ROTATION_BYTES, copy_bandwidth, family_main, results_dir, rotating_copies, rotation,  # noqa: E402
                    storage_bytes, time_samples, write_json)

SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "4096x11008": (4096, 11008),
          "768x768": (768, 768), "3072x768": (3072, 768), "768x3072": (768, 3072)}
ROWS = [1, 2, 4, 8, 12, 16]
GEMV_ENV = "MULTIFLOW_BITMAP_GEMV"
COLUMNS = ("dense", "bitmap", "bitmap_v1", "bitmap_tc2", "private")


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _buffers(shape, sparsity, dtype, n, seed=0):
    from multiflow_kernels import ops

    g = torch.Generator(device="cuda").manual_seed(seed)
    bufs = []
    for _ in range(n):
        w = torch.randn(shape, generator=g, device="cuda")
        mask = torch.rand(shape, generator=g, device="cuda") >= sparsity
        w = (w * mask).to(dtype)
        bufs.append({"dense": w, "bitmap": ops.bitmap_pack(w, mask)})
    return bufs


def _time(fn, timing, gemv=None):
    """Median seconds of fn() with MULTIFLOW_BITMAP_GEMV set to ``gemv`` (unset: None) around
    the timing, not inside the timed calls."""
    old = os.environ.pop(GEMV_ENV, None)
    if gemv is not None:
        os.environ[GEMV_ENV] = gemv
    try:
        return statistics.median(time_samples(fn, "cuda", **timing))
    finally:
        os.environ.pop(GEMV_ENV, None)
        if old is not None:
            os.environ[GEMV_ENV] = old


def bench_case(shape, sparsity, dtype, rows_list, bandwidth, timing):
    from multiflow_kernels import ops

    out_f, in_f = shape
    esize = torch.empty(0, dtype=dtype).element_size()
    bufs = _buffers(shape, sparsity, dtype, rotating_copies(out_f * in_f * esize, "cuda"))
    # each format rotates enough copies that its own bytes fill ROTATION_BYTES (bitmap: clones)
    rot = {fmt: rotation([b[fmt] for b in bufs], "cuda") for fmt in ("dense", "bitmap")}
    del bufs
    w_bytes = {fmt: storage_bytes(copies[0]) for fmt, copies in rot.items()}
    g = torch.Generator(device="cuda").manual_seed(1)
    counters = {fmt: iter(range(10**12)) for fmt in rot}

    def pick(fmt):
        return rot[fmt][next(counters[fmt]) % len(rot[fmt])]

    rows_out = []
    for rows in rows_list:
        x = torch.randn(rows, in_f, generator=g, device="cuda").to(dtype)
        fns = {
            "dense": (lambda: F.linear(x, pick("dense")), None),
            "bitmap": (lambda: ops.bitmap_linear(x, *pick("bitmap"), in_f, None), None),
            "bitmap_v1": (lambda: ops.bitmap_linear(x, *pick("bitmap"), in_f, None), "v1"),
            "bitmap_tc2": (lambda: ops.bitmap_linear(x, *pick("bitmap"), in_f, None), "tc2"),
            "private": (lambda: torch.ops.multiflow._bitmap_linear_cuda.default(x, *pick("bitmap"), in_f, None), None),
        }
        io = _nbytes(x) + rows * out_f * esize
        r = {"rows": rows, "time_s": {}, "of_roofline": {}}
        for name, (fn, gemv) in fns.items():
            r["time_s"][name] = t = _time(fn, timing, gemv)
            r["of_roofline"][name] = (w_bytes["dense" if name == "dense" else "bitmap"] + io) / bandwidth / t
        rows_out.append(r)
    copies = {fmt: len(c) for fmt, c in rot.items()}
    del rot
    return {"weight_bytes": w_bytes, "weight_copies": copies, "bitmap_bytes_ratio": w_bytes["bitmap"] / w_bytes["dense"], "rows": rows_out}


def run(device: str = "cpu", quick: bool = False, out=None, dtypes=None) -> Path:
    """The ``bitmap_gemv`` family (CUDA only): prints the table, writes bitmap_gemv_cuda.json."""
    import multiflow_kernels  # noqa: F401  (registers the ops)

    if torch.device(device).type != "cuda":
        print("bitmap_gemv: CUDA only (the few-row CUDA C++ kernels); nothing to run on", device)
        return None
    if not torch.cuda.is_available():
        raise RuntimeError("bitmap_gemv: --device cuda but torch sees no CUDA GPU")
    names = dtypes or ["float16"]
    dts = [getattr(torch, n) for n in names]
    shapes = ["4096x4096", "768x3072"] if quick else list(SHAPES)
    sparsities = [0.75] if quick else [0.75, 0.63]
    timing = {"min_seconds": 0.03, "max_runs": 30}
    bandwidth = copy_bandwidth("cuda")
    print(f"bitmap_linear few-row kernels, {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
          f"ms per call (median), weights rotated over {ROTATION_BYTES['cuda'] >> 20} MiB; x = speed vs dense")
    print(f"{'shape':>10} {'dtype':>8} {'spars':>5} {'rows':>4} {'dense':>8} {'bitmap':>8} {'(x)':>6} {'%roof':>5} "
          f"{'v1':>8} {'(x)':>6} {'tc2':>8} {'(x)':>6} {'private':>8}")
    out = Path(out or results_dir(quick=quick))
    results = []
    for dtype, dname in zip(dts, names):
        for shape_name in shapes:
            for s in sparsities:
                case = bench_case(SHAPES[shape_name], s, dtype, ROWS, bandwidth, timing)
                case.update(shape=shape_name, sparsity=s, dtype=dname)
                results.append(case)
                for r in case["rows"]:
                    t = r["time_s"]
                    print(f"{shape_name:>10} {dname:>8} {s:>5.2f} {r['rows']:>4} {t['dense'] * 1e3:>8.4f} "
                          f"{t['bitmap'] * 1e3:>8.4f} {t['dense'] / t['bitmap']:>5.2f}x {r['of_roofline']['bitmap']:>5.0%} "
                          f"{t['bitmap_v1'] * 1e3:>8.4f} {t['dense'] / t['bitmap_v1']:>5.2f}x "
                          f"{t['bitmap_tc2'] * 1e3:>8.4f} {t['dense'] / t['bitmap_tc2']:>5.2f}x {t['private'] * 1e3:>8.4f}",
                          flush=True)
            path = write_json(out, "bitmap_gemv_cuda", {
                "benchmark": "bitmap_gemv", "family": "bitmap_gemv", "device": "cuda", "quick": quick,
                "rotation_bytes": ROTATION_BYTES["cuda"], "copy_bandwidth_Bps": bandwidth, "timing": timing,
                "columns": {"dense": "F.linear (cuBLAS)", "bitmap": "public bitmap_linear, default (gemv_tc for 16-bit types)",
                            "bitmap_v1": "public bitmap_linear, MULTIFLOW_BITMAP_GEMV=v1",
                            "bitmap_tc2": "public bitmap_linear, MULTIFLOW_BITMAP_GEMV=tc2 (lean decode)",
                            "private": "_bitmap_linear_cuda called directly (default kernel)"},
                "note": "time_s: median seconds per call; of_roofline = (format bytes + x + y) / copy bandwidth / time",
                "results": results})
    print(f"wrote {path}")
    return path


def main():
    family_main(run, __doc__, "2 shapes, 75% sparse, float16")


if __name__ == "__main__":
    main()
