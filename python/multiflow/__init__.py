"""MULTIFLOW: task-agnostic, gradient-free pruning of vision-language models.

Quick use::

    import multiflow
    masks = multiflow.prune(model, batches, sparsity=0.75)          # multiflow.Masks
    masks.save("masks.safetensors")

    pruner = multiflow.Pruner(model).calibrate(batches)              # calibrate once,
    m63, m90 = pruner.masks(0.63), pruner.masks(0.9)                 # ask many sparsities
"""
from .calibrate import Pruner, prune
from .masks import Masks
from .pruners import METHODS, compute_masks, masks_from_stats, register_method

__version__ = "0.1.0"

__all__ = ["Pruner", "prune", "Masks", "masks_from_stats", "compute_masks", "METHODS", "register_method", "__version__"]
