"""bitmap_linear in Triton: a CUDA implementation of the op, run by the public op under
MULTIFLOW_BITMAP_CUDA=triton (the default is the faster CUDA C++ kernel of
csrc/cuda/bitmap.cu: see multiflow_kernels/triton/__init__.py).

The weight is never decoded to memory. A program decodes (rows x BLOCK_K) tiles of
W into registers straight from the format (csrc/bitmap.h) and multiplies them with x:

- element (r, k) is kept when bit k % 32 of word k // 32 of row r is set;
- its index in values is the tile's first index for the row plus the exclusive
  prefix count of the kept bits left of it in the tile (``tl.cumsum`` along the row);
- the tile's first index is ``row_ptr[r]`` + the kept count of the row before column
  512 b, b = k0 // 512 (0 for b = 0, else ``block_ptr[r, b - 1]``), plus the kept
  count of the earlier tiles of the same 512-column block (a running count, reset at
  each block: BLOCK_K divides 512, so a tile never straddles two blocks);
- pruned elements are 0 (a masked load of values: only kept elements are read).

Two paths, chosen by the number of rows m of x (``x.reshape(-1, in_features)``):

- ``gemv`` (m <= GEMV_MAX_M: the memory-bound regime, decoding at one token):
  a program owns GEMV_BLOCK_N output rows and BLOCK_M = next_pow2(m) rows of x (at
  most GEMV_MAX_BLOCK_M; more rows take more programs), walks all of the weight's
  columns and accumulates the BLOCK_M x GEMV_BLOCK_N products on CUDA cores (a
  broadcast multiply and a sum along k: m multiply-adds per decoded weight). A step
  decodes GEMV_BLOCK_N x BLOCK_K weights, BLOCK_K = 512 for m = 1 and shrinking as m
  grows, so that a step holds about GEMV_PRODUCTS products.
- ``tiled`` (larger m): a program owns a BLOCK_M x TILED_BLOCK_N output tile
  (BLOCK_M = 16, 32 or 64 by m) and walks k TILED_BLOCK_K at a time: decode the
  weight tile, ``tl.dot`` with the x tile (tensor cores for half types). The decode
  is paid once per BLOCK_M rows of x.

GEMV_MAX_M = 4: past a few rows, m multiply-adds per weight on CUDA cores cost more
than the weight's bytes (a 75%-sparse float16 weight is ~0.6 byte per weight at
~3 TB/s, ~5e12 weights/s), and tensor cores do them for free in the tiled path.
The block sizes are reasoned, not yet tuned on a GPU.

Bytes moved: the kept values and the bit words (1/32 of an int32 per weight), read
once per BLOCK_M rows of x (once in all for m <= 16 on the gemv path; repeat reads
mostly hit L2); one row_ptr and ceil(in / 512) - 1 block_ptr entries per row; x and y.
Each element loads its own bit word (the 32 elements of a word hit the same address,
served by L1). For a 75%-sparse weight the weight's share is ~0.28x the dense
weight's bytes in float32 and ~0.31x in half types; nothing but y is written.

Numerics: products summed in float32 (tl.dot's accumulator; float32 tl.dot uses
``input_precision="ieee"``, no TF32), the bias added in float32, the result rounded
once to x's dtype. Under TRITON_INTERPRET=1 tl.dot's operands are widened to float32
(masked_linear.py's _dot). Deterministic: no atomics, a fixed summation order.

Trust: the format's shapes and dtypes are checked (ops.py's contract), but row_ptr,
on the device, is not read on the host (no sync per call): a row_ptr that does not
match the bits gives wrong numbers, never an out-of-bounds read (every values index
is checked against [0, nnz)). The CPU op and bitmap_unpack check the counts.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import _check_bitmap_linear_args, block_ptr_cols
from .masked_linear import _dot, _keep, _widen

BLOCK_COLS = tl.constexpr(512)  # columns per block_ptr entry (kBitmapBlockCols in csrc/bitmap.h)

GEMV_MAX_M = 4  # path=None takes the gemv path for m <= GEMV_MAX_M, the tiled path above
GEMV_BLOCK_N = 4
GEMV_MAX_BLOCK_M = 16  # rows of x per gemv program (a forced gemv path on more rows takes several)
GEMV_PRODUCTS = 2048  # BLOCK_M * GEMV_BLOCK_N * BLOCK_K per gemv step
TILED_BLOCK_N = 64
TILED_BLOCK_K = 64  # divides 512 (one block_ptr entry per 512 // 64 tiles)
TILED_NUM_WARPS = 8  # the decode keeps an int64 index per tile element: spread it over 256 threads

PATHS = ("gemv", "tiled")


@triton.jit
def _decode(values_ptr, bits_ptr, block_ptr_ptr, nnz, words, bp_cols, row_start, in_block, rn, rk, block, n_ok, k_ok):
    """The weight tile W[rn, rk] in values' dtype (0 where pruned), and each row's kept
    count in it (to advance ``in_block``, the kept count of the block's earlier tiles).
    ``bp_cols``: block_ptr's columns (block 0's offset, 0, is not stored)."""
    kept = _keep(bits_ptr, rn, rk, words, n_ok, k_ok).to(tl.int32)
    before_block = tl.load(block_ptr_ptr + rn * bp_cols + (block - 1), mask=n_ok & (block > 0), other=0)
    first = row_start + before_block + in_block
    idx = first[:, None] + (tl.cumsum(kept, axis=1) - kept)
    w = tl.load(values_ptr + idx, mask=(kept != 0) & (idx >= 0) & (idx < nnz), other=0.0)
    return w, tl.sum(kept, axis=1)


@triton.jit
def _kernel(
    x_ptr, values_ptr, bits_ptr, row_ptr_ptr, block_ptr_ptr, bias_ptr, y_ptr, M, N, K, words, bp_cols, nnz,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # y tile (BLOCK_M x BLOCK_N) = sum over k steps of x (BLOCK_M x BLOCK_K) @ decoded W^T (BLOCK_K x BLOCK_N):
    # tl.dot on the tiled path (USE_DOT), a broadcast multiply and a sum along k on the gemv path.
    # Output rows of W on grid axis 0 (up to 2^31 - 1 programs; axis 1 allows 65535).
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
    row_start = tl.load(row_ptr_ptr + rn, mask=n_ok, other=0).to(tl.int64)
    in_block = tl.zeros((BLOCK_N,), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        block = k0 // BLOCK_COLS
        in_block = tl.where(k0 == block * BLOCK_COLS, 0, in_block)  # a new 512-column block
        w, kept = _decode(values_ptr, bits_ptr, block_ptr_ptr, nnz, words, bp_cols, row_start, in_block, rn, rk, block, n_ok, k_ok)
        in_block += kept
        x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:
            acc = _dot(x, tl.trans(w), acc, WIDEN)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def bitmap_linear_triton(
    x: Tensor,
    values: Tensor,
    bits: Tensor,
    row_ptr: Tensor,
    block_ptr: Tensor,
    in_features: int,
    bias: Tensor | None = None,
    path: str | None = None,
) -> Tensor:
    """multiflow::bitmap_linear: ``y = x @ W.T + bias``, W decoded in registers.

    ``path``: "gemv", "tiled", or None to choose by the rows of x (gemv for
    m <= GEMV_MAX_M); both are correct for every shape (benchmarks force one).
    """
    op = "multiflow::bitmap_linear"
    _check_bitmap_linear_args(op, x, values, bits, row_ptr, block_ptr, in_features, bias)
    if path not in (None, *PATHS):
        raise ValueError(f"{op}: path must be one of {PATHS} or None, got {path!r}")
    n, k = bits.shape[0], in_features
    m = math.prod(x.shape[:-1])
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        x2 = x.reshape(m, k).contiguous()
        bits = bits.contiguous()
        row_ptr = row_ptr.contiguous()
        # No block_ptr columns (in_features <= 512): any pointer, never read (block is 0).
        block_ptr = block_ptr.contiguous() if block_ptr.numel() else row_ptr
        b = bias.contiguous() if bias is not None else y  # any pointer: never read without HAS_BIAS
        args = (
            x2, values.contiguous(), bits, row_ptr, block_ptr, b, y,
            m, n, k, bits.shape[1], block_ptr_cols(k), values.numel(),
        )
        if path is None:
            path = "gemv" if m <= GEMV_MAX_M else "tiled"
        if path == "gemv":
            block_m = min(triton.next_power_of_2(m), GEMV_MAX_BLOCK_M)
            block_n = GEMV_BLOCK_N
            block_k = min(BLOCK_COLS.value, max(32, GEMV_PRODUCTS // (block_m * block_n)))
            num_warps = 4
        else:
            block_m = min(max(triton.next_power_of_2(m), 16), 64)
            block_n, block_k, num_warps = TILED_BLOCK_N, TILED_BLOCK_K, TILED_NUM_WARPS
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
        # Triton launches on the current device: make it x's (a model on cuda:1).
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _kernel[grid](
                *args, HAS_BIAS=bias is not None, USE_DOT=path == "tiled", WIDEN=_widen(),
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
            )
    return y.reshape(*x.shape[:-1], n)
