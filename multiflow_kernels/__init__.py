"""multiflow_kernels: the runtime half of MULTIFLOW.

The torch ops (torch.ops.multiflow.*), their Python entry points, and the
modules that deploy a pruned model. Depends on torch only, never on multiflow.
"""

import torch  # noqa: F401  (loads libtorch before the extension that links to it)

__version__ = "0.1.0"

try:
    from . import _C  # noqa: F401  (loading it registers the torch.ops.multiflow kernels)
except ImportError as e:
    raise ImportError(
        "multiflow_kernels._C, the compiled extension, is not built or does not load "
        f"with this torch ({torch.__version__}): {e}\n"
        "Build it from the repository root with:  pip install --no-build-isolation -e ."
    ) from e

from . import formats, nn, ops, reference  # noqa: E402
from .nn import SparseLinear, load_sparse, memory_report, save_sparse, sparsify  # noqa: E402
from . import triton  # noqa: E402, F401  (registers the Triton CUDA kernels; never imports triton itself)

__all__ = [
    "__version__",
    "ops",
    "formats",
    "reference",
    "nn",
    "SparseLinear",
    "sparsify",
    "save_sparse",
    "load_sparse",
    "memory_report",
]
