"""masked_linear and its backward in Triton: the CUDA implementation of the ops.

The mask never exists densely: every kernel that reads a weight tile also loads the
int32 words of its mask bits (word ``k // 32`` of each of the tile's rows), shifts out
bit ``k % 32`` and zeroes the pruned weights with ``tl.where`` before ``tl.dot``. The
grad_weight kernel applies the same bits to its result, so pruned places are written
as exactly 0.

Tiling: each program owns one BLOCK_M x BLOCK_N output tile and walks the reduction
dimension BLOCK_K at a time; loads are masked at every edge (shapes need not be
multiples of a tile). Sums run in float32 (tl.dot's accumulator); float32 inputs use
``input_precision="ieee"`` (no TF32), so the error is plain float32 GEMM's. Under
TRITON_INTERPRET=1 the operands are widened to float32 before tl.dot (the interpreter
computes bfloat16 dots wrongly). grad_bias is a plain float32 column sum in torch.
Deterministic: no atomics, every sum in an order fixed by the shapes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import _check_bias, _check_grad_out, _check_masked_linear_args

BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 32


@triton.jit
def _keep(bits_ptr, rows, cols, words, row_ok, col_ok):
    """The mask bits of a (rows x cols) tile as a bool tile; False outside the weight."""
    word = tl.load(bits_ptr + rows[:, None] * words + (cols[None, :] >> 5), mask=row_ok[:, None] & col_ok[None, :], other=0)
    return ((word >> (cols[None, :] & 31)) & 1) != 0


@triton.jit
def _dot(a, b, acc, WIDEN: tl.constexpr):
    # "ieee" matters for float32 operands only (no TF32); half operands use tensor cores.
    if WIDEN:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, bits_ptr, bias_ptr, y_ptr, M, N, K, words,
    HAS_BIAS: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # y tile (BLOCK_M x BLOCK_N) = sum over k tiles of x (M x k) @ (W*M)^T (k x N).
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.where(_keep(bits_ptr, rn, rk, words, n_ok, k_ok), w, 0.0)
        acc = _dot(x, tl.trans(w), acc, WIDEN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grad_x_kernel(
    g_ptr, w_ptr, bits_ptr, gx_ptr, M, N, K, words,
    WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grad_x tile (BLOCK_M x BLOCK_K) = sum over n tiles of g (M x n) @ (W*M) (n x K).
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = rm < M
    k_ok = rk < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        g = tl.load(g_ptr + rm[:, None] * N + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.where(_keep(bits_ptr, rn, rk, words, n_ok, k_ok), w, 0.0)
        acc = _dot(g, w, acc, WIDEN)
    tl.store(gx_ptr + rm[:, None] * K + rk[None, :], acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _grad_w_kernel(
    g_ptr, x_ptr, bits_ptr, gw_ptr, M, N, K, words,
    WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grad_w tile (BLOCK_N x BLOCK_K) = (sum over token tiles of g^T (N x m) @ x (m x K)) * M.
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        g_t = tl.load(g_ptr + rm[None, :] * N + rn[:, None], mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(g_t, x, acc, WIDEN)
    acc = tl.where(_keep(bits_ptr, rn, rk, words, n_ok, k_ok), acc, 0.0)
    tl.store(gw_ptr + rn[:, None] * K + rk[None, :], acc.to(gw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def _widen() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def masked_linear_triton(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Tensor | None = None) -> Tensor:
    op = "multiflow::masked_linear"
    _check_masked_linear_args(op, x, weight, mask_bits)
    _check_bias(op, x, weight, bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        w = weight.contiguous()
        bits = mask_bits.contiguous()
        b = bias.contiguous() if bias is not None else w  # any pointer: never read without HAS_BIAS
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        _forward_kernel[grid](
            x2, w, bits, b, y, m, n, k, bits.shape[1], HAS_BIAS=bias is not None, WIDEN=_widen(),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
    return y.reshape(*x.shape[:-1], n)


def masked_linear_backward_triton(
    grad_out: Tensor, x: Tensor, weight: Tensor, mask_bits: Tensor, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    op = "multiflow::masked_linear_backward"
    _check_masked_linear_args(op, x, weight, mask_bits)
    _check_grad_out(op, grad_out, x, weight)
    n, k = weight.shape
    g = grad_out.reshape(-1, n).contiguous()
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    w = weight.contiguous()
    bits = mask_bits.contiguous()
    opts = dict(WIDEN=_widen(), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    grad_x, grad_w, grad_b = (x.new_empty(0) for _ in range(3))  # distinct: outputs must not alias
    if output_mask[0]:
        grad_x = torch.empty((m, k), dtype=x.dtype, device=x.device)
        if m and k:
            _grad_x_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(k, BLOCK_K))](
                g, w, bits, grad_x, m, n, k, bits.shape[1], **opts
            )
        grad_x = grad_x.reshape(x.shape)
    if output_mask[1]:
        grad_w = torch.empty((n, k), dtype=x.dtype, device=x.device)
        if n and k:
            _grad_w_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))](
                g, x2, bits, grad_w, m, n, k, bits.shape[1], **opts
            )
    if output_mask[2]:
        grad_b = g.float().sum(0).to(x.dtype)
    return grad_x, grad_w, grad_b
