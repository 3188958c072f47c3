#!/usr/bin/env bash
# One prepared run on an NVIDIA GPU: build for the local architecture, run every CUDA /
# Triton test, compute-sanitizer memcheck on one small call of each CUDA C++ kernel, then
# every benchmark family of benchmarks/run.py at sizes that fill the chip (the whole run
# under 8 minutes on an H100 / H200). Prints a summary table last.
#
#   benchmarks/gpu_check.sh [--quick] [--bench-only] [--profile] [--families "F ..."] [--out DIR]
#                           [--tar FILE.tgz]
#
# --quick: build + tests only. --bench-only: build + benchmarks (no tests, no sanitizer),
# e.g. a second call for the families the first one had no time for. --families: the
# benchmark families to run, in that order (default: act masks sparse24 bitmap_gemv bitmap e2e scores
# masked_linear, most wanted first: the time budget may not reach the last ones).
# --profile: also benchmarks/gpu_profile.py (torch.profiler tables of the calls that miss
# their goals) into profile.log, after the tests. --families "" runs no benchmark.
# --tar: also pack the --out folder into FILE.tgz when the script ends, also when it is
# stopped by a signal (e.g. a time limit): a device that returns few files gets them all.
# Environment: BUILD_CAP / TEST_CAP / MEMCHECK_CAP / PROFILE_CAP (seconds for the build /
# pytest / memcheck / --profile; 300 / 240 / 90 / 90), GPU_CHECK_BUDGET_S (450): the run's
# budget from its start; every stage's cap is cut to what is left of it and no benchmark family
# starts with under 20 s left. GPU_CHECK_PYTEST_ARGS: what pytest runs (default: tests, every
# test marked cuda; e.g. "tests/test_cuda_bitmap.py tests/test_cuda_sparse24.py" for a run
# aimed at two kernels). Exit status: 1 if a step failed, 2 if none failed but a requested
# benchmark family was skipped for lack of budget, 0 otherwise.
# MULTIFLOW_COMMIT: the commit to record in the JSON (a copied tree's .git may be stale).
# Results (logs, JSON, PNG) go to --out, else $OUT, else benchmarks/results/. Needs a
# preinstalled CUDA torch, triton and nvcc; installs nothing (no network): the extension is
# built in place with --no-build-isolation semantics.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

QUICK=0
BENCH_ONLY=0
PROFILE=0
TAR=""
FAMILIES="act masks sparse24 bitmap_gemv bitmap e2e scores masked_linear"
OUT_DIR=${OUT:-benchmarks/results}
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --bench-only) BENCH_ONLY=1 ;;
        --profile) PROFILE=1 ;;
        --tar|--families|--out)
            [ $# -ge 2 ] || { echo "gpu_check: $1 needs a value" >&2; exit 2; }
            case "$1" in --tar) TAR=$2 ;; --families) FAMILIES=$2 ;; --out) OUT_DIR=$2 ;; esac
            shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1  # a stage stopped by its cap keeps every line it printed
T0=$(date +%s)
BUDGET_END=$(( T0 + ${GPU_CHECK_BUDGET_S:-450} ))
# this harness's own logs from an earlier call on the same machine (results JSON stay: they
# are overwritten by the families that run)
rm -f "$OUT_DIR"/summary.txt "$OUT_DIR"/build.log "$OUT_DIR"/canary_*.* "$OUT_DIR"/pytest_cuda*.* \
      "$OUT_DIR"/memcheck.log "$OUT_DIR"/profile.log "$OUT_DIR"/bench_*.log
pack() {
    [ -n "$TAR" ] || return 0
    tar czf "$TAR.tmp" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")" 2>/dev/null && mv -f "$TAR.tmp" "$TAR"
}
# A capped stage runs in the background and the script waits for it (run_capped), so a TERM /
# INT from an outer time limit reaches this trap at once (bash defers traps while a foreground
# child runs, and timeout's child is in its own process group): INT to the stage (its timeout
# passes it on: pytest then writes its summary and junit XML), up to 5 s for it to end, TERM,
# a summary line naming the stage, pack, exit; within an outer `timeout -k 10`.
STAGE=""
STAGE_LOG=""
on_signal() {
    if [ -n "$STAGE" ]; then
        kill -INT "$STAGE" 2>/dev/null
        for _ in 1 2 3 4 5; do kill -0 "$STAGE" 2>/dev/null || break; sleep 1; done
        kill -TERM "$STAGE" 2>/dev/null
        printf 'interrupted during %s at %ss (outer time limit)\n' "$(basename "$STAGE_LOG")" \
            $(( $(date +%s) - T0 )) >> "$OUT_DIR/summary.txt"
    fi
    pack
    exit 143
}
trap on_signal TERM INT
trap pack EXIT
declare -a SUMMARY
: > "$OUT_DIR/summary.txt"
# Each step's line goes to summary.txt at once, and the archive is packed again, so a run cut
# short (even by SIGKILL) still says how far it got and returns what it had.
step() {
    SUMMARY+=("$(printf '%-28s %-6s %6ss  %s' "$1" "$2" "$3" "$4")")
    printf '%s\n' "${SUMMARY[-1]}" >> "$OUT_DIR/summary.txt"
    pack
}
# cap CAP: CAP cut to what is left of the budget (at least 10 s).
cap() {
    local left=$(( BUDGET_END - $(date +%s) ))
    [ "$left" -lt 10 ] && left=10
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
# run_capped CAP LOG CMD...: CMD under timeout (SIGINT first: pytest then writes its summary
# and junit XML; SIGKILL 20 s later), output to LOG; returns CMD's status (124: timed out).
run_capped() {
    local c=$1 log=$2
    shift 2
    timeout -s INT --kill-after=20 "$c" "$@" > "$log" 2>&1 &
    STAGE=$!
    STAGE_LOG=$log
    wait "$STAGE"
    local rc=$?
    STAGE=""
    return $rc
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no NVIDIA GPU is visible to torch ($PY: torch.cuda.is_available() is False or torch is missing);" >&2
    echo "gpu_check: nothing to check here. Run this script on a machine with an NVIDIA GPU." >&2
    exit 3
fi
"$PY" - <<'EOF' | tee "$OUT_DIR/gpu_env.txt"
import torch, platform, subprocess
p = torch.cuda.get_device_properties(0)
print(f"gpu: {p.name}  sm_{p.major}{p.minor}  {p.multi_processor_count} SMs  {p.total_memory / 2**30:.0f} GiB")
print(f"torch {torch.__version__}  cuda {torch.version.cuda}  python {platform.python_version()}")
try:
    import triton; print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
try:
    print("driver", subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True).stdout.strip())
except OSError:
    pass
EOF

# ---- build: local architecture only ------------------------------------------------
# sm_90 as 9.0a: the opt-in wgmma 2:4 kernel needs sm_90a code (it runs on every sm_90 GPU)
ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if (m, n) == (9, 0) else ''))")
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}
export TORCH_CUDA_ARCH_LIST=$ARCH FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
t=$(date +%s)
rm -f multiflow_kernels/_C*.so
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
run_capped "$(cap "${BUILD_CAP:-300}")" "$OUT_DIR/build.log" "$PY" setup.py build_ext --inplace
rc=$?
# the build can succeed without CUDA (no nvcc found: setup.py builds the CPU kernels only)
if [ $rc -eq 0 ] && ! "$PY" -c "import torch, multiflow_kernels, sys; sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key('multiflow::_bitmap_linear_cuda', 'CUDA') else 1)" 2>> "$OUT_DIR/build.log"; then
    rc=99
fi
if [ $rc -eq 0 ]; then
    step "build (sm_${ARCH/./})" ok $(( $(date +%s) - t )) "CUDA_HOME=$CUDA_HOME"
else
    step "build (sm_${ARCH/./})" FAIL $(( $(date +%s) - t )) \
        "$([ $rc -eq 99 ] && echo "no CUDA kernels built (nvcc? see build.log)" || echo "rc=$rc, see build.log")"
    tail -40 "$OUT_DIR/build.log"
    printf '%s\n' "${SUMMARY[@]}"
    exit 1
fi

# ---- tests: every CUDA / Triton test --------------------------------------------------
if [ $BENCH_ONLY -eq 0 ]; then
# Canary for a crash seen once on an H200: op argument errors whose message formats a number
# killed the process. Each device in its own process; the C++ runtimes mapped are logged.
t=$(date +%s)
canary=""
for dev in cpu cuda; do
    "$PY" - "$dev" > "$OUT_DIR/canary_$dev.log" 2>&1 <<'EOF'
import sys, torch
import multiflow_kernels  # noqa: F401
dev = sys.argv[1]
print("libstdc++ / libgcc mapped:", sorted({l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l or "libgcc_s" in l}))
try:  # acc of the wrong size: the message formats both sizes
    torch.ops.multiflow.sq_sum_accumulate_(torch.zeros(3, device=dev), torch.ones(2, 5, device=dev), None)
except RuntimeError as e:
    print("message ok:", str(e).splitlines()[0][:160])
EOF
    rc=$?
    canary="$canary $dev:$([ $rc -eq 0 ] && echo ok || echo "rc=$rc")"
done
{ "${CXX:-c++}" --version 2>&1 | head -1; grep "^multiflow_kernels._C:" "$OUT_DIR/build.log";
  readelf -d multiflow_kernels/_C*.so 2>&1 | grep NEEDED; } > "$OUT_DIR/canary_ldd.txt"
step "error-message canary" $(echo "$canary" | grep -q rc= && echo FAIL || echo ok) $(( $(date +%s) - t )) "$canary"
t=$(date +%s)
# pytest-xdist when installed: Triton compiles on the host's cores in parallel (its disk cache
# is shared), and a worker killed by a crash is reported and replaced instead of ending the run.
# Each worker's CPU threads: the cores shared out (the float64 references run on the CPU).
XDIST=""
WORKERS=1
if "$PY" -c "import xdist" 2>/dev/null; then WORKERS=$(( $(nproc) < 8 ? $(nproc) : 8 )); XDIST="-n $WORKERS"; fi
PER_TEST=""
# a hung kernel names its test: the thread method (the default, signal, waits for the C call to
# return, which a hung kernel never does; thread dumps the stacks and ends the xdist worker,
# which is reported and replaced)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PER_TEST="--timeout 60 --timeout-method=thread"; fi
TEST_CAP_NOW=$(cap "${TEST_CAP:-240}")
# shellcheck disable=SC2086  # word splitting of the option lists is wanted
OMP_NUM_THREADS=$(( $(nproc) / WORKERS > 0 ? $(nproc) / WORKERS : 1 )) run_capped "$TEST_CAP_NOW" "$OUT_DIR/pytest_cuda.log" \
    "$PY" -m pytest -m cuda -q -p no:cacheprovider $XDIST $PER_TEST --continue-on-collection-errors \
    --junitxml="$OUT_DIR/pytest_cuda.xml" ${GPU_CHECK_PYTEST_ARGS:-tests}
rc=$?
line=$(grep -E "passed|failed|error" "$OUT_DIR/pytest_cuda.log" | tail -1)
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "pytest: timed out after ${TEST_CAP_NOW}s" >> "$OUT_DIR/pytest_cuda.log"
    line="timed out after ${TEST_CAP_NOW}s; ${line:-no summary}"
elif [ $rc -ge 128 ]; then
    # Killed by a signal (a crash in a kernel or an op): pytest's faulthandler put the
    # crashing test's traceback in the log; run each test file on its own so one crash
    # does not hide the other files' results.
    line="crashed (signal $(( rc - 128 )), see pytest_cuda.log); per file:"
    grep -E -A12 "Fatal Python error|Current thread" "$OUT_DIR/pytest_cuda.log" | head -30
    files=""  # the files GPU_CHECK_PYTEST_ARGS names, else every file with CUDA tests
    for a in ${GPU_CHECK_PYTEST_ARGS:-}; do case "$a" in *.py) files="$files $a" ;; esac; done
    [ -n "$files" ] || files=$(grep -l "mark.cuda" tests/test_*.py)
    for f in $files; do
        name=$(basename "$f" .py)
        left=$(( 2 * TEST_CAP_NOW - ($(date +%s) - t) ))  # the per-file pass: one more TEST_CAP in all
        if [ $left -lt 10 ]; then
            line="$line $name:not-run"; continue
        fi
        # shellcheck disable=SC2086
        run_capped "$(cap $left)" "$OUT_DIR/pytest_cuda_$name.log" "$PY" -m pytest -m cuda -q -p no:cacheprovider \
            $PER_TEST "$f"
        frc=$?
        line="$line $name:$([ $frc -eq 0 ] && echo ok || { [ $frc -ge 128 ] && echo crash || echo FAIL; })"
    done
fi
step "pytest -m cuda" $([ $rc -eq 0 ] && echo ok || echo FAIL) $(( $(date +%s) - t )) "$line"
[ $rc -ne 0 ] && grep -h -E "^(FAILED|ERROR)" "$OUT_DIR"/pytest_cuda*.log | head -20

# ---- compute-sanitizer memcheck on one small call of each CUDA C++ kernel -------------
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then
    t=$(date +%s)
    # Without torch's caching allocator every tensor is its own cudaMalloc, so a read past a
    # tensor's end leaves the allocation and memcheck sees it (inside a cached segment it would not).
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_capped "$(cap "${MEMCHECK_CAP:-90}")" "$OUT_DIR/memcheck.log" \
        "$SANITIZER" --tool memcheck --error-exitcode 9 "$PY" benchmarks/sanitize_calls.py
    rc=$?
    status=$([ $rc -eq 0 ] && echo ok || echo FAIL)
    case $rc in
        0) why="" ;;
        9) why="memory errors:" ;;
        124|137) why="timed out:" ;;
        *) why="the calls failed (rc=$rc; a value check or the sanitizer itself, see memcheck.log):" ;;
    esac
    if [ $rc -ne 0 ] && grep -q "Device not supported" "$OUT_DIR/memcheck.log"; then
        status=skip  # the sanitizer cannot attach on this machine (seen on gVisor hosts): not a finding
        why="compute-sanitizer does not support this device here:"
    fi
    step "compute-sanitizer memcheck" "$status" $(( $(date +%s) - t )) \
        "$why $(grep -E 'ERROR SUMMARY|calls checked|Device not supported' "$OUT_DIR/memcheck.log" | head -3 | tr '\n' ' ')"
else
    step "compute-sanitizer memcheck" skip 0 "compute-sanitizer not found"
fi
fi  # BENCH_ONLY

if [ $PROFILE -eq 1 ]; then
    t=$(date +%s)
    run_capped "$(cap "${PROFILE_CAP:-90}")" "$OUT_DIR/profile.log" "$PY" benchmarks/gpu_profile.py
    rc=$?
    step "profile (gpu_profile.py)" $([ $rc -eq 0 ] && echo ok || echo FAIL) $(( $(date +%s) - t )) "profile.log"
fi

# ---- benchmarks: every family of benchmarks/run.py, each in its own process --------------
# The whole script stays under 8 minutes on an H100 / H200: build ~2 min, tests + sanitizer
# ~2 min, then each family of --families under its own cap (estimates: act 10 s, scores 20 s,
# masks 15 s, sparse24 40 s, bitmap 60 s, masked_linear 30 s, e2e 60 s), and no family starts after 7.5 min.
if [ $QUICK -eq 0 ]; then
    declare -A CAP=([act]=40 [masks]=40 [bitmap_gemv]=90 [scores]=60 [sparse24]=60 [bitmap]=120 [masked_linear]=60 [e2e]=150)
    for fam in $FAMILIES; do
        if [ $(( BUDGET_END - $(date +%s) )) -lt 20 ]; then
            step "bench $fam (cuda)" skip 0 "no time left in the budget (GPU_CHECK_BUDGET_S)"
            SKIPPED=1
            continue
        fi
        fcap=$(cap "${CAP[$fam]:-90}")
        t=$(date +%s)
        run_capped "$fcap" "$OUT_DIR/bench_$fam.log" "$PY" benchmarks/run.py --family "$fam" --device cuda --out "$OUT_DIR"
        rc=$?
        case $rc in
            0) status=ok; what=$(grep -E "^$fam +ok" "$OUT_DIR/bench_$fam.log" | awk '{print $NF}' | xargs -r basename) ;;
            124|137) status=FAIL; what="timed out after ${fcap}s (bench_$fam.log)" ;;
            *) status=FAIL; what="exit $rc (bench_$fam.log)" ;;
        esac
        step "bench $fam (cuda)" $status $(( $(date +%s) - t )) "$what"
        tail -n 25 "$OUT_DIR/bench_$fam.log"
    done
fi

echo
echo "== gpu_check summary ($(head -1 "$OUT_DIR/gpu_env.txt"); total $(( $(date +%s) - T0 )) s) =="
printf '%s\n' "${SUMMARY[@]}"
grep -q FAIL "$OUT_DIR/summary.txt" && exit 1
[ "${SKIPPED:-0}" -eq 1 ] && exit 2
exit 0
