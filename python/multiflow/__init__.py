"""MULTIFLOW: task-agnostic, gradient-free pruning of vision-language models.

Quick use::

    import multiflow
    masks = multiflow.prune(model, batches, sparsity=0.75)          # multiflow.Masks
    masks.save("masks.safetensors")

    pruner = multiflow.Pruner(model).calibrate(batches)              # calibrate once,
    m63, m90 = pruner.masks(0.63), pruner.masks(0.9)                 # ask many sparsities
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names, imported on first use (PEP 562): `import multiflow.cli` stays light, so the
# command line can import torch with Ctrl-C deferred (cli.main) instead of inside this import.
_LAZY = {
    "Pruner": "calibrate",
    "prune": "calibrate",
    "Masks": "masks",
    "METHODS": "pruners",
    "compute_masks": "pruners",
    "masks_from_stats": "pruners",
    "register_method": "pruners",
}

__all__ = ["Pruner", "prune", "Masks", "masks_from_stats", "compute_masks", "METHODS", "register_method", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .calibrate import Pruner, prune
    from .masks import Masks
    from .pruners import METHODS, compute_masks, masks_from_stats, register_method


# the submodules, as attributes after a plain `import multiflow` (as when this file imported them)
_SUBMODULES = ("calibrate", "cli", "data", "masks", "models", "prior", "pruners", "scores", "selection")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'multiflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
