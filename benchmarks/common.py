"""Shared benchmark plumbing: machine / version facts, JSON output, timing, copy bandwidth."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    """``MULTIFLOW_COMMIT`` when set (a copied working tree may carry a stale .git: seen on a
    lent GPU machine), else this checkout's commit, with "-dirty" when a tracked file other
    than benchmarks/results/ (which the benchmarks themselves rewrite) differs from it."""
    if os.environ.get("MULTIFLOW_COMMIT"):
        return os.environ["MULTIFLOW_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        def git(*args):
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=10)

        head = git("describe", "--always", "--abbrev=7").stdout.strip()
        if not head:
            return "unknown"
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
        return head + ("-dirty" if changed.returncode != 0 or changed.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    """Machine, versions, date and commit, for every results file."""
    import torch

    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15m": [round(v, 2) for v in os.getloadavg()],  # when the results were written
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def results_dir(default: str | None = None, quick: bool = False) -> Path:
    """``--out`` default: $OUT when set, else benchmarks/results/ (benchmarks/results/quick/
    for --quick runs, so a smoke run never overwrites the committed full results)."""
    if default or os.environ.get("OUT"):
        return Path(default or os.environ["OUT"])
    return Path(__file__).parent / "results" / ("quick" if quick else "")


OUT_HELP = "default: $OUT, else benchmarks/results/ (benchmarks/results/quick/ with --quick)"


def torch_dtypes(names, cuda: bool) -> list:
    """dtype names (or dtypes) as torch dtypes; default float32 on CPU, float16 and float32 on CUDA."""
    import torch

    return [getattr(torch, d) if isinstance(d, str) else d for d in (names or (["float16", "float32"] if cuda else ["float32"]))]


def family_main(run, doc: str, quick_help: str) -> None:
    """The command line of a family script: ``--device``, ``--quick``, ``--dtypes``, ``--out``,
    handed to ``run(device, quick, out, dtypes)``."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--dtypes", nargs="+", help="default: float32 on CPU, float16 float32 on CUDA")
    p.add_argument("--out", help=OUT_HELP)
    args = p.parse_args()
    run(args.device, args.quick, args.out, args.dtypes)


def write_json(out_dir: str | os.PathLike, name: str, result: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info(), **result}, indent=2))
    return path


def time_call(fn, device, group: int = 1) -> float:
    """Seconds per call of ``group`` back-to-back ``fn()`` calls: wall clock on CPU, CUDA
    events on CUDA (GPU time, waiting for the end of the calls)."""
    import torch

    if torch.device(device).type != "cuda":
        t0 = time.perf_counter()
        for _ in range(group):
            fn()
        return (time.perf_counter() - t0) / group
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(group):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / group


def time_samples(fn, device, min_seconds: float = 0.3, max_runs: int = 200, min_runs: int = 5,
                 warmup: int = 1, warmup_seconds: float = 0.05) -> list[float]:
    """Seconds per ``fn()`` call, one value per sample, after a warm-up of at least ``warmup``
    calls and ``warmup_seconds`` (none with ``warmup=0``): at least ``min_runs`` samples, more
    until ``min_seconds`` have passed or ``max_runs`` are taken.

    The warm-up is timed, not counted, because a rotated weight's first calls after another
    format's were slower on our 2-core VM for ~10 ms (25 vs 20 us for a 768x768 bitmap call):
    one call of warm-up timed a fast op in that state and a slow one out of it.

    CPU: one call per sample. CUDA: a sample is a group of back-to-back calls (as many as
    take about 1 ms, at most 100), so a short kernel is timed with the launch queue full
    rather than with the launch latency of an idle GPU."""
    import torch

    cuda = torch.device(device).type == "cuda"
    start = time.perf_counter()
    done = 0
    while done < warmup or (warmup > 0 and time.perf_counter() - start < warmup_seconds):
        fn()
        done += 1
    group = 1
    if cuda:
        torch.cuda.synchronize()
        group = max(1, min(100, int(1e-3 / max(time_call(fn, device), 1e-7))))
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < max_runs):
        times.append(time_call(fn, device, group))
    return times


def median_time(fn, device, **kw) -> float:
    """Median of :func:`time_samples` (same keyword arguments)."""
    return statistics.median(time_samples(fn, device, **kw))


ROTATION_BYTES = {"cpu": 1 << 30, "cuda": 512 << 20}


def rotating_copies(weight_bytes: int, device, least: int = 4, most: int = 128) -> int:
    """How many copies of a weight a benchmark rotates through so that the caches cannot hold
    it between calls: enough to fill ``ROTATION_BYTES`` (1 GiB on CPU, 32x a 32 MiB L3;
    512 MiB on CUDA, 10x the 50 MB L2 of an H100 / H200), at least ``least``, at most ``most``.

    On CPU 256 MiB was not enough for small weights: a 768x768 bitmap call (0.67 MB) took
    19.5 / 21.4 / 23.7 / 22.9 us rotating 76 / 256 / 512 / 1024 MiB of copies, CSR 81 / 85 /
    87.5 / 86 us (session 12): the L3 kept part of a rotation a few times its size."""
    import torch

    budget = ROTATION_BYTES[torch.device(device).type]
    return max(least, min(most, -(-budget // max(1, weight_bytes))))


def storage_bytes(entry) -> int:
    """Bytes of one weight buffer as a benchmark holds it: a tensor (a sparse CSR one: values,
    column indices and row pointers), or a tuple / list of them."""
    import torch

    if isinstance(entry, (tuple, list)):
        return sum(storage_bytes(t) for t in entry)
    if entry.layout == torch.sparse_csr:
        return storage_bytes((entry.values(), entry.col_indices(), entry.crow_indices()))
    return entry.numel() * entry.element_size()


def _clone(entry):
    return type(entry)(_clone(t) for t in entry) if isinstance(entry, (tuple, list)) else entry.clone()


def rotation(copies: list, device, least: int = 4) -> list:
    """One format's weight buffers, ``copies`` (tensors or tuples of tensors, each of the same
    size), extended with clones of them in turn until the format's *own* bytes fill
    ``ROTATION_BYTES``: a compressed weight rotated with only as many copies as the dense one
    needs would be partly cached (0.28x the bytes for a 75%-sparse bitmap)."""
    need = rotating_copies(storage_bytes(copies[0]), device, least=least, most=1 << 16)
    out = list(copies)
    for i in range(need - len(out)):
        out.append(_clone(copies[i % len(copies)]))
    return out


def copy_bandwidth(device, nbytes: int = 1 << 28) -> float:
    """Measured device memory bandwidth in bytes/s: ``Tensor.copy_`` of ``nbytes`` (far larger
    than the caches), counting the read and the write. The roofline of a memory-bound op is
    the bytes it must move divided by this."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_time(lambda: dst.copy_(src), device, min_seconds=0.5, max_runs=50)


def plot_time_vs_rows(cases, shapes, formats, panel_of, title, out_png):
    """A grid of log-log plots, ms per call vs rows of x, one line per format: a row of
    panels per value of ``panel_of(case)`` (e.g. dtype, sparsity), a column per shape.
    ``cases`` hold "shape" and "rows" (each with "rows" and "time_s" per format);
    ``title(shape, panel)`` names a panel. Returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = sorted({panel_of(c) for c in cases})
    fig, axes = plt.subplots(len(panels), len(shapes), figsize=(4 * len(shapes), 3.3 * len(panels)), squeeze=False)
    for row_axes, panel in zip(axes, panels):
        for ax, shape_name in zip(row_axes, shapes):
            case = next(c for c in cases if c["shape"] == shape_name and panel_of(c) == panel)
            for fmt in formats:
                pts = [(r["rows"], r["time_s"][fmt] * 1e3) for r in case["rows"] if fmt in r["time_s"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=fmt)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(title(shape_name, panel), fontsize=9)
            ax.set_xlabel("rows of x")
            ax.set_ylabel("ms per call")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
