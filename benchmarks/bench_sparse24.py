"""The 2:4 format (family ``sparse24``): ``sparse24_linear`` against dense ``F.linear``
(cuBLAS / MKL), ``bitmap_linear`` on the same 50% masks and, on CUDA, PyTorch's own 2:4 path (``to_sparse_semi_structured``, where
this torch and GPU support it); time vs rows of x. On CUDA at 1-4 rows also
``sparse24_half`` ("half ms"): the same op with MULTIFLOW_SPARSE24_GEMV=half (a half-warp per
output row in the few-row kernel, for layers whose warp-per-row grid takes more than one wave);
at 16 rows or more ``sparse24_t128`` ("t128 ms", "t128/dense"): the same op with
MULTIFLOW_SPARSE24_GEMM=tile128 (the 128 x 128 tile mma.sp kernel instead of the 64 x 64 one),
and on sm_90 GPUs ``sparse24_wgmma`` ("wg ms", "wg/dense"): MULTIFLOW_SPARSE24_GEMM=wgmma
(the same tiles on Hopper's wgmma.mma_async.sp).

Rows 1 ... 8192; BLIP shapes (768x768, 2304x768, 3072x768, 768x3072) and 4096x4096
(+ 11008x4096 on CUDA); weights pruned 2:4 by ``nm_mask`` (50%). Each format rotates copies
of its weight that fill 1 GiB (CPU) / 512 MiB (CUDA) of its own storage (torch's 2:4 tensors
packed again from the dense copies), so the cache does not hold the weight between calls
(CUDA: CUDA events); medians after a timed warm-up. Each time is put against the roofline of the bytes the format must move
(weight storage + x + y, at the measured copy bandwidth) and, on CUDA, against dense in
TFLOP/s. Prints a table, writes JSON (machine, versions, date, commit) and a PNG plot to
--out as sparse24_<device>.{json,png}.

    .venv/bin/python benchmarks/bench_sparse24.py [--device cpu|cuda] [--quick] [--dtypes float16]
"""
from __future__ import annotations

import os
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    copy_bandwidth, family_main, plot_time_vs_rows, results_dir, rotating_copies, rotation, storage_bytes, time_samples,
    torch_dtypes, write_json,
)

SHAPES = {"768x768": (768, 768), "2304x768": (2304, 768), "3072x768": (3072, 768), "768x3072": (768, 3072),
          "4096x4096": (4096, 4096), "11008x4096": (11008, 4096)}
FORMATS = ("dense", "torch_2:4", "bitmap", "sparse24", "sparse24_half", "sparse24_t128", "sparse24_wgmma")
# Formats timed under an environment setting (set around their samples, not per call):
# sparse24_half = sparse24_linear's few-row kernel with a half-warp per output row, CUDA,
# at the rows that kernel serves (1-4; 5+ rows of 16-bit x go to the tensor cores).
# sparse24_t128 / sparse24_wgmma = the tensor-core path with 128 x 128 tiles (mma.sp / wgmma,
# the latter on sm_90 only), CUDA, at T128_MIN_ROWS rows or more.
FORMAT_ENV = {"sparse24_half": ("MULTIFLOW_SPARSE24_GEMV", "half"),
              "sparse24_t128": ("MULTIFLOW_SPARSE24_GEMM", "tile128"),
              "sparse24_wgmma": ("MULTIFLOW_SPARSE24_GEMM", "wgmma")}
HALF_MAX_ROWS = 4
T128_MIN_ROWS = 16

# A child process runs each opt-in kernel once before any is timed here: a kernel that has not
# run on a GPU before could leave a sticky CUDA error (an illegal address) that would fail every
# later call of this process, the default kernels' timings included.
_PROBE = """
import os, sys, torch, multiflow_kernels
from multiflow_kernels import ops
os.environ[sys.argv[1]] = sys.argv[2]
dev = torch.device("cuda", int(sys.argv[3]))
torch.cuda.set_device(dev)
g = torch.Generator(device=dev).manual_seed(0)
w = torch.randn(136, 1040, generator=g, device=dev).half()
values, meta = ops.sparse24_pack(w, ops.nm_mask(w.abs().float(), 2, 4))
x = torch.randn(130, 1040, generator=g, device=dev).half()
y = ops.sparse24_linear(x, values, meta, None)
torch.cuda.synchronize()
print("ok" if torch.isfinite(y).all() else "non-finite output")
"""
_PROBED: dict = {}


def _probe(fmt: str, device) -> str | None:
    """None if the opt-in format ``fmt`` ran in a child process, else why not (cached)."""
    if fmt not in _PROBED:
        import subprocess

        env_name, env_value = FORMAT_ENV[fmt]
        try:
            r = subprocess.run([sys.executable, "-c", _PROBE, env_name, env_value, str(device.index or 0)],
                               capture_output=True, text=True, timeout=120)
            ok = r.returncode == 0 and r.stdout.strip().endswith("ok")
            lines = r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["no output"]
            tail = ([ln for ln in lines if re.match(r"[\w.]*(Error|Exception)\b", ln)] or lines)[-1]  # the exception
            _PROBED[fmt] = None if ok else f"its probe in a child process failed (rc {r.returncode}): {tail[:200]}"
        except subprocess.TimeoutExpired:
            _PROBED[fmt] = "its probe in a child process timed out (120 s)"
    return _PROBED[fmt]


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _weight_buffers(shape, dtype, device, n_buffers, seed=0):
    """``n_buffers`` independent 2:4-pruned weights in every format, and {format: why not}."""
    from multiflow_kernels import ops

    g = torch.Generator(device=device).manual_seed(seed)
    bufs, unavailable = [], {}
    for _ in range(n_buffers):
        w = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        mask = ops.nm_mask(w.abs(), 2, 4)
        w = (w * mask).to(dtype)
        entry = {"dense": w, "sparse24": ops.sparse24_pack(w, mask)}
        try:  # the same 50% mask in the bitmap format: which compressed format is faster for 2:4 masks
            entry["bitmap"] = ops.bitmap_pack(w, mask)
        except (NotImplementedError, RuntimeError) as e:
            unavailable["bitmap"] = str(e).splitlines()[0][:200]
        if device.type == "cuda" and "torch_2:4" not in unavailable:
            try:
                from torch.sparse import to_sparse_semi_structured

                entry["torch_2:4"] = to_sparse_semi_structured(w)
            except (RuntimeError, ValueError, NotImplementedError, ImportError) as e:
                unavailable["torch_2:4"] = str(e).splitlines()[0][:200]
        bufs.append(entry)
    if device.type != "cuda":
        unavailable["torch_2:4"] = "PyTorch's 2:4 path is CUDA only"
    return bufs, unavailable


def _rotations(bufs, device, unavailable) -> dict:
    """{format: its weight buffers}: each format rotates enough copies that its own bytes fill
    ``ROTATION_BYTES``: clones of the independent weights where it is smaller; torch's 2:4
    tensors (not plain tensors: no clone) are packed again from the dense copies, as many as
    the same bytes as ours take (torch keeps the same values; its metadata is laid out
    differently). A format that failed on any buffer is left out (it is in ``unavailable``)."""
    rot = {fmt: rotation([b[fmt] for b in bufs], device) for fmt in ("dense", "bitmap", "sparse24")
           if all(fmt in b for b in bufs)}
    if all("torch_2:4" in b for b in bufs) and "torch_2:4" not in unavailable:
        from torch.sparse import to_sparse_semi_structured

        torch24 = [b["torch_2:4"] for b in bufs]
        need = rotating_copies(storage_bytes(rot["sparse24"][0]), device, most=1 << 16)
        try:
            while len(torch24) < need:
                torch24.append(to_sparse_semi_structured(rot["dense"][len(torch24) % len(rot["dense"])]))
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # fewer copies: recorded, not fatal
            unavailable["torch_2:4 rotation"] = f"only {len(torch24)} of {need} copies: {str(e).splitlines()[0][:160]}"
        rot["torch_2:4"] = torch24
    return rot


def _format_fns(rot, x):
    from multiflow_kernels import ops

    def picker(fmt):
        bufs, state = rot.get(fmt), {"i": 0}

        def pick():
            state["i"] = (state["i"] + 1) % len(bufs)
            return bufs[state["i"]]
        return pick

    dense, torch24, bitmap, ours = (picker(f) for f in ("dense", "torch_2:4", "bitmap", "sparse24"))
    fns = {
        "dense": lambda: F.linear(x, dense()),
        "torch_2:4": lambda: F.linear(x, torch24()),
        "bitmap": lambda: ops.bitmap_linear(x, *bitmap(), x.shape[-1], None),
        "sparse24": lambda: ops.sparse24_linear(x, *ours(), None),
    }
    if x.is_cuda and x.shape[0] <= HALF_MAX_ROWS:
        fns["sparse24_half"] = fns["sparse24"]  # the same call, timed under FORMAT_ENV
    if x.is_cuda and x.shape[0] >= T128_MIN_ROWS and x.dtype != torch.float32:  # tensor cores: 16-bit only
        fns["sparse24_t128"] = fns["sparse24"]
        if torch.cuda.get_device_capability(x.device) == (9, 0):
            fns["sparse24_wgmma"] = fns["sparse24"]
    return fns


def _unprobed(fns, device, unavailable) -> dict:
    """``fns`` without the opt-in formats whose child-process probe failed (recorded in
    ``unavailable``)."""
    for fmt in [f for f in fns if f in ("sparse24_t128", "sparse24_wgmma")]:
        why = _probe(fmt, device)
        if why is not None:
            unavailable[fmt] = why
            del fns[fmt]
    return fns


def bench_weight(shape, rows_list, dtype, device, bandwidth, timing):
    out_f, in_f = shape
    n_buffers = rotating_copies(out_f * in_f * torch.empty(0, dtype=dtype).element_size(), device)
    bufs, unavailable = _weight_buffers(shape, dtype, device, n_buffers)
    rot = _rotations(bufs, device, unavailable)
    del bufs
    w_bytes = {"dense": storage_bytes(rot["dense"][0]), "sparse24": storage_bytes(rot["sparse24"][0]),
               "bitmap": storage_bytes(rot["bitmap"][0]) if "bitmap" in rot else 0}
    w_bytes["torch_2:4"] = w_bytes["sparse24"]  # same values; its metadata is laid out differently
    w_bytes["sparse24_half"] = w_bytes["sparse24_t128"] = w_bytes["sparse24_wgmma"] = w_bytes["sparse24"]
    g = torch.Generator(device=device).manual_seed(1)
    results = []
    for rows in rows_list:
        x = torch.randn(rows, in_f, generator=g, device=device).to(dtype)
        io_bytes = _nbytes(x) + rows * out_f * x.element_size()
        r = {"rows": rows, "time_s": {}, "best_s": {}, "of_roofline": {}, "tflops": {}}
        for fmt, fn in _unprobed(_format_fns(rot, x), x.device, unavailable).items():
            if fmt in unavailable:
                continue
            env_name, env_value = FORMAT_ENV.get(fmt, (None, None))
            before = os.environ.get(env_name) if env_name else None
            if env_name:
                os.environ[env_name] = env_value
            try:
                samples = time_samples(fn, device, **timing)
            except (NotImplementedError, RuntimeError) as e:  # this format at this row count only
                r.setdefault("failed", {})[fmt] = str(e).splitlines()[0][:200]
                continue
            finally:
                if env_name and before is None:
                    os.environ.pop(env_name, None)
                elif env_name:
                    os.environ[env_name] = before
            r["time_s"][fmt] = t = statistics.median(samples)
            r["best_s"][fmt] = min(samples)
            r["of_roofline"][fmt] = (w_bytes[fmt] + io_bytes) / bandwidth / t
            r["tflops"][fmt] = 2 * rows * out_f * in_f / t / 1e12  # dense-equivalent FLOP/s
        results.append(r)
    copies = {fmt: len(bufs) for fmt, bufs in rot.items()}
    del rot
    return {"weight_bytes": w_bytes, "bytes_ratio": w_bytes["sparse24"] / w_bytes["dense"], "weight_copies": copies,
            "independent_weights": n_buffers,
            "rows": results, "unavailable": unavailable}


def _plot(results, shapes, out_png, device):
    return plot_time_vs_rows(results, shapes, FORMATS, lambda c: c["dtype"],
                             lambda shape, p: f"{shape}, 2:4, {p}, {device}", out_png)


def _ratio(t, base, fmt):
    return f"{t[base] / t[fmt]:.2f}x" if fmt in t and base in t else "-"


def _ms(r, fmt):
    t = r["time_s"].get(fmt)
    return f"{t * 1e3:.3f}" if t is not None else "-"


def run(device: str = "cpu", quick: bool = False, out=None, dtypes=None) -> Path:
    """The ``sparse24`` family: prints the table, writes sparse24_<device>.{json,png} to ``out``."""
    import multiflow_kernels  # noqa: F401  (registers the ops)

    device = torch.device(device)
    cuda = device.type == "cuda"
    if quick:
        shapes, rows_list = ["768x3072", "4096x4096"], [1, 16, 128]
    else:
        shapes = [s for s in SHAPES if cuda or s != "11008x4096"]
        rows_list = [1, 4, 16, 64, 256, 2048, 8192] if cuda else [1, 4, 16, 64, 256]
    dtypes = torch_dtypes(dtypes or (["float16", "bfloat16"] if cuda else ["float32"]), cuda)
    timing = {"min_seconds": 0.03, "max_runs": 30} if cuda else {"min_seconds": 0.05 if quick else 0.3, "max_runs": 200}
    bandwidth = copy_bandwidth(device)
    print(f"2:4 linear, {device}, copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write), weight copies rotated "
          f"(see common.rotating_copies); ms per call (median); '% roof' = time the format's bytes take at copy bandwidth / measured time")
    print(f"{'shape':>10} {'dtype':>8} {'rows':>5} {'dense ms':>9} {'torch2:4 ms':>11} {'bitmap ms':>9} {'ours ms':>9} "
          f"{'ours/dense':>10} {'ours/torch':>10} {'dense %roof':>11} {'ours %roof':>10} {'ours TF/s':>9} {'half ms':>8} {'t128 ms':>8} {'t128/dense':>10} {'wg ms':>8} {'wg/dense':>8}")
    out = Path(out or results_dir(quick=quick))
    results = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for shape_name in shapes:
            case = bench_weight(SHAPES[shape_name], rows_list, dtype, device, bandwidth, timing)
            case.update(shape=shape_name, dtype=dname)
            results.append(case)
            for r in case["rows"]:
                t = r["time_s"]
                ours = t.get("sparse24")
                vs_dense = f"{t['dense'] / ours:.2f}x" if ours else "-"
                vs_torch = f"{t['torch_2:4'] / ours:.2f}x" if ours and "torch_2:4" in t else "-"
                roof = f"{r['of_roofline']['sparse24']:.0%}" if ours else "-"
                tf = f"{r['tflops']['sparse24']:.1f}" if ours else "-"
                print(f"{shape_name:>10} {dname:>8} {r['rows']:>5} {_ms(r, 'dense'):>9} {_ms(r, 'torch_2:4'):>11} "
                      f"{_ms(r, 'bitmap'):>9} {_ms(r, 'sparse24'):>9} {vs_dense:>10} {vs_torch:>10} {r['of_roofline']['dense']:>11.0%} "
                      f"{roof:>10} {tf:>9} {_ms(r, 'sparse24_half'):>8} {_ms(r, 'sparse24_t128'):>8} "
                      f"{_ratio(t, 'dense', 'sparse24_t128'):>10} {_ms(r, 'sparse24_wgmma'):>8} "
                      f"{_ratio(t, 'dense', 'sparse24_wgmma'):>8}")
            for fmt, why in case["unavailable"].items():
                print(f"{'':>10} {fmt}{':' if fmt.endswith(' rotation') else ' not measured:'} {why}")
            for r in case["rows"]:
                for fmt, why in r.get("failed", {}).items():
                    print(f"{'':>10} {fmt} failed at {r['rows']} rows: {why}")
        # after each dtype, so a run cut short (gpu_check's time caps) keeps the dtypes it finished
        path = write_json(out, f"sparse24_{device.type}", {
            "benchmark": "sparse24", "family": "sparse24", "device": str(device), "quick": quick,
            "copy_bandwidth_Bps": bandwidth, "timing": timing, "partial": dtype is not dtypes[-1],
            "note": "time_s: median seconds per call, best_s: fastest sample; of_roofline = (weight storage + x + y bytes) / "
                    "copy bandwidth / time_s; tflops: dense-equivalent 2*rows*out*in / time; ours/dense > 1 means faster",
            "results": results})
    png = _plot(results, shapes, out / f"sparse24_{device.type}.png", device.type)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return path


def main():
    family_main(run, __doc__, "2 shapes, 3 row counts (under a minute on 2 cores)")


if __name__ == "__main__":
    main()
