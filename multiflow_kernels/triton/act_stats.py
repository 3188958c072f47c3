"""sq_sum_accumulate_ in Triton: for comparison in benchmarks only.

The op's CUDA implementation stays the CUDA C++ kernel (csrc/cuda/act_stats.cu); this
one is NOT registered. Same semantics: ``acc[j] += sum over kept tokens t of
float(x[t, j]) ** 2`` in float32.

Layout (as the CUDA C++ kernel): x is read as (n_tokens, F) rows with contiguous
features. A program owns BLOCK_F features of one chunk of CHUNK_T tokens and walks it
BLOCK_T tokens at a time, each lane keeping its own float32 sum of its (token row,
feature) position; the BLOCK_T lane sums are added at the end. With one chunk the
result goes straight into acc; with several, each chunk writes a partial row and
_add_partials_kernel adds the rows into acc in chunk order. No atomics: the result
depends only on the shape, never on scheduling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T = 32
BLOCK_F = 128
MIN_CHUNK_TOKENS = 512  # so a chunk's partial row is small next to its data ...
MAX_CHUNKS = 256  # ... and the partial buffer is at most MAX_CHUNKS x F floats


@triton.jit
def _sq_sum_chunks_kernel(x, row_stride, mask, n_tokens, n_features, chunk_tokens, out, HAS_MASK: tl.constexpr,
                          ADD_INTO_OUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    feats = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    chunk = tl.program_id(1).to(tl.int64)
    t_begin = chunk * chunk_tokens
    t_end = tl.minimum(n_tokens, t_begin + chunk_tokens)
    f_ok = feats < n_features
    acc = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        toks = t0 + tl.arange(0, BLOCK_T)
        keep = toks < t_end
        if HAS_MASK:
            keep = keep & (tl.load(mask + toks, mask=keep, other=0) != 0)
        v = tl.load(x + toks[:, None] * row_stride + feats[None, :], mask=keep[:, None] & f_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += v * v
    total = tl.sum(acc, axis=0)
    if ADD_INTO_OUT:
        total += tl.load(out + feats, mask=f_ok, other=0.0)
        tl.store(out + feats, total, mask=f_ok)
    else:
        tl.store(out + chunk * n_features + feats, total, mask=f_ok)


@triton.jit
def _add_partials_kernel(partial, n_chunks, n_features, acc, BLOCK_F: tl.constexpr):
    feats = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = feats < n_features
    s = tl.zeros([BLOCK_F], dtype=tl.float32)
    for c in range(0, n_chunks):
        s += tl.load(partial + c * n_features + feats, mask=f_ok, other=0.0)
    tl.store(acc + feats, tl.load(acc + feats, mask=f_ok) + s, mask=f_ok)


def sq_sum_accumulate_triton(acc: Tensor, x: Tensor, token_mask: Tensor | None = None) -> None:
    """acc[j] += sum over kept tokens t of float(x[t, j]) ** 2, in place (float32).

    Same arguments and checks as :func:`multiflow_kernels.ops.sq_sum_accumulate_`; runs on
    CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
    """
    from ..ops import _sq_sum_accumulate_fake as check_contract

    check_contract(acc, x, token_mask)
    n_features = x.shape[-1]
    n_tokens = x.numel() // n_features if n_features else 0
    if n_tokens == 0 or n_features == 0:
        return
    x2 = x.reshape(n_tokens, n_features)
    if n_features > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    mask = token_mask.reshape(n_tokens).contiguous().view(torch.uint8) if token_mask is not None else None

    chunk_tokens = max(MIN_CHUNK_TOKENS, triton.cdiv(n_tokens, MAX_CHUNKS))
    n_chunks = triton.cdiv(n_tokens, chunk_tokens)
    grid = (triton.cdiv(n_features, BLOCK_F), n_chunks)
    out = acc if n_chunks == 1 else torch.empty(n_chunks, n_features, dtype=torch.float32, device=acc.device)
    _sq_sum_chunks_kernel[grid](x2, x2.stride(0), mask if mask is not None else x2, n_tokens, n_features,
                                chunk_tokens, out, HAS_MASK=mask is not None, ADD_INTO_OUT=n_chunks == 1,
                                BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F)
    if n_chunks > 1:
        _add_partials_kernel[(grid[0],)](out, n_chunks, n_features, acc, BLOCK_F=BLOCK_F)
