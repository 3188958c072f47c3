"""Format conversions on CPU: bitmap_pack / bitmap_unpack and sparse24_pack / sparse24_unpack
against their plain-torch twins (multiflow_kernels.reference) and a clone() of the dense weight.

Conversions are one-time work per layer (sparsify, load_sparse, a dense export), so the
point is that they cost about what touching the weight once costs, not many times more.
Weights: random float32 / float16, a random 75%-sparse mask for bitmap, a random 2:4 mask for
sparse24. Each op is timed on the same inputs (median of the samples; the outputs are fresh
allocations, as in real use, so their first-touch page faults count). Baselines: clone() of
the dense weight (a fresh output too) and copy_() into a buffer made once (the bytes alone).
The CPU inner loops are the ISA torch's capability selects (ATEN_CPU_CAPABILITY overrides it;
the file is convert_cpu_<isa>.json, and records MULTIFLOW_CPU_VBMI2).

    PYTHONPATH=.:python .venv/bin/python benchmarks/bench_convert.py [--quick] [--dtypes float32 float16]
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import family_main, results_dir, time_samples, write_json  # noqa: E402

SHAPES = {"768x768": (768, 768), "3072x768": (3072, 768), "4096x4096": (4096, 4096)}


def _inputs(shape, dtype, gen):
    from multiflow_kernels import ops

    w = torch.randn(shape, generator=gen).to(dtype)
    mask = torch.rand(shape, generator=gen) >= 0.75
    mask24 = ops.nm_mask(torch.rand(shape, generator=gen), 2, 4)
    return w, mask, mask24


def _fns(w, mask, mask24):
    """{name: (ours, plain-torch twin)}; the baselines clone() (a fresh output, as the ops
    make) and copy_() into a buffer made once (the bytes alone, no first-touch page faults)."""
    from multiflow_kernels import ops, reference

    n_in = w.shape[1]
    fmt = ops.bitmap_pack(w, mask)
    fmt24 = ops.sparse24_pack(w, mask24)
    dst = torch.empty_like(w)
    return {
        "clone": (w.clone, None),
        "copy_": (lambda: dst.copy_(w), None),
        "bitmap_pack": (lambda: ops.bitmap_pack(w, mask), lambda: reference.bitmap_pack(w, mask)),
        "bitmap_unpack": (lambda: ops.bitmap_unpack(*fmt, n_in), lambda: reference.bitmap_unpack(*fmt, n_in)),
        "sparse24_pack": (lambda: ops.sparse24_pack(w, mask24), lambda: reference.sparse24_pack(w, mask24)),
        "sparse24_unpack": (lambda: ops.sparse24_unpack(*fmt24), lambda: reference.sparse24_unpack(*fmt24)),
    }


def run(device: str = "cpu", quick: bool = False, out=None, dtypes=None) -> Path | None:
    """The ``convert`` family: prints the table, writes convert_cpu_<isa>.json to ``out`` (isa:
    torch's CPU capability, e.g. avx512); None (and nothing written) on CUDA."""
    import multiflow_kernels  # noqa: F401  (registers the ops)

    if torch.device(device).type != "cpu":
        print("bench_convert: CPU only (the CUDA conversions are torch-op composites): skipped")
        return None
    dtypes = [getattr(torch, d) if isinstance(d, str) else d for d in (dtypes or ["float32", "float16"])]
    shapes = {"768x768": SHAPES["768x768"]} if quick else SHAPES
    timing = {"min_seconds": 0.05, "max_runs": 10, "min_runs": 3} if quick else {"min_seconds": 0.5, "max_runs": 60, "min_runs": 9}
    gen = torch.Generator().manual_seed(0)
    results = []
    print(f"{'dtype':>8} {'shape':>10} {'op':>16} {'ms':>9} {'torch ms':>9} {'x torch':>8} {'x clone':>8} {'x copy_':>8}")
    for dtype in dtypes:
        for name, shape in shapes.items():
            w, mask, mask24 = _inputs(shape, dtype, gen)
            fns = _fns(w, mask, mask24)
            times = {"clone": None, "copy_": None}  # the baselines first in the table, timed last (warm)
            for op, (ours, twin) in fns.items():
                if twin is not None:
                    times[op] = (statistics.median(time_samples(ours, "cpu", **timing)),
                                 statistics.median(time_samples(twin, "cpu", **timing)))
            for base in ("clone", "copy_"):
                times[base] = (statistics.median(time_samples(fns[base][0], "cpu", **timing)), None)
            clone_s, copy_s = times["clone"][0], times["copy_"][0]
            for op, (t, t_twin) in times.items():
                row = {"dtype": str(dtype).removeprefix("torch."), "shape": name, "op": op, "time_s": t,
                       "torch_time_s": t_twin, "speedup_vs_torch": t_twin / t if t_twin else None,
                       "time_vs_clone": t / clone_s, "time_vs_copy": t / copy_s}
                results.append(row)
                tw = f"{t_twin * 1e3:9.3f}" if t_twin else f"{'':>9}"
                sp = f"{t_twin / t:7.2f}x" if t_twin else f"{'':>8}"
                print(f"{row['dtype']:>8} {name:>10} {op:>16} {t * 1e3:9.3f} {tw} {sp} {t / clone_s:7.2f}x {t / copy_s:7.2f}x")
    isa = torch.backends.cpu.get_cpu_capability().lower()
    path = write_json(Path(out or results_dir(quick=quick)), f"convert_cpu_{isa}", {
        "benchmark": "convert", "family": "convert", "device": "cpu", "quick": quick, "timing": timing,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "MULTIFLOW_CPU_VBMI2": os.environ.get("MULTIFLOW_CPU_VBMI2"),
        "note": "time_s: median seconds per call of our op; torch_time_s: the plain-torch twin "
                "(multiflow_kernels.reference); time_vs_clone: time_s over clone() of the dense weight "
                "(same dtype and shape, a fresh output: first-touch page faults included where the allocator "
                "maps new pages, which glibc does for some sizes and not others); time_vs_copy: over copy_() "
                "into a buffer made once (the bytes alone)",
        "results": results})
    print(f"wrote {path}")
    return path


def main():
    family_main(run, __doc__, "768x768 only, few samples (seconds)")


if __name__ == "__main__":
    main()
