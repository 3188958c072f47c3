"""Triton kernels of the multiflow ops.

Each one is registered as the CUDA implementation of its op where it beats the
CUDA C++ kernel in csrc/cuda/ (the other is kept for comparison in benchmarks).

Registered here: flow_importance and flow_scores (flow.py). The kernel modules are
imported on the first CUDA call, not here: importing multiflow_kernels never
imports triton (machines without it, or without a GPU, pay nothing), and a test
can still choose TRITON_INTERPRET=1 before the kernels are defined.
act_stats.py (sq_sum_accumulate_triton) is for benchmarks only, not registered.
"""

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:

    def _flow_importance_cuda(weights, act_sq_norms):
        from .flow import flow_importance_triton

        return flow_importance_triton(weights, act_sq_norms)

    def _flow_scores_cuda(weights, act_sq_norms):
        from .flow import flow_scores_triton

        return flow_scores_triton(weights, act_sq_norms)

    torch.library.register_kernel("multiflow::flow_importance", "cuda", _flow_importance_cuda)
    torch.library.register_kernel("multiflow::flow_scores", "cuda", _flow_scores_cuda)
