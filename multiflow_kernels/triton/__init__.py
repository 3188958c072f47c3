"""Triton kernels of the multiflow ops.

Each one is registered as the CUDA implementation of its op where it beats the
CUDA C++ kernel in csrc/cuda/ (the other is kept for comparison in benchmarks).

Registered here as the ops' CUDA kernels:

- flow_importance and flow_scores (flow.py);
- masked_linear and masked_linear_backward: by default NOT the Triton kernels
  (masked_linear.py) but the masked weight built in one pass and cuBLAS GEMMs
  (multiflow_kernels/masked_cublas.py): on an H200 the Triton forward took 2.4-31x the
  time of ``F.linear(x, W * M)``, which the composite computes (timed since: 3.7x faster
  than the Triton forward, median over 252 H200 cases);
  ``MULTIFLOW_MASKED_CUDA=triton`` selects the Triton kernels (``cublas``, or unset:
  the default; any other value is a ValueError; read at each call);
- bitmap_linear: by default NOT a Triton kernel but the CUDA C++ one, the private op
  ``multiflow::_bitmap_linear_cuda`` (csrc/cuda/bitmap.cu: one pass over the format for
  up to 16 rows of x, a dense decode and cuBLAS above): on an H200 it passed every CUDA
  test and took 0.03-0.44x the time of the Triton kernel (the private op timed directly) (bitmap_linear.py: a gemv path
  for a few rows of x, a tiled tl.dot path above) on every measured shape and row count.
  ``MULTIFLOW_BITMAP_CUDA=triton`` selects the Triton kernel (``cpp``, or unset: the
  default; any other value is a ValueError). The variable is read at each call. In a
  build with CUDA kernels the switch is the public op's CUDA kernel in C++
  (csrc/cuda/bitmap.cu), which calls the private op ``_bitmap_linear_triton`` (registered
  here, also without triton: it then says to install it) for the Triton choice; when _C
  was built without its CUDA kernels, ``_bitmap_linear_cuda`` below is registered instead
  and the default falls back to Triton;
- bitmap_pack and bitmap_unpack (bitmap_format.py: compositions of torch CUDA ops,
  no Triton, so they are registered even without triton installed).

The kernel modules are imported on the first CUDA call, not here: importing
multiflow_kernels never imports triton (machines without it, or without a GPU, pay
nothing), and a test can still choose TRITON_INTERPRET=1 before the kernels are
defined. act_stats.py (sq_sum_accumulate_triton) is for benchmarks only, not registered.
"""

import functools
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

BITMAP_CUDA_ENV = "MULTIFLOW_BITMAP_CUDA"
BITMAP_CUDA_CHOICES = ("cpp", "triton")
MASKED_CUDA_ENV = "MULTIFLOW_MASKED_CUDA"
MASKED_CUDA_CHOICES = ("cublas", "triton")


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The value of environment variable ``name`` (the first of ``choices`` when unset or
    empty); a ValueError naming the variable for anything else."""
    choice = os.environ.get(name, "") or choices[0]
    if choice not in choices:
        raise ValueError(f"{name} must be one of {choices} (or unset), got {choice!r}")
    return choice


def _bitmap_pack_cuda(weight, mask):
    from .bitmap_format import bitmap_pack_torch

    return bitmap_pack_torch(weight, mask)


def _bitmap_unpack_cuda(values, bits, row_ptr, block_ptr, in_features):
    from .bitmap_format import bitmap_unpack_torch

    return bitmap_unpack_torch(values, bits, row_ptr, block_ptr, in_features)


torch.library.register_kernel("multiflow::bitmap_pack", "cuda", _bitmap_pack_cuda)
torch.library.register_kernel("multiflow::bitmap_unpack", "cuda", _bitmap_unpack_cuda)


def bitmap_cuda_choice() -> str:
    """Which kernel the public bitmap_linear runs on CUDA: ``MULTIFLOW_BITMAP_CUDA``,
    "cpp" (the default) or "triton"."""
    return _env_choice(BITMAP_CUDA_ENV, BITMAP_CUDA_CHOICES)


def masked_cuda_choice() -> str:
    """Which kernels masked_linear (and its backward) run on CUDA: ``MULTIFLOW_MASKED_CUDA``,
    "cublas" (the default) or "triton"."""
    return _env_choice(MASKED_CUDA_ENV, MASKED_CUDA_CHOICES)


def _need_triton(op: str, env: str, other: str) -> None:
    if not HAS_TRITON:
        raise NotImplementedError(f"{op} on CUDA runs a Triton kernel here: install triton, or set {env}={other}")


def _masked_linear_cuda(x, weight, mask_bits, bias):
    if masked_cuda_choice() == "cublas":
        from ..masked_cublas import masked_linear_cublas

        return masked_linear_cublas(x, weight, mask_bits, bias)
    _need_triton("multiflow::masked_linear", MASKED_CUDA_ENV, "cublas")
    from .masked_linear import masked_linear_triton

    return masked_linear_triton(x, weight, mask_bits, bias)


def _masked_linear_backward_cuda(grad_out, x, weight, mask_bits, output_mask):
    if masked_cuda_choice() == "cublas":
        from ..masked_cublas import masked_linear_backward_cublas

        return masked_linear_backward_cublas(grad_out, x, weight, mask_bits, output_mask)
    _need_triton("multiflow::masked_linear_backward", MASKED_CUDA_ENV, "cublas")
    from .masked_linear import masked_linear_backward_triton

    return masked_linear_backward_triton(grad_out, x, weight, mask_bits, output_mask)


torch.library.register_kernel("multiflow::masked_linear", "cuda", _masked_linear_cuda)
torch.library.register_kernel("multiflow::masked_linear_backward", "cuda", _masked_linear_backward_cuda)


@functools.cache
def _has_cpp_bitmap_cuda() -> bool:
    """Whether multiflow_kernels._C holds the CUDA C++ bitmap kernel (not when it was
    built without nvcc or with MULTIFLOW_NO_CUDA=1)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("multiflow::_bitmap_linear_cuda", "CUDA")


def _bitmap_linear_cuda(x, values, bits, row_ptr, block_ptr, in_features, bias):
    if bitmap_cuda_choice() == "cpp":
        if _has_cpp_bitmap_cuda():
            return torch.ops.multiflow._bitmap_linear_cuda.default(x, values, bits, row_ptr, block_ptr, in_features, bias)
        # A build without CUDA kernels: the default falls back to Triton; an explicit
        # choice of the C++ kernel (or no triton) is an error that says why.
        if os.environ.get(BITMAP_CUDA_ENV) == "cpp" or not HAS_TRITON:
            raise NotImplementedError(
                "multiflow::bitmap_linear on CUDA: multiflow_kernels._C was built without its CUDA kernels "
                "(no nvcc, or MULTIFLOW_NO_CUDA=1), so the CUDA C++ kernel (_bitmap_linear_cuda) is missing; "
                + (f"set {BITMAP_CUDA_ENV}=triton (or unset it) for the Triton kernel" if HAS_TRITON
                   else "install triton for the Triton kernel, or rebuild with nvcc"))
    return _bitmap_linear_triton_cuda(x, values, bits, row_ptr, block_ptr, in_features, bias)


def _bitmap_linear_triton_cuda(x, values, bits, row_ptr, block_ptr, in_features, bias):
    """The CUDA kernel of the private op ``multiflow::_bitmap_linear_triton``: what the public
    op's C++ CUDA kernel (csrc/cuda/bitmap.cu) calls under ``MULTIFLOW_BITMAP_CUDA=triton``."""
    _need_triton("multiflow::bitmap_linear", BITMAP_CUDA_ENV, "cpp")
    from .bitmap_linear import bitmap_linear_triton

    return bitmap_linear_triton(x, values, bits, row_ptr, block_ptr, in_features, bias)


torch.library.register_kernel("multiflow::_bitmap_linear_triton", "cuda", _bitmap_linear_triton_cuda)
# With CUDA kernels in _C, the public op's CUDA kernel is registered in C++ (csrc/cuda/bitmap.cu:
# the same switch without a hop through Python, ~5 us of host time a call); without them
# _bitmap_linear_cuda above routes (to Triton by default).
if not _has_cpp_bitmap_cuda():
    torch.library.register_kernel("multiflow::bitmap_linear", "cuda", _bitmap_linear_cuda)

if HAS_TRITON:

    def _flow_importance_cuda(weights, act_sq_norms):
        from .flow import flow_importance_triton

        return flow_importance_triton(weights, act_sq_norms)

    def _flow_scores_cuda(weights, act_sq_norms):
        from .flow import flow_scores_triton

        return flow_scores_triton(weights, act_sq_norms)

    torch.library.register_kernel("multiflow::flow_importance", "cuda", _flow_importance_cuda)
    torch.library.register_kernel("multiflow::flow_scores", "cuda", _flow_scores_cuda)

