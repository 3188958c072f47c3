"""Triton kernels of the multiflow ops.

Each one is registered as the CUDA implementation of its op where it beats the
CUDA C++ kernel in csrc/cuda/ (the other is kept for comparison in benchmarks).
"""
