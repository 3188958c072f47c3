#!/usr/bin/env bash
# Create .venv in the repo root (if missing), install the pinned dependencies and the
# package with its compiled extension (multiflow_kernels._C). Safe to re-run: the
# extension is rebuilt only when setup.py, csrc/ or the build settings changed.
#
# CUDA sources are compiled when nvcc is found (CUDA_HOME is derived from it) even without
# a GPU (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0a"). MULTIFLOW_NO_CUDA=1
# builds the CPU kernels only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
# The CUDA build of torch and its nvidia-* wheels need about 6 GB in .venv: say so up front
# when the disk is short, and show the free space when pip fails (ENOSPC reads like any error).
free_mb() { df -Pm "$1" 2>/dev/null | awk 'NR == 2 {print $4}'; }
FREE=$(free_mb . || true)
if [ -n "$FREE" ] && [ "$FREE" -lt 7000 ] && ! compgen -G ".venv/lib/python3*/site-packages/torch" > /dev/null; then
    echo "bootstrap: warning: only ${FREE} MB free on $(pwd); .venv needs about 6000 MB" >&2
fi
if ! "$VPY" -m pip install -q --no-cache-dir -r requirements-dev.txt; then
    echo "bootstrap: installing requirements-dev.txt failed; free space now:" >&2
    df -h . "${TMPDIR:-/tmp}" >&2 || true
    exit 1
fi

if [ "${MULTIFLOW_NO_CUDA:-0}" != "1" ]; then
    NVCC=$(command -v nvcc || true)
    if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
    if [ -n "$NVCC" ]; then
        if [ -z "${CUDA_HOME:-}" ]; then
            REAL=$(readlink -f "$NVCC")
            # nvcc may be a wrapper script (exec /path/to/toolkit/bin/nvcc): follow it
            if [ "$(head -c 2 "$REAL")" = "#!" ]; then
                WRAPPED=$(grep -o '/[^ "]*/bin/nvcc' "$REAL" | head -1 || true)
                [ -n "$WRAPPED" ] && REAL=$WRAPPED
            fi
            CUDA_HOME=$(dirname "$(dirname "$REAL")")
            export CUDA_HOME
        fi
        export FORCE_CUDA=${FORCE_CUDA:-1}
        export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
    fi
fi

STAMP=.venv/.multiflow-build-stamp
HASH=$( (cat setup.py; find csrc -type f | LC_ALL=C sort | xargs cat;
         echo "${CUDA_HOME:-} ${FORCE_CUDA:-} ${TORCH_CUDA_ARCH_LIST:-} ${MULTIFLOW_NO_CUDA:-}") | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && "$VPY" -c "import multiflow_kernels, multiflow" 2>/dev/null; then
    exit 0
fi
echo "bootstrap: building the extension (CUDA_HOME=${CUDA_HOME:-none}, FORCE_CUDA=${FORCE_CUDA:-0}, arch=${TORCH_CUDA_ARCH_LIST:-local})" >&2
rm -f "$STAMP"
MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
echo "$HASH" > "$STAMP"
