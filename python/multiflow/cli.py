"""Command line: ``multiflow prune`` and ``multiflow inspect``.

``multiflow prune`` calibrates a model once and writes, into ``--out``, one mask file per
sparsity (``masks_<method>_s<sparsity>.safetensors``), ``report.json``, ``report.md`` and
``layer_sparsity.png``. Errors print one line and exit non-zero (``--debug`` shows the
traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence


def _parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.replace(",", ":").split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nm must look like 2:4, got {text!r}") from None
    if not 0 < n <= m:
        raise argparse.ArgumentTypeError(f"--nm needs 0 < N <= M, got {text!r}")
    return n, m


def _parse_sparsity(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= s < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {text!r}")
    return s


def build_parser() -> argparse.ArgumentParser:
    from .pruners import METHODS

    p = argparse.ArgumentParser(prog="multiflow", description="MULTIFLOW pruning of vision-language models")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prune", help="calibrate a model and write masks at one or more sparsities")
    pr.add_argument("--model", default="blip-tiny", help="'blip-tiny', 'xvlm-tiny' or 'clip-tiny' (built in), a local transformers BLIP folder, "
                         "or xvlm:PATH (X-VLM base from an original X-VLM checkpoint file)")
    pr.add_argument("--task", choices=["retrieval", "caption", "vqa"], default=None,
                    help="BLIP class to build (default: retrieval for blip-tiny, the checkpoint's own class for a folder); "
                         "not for X-VLM")
    pr.add_argument("--data", default="builtin",
                    help="'builtin' (procedural image-caption pairs) or DATA.json[:IMAGE_ROOT] in the original format")
    pr.add_argument("--method", default="multiflow", choices=sorted(METHODS))
    pr.add_argument("--sparsity", type=_parse_sparsity, nargs="+", default=[0.63, 0.75, 0.9])
    pr.add_argument("--nm", type=_parse_nm, default=None, help="N:M masks instead of sparsities, e.g. 2:4")
    pr.add_argument("--batches", type=int, default=8, help="number of calibration batches")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", default="runs/prune", help="output folder (created if missing)")
    pr.add_argument("--nproc", type=int, default=1,
                    help="calibrate in N processes (torchrun; gloo on CPU, NCCL on GPUs): each runs a share "
                         "of the batches, statistics are all-reduced, rank 0 writes the outputs")
    pr.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pr.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    sp = sub.add_parser("sparsify", help="replace the masked nn.Linear layers of a model by sparse ones, "
                                          "save it and print the memory report")
    sp.add_argument("model", help="'blip-tiny', 'xvlm-tiny', 'clip-tiny', a local BLIP folder or xvlm:PATH")
    sp.add_argument("maskfile", help="a mask file written by multiflow prune")
    sp.add_argument("--task", choices=["retrieval", "caption", "vqa"], default=None,
                    help="the model's task (default: the one the mask file records, else retrieval)")
    sp.add_argument("--format", default="bitmap", choices=["masked", "bitmap", "2:4", "auto"],
                    help="sparse format: bitmap (the default: compressed, inference), masked (dense + mask bits, "
                         "fine-tuning), "
                         "2:4 (sparse tensor cores; needs masks from --nm 2:4) or auto (per layer, the fastest "
                         "kernel for the device and --rows)")
    sp.add_argument("--rows", type=int, default=1,
                    help="with --format auto: expected rows of x per call (tokens x batch), default 1. The model "
                         "is built on the CPU, so auto decides for the CPU here (where rows matter from 512 on, on "
                         "AVX-512 CPUs: layers keeping >= 35%% that are not 2:4 become masked from 512 rows "
                         "(float16: 1024), keeping >= 24%% from 1024 (float16: 2048), the faster kernel there, "
                         "with the dense weight's memory); use "
                         "multiflow_kernels.sparsify(model.cuda(), masks, 'auto', rows=N) for a GPU")
    sp.add_argument("--seed", type=int, default=None,
                    help="seed of a built-in model (default: the one the mask file records, else 0; a different "
                         "one is refused: it would be another model)")
    sp.add_argument("--out", default="sparse_model.safetensors", help="output safetensors file")
    sp.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    ins = sub.add_parser("inspect", help="print a mask file's summary")
    ins.add_argument("maskfile")
    ins.add_argument("--no-layers", action="store_true", help="only the per-modality table")
    ins.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def _image_size(model) -> int:
    cfg = getattr(model, "config", None)
    vision = getattr(cfg, "vision_config", None)
    return int(getattr(vision, "image_size", 224))


def _batches(args, model):
    from .data import calibration_batches, load_data

    if args.batches < 1 or args.batch_size < 1:
        raise ValueError("--batches and --batch-size must be at least 1")
    image_size = _image_size(model)
    processor = None
    if Path(args.model).is_dir() and (Path(args.model) / "preprocessor_config.json").exists():
        from transformers import BlipProcessor

        processor = BlipProcessor.from_pretrained(args.model, local_files_only=True)
    dataset = load_data(args.data, num_samples=None if args.data not in (None, "builtin") else
                        args.batches * args.batch_size, image_size=image_size, seed=args.seed)
    batches = calibration_batches(
        dataset, batch_size=args.batch_size, num_batches=args.batches, image_size=image_size, processor=processor
    )
    if batches.skipped:
        print(f"multiflow: skipped {len(batches.skipped)} samples with unreadable images "
              f"(first: {batches.skipped[0][1]})", file=sys.stderr)
    return batches


class _Stage:
    """What `multiflow prune` / `sparsify` is doing now, for the message printed on Ctrl-C."""

    now = "starting"


class _Tracked:
    """A list of batches whose iteration records which batch is being calibrated."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, b in enumerate(self.batches):
            _Stage.now = f"calibrating batch {i + 1} of {len(self.batches)}"
            yield b


def _sparsity_text(sparsity: float) -> str:
    """Two decimals (0.75), more only when the sparsity has them (0.631): distinct sparsities
    never share a file name or a report entry."""
    two = f"{sparsity:.2f}"
    return two if float(two) == sparsity else f"{sparsity:.6g}"


def _mask_filename(method: str, sparsity: Optional[float], nm) -> str:
    if nm is not None:
        return f"masks_{method}_{nm[0]}of{nm[1]}.safetensors"
    return f"masks_{method}_s{_sparsity_text(sparsity)}.safetensors"


def plot_layer_sparsity(results: dict, path: Path) -> None:
    """One line per mask set: each layer's sparsity in model order, coloured by modality."""
    from .masks import atomic_write

    atomic_write(path, layer_sparsity_plot(results))


def layer_sparsity_plot(results: dict):
    """:func:`plot_layer_sparsity`'s figure, as a function that draws it and writes it to a
    PNG path (nothing is drawn unless it is called)."""
    return lambda tmp: _draw_layer_sparsity(results, tmp)


def _draw_layer_sparsity(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    colors = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for label, masks in results.items():
        names = list(masks)
        mods = masks.metadata.get("modalities", {})
        sp = masks.layer_sparsity()
        ax.plot(range(len(names)), [sp[n] for n in names], color="0.7", lw=0.8, zorder=1)
        for mod in dict.fromkeys(mods.get(n, "?") for n in names):
            colors.setdefault(mod, palette[len(colors) % len(palette)])
            idx = [i for i, n in enumerate(names) if mods.get(n, "?") == mod]
            ax.scatter(idx, [sp[names[i]] for i in idx], s=10, color=colors[mod], zorder=2,
                       label=mod if label == next(iter(results)) else None)
        ax.annotate(label, (len(names) - 1, sp[names[-1]]), fontsize=8, xytext=(4, 0), textcoords="offset points")
    ax.set_xlabel("prunable layer (model order)")
    ax.set_ylabel("layer sparsity")
    ax.set_ylim(0, 1)
    ax.set_title("MULTIFLOW layer-wise sparsity per modality")
    ax.legend(title="modality", loc="lower left")
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)


def _without_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_distributed(nproc: int, argv: Sequence[str]) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine.

    torchrun runs in this process (not as a command) so that a failed run ends in one line:
    rank 0 prints its own reason, the other ranks leave theirs in a folder (see ``main``) that
    is read back when rank 0 did not fail with one, and torchrun's ChildFailedError, which the
    ``torchrun`` command prints as a traceback, becomes the exit code."""
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _Stage.now = f"running {nproc} processes"
    # the CPU threads per process: this machine's cores shared out (torchrun's default is 1,
    # with a warning); and torchrun's own log lines about a failed rank stay out of the way
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="multiflow-ranks-") as errors:
        os.environ[_RANK_ERRORS] = errors  # the other ranks leave their one-line reason here
        try:
            run(parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "multiflow.cli",
                            *_without_nproc(argv)]))
        except ChildFailedError as e:
            codes = {rank: f.exitcode for rank, f in sorted(e.failures.items())}
            if codes.get(0, -1) != 1:  # rank 0 did not print a reason: the first rank that has one
                reasons = sorted(Path(errors).glob("rank*.txt"), key=lambda p: int(p.stem[4:]))
                reason = reasons[0].read_text() if reasons else f"processes failed (rank: exit code) {codes}"
                print(f"multiflow: error: {reason}", file=sys.stderr)
            return 130 if 130 in codes.values() else 1
        except SignalException:  # Ctrl-C: each rank printed where it stopped
            return 130
        finally:
            os.environ.pop(_RANK_ERRORS, None)
    return 0


def _init_distributed(device: str) -> tuple[int, int, str]:
    """Join the process group torchrun describes; returns (rank, world size, device)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def cmd_prune(args) -> int:
    if args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and "RANK" not in os.environ:
        return launch_distributed(args.nproc, args.raw_argv)
    import torch

    rank, world, args.device = _init_distributed(args.device)
    try:
        return _prune(args, rank, world)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _check_out_folder(out: Path) -> None:
    """--out must be a folder, or creatable as one: checked before calibrating, so a typo
    does not cost the run."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--out {out}: {parent} is not writable")


def _prune(args, rank: int, world: int) -> int:
    import torch

    from multiflow_kernels._io import atomic_write_all

    from . import Pruner
    from .models import build_model
    from .pruners import get_method

    out = Path(args.out)
    _check_out_folder(out)  # before the work, not after it
    if args.nm is None:
        names = [_mask_filename(args.method, s, None) for s in args.sparsity]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"--sparsity lists the same sparsity twice ({', '.join(twice)})")
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    _Stage.now = f"building the model {args.model}"
    model = build_model(args.model, task=args.task, seed=args.seed).to(args.device)
    t_model = time.perf_counter()
    pruner = Pruner(model, args.method, seed=args.seed)
    method = get_method(args.method)
    _Stage.now = f"loading the data {args.data}"
    batches = _batches(args, model) if (method.needs_activations or method.needs_gradients) else []
    t_data = time.perf_counter()
    if batches:
        if rank == 0:
            print(f"calibrating on {len(batches)} batches ...", file=sys.stderr, flush=True)
        pruner.calibrate(_Tracked(batches), progress=not args.no_progress and rank == 0)
    t_calib = time.perf_counter()
    targets = [None] if args.nm is not None else list(args.sparsity)
    results = {}
    mask_seconds = {}
    for s in targets:
        t0 = time.perf_counter()
        label = f"{args.nm[0]}:{args.nm[1]}" if args.nm is not None else f"s={_sparsity_text(s)}"
        _Stage.now = f"computing the masks at {label}"
        results[label] = pruner.masks(s, nm=args.nm)
        mask_seconds[label] = time.perf_counter() - t0
    if rank != 0:  # every rank holds the same masks; rank 0 writes them
        return 0
    # all masks computed: only now touch the output folder
    _Stage.now = f"writing the outputs to {out}"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    writes = []  # every output written before any replaces an existing one (atomic_write_all)
    for (label, masks), s in zip(results.items(), targets):
        masks.metadata["model"] = args.model
        masks.metadata["seed"] = args.seed  # what `multiflow sparsify` needs to rebuild the same model
        masks.metadata["task"] = args.task
        masks.metadata["model_class"] = type(model).__name__
        files[label] = str(out / _mask_filename(args.method, s, args.nm))
        writes.append((files[label], masks.save))
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "model_class": type(model).__name__,
        "method": args.method,
        "data": args.data,
        "calibration_samples": pruner.calibration_samples,
        "batches": len(batches),
        "processes": world,
        "device": args.device,
        "machine": platform.platform(),
        "torch": torch.__version__,
        "timings_s": {
            "build_model": t_model - t_start,
            "load_data": t_data - t_model,
            "calibration": t_calib - t_data,
            "masks": mask_seconds,
        },
        "results": {
            label: {
                "file": files[label],
                "target_sparsity": m.metadata.get("sparsity"),
                "achieved_sparsity": m.sparsity,
                "modality_sparsity": m.metadata["modality_sparsity"],
                "layer_sparsity": m.metadata["layer_sparsity"],
                "allocated_sparsity": m.metadata["allocated_sparsity"],
            }
            for label, m in results.items()
        },
    }
    text = json.dumps(report, indent=2)
    writes.append((out / "report.json", lambda tmp: Path(tmp).write_text(text)))
    md = [f"# multiflow prune: {args.model} ({type(model).__name__}), method {args.method}", ""]
    md.append(f"Calibration: {pruner.calibration_samples} samples in {len(batches)} batches, "
              f"{t_calib - t_data:.2f} s; date {report['date']}; {platform.platform()}; torch {torch.__version__}")
    for label, m in results.items():
        md += ["", f"## {label}  ({Path(files[label]).name}, {mask_seconds[label]:.2f} s)", "", "```", m.summary(), "```"]
    md_text = "\n".join(md) + "\n"
    writes.append((out / "report.md", lambda tmp: Path(tmp).write_text(md_text)))
    writes.append((out / "layer_sparsity.png", layer_sparsity_plot(results)))
    atomic_write_all(writes)

    print(f"{type(model).__name__} ({args.model}), method {args.method}, "
          f"{pruner.calibration_samples} calibration samples, calibration {t_calib - t_data:.2f} s")
    for label, m in results.items():
        mods = "  ".join(f"{k}={v:.3f}" for k, v in m.metadata["modality_sparsity"].items())
        print(f"  {label:<8} sparsity {m.sparsity:.4f}   {mods}   -> {files[label]}")
    print(f"report: {out / 'report.md'}  plot: {out / 'layer_sparsity.png'}  "
          f"total {time.perf_counter() - t_start:.1f} s")
    return 0


def _check_out_file(out: Path, maskfile: str) -> None:
    """--out must be a file path that is not the mask file and whose folder exists and is
    writable: checked before building anything."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file path, e.g. {out / 'sparse_model.safetensors'}")
    if out.exists() and Path(maskfile).exists() and os.path.samefile(out, maskfile):
        raise ValueError(f"--out {out} is the mask file: writing the model there would destroy the masks")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--out {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--out {out}: {parent} is not writable")


def cmd_sparsify(args) -> int:
    import multiflow_kernels as mk

    from .masks import Masks
    from .models import build_model

    out = Path(args.out)
    _check_out_file(out, args.maskfile)
    _Stage.now = f"reading the masks {args.maskfile}"
    masks = Masks.load(args.maskfile)
    recorded = masks.metadata
    same_model = recorded.get("model") == args.model
    seed = args.seed
    if same_model and isinstance(recorded.get("seed"), int):
        if seed is not None and seed != recorded["seed"]:
            raise ValueError(f"--seed {seed}: the masks were computed on {args.model} built with seed "
                             f"{recorded['seed']}; another seed is another model (omit --seed to use the recorded one)")
        seed = recorded["seed"]
    task = args.task if args.task is not None else (recorded.get("task") if same_model else None)
    _Stage.now = f"building the model {args.model}"
    model = build_model(args.model, task=task, seed=0 if seed is None else seed)
    _Stage.now = f"sparsifying {type(model).__name__}"
    mk.sparsify(model, masks, format=args.format, rows=args.rows)
    _Stage.now = f"writing {out}"
    path = mk.save_sparse(model, out)
    print(mk.memory_report(model))
    used = sorted({m.format for m in model.modules() if isinstance(m, mk.SparseLinear)})
    print(f"wrote {path} ({len(masks)} sparse layers, format {args.format}"
          + (f": {', '.join(used)})" if args.format == "auto" else ")"))
    return 0


def cmd_inspect(args) -> int:
    from .masks import Masks

    masks = Masks.load(args.maskfile)
    print(f"{args.maskfile}: {len(masks)} masked parameters, sparsity {masks.sparsity:.4f}")
    print(masks.summary(layers=not args.no_layers))
    return 0


_RANK_ERRORS = "MULTIFLOW_RANK_ERRORS"  # set by launch_distributed for its ranks


def _one_line(message: str, limit: int = 600) -> str:
    """An error message as one line (a multi-line list of problems joined by "; "), cut to
    ``limit`` characters; --debug shows the whole exception."""
    text = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    text = re.sub(r":; ", ": ", text)
    return text if len(text) <= limit else text[: limit - 40].rstrip() + " ... (cut; --debug shows all)"


def _import_deferring_sigint() -> None:
    """Import torch and the package's modules with Ctrl-C held back until they are imported (an
    interrupt inside torch's import can leave half-imported modules that fail later, and used to
    print a traceback), then raise KeyboardInterrupt if one came. Only from the main thread with
    Python's default SIGINT handler (otherwise: a plain import, the caller's handling kept)."""
    import signal
    import threading

    def load() -> None:
        import torch  # noqa: F401

        from . import calibrate, masks, models, pruners  # noqa: F401

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        load()  # Ctrl-C ignored (nohup, a background job) or handled by the caller: left as it is
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        load()
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        _import_deferring_sigint()
    except KeyboardInterrupt:
        print("multiflow: interrupted while starting (importing torch); nothing was written", file=sys.stderr)
        return 130
    parser = build_parser()
    args = parser.parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)
    debug = args.debug or os.environ.get("MULTIFLOW_DEBUG") == "1"
    try:
        if args.command == "prune":
            return cmd_prune(args)
        if args.command == "sparsify":
            return cmd_sparsify(args)
        return cmd_inspect(args)
    except KeyboardInterrupt:
        print(f"multiflow: interrupted while {_Stage.now}; no partial file was written "
              "(outputs are written atomically)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, OSError, RuntimeError) as e:
        if debug:
            raise
        rank = int(os.environ.get("RANK", "0")) if os.environ.get(_RANK_ERRORS) else 0
        if rank == 0:  # under --nproc the ranks mostly fail alike: rank 0 speaks
            print(f"multiflow: error: {_one_line(str(e))}", file=sys.stderr)
        else:  # the launcher prints it when rank 0 has nothing to say
            (Path(os.environ[_RANK_ERRORS]) / f"rank{rank}.txt").write_text(f"rank {rank}: {_one_line(str(e))}")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
