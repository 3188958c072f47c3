"""Sparse linear layers for inference (family ``bitmap``): ``bitmap_linear`` against dense
``F.linear``, ``torch.sparse.mm`` with a CSR weight and ``masked_linear``; time vs rows of x.

On CUDA ``bitmap`` is the public op's default there, the CUDA C++ kernel (csrc/cuda/bitmap.cu),
and a fifth column, ``bitmap_triton``, times the Triton kernel (called directly) beside it.

Rows 1 ... 2048; sparsity 0.63 / 0.75 / 0.9; BLIP shapes (768x768, 2304x768, 3072x768,
768x3072) and 4096x4096 (+ 11008x4096 on CUDA). Each format rotates copies of its weight that
fill 1 GiB (CPU) / 512 MiB (CUDA) of its own storage, so the caches do not hold the weight
between calls (CUDA: CUDA events); medians after a timed warm-up (common.time_samples). Each
format's time is also put against its roofline: the bytes it must move (its weight storage,
x and y) over the measured copy bandwidth of the device. Prints a table and the dense /
bitmap crossover, writes JSON (machine, versions, date, commit) and a PNG plot (time vs rows
per format) to --out as sparse_linear_<device>.{json,png}.

    .venv/bin/python benchmarks/bench_sparse_linear.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (ROTATION_BYTES, copy_bandwidth, family_main, plot_time_vs_rows, results_dir, rotating_copies,  # noqa: E402
                    rotation, storage_bytes, time_samples, torch_dtypes, write_json)

SHAPES = {"768x768": (768, 768), "2304x768": (2304, 768), "3072x768": (3072, 768), "768x3072": (768, 3072),
          "4096x4096": (4096, 4096), "11008x4096": (11008, 4096)}
FORMATS = ("dense", "csr", "masked", "bitmap", "bitmap_triton")  # bitmap_triton: CUDA only


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _weight_buffers(shape, sparsity, dtype, device, n_buffers, seed=0, csr=True):
    """``n_buffers`` independent pruned weights of one shape in every format (CSR only if
    ``csr``), and {format: why} for the formats that cannot be built here."""
    from multiflow_kernels import ops

    g = torch.Generator(device=device).manual_seed(seed)
    bufs, unavailable = [], {}
    for _ in range(n_buffers):
        w = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        mask = torch.rand(shape, generator=g, device=device) >= sparsity
        w = (w * mask).to(dtype)
        entry = {"dense": w, "bits": ops.pack_mask(mask)}
        packers = [("bitmap", lambda: ops.bitmap_pack(w, mask))] + ([("csr", w.to_sparse_csr)] if csr else [])
        for fmt, pack in packers:
            try:
                entry[fmt] = pack()
            except (NotImplementedError, RuntimeError) as e:  # no kernel for this device / dtype (yet)
                unavailable[fmt] = str(e).splitlines()[0][:200]
        bufs.append(entry)
    return bufs, unavailable


def _rotations(bufs, device) -> dict:
    """{format: its weight buffers}: each format rotates enough copies that its own bytes fill
    ``ROTATION_BYTES`` (clones of the independent weights where the format is smaller)."""
    rot = {fmt: rotation([b[fmt] for b in bufs], device) for fmt in ("dense", "csr", "bitmap")
           if all(fmt in b for b in bufs)}  # a format that failed on any buffer is in `unavailable`
    rot["masked"] = rotation([(b["dense"], b["bits"]) for b in bufs], device)
    return rot


def _format_fns(rot, x, in_f):
    """One call per format, each on the next of its weight buffers."""
    from multiflow_kernels import ops

    def picker(fmt):
        bufs, it = rot[fmt], iter(range(10**12))
        return lambda: bufs[next(it) % len(bufs)]

    dense, csr, masked, bitmap = (picker(f) if f in rot else None for f in ("dense", "csr", "masked", "bitmap"))
    fns = {
        "dense": lambda: F.linear(x, dense()),
        "csr": lambda: torch.sparse.mm(csr(), x.t()),
        "masked": lambda: ops.masked_linear(x, *masked(), None),
        "bitmap": lambda: ops.bitmap_linear(x, *bitmap(), in_f, None),
    }
    from multiflow_kernels.triton import HAS_TRITON

    if x.is_cuda and HAS_TRITON:
        from multiflow_kernels.triton.bitmap_linear import bitmap_linear_triton

        fns["bitmap_triton"] = lambda: bitmap_linear_triton(x, *bitmap(), in_f, None)
    return {f: fn for f, fn in fns.items() if f.removesuffix("_triton") in rot}


def _format_bytes(rot):
    """Weight bytes each format must read."""
    b = {fmt: storage_bytes(bufs[0]) for fmt, bufs in rot.items()}
    b.setdefault("csr", None)
    b.setdefault("bitmap", None)
    b["bitmap_triton"] = b["bitmap"]
    return b


def bench_weight(shape, sparsity, rows_list, dtype, device, bandwidth, timing, formats=FORMATS):
    """Every format of ``formats`` at every number of rows for one (shape, sparsity, dtype)."""
    out_f, in_f = shape
    n_buffers = rotating_copies(out_f * in_f * torch.empty(0, dtype=dtype).element_size(), device)
    bufs, unavailable = _weight_buffers(shape, sparsity, dtype, device, n_buffers, csr="csr" in formats)
    density = float(bufs[0]["dense"].count_nonzero()) / (out_f * in_f)
    rot = _rotations(bufs, device)
    del bufs
    w_bytes = _format_bytes(rot)
    g = torch.Generator(device=device).manual_seed(1)
    results = []
    for rows in rows_list:
        x = torch.randn(rows, in_f, generator=g, device=device).to(dtype)
        io_bytes = _nbytes(x) + rows * out_f * x.element_size()
        r = {"rows": rows, "density": density, "time_s": {}, "best_s": {}, "roofline_s": {}, "of_roofline": {}}
        for fmt, fn in _format_fns(rot, x, in_f).items():
            if fmt in unavailable or fmt not in formats:
                continue
            try:
                samples = time_samples(fn, device, **timing)
            except (NotImplementedError, RuntimeError) as e:  # e.g. no kernel for this device / dtype yet
                unavailable[fmt] = str(e).splitlines()[0][:200]
                continue
            r["time_s"][fmt] = t = statistics.median(samples)
            r["best_s"][fmt] = min(samples)
            r["roofline_s"][fmt] = (w_bytes[fmt] + io_bytes) / bandwidth
            r["of_roofline"][fmt] = r["roofline_s"][fmt] / t
        if "dense" in r["time_s"]:
            r["tflops_dense"] = 2 * rows * out_f * in_f / r["time_s"]["dense"] / 1e12
        results.append(r)
    copies = {fmt: len(bufs) for fmt, bufs in rot.items()}
    del rot
    bitmap_ratio = w_bytes["bitmap"] / w_bytes["dense"] if w_bytes["bitmap"] else None
    return {"weight_bytes": w_bytes, "bitmap_bytes_ratio": bitmap_ratio, "weight_copies": copies, "independent_weights": n_buffers,
            "rows": results, "unavailable": unavailable}


def crossover(rows):
    """Where bitmap first stops beating dense: (largest rows before that, first rows where it
    does not); None where it never wins / never loses."""
    faster_up_to = slower_from = None
    for r in sorted(rows, key=lambda r: r["rows"]):
        if "bitmap" not in r["time_s"]:
            continue
        if r["time_s"]["bitmap"] >= r["time_s"]["dense"]:
            slower_from = r["rows"]
            break
        faster_up_to = r["rows"]
    return faster_up_to, slower_from


def _ms(r, fmt):
    t = r["time_s"].get(fmt)
    return f"{t * 1e3:.3f}" if t is not None else "-"


def _plot(results, shapes, out_png, device):
    return plot_time_vs_rows(results, shapes, FORMATS, lambda c: (c["dtype"], c["sparsity"]),
                             lambda shape, p: f"{shape}, {p[1]:.0%} sparse, {p[0]}, {device}", out_png)


def run(device: str = "cpu", quick: bool = False, out=None, dtypes=None) -> Path:
    """The ``bitmap`` family: prints the table, writes sparse_linear_<device>.{json,png} to ``out``."""
    import multiflow_kernels  # noqa: F401  (registers the ops)

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if quick:
        shapes, rows_list, sparsities = ["768x3072", "4096x4096"], [1, 16, 128], [0.75]
    else:
        shapes = [s for s in SHAPES if cuda or s != "11008x4096"]
        rows_list, sparsities = [1, 4, 16, 64, 128, 256, 2048], [0.63, 0.75, 0.9]
    dtypes = torch_dtypes(dtypes, cuda)
    timing = {"min_seconds": 0.03, "max_runs": 30} if cuda else {"min_seconds": 0.05 if quick else 0.3, "max_runs": 200}
    bandwidth = copy_bandwidth(device)
    print(f"sparse linear, {device}, copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write), "
          f"weight copies rotated ({ROTATION_BYTES[device.type] >> 20} MiB of each format's storage); ms per call (median); '% roof' = time the format's bytes "
          f"(weight storage + x + y) take at copy bandwidth / measured time")
    print(f"{'shape':>10} {'dtype':>8} {'spars':>5} {'rows':>5} {'dense ms':>9} {'csr ms':>9} {'masked ms':>10} "
          f"{'bitmap ms':>10} {'bm/dense':>9} {'bm/csr':>7} {'dense %roof':>11} {'bitmap %roof':>12}"
          + (f" {'triton ms':>9} {'tri/dense':>9} {'tri %roof':>9}" if cuda else ""))
    out = Path(out or results_dir(quick=quick))
    results = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for shape_name in shapes:
            for s in sparsities:
                case = bench_weight(SHAPES[shape_name], s, rows_list, dtype, device, bandwidth, timing)
                case.update(shape=shape_name, sparsity=s, dtype=dname)
                case["crossover"] = dict(zip(("bitmap_faster_up_to_rows", "bitmap_slower_from_rows"),
                                             crossover(case["rows"])))
                results.append(case)
                for r in case["rows"]:
                    t = r["time_s"]
                    vs_dense = f"{t['dense'] / t['bitmap']:.2f}x" if "bitmap" in t else "-"
                    vs_csr = f"{t['csr'] / t['bitmap']:.2f}x" if "bitmap" in t and "csr" in t else "-"
                    roof_bm = f"{r['of_roofline']['bitmap']:.0%}" if "bitmap" in t else "-"
                    tri = ""
                    if cuda:
                        tri_vs_dense = f"{t['dense'] / t['bitmap_triton']:.2f}x" if "bitmap_triton" in t else "-"
                        roof_tri = f"{r['of_roofline']['bitmap_triton']:.0%}" if "bitmap_triton" in t else "-"
                        tri = f" {_ms(r, 'bitmap_triton'):>9} {tri_vs_dense:>9} {roof_tri:>9}"
                    print(f"{shape_name:>10} {dname:>8} {s:>5.2f} {r['rows']:>5} {_ms(r, 'dense'):>9} {_ms(r, 'csr'):>9} "
                          f"{_ms(r, 'masked'):>10} {_ms(r, 'bitmap'):>10} {vs_dense:>9} {vs_csr:>7} "
                          f"{r['of_roofline']['dense']:>11.0%} {roof_bm:>12}" + tri)
                for fmt, why in case["unavailable"].items():
                    print(f"{'':>10} {fmt} not measured: {why}")
        # after each dtype, so a run cut short (gpu_check's time caps) keeps the dtypes it finished
        path = write_json(out, f"sparse_linear_{device.type}", {
            "benchmark": "sparse_linear", "family": "bitmap", "device": str(device), "quick": quick,
            "rotation_bytes": ROTATION_BYTES[device.type], "copy_bandwidth_Bps": bandwidth, "timing": timing,
            "partial": dtype is not dtypes[-1],
            "note": "time_s: median seconds per call, best_s: fastest sample; roofline_s: (weight storage + x + y bytes) / copy bandwidth; "
                    "of_roofline = roofline_s / time_s; masks are random with the given keep probability",
            "results": results})
    print("\ncrossover (bitmap vs dense): bitmap faster up to / slower from rows")
    for c in results:
        print(f"  {c['shape']:>10} {c['dtype']:>8} {c['sparsity']:.2f}: {c['crossover']['bitmap_faster_up_to_rows']} / "
              f"{c['crossover']['bitmap_slower_from_rows']}   (bitmap storage {c['bitmap_bytes_ratio'] or float('nan'):.3f}x dense)")
    png = _plot(results, shapes, out / f"sparse_linear_{device.type}.png", device.type)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return path


def main():
    family_main(run, __doc__, "2 shapes, 3 row counts, 75% sparse (under a minute on 2 cores)")


if __name__ == "__main__":
    main()
