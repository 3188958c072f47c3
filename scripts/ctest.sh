#!/usr/bin/env bash
# Build csrc/ with CMake against the torch of .venv (CMakeLists.txt: the shared
# library multiflow_kernels and the C++ tests of its CPU kernels), then run the
# tests with ctest. The build folder persists, so a re-run rebuilds only what
# changed. Exits non-zero when the configure, the build or a test fails; exits 0
# with "SKIPPED" only when cmake is not installed.
#
#   PYTHON      the Python whose torch to build against (default .venv/bin/python)
#   BUILD_DIR   the CMake build folder (default build/cmake)
#   JOBS        parallel compile jobs (default 2)
# A CUDA build of torch needs a CUDA toolkit for its CMake config even here,
# where only the CPU half is linked: CMakeLists.txt looks in $CUDA_HOME, then
# /usr/local/cuda.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cmake >/dev/null 2>&1; then
    echo "ctest.sh: SKIPPED: cmake is not installed, so the C++ tests did not run" \
         "(apt-get install cmake, or pip install cmake)" >&2
    exit 0
fi
CMAKE=$(command -v cmake)
CTEST=$(dirname "$CMAKE")/ctest
[ -x "$CTEST" ] || CTEST=ctest

PYTHON=${PYTHON:-.venv/bin/python}
BUILD_DIR=${BUILD_DIR:-build/cmake}
JOBS=${JOBS:-2}

TORCH_PREFIX=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
# Ninja when there is one (pip installs it into .venv), for a fresh build folder
# only: an existing one keeps the generator it was made with.
GENERATOR=()
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
    if command -v ninja >/dev/null 2>&1; then
        GENERATOR=(-G Ninja)
    elif [ -x "$(dirname "$PYTHON")/ninja" ]; then
        GENERATOR=(-G Ninja -DCMAKE_MAKE_PROGRAM="$(cd "$(dirname "$PYTHON")" && pwd)/ninja")
    fi
fi

echo "ctest.sh: configuring $BUILD_DIR against $TORCH_PREFIX" >&2
mkdir -p "$BUILD_DIR"
# Its output (30-odd lines) only matters when it fails.
"$CMAKE" -S . -B "$BUILD_DIR" "${GENERATOR[@]}" \
    -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_BUILD_TYPE=Release >"$BUILD_DIR/configure.log" 2>&1 || {
    cat "$BUILD_DIR/configure.log" >&2
    echo "ctest.sh: FAILED: cmake could not configure (log above)" >&2
    exit 1
}
"$CMAKE" --build "$BUILD_DIR" -j "$JOBS"
"$CTEST" --test-dir "$BUILD_DIR" --output-on-failure
