"""Helpers shared by the op tests (test_ops_*.py) that run the CPU kernels on
every instruction-set path and at several thread counts.

The CPU inner loops are compiled once per ISA and picked at run time from
torch's CPU capability, which ATEN_CPU_CAPABILITY overrides; the capability is
read once per process, so each ISA path runs in its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def isas_of_this_cpu() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this CPU can run: "default", then "avx2"
    and "avx512" where it has them."""
    cap = torch.backends.cpu.get_cpu_capability()
    isas = ["default"]
    if cap in ("AVX2", "AVX512"):
        isas.append("avx2")
    if cap == "AVX512":
        isas.append("avx512")
    return isas


def run_with_isa(isa: str, script: str, inputs: Any, tmp_path: Path, **env: str) -> dict:
    """Runs `script` in a fresh Python with ATEN_CPU_CAPABILITY=isa and returns
    what it saved.

    The inputs travel by file (torch.randn itself differs between ISAs): the
    script gets the path of torch.save(inputs) as sys.argv[1] and must
    torch.save a dict with "capability" (torch.backends.cpu.get_cpu_capability())
    to sys.argv[2]. `env`: more environment variables for it. Asserts that the process
    succeeded and ran on `isa`.
    """
    torch.save(inputs, tmp_path / "in.pt")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa, **env)
    cmd = [sys.executable, "-c", script, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tmp_path / "out.pt")
    assert got["capability"].lower() == isa
    return got


def results_at_thread_counts(fn: Callable[[], T], counts: Iterable[int] = (1, 2, 1)) -> list[T]:
    """fn() run once with torch.set_num_threads(n) for each n in counts (the
    thread count is restored afterwards)."""
    before = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
    finally:
        torch.set_num_threads(before)
    return results
