"""Guard pages for the op tests that check loads never leave their tensors (Linux only).

at_page_end(t) copies t so that its last byte lies just before a page with no access
at all: a kernel that loads one byte past the tensor faults. The checks run in a
subprocess (run_guarded), so a fault fails that test only; the script imports
at_page_end from this module.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
from pathlib import Path

import torch

PAGE = mmap.PAGESIZE
_keep = []  # the mappings stay alive as long as the process


def at_page_end(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose last byte lies just before a page with no access at all."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    pages = nbytes // PAGE + 1
    m = mmap.mmap(-1, (pages + 1) * PAGE)
    buf = torch.frombuffer(m, dtype=torch.uint8)
    assert libc.mprotect(buf.data_ptr() + pages * PAGE, PAGE, 0) == 0
    start = pages * PAGE - nbytes
    out = buf[start : start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    _keep.append((m, buf))
    return out


def run_guarded(script: str, isa: str, **env: str) -> str:
    """Runs `script` in a fresh Python with ATEN_CPU_CAPABILITY=isa (and env), this
    folder importable; asserts that it exited 0 and printed "ok ... CAPABILITY" (its last
    word, torch.backends.cpu.get_cpu_capability(), must be isa). Returns its stdout."""
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    full_env = dict(os.environ, ATEN_CPU_CAPABILITY=isa, PYTHONPATH=path, **env)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=full_env)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert proc.stdout.split()[-1].lower() == isa, proc.stdout
    return proc.stdout
