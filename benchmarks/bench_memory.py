"""Peak memory of pruning a BLIP-base-sized model on CPU, stage by stage.

A randomly initialised transformers BlipForImageTextRetrieval with the default (base)
config: 12+12 layers, 768 hidden, 384 px images. The stages run in order in one process and
the peak resident set (ru_maxrss, monotonic) is read after each, so each row says how much a
stage raised the peak. Calibration should add only one batch's activations (which the plain
forward needs too) and O(in_features) statistics per layer; mask computation adds the masks
(one byte per weight) and per-layer-group temporaries, never every score tensor at once.

    .venv/bin/python benchmarks/bench_memory.py [--batch-size 4] [--batches 2]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import results_dir, write_json  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--out", default=str(results_dir()))
    args = p.parse_args()

    from transformers import BlipConfig, BlipForImageTextRetrieval
    from transformers.utils import logging as hf_logging

    import multiflow
    from multiflow.data import BuiltinCalibrationSet, calibration_batches

    hf_logging.set_verbosity_error()
    rows = []

    def stage(name, fn):
        t0 = time.perf_counter()
        out = fn()
        rows.append({"stage": name, "seconds": time.perf_counter() - t0, "peak_rss_mib": peak_mib(),
                     "rss_mib": current_mib()})
        return out

    stage("imports", lambda: None)
    torch.manual_seed(0)
    model = stage("build BLIP-base (random init)", lambda: BlipForImageTextRetrieval(BlipConfig()).eval())
    n_params = sum(p.numel() for p in model.parameters())
    size = model.config.vision_config.image_size
    data = stage("calibration batches", lambda: calibration_batches(
        BuiltinCalibrationSet(args.batch_size * args.batches, image_size=size), batch_size=args.batch_size,
        image_size=size))

    def plain_forward():
        with torch.no_grad():
            for b in data:
                model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"],
                      use_itm_head=True)

    stage("plain forward over the batches", plain_forward)
    pruner = stage("calibrate (hooks)", lambda: multiflow.Pruner(model).calibrate(data, progress=False))
    stage("masks at 0.75", lambda: pruner.masks(0.75))
    stage("masks at 0.63", lambda: pruner.masks(0.63))

    weight_mib = sum(m.weight.numel() * 4 for m in pruner.layers.values()) / 2**20
    print(f"BLIP-base retrieval, {n_params / 1e6:.1f}M parameters ({weight_mib:.0f} MiB of prunable float32 "
          f"weights, masks {weight_mib / 4:.0f} MiB), {args.batches} x {args.batch_size} samples at {size} px")
    print(f"{'stage':<34} {'seconds':>8} {'peak RSS MiB':>13} {'RSS MiB':>9}")
    for r in rows:
        print(f"{r['stage']:<34} {r['seconds']:>8.2f} {r['peak_rss_mib']:>13.0f} {r['rss_mib']:>9.0f}")
    result = {"benchmark": "memory", "params": n_params, "prunable_weight_mib": weight_mib,
              "batches": args.batches, "batch_size": args.batch_size, "image_size": size, "rows": rows}
    print(f"wrote {write_json(args.out, 'memory_cpu', result)}")


if __name__ == "__main__":
    main()
