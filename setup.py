"""Build and install multiflow-kernels: the extension multiflow_kernels._C and
the Python packages multiflow_kernels (runtime) and multiflow (pruning).

    pip install --no-build-isolation -e .      # torch must already be installed

The extension always has its CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp). It also
gets the CUDA kernels (csrc/cuda/*.cu, with WITH_CUDA defined) when torch is a
CUDA build, nvcc is found (CUDA_HOME) and either a GPU is visible or
FORCE_CUDA=1. MULTIFLOW_NO_CUDA=1 forces a CPU-only build. Without a GPU to
read the architecture from, TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0a"; with one,
torch's choice from the visible GPUs, except that an sm_90 GPU gives 9.0a (Hopper's wgmma, used by the opt-in
MULTIFLOW_SPARSE24_GEMM=wgmma kernel, exists only in sm_90a code; an sm_90a binary
runs on every sm_90 GPU).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent.resolve()
VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def _sources(*patterns: str) -> list[str]:
    # Paths relative to the repository root: setuptools wants them so.
    return sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(pattern))


def _cuda_decision() -> tuple[bool, str]:
    """Whether to compile csrc/cuda, and why (printed at build time)."""
    if os.environ.get("MULTIFLOW_NO_CUDA", "0") == "1":
        return False, "MULTIFLOW_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is not a CUDA build"
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")).exists():
        return False, "nvcc not found (set CUDA_HOME)"
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if not forced and not torch.cuda.is_available():
        return False, "no GPU visible (set FORCE_CUDA=1 to build the CUDA kernels anyway)"
    if not (Path(CUDA_HOME) / "include" / "cuda_runtime_api.h").exists():
        # torch guesses CUDA_HOME from `which nvcc`; a wrapper script in
        # /usr/local/bin makes that /usr/local, which holds no toolkit.
        reason = f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime_api.h (set CUDA_HOME to the toolkit root)"
        if forced:
            raise RuntimeError(f"FORCE_CUDA=1, but {reason}")
        return False, reason
    return True, "FORCE_CUDA=1" if forced else "a GPU is visible"


def _openmp_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags that make at::parallel_for parallel.

    at::parallel_for is a header template. With torch's OpenMP backend it
    expands to `#pragma omp parallel` in *our* object files, which a compiler
    without OpenMP enabled silently ignores (every op would run on one
    thread). With torch's native thread pool backend it calls into libtorch,
    and no flag is needed. The libgomp we link resolves, at load time, to the
    copy torch has already loaded (same soname), so there is one OpenMP runtime.
    """
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":  # Apple clang: OpenMP via torch's bundled libomp (untested here)
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _mapped_library(prefix: str) -> str | None:
    """Path of the shared library named ``prefix*`` that this process (which has
    imported torch) has loaded, e.g. the libstdc++ torch runs with."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.rstrip("\n").split(None, 5)  # the path (6th field) may hold spaces
                if len(parts) < 6:
                    continue
                path = parts[5].removesuffix(" (deleted)")
                if os.path.basename(path).startswith(prefix) and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


def _shared_runtime_link_args(linker: str, openmp: bool) -> list[str]:
    """Link flags that keep one C++ (and OpenMP) runtime in the process.

    Some toolchains link libstdc++ statically (seen: a GCC in /opt/gcc on an
    H200 image, with no shared libstdc++): the C++ runtime is then copied into
    _C.so, the process holds two copies whose data (the locale's facet ids) the
    dynamic loader mixes, and every op error message that formats a number
    segfaulted there (or silently lost its numbers). So the libstdc++ torch runs
    with is always linked by path (same soname: one copy at run time), and so is
    torch's libgomp when the linker has no shared one."""
    if not sys.platform.startswith("linux"):
        return []
    args = []
    cxx_runtime = _mapped_library("libstdc++.so")
    if cxx_runtime:
        args.append(cxx_runtime)
    if openmp:
        try:
            found = subprocess.run([linker, "-print-file-name=libgomp.so"], capture_output=True, text=True,
                                   timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found = ""
        gomp = _mapped_library("libgomp")
        if not (os.path.isabs(found) and os.path.exists(found)) and gomp:
            print(f"multiflow_kernels._C: {linker} has no shared libgomp; linking {gomp}, the copy torch runs with",
                  file=sys.stderr)
            args.append(gomp)
    return args


def _needed_libraries(path: str) -> list[str] | None:
    """The DT_NEEDED entries of a shared object (readelf), or None if unknown."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    out = subprocess.run([readelf, "-d", path], capture_output=True, text=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line and "[" in line]


def _defined_cxx_runtime_symbols(path: str) -> int:
    """How many std::locale symbols the shared object defines itself (nm; 0 if unknown):
    nonzero means libstdc++'s locale code was linked in statically."""
    nm = shutil.which("nm")
    if nm is None:
        return 0
    out = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True).stdout
    return sum("_ZNSt6locale" in line for line in out.splitlines())


class _BuildExt(BuildExtension):
    """torch's BuildExtension, plus: one C++ / OpenMP runtime in the process."""

    def build_extension(self, ext):
        if sys.platform.startswith("linux") and getattr(self.compiler, "linker_so", None):
            openmp = any("-fopenmp" in a for a in ext.extra_link_args or [])
            # the linker itself, past launcher wrappers (CC="ccache gcc")
            linker = next((a for a in self.compiler.linker_so
                           if os.path.basename(a) not in ("ccache", "sccache", "distcc")), self.compiler.linker_so[0])
            ext.extra_link_args = list(ext.extra_link_args or []) + _shared_runtime_link_args(linker, openmp)
        super().build_extension(ext)
        path = self.get_ext_fullpath(ext.name)
        needed = _needed_libraries(path) if sys.platform.startswith("linux") else None
        copied = _defined_cxx_runtime_symbols(path) if sys.platform.startswith("linux") else 0
        if copied:
            print("\n" + "!" * 78 + f"\nmultiflow_kernels._C: WARNING: {path} defines {copied} std::locale symbols "
                  "itself: part of the C++ runtime was copied in statically (a toolchain libstdc++ newer than "
                  "torch's?). Op error messages that format numbers may crash the process.\n" + "!" * 78,
                  file=sys.stderr)
        if needed is not None and not any(n.startswith("libstdc++.so") for n in needed):
            print("\n" + "!" * 78 + f"\nmultiflow_kernels._C: WARNING: {path} does not "
                  f"load libstdc++ (linked statically?): op error messages that format numbers may crash the "
                  f"process. Needed: {', '.join(needed)}\n" + "!" * 78, file=sys.stderr)


def _wheel_cuda_include_dirs() -> list[str]:
    """Include dirs of the NVIDIA wheels torch depends on (nvidia/cu13/include,
    or nvidia/cublas/include etc. for CUDA 12): ATen's CUDA headers include
    cublas_v2.h and cusparse.h, which a bare CUDA toolkit may lack."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        for inc in sorted(Path(base).glob("*/include")):
            if (inc / "cublas_v2.h").exists() or (inc / "cusparse.h").exists():
                dirs.append(str(inc))
    return dirs


def _extension():
    with_cuda, cuda_reason = _cuda_decision()
    omp_compile, omp_link = _openmp_flags()

    # Vectorisation: everything is compiled for the baseline target, so one
    # build runs on any x86-64 CPU (no -march=native, no global -mavx2). The
    # inner loops are compiled once more per ISA (AVX2, AVX-512) with
    # per-file target pragmas and chosen at run time from torch's own CPU
    # capability: see csrc/cpu/isa.h.
    if sys.platform == "win32":
        cxx_flags = ["/O2"] + omp_compile
    else:
        # The warnings torch's own build turns off for its vectorised headers:
        # CUDA-only `#pragma unroll`s, GCC's note that AVX vector returns change
        # the ABI (internal functions only), and false positives in GCC 12's
        # AVX-512 intrinsics.
        quiet = ["-Wno-unknown-pragmas", "-Wno-psabi", "-Wno-maybe-uninitialized"]
        cxx_flags = ["-O3"] + omp_compile + quiet
    sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    define_macros = [("MULTIFLOW_PYTHON_MODULE", None)]
    include_dirs = [str(ROOT / "csrc")]
    isas = "baseline + AVX2 + AVX-512, chosen at run time" if platform.machine().lower() in ("x86_64", "amd64") else "baseline"
    backends = [f"CPU (OpenMP: {'yes' if omp_compile else 'no'}; {isas})"]

    if not with_cuda:
        backends.append(f"no CUDA ({cuda_reason})")
        ext = CppExtension(
            name="multiflow_kernels._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=omp_link,
        )
        return ext, backends

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        else:  # torch's own choice (the visible GPUs), unless one is sm_90: then 9.0a for it
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            if (9, 0) in caps:
                os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(
                    f"{a}.{b}" + ("a" if (a, b) == (9, 0) else "") for a, b in caps)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "those of the visible GPUs")
    # -isystem, not -I: searched after CUDA_HOME/include, so the toolkit's own
    # runtime headers win and the wheels only fill in what it lacks.
    wheel_includes = []
    if sys.platform == "win32":
        include_dirs += _wheel_cuda_include_dirs()
    else:
        wheel_includes = [flag for d in _wheel_cuda_include_dirs() for flag in ("-isystem", d)]
    backends.append(f"CUDA ({cuda_reason}; CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}; archs {archs})")
    ext = CUDAExtension(
        name="multiflow_kernels._C",
        sources=sources + _sources("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=define_macros + [("WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags + wheel_includes,
            "nvcc": ["-O3", "-lineinfo"] + wheel_includes,
        },
        extra_link_args=omp_link,
    )
    return ext, backends


def _packages() -> list[str]:
    runtime = find_packages(where=str(ROOT), include=["multiflow_kernels", "multiflow_kernels.*"])
    pruning = ["multiflow"] + [f"multiflow.{p}" for p in find_packages(where=str(ROOT / "python" / "multiflow"))]
    return runtime + pruning


ext_module, backends = _extension()
print("multiflow_kernels._C: building " + "; ".join(backends), file=sys.stderr)

setup(
    name="multiflow-kernels",
    version=VERSION,
    description="MULTIFLOW task-agnostic vision-language pruning, with sparse kernels to deploy the pruned model",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"multiflow": "python/multiflow"},
    package_data={"multiflow": ["configs/*.json"]},
    ext_modules=[ext_module],
    cmdclass={"build_ext": _BuildExt.with_options(use_ninja=True)},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tqdm",
        "transformers>=4.40",
        "pillow",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["multiflow=multiflow.cli:main"]},
    zip_safe=False,
)
