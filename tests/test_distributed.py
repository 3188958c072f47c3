"""Calibration sharded over processes with torch.distributed (gloo on CPU)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import multiflow
from multiflow import Masks
from multiflow.cli import main

SPARSITY = 0.75


def _batches():
    from multiflow.data import BuiltinCalibrationSet, calibration_batches

    return calibration_batches(BuiltinCalibrationSet(num_samples=10, image_size=64, seed=3), batch_size=2, image_size=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from multiflow.models.blip import build_blip_tiny

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        pruner = multiflow.Pruner(build_blip_tiny("retrieval", seed=0)).calibrate(_batches(), progress=False)
        pruner.masks(SPARSITY).save(os.path.join(out_dir, f"rank{rank}.safetensors"))
        torch.save({"samples": pruner.calibration_samples, "act": pruner.act_sq_norms}, os.path.join(out_dir, f"stats{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_single_process(tmp_path):
    from multiflow.models.blip import build_blip_tiny

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = multiflow.Pruner(build_blip_tiny("retrieval", seed=0)).calibrate(_batches(), progress=False)
    ref = single.masks(SPARSITY)
    r0, r1 = Masks.load(tmp_path / "rank0.safetensors"), Masks.load(tmp_path / "rank1.safetensors")
    s0, s1 = torch.load(tmp_path / "stats0.pt"), torch.load(tmp_path / "stats1.pt")
    # 5 batches: rank 0 ran 3, rank 1 ran 2, and both ended with the global statistics
    assert s0["samples"] == s1["samples"] == single.calibration_samples == 10
    for n in ref:
        assert torch.equal(s0["act"][n], s1["act"][n])  # identical on every rank
        torch.testing.assert_close(s0["act"][n], single.act_sq_norms[n], rtol=1e-5, atol=0)
        assert torch.equal(r0[n], r1[n])
        assert torch.equal(r0[n], ref[n]), n


def test_distributed_true_without_process_group():
    from multiflow.models.blip import build_blip_tiny

    with pytest.raises(ValueError, match="init_process_group"):
        multiflow.Pruner(build_blip_tiny()).calibrate(_batches(), progress=False, distributed=True)


def test_cli_nproc_matches_single_process(tmp_path):
    common = ["prune", "--no-progress", "--batches", "3", "--batch-size", "2", "--sparsity", "0.5"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    a = Masks.load(tmp_path / "one" / "masks_multiflow_s0.50.safetensors")
    b = Masks.load(tmp_path / "two" / "masks_multiflow_s0.50.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
    import json

    assert json.loads((tmp_path / "two" / "report.json").read_text())["processes"] == 2
