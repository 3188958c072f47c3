"""benchmarks/run.py runs a family and writes JSON with the machine facts (no timing checks)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    env = dict(os.environ)
    env.pop("OUT", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_quick_family_writes_json_with_machine_facts(tmp_path):
    r = _run("--family", "act", "--quick", "--device", "cpu", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["pruning_act_stats_cpu.json"], files
    result = json.loads((tmp_path / files[0]).read_text())
    machine = result["machine"]
    for key in ("date", "commit", "platform", "cpu", "cpus", "python", "torch"):
        assert machine.get(key) not in (None, ""), key
    assert machine["torch"] == torch.__version__
    assert result["family"] == "act_stats" and result["quick"] is True and result["device"] == "cpu"
    assert result["act_stats"]["rows"], "no measurement in the results"
    assert "act" in r.stdout and " ok " in r.stdout


def test_quick_convert_family_times_every_conversion(tmp_path):
    r = _run("--family", "convert", "--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    isa = torch.backends.cpu.get_cpu_capability().lower()
    result = json.loads((tmp_path / f"convert_cpu_{isa}.json").read_text())
    assert result["cpu_capability"].lower() == isa and result["quick"] is True
    ops = {(row["dtype"], row["op"]) for row in result["results"]}
    for dtype in ("float32", "float16"):
        for op in ("clone", "copy_", "bitmap_pack", "bitmap_unpack", "sparse24_pack", "sparse24_unpack"):
            assert (dtype, op) in ops, (dtype, op)
    for row in result["results"]:
        assert row["time_s"] > 0 and row["time_vs_clone"] > 0 and row["time_vs_copy"] > 0
        assert (row["torch_time_s"] is None) == (row["op"] in ("clone", "copy_"))


def test_quick_auto_family_times_masked_and_bitmap_in_every_dtype(tmp_path):
    r = _run("--family", "auto", "--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "auto_cpu.json").read_text())
    assert result["family"] == "auto" and result["quick"] is True
    assert {c["dtype"] for c in result["results"]} == {"float32", "bfloat16", "float16"}
    for case in result["results"]:
        assert case["weight_copies"]["masked"] >= 4 and case["weight_copies"]["bitmap"] >= 4
        for row in case["rows"]:
            t = row["time_s"]
            assert set(t) == {"dense", "masked", "bitmap"} and all(v > 0 for v in t.values())
            assert row["masked_over_bitmap"] == t["masked"] / t["bitmap"]


def test_unknown_family_is_an_error():
    r = _run("--family", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu_says_so(tmp_path):
    r = _run("--family", "act", "--device", "cuda", "--out", str(tmp_path))
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr
    assert not list(tmp_path.iterdir())


def test_rotation_fills_the_budget_with_each_formats_own_bytes(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    monkeypatch.setitem(common.ROTATION_BYTES, "cpu", 1 << 20)
    dense = [torch.randn(64, 64) for _ in range(3)]  # 16 KiB each: 64 copies fill 1 MiB
    rot = common.rotation(dense, "cpu")
    assert len(rot) == 64 and all(a is b for a, b in zip(rot, dense))
    assert len({t.data_ptr() for t in rot}) == 64  # clones: storage of their own
    assert all(torch.equal(rot[i], dense[i % 3]) for i in range(64))
    packed = [(torch.randn(100), torch.zeros(28, dtype=torch.int32))]  # 512 B: 2048 copies
    rot = common.rotation(packed, "cpu")
    assert len(rot) == 2048 and isinstance(rot[-1], tuple) and rot[-1][0].data_ptr() != packed[0][0].data_ptr()
    csr = (torch.eye(16) * 2).to_sparse_csr()  # 16 values + 16 column indices + 17 row pointers (int64)
    assert common.storage_bytes(csr) == 16 * 4 + 16 * 8 + 17 * 8
    assert len(common.rotation([csr], "cpu")) == (1 << 20) // (16 * 4 + 33 * 8) + 1
    big = [torch.empty(1 << 19)]  # 2 MiB, over the budget: the floor of 4 copies
    assert len(common.rotation(big, "cpu")) == 4
