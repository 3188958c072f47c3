"""Plain-torch implementation of every op: the oracle in tests.

Each function has the name, arguments and semantics of its op in ops.py, and
is written to be obviously right rather than fast.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sq_sum_accumulate_(acc: Tensor, x: Tensor, token_mask: Tensor | None = None) -> None:
    """acc[j] += sum over kept tokens t of float(x[t, j]) ** 2 (float32)."""
    n_tokens = math.prod(x.shape[:-1])
    tokens = x.reshape(n_tokens, x.shape[-1]).float()
    if token_mask is not None:
        tokens = tokens[token_mask.reshape(n_tokens)]
    acc += tokens.square().sum(dim=0)


def sq_sum(x: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """The per-feature sum of squares of x's kept tokens, as a new float32 (F,) tensor."""
    acc = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    sq_sum_accumulate_(acc, x, token_mask)
    return acc


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------
_MAX_EXP = 126


def pow2_scale(t: Tensor) -> Tensor:
    """float32 0-d ``2**-e`` with ``max|t| * 2**-e`` in [0.5, 1) (``e`` clamped to
    [-126, 126] so the factor is a normal float32); 1 when ``t`` is empty, all zero or has
    a non-finite maximum. Multiplying by it is exact."""
    m = float(t.detach().abs().max()) if t.numel() else 0.0
    if m == 0.0 or not math.isfinite(m):
        return torch.tensor(1.0, dtype=torch.float32, device=t.device)
    e = math.frexp(m)[1]
    e = max(-_MAX_EXP, min(_MAX_EXP, e))
    return torch.tensor(2.0 ** (-e), dtype=torch.float32, device=t.device)


def flow_importance(weights: list[Tensor], act_sq_norms: list[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """MULTIFLOW node importances of each layer, scale-robust.

    ``w = |W| * w_scale`` and ``r = sqrt(max(a, 0)) * r_scale`` (power-of-two scales, exact;
    an all-zero ``a`` gives all-zero importances, so every score of that layer is 0 and the
    tie rule prunes the whole layer, as the contract's formulas say), ``A = w * r[None, :]`` in float32, ``imp_out_i = mean_j A_ij`` and
    ``imp_in_j = mean_i A_ij`` summed in float64 and rounded once to float32.
    Returns (imp_out list, imp_in list, w_scale float32 (L,)).
    """
    imp_out, imp_in, scales = [], [], []
    for w, a in zip(weights, act_sq_norms):
        w_abs = w.detach().float().abs()
        s = pow2_scale(w_abs)
        w_abs = w_abs * s
        r = a.detach().float().clamp_min(0).sqrt()
        r = r * pow2_scale(r)
        A = w_abs * r[None, :]
        imp_out.append((A.sum(dim=1, dtype=torch.float64) / max(A.shape[1], 1)).float())
        imp_in.append((A.sum(dim=0, dtype=torch.float64) / max(A.shape[0], 1)).float())
        scales.append(s)
    device = weights[0].device if weights else torch.device("cpu")
    w_scale = torch.stack(scales) if scales else torch.empty(0, dtype=torch.float32, device=device)
    return imp_out, imp_in, w_scale


def flow_score_of(w: Tensor, imp_out: Tensor, imp_in: Tensor, w_scale: Tensor) -> Tensor:
    """``(imp_out[:, None] * (|w| * w_scale)) * imp_in[None, :]`` in float32, in that order."""
    return (imp_out[:, None] * (w.detach().float().abs() * w_scale)) * imp_in[None, :]


def flow_scores(weights: list[Tensor], act_sq_norms: list[Tensor]) -> list[Tensor]:
    """The MULTIFLOW flow score of every layer (float32, the weight's shape)."""
    imp_out, imp_in, w_scale = flow_importance(weights, act_sq_norms)
    return [flow_score_of(w, o, i, w_scale[l]) for l, (w, o, i) in enumerate(zip(weights, imp_out, imp_in))]


# ---------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------
def _as_float(v: Tensor, absolute: bool) -> Tensor:
    v = v.detach().float().flatten()
    return v.abs() if absolute else v


def kth_smallest_group(values: list[Tensor], k: int, absolute: bool = False) -> Tensor:
    """k-th smallest (1-based) of the union of ``values`` (float32 view; ``|v|`` when
    ``absolute``), as a 0-d float32 tensor. ``1 <= k <= total numel``."""
    flat = torch.cat([_as_float(v, absolute) for v in values])
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k must be in [1, {flat.numel()}], got {k}")
    out = torch.kthvalue(flat, k).values
    return out + 0.0  # an answer of zero is +0.0, as the op documents (-0.0 + 0.0 == +0.0)


def kth_smallest_each(values: list[Tensor], ks: list[int], absolute: bool = False) -> Tensor:
    """``out[l]`` = k-th smallest of ``values[l]`` (``-inf`` when ``ks[l] == 0``; an answer
    of zero is +0.0, as for :func:`kth_smallest_group`), float32 (L,)."""
    out = []
    for v, k in zip(values, ks):
        flat = _as_float(v, absolute)
        if not 0 <= k <= flat.numel():
            raise ValueError(f"ks entries must be in [0, numel], got {k} for a tensor of {flat.numel()}")
        out.append(torch.kthvalue(flat, k).values + 0.0 if k >= 1 else torch.tensor(-math.inf, device=flat.device))
    device = values[0].device if values else torch.device("cpu")
    return torch.stack(out) if out else torch.empty(0, dtype=torch.float32, device=device)


def count_at_most(values: list[Tensor], threshold: Tensor, absolute: bool = False) -> Tensor:
    """``out[l]`` = number of elements of ``values[l]`` (float32 view) ``<= threshold``, int64 (L,)."""
    t = threshold.float()
    device = values[0].device if values else torch.device("cpu")
    return torch.tensor([int((_as_float(v, absolute) <= t).sum()) for v in values], dtype=torch.int64, device=device)


def flow_kth_each(
    weights: list[Tensor], imp_out: list[Tensor], imp_in: list[Tensor], w_scale: Tensor, ks: list[int]
) -> Tensor:
    """Per layer: the k-th smallest flow score (``-inf`` when ``ks[l] == 0``), float32 (L,)."""
    scores = [flow_score_of(w, o, i, w_scale[l]) for l, (w, o, i) in enumerate(zip(weights, imp_out, imp_in))]
    return kth_smallest_each(scores, ks)


def flow_masks(
    weights: list[Tensor], imp_out: list[Tensor], imp_in: list[Tensor], w_scale: Tensor, thresholds: Tensor
) -> list[Tensor]:
    """Per layer: keep-mask ``flow score > thresholds[l]`` (ties at the threshold pruned)."""
    return [
        flow_score_of(w, o, i, w_scale[l]) > thresholds[l]
        for l, (w, o, i) in enumerate(zip(weights, imp_out, imp_in))
    ]


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive scores of each row; among equal
    scores the lower index is kept. ``scores`` is (R, C) with ``C % m == 0``."""
    r, c = scores.shape
    groups = scores.detach().float().reshape(r, c // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(r, c)


# ---------------------------------------------------------------------------------------
# Mask packing
# ---------------------------------------------------------------------------------------
def pack_mask(mask: Tensor) -> Tensor:
    """bool (R, C) -> int32 (R, ceil(C / 32)): bit b of word w of row r is mask[r, 32w + b]."""
    r, c = mask.shape
    words = (c + 31) // 32
    padded = torch.zeros(r, words * 32, dtype=torch.int64, device=mask.device)
    padded[:, :c] = mask.to(torch.int64)
    bits = (padded.reshape(r, words, 32) << torch.arange(32, device=mask.device)).sum(-1)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)  # two's complement into int32
    return bits.to(torch.int32)


def unpack_mask(bits: Tensor, cols: int) -> Tensor:
    """int32 (R, ceil(cols / 32)) -> bool (R, cols); the inverse of :func:`pack_mask`."""
    r, words = bits.shape
    b = bits.to(torch.int64) & 0xFFFFFFFF
    expanded = (b[:, :, None] >> torch.arange(32, device=bits.device)) & 1
    return expanded.reshape(r, words * 32)[:, :cols].bool()


# =======================================================================================
# Matmul: masked_linear
# =======================================================================================
def masked_weight(weight: Tensor, mask_bits: Tensor) -> Tensor:
    """weight * mask with the mask unpacked from ``mask_bits``; pruned places are exactly 0."""
    mask = unpack_mask(mask_bits, weight.shape[1])
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def masked_linear(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ (weight * mask).T + bias, summed in float32, rounded once to x's dtype."""
    y = x.float() @ masked_weight(weight, mask_bits).float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def masked_linear_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, mask_bits: Tensor, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias) of :func:`masked_linear`, in float32 rounded to x's
    dtype; grad_weight is exactly 0 where the mask is False. Outputs that ``output_mask``
    leaves out are (0,)-shaped tensors, as the op returns them."""
    rows = math.prod(x.shape[:-1])  # not reshape(-1, n): that fails for n = 0
    g = grad_out.reshape(rows, weight.shape[0]).float()
    xs = x.reshape(rows, weight.shape[1]).float()
    skipped = x.new_empty(0)
    grad_x = (g @ masked_weight(weight, mask_bits).float()).reshape(x.shape).to(x.dtype) if output_mask[0] else skipped
    if output_mask[1]:
        mask = unpack_mask(mask_bits, weight.shape[1])
        grad_w = torch.where(mask, g.T @ xs, torch.zeros((), device=x.device)).to(x.dtype)
    else:
        grad_w = skipped
    grad_b = g.sum(0).to(x.dtype) if output_mask[2] else skipped
    return grad_x, grad_w, grad_b


# =======================================================================================
# Bitmap format: bitmap_pack, bitmap_unpack, bitmap_linear
# =======================================================================================
def dense_linear(x: Tensor, w: Tensor, bias: Tensor | None, compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """x @ w.T + bias summed in compute_dtype, rounded once to x's dtype: the linear ops over
    a compressed weight, once the weight is decoded."""
    y = torch.nn.functional.linear(x.to(compute_dtype), w.to(compute_dtype), None if bias is None else bias.to(compute_dtype))
    return y.to(x.dtype)


def bitmap_offsets(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(row_ptr, block_ptr) of the bitmap format for the bool keep-mask (out, in): int32
    (out + 1,) the kept weights before each row, and int32 (out, ceil(in / 512) - 1) with
    [r, b - 1] = the kept weights of row r before column 512 b, blocks b >= 1."""
    out, cols = mask.shape
    row_ptr = torch.zeros(out + 1, dtype=torch.int64, device=mask.device)
    row_ptr[1:] = mask.sum(1, dtype=torch.int64).cumsum(0)
    blocks = max((cols + 511) // 512, 1)
    per_block = torch.nn.functional.pad(mask, (0, blocks * 512 - cols)).reshape(out, blocks, 512).sum(-1)
    return row_ptr.to(torch.int32), per_block.cumsum(1)[:, :-1].to(torch.int32)


def bitmap_pack(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(values, bits, row_ptr, block_ptr) of weight (out, in) under the bool keep-mask."""
    values = weight[mask]  # row-major order
    return (values, pack_mask(mask), *bitmap_offsets(mask))


def bitmap_unpack(values: Tensor, bits: Tensor, row_ptr: Tensor, block_ptr: Tensor, in_features: int) -> Tensor:
    """The dense weight (out, in_features): values at the kept places, zeros elsewhere."""
    mask = unpack_mask(bits, in_features)
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    dense[mask] = values
    return dense


def bitmap_linear(
    x: Tensor,
    values: Tensor,
    bits: Tensor,
    row_ptr: Tensor,
    block_ptr: Tensor,
    in_features: int,
    bias: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """y = x @ W.T + bias with W = bitmap_unpack(...), summed in compute_dtype (float32, or
    float64 for an exact reference), rounded once to x's dtype."""
    return dense_linear(x, bitmap_unpack(values, bits, row_ptr, block_ptr, in_features), bias, compute_dtype)


# =======================================================================================
# 2:4 format: sparse24_pack, sparse24_unpack, sparse24_linear
# =======================================================================================
def _bits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype of dtype's size: elements are moved by their bits."""
    return torch.int32 if dtype.itemsize == 4 else torch.int16


def _check_2_4(mask: Tensor) -> None:
    out, cols = mask.shape
    if cols % 4 != 0:
        raise ValueError(f"in_features must be a multiple of 4 for the 2:4 format, got {cols}")
    bad = (mask.reshape(out, cols // 4, 4).sum(-1) > 2).any(-1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"mask is not 2:4: rows {bad[:8]} keep more than 2 of 4 consecutive weights ({len(bad)} in total)")


def sparse24_pack(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(values (out, in/2), metadata int16 (out, ceil(in/16))) of weight under a 2:4 keep-mask;
    the layout is described in ops.sparse24_pack. ValueError where the mask is not 2:4."""
    _check_2_4(mask)
    out, cols = weight.shape
    device = weight.device
    keep = mask.reshape(out, cols // 4, 4)
    # The two smallest keys of a chunk: its kept positions, then the lowest unused ones.
    pos = torch.arange(4, device=device)
    key = torch.where(keep, pos, pos + 4)
    positions = key.topk(2, dim=-1, largest=False).values.remainder(4).sort(dim=-1).values
    bits = weight.reshape(out, cols // 4, 4).view(_bits_dtype(weight.dtype))
    picked = torch.where(keep.gather(-1, positions), bits.gather(-1, positions), 0)
    values = picked.reshape(out, cols // 2).view(weight.dtype)
    codes = positions[..., 0] | (positions[..., 1] << 2)  # (out, chunks)
    words = (cols + 15) // 16
    padded = torch.zeros(out, 4 * words, dtype=torch.int64, device=device)
    padded[:, : cols // 4] = codes
    metadata = (padded.reshape(out, words, 4) << torch.arange(0, 16, 4, device=device)).sum(-1)
    metadata = torch.where(metadata >= 2**15, metadata - 2**16, metadata).to(torch.int16)  # two's complement
    return values, metadata


def sparse24_positions(metadata: Tensor, in_features: int) -> Tensor:
    """int64 (out, in/4, 2): the two positions (0..3) in its chunk of each value, from metadata."""
    words = metadata.to(torch.int64) & 0xFFFF
    codes = (words[:, :, None] >> torch.arange(0, 16, 4, device=metadata.device)) & 15
    codes = codes.reshape(metadata.shape[0], 4 * metadata.shape[1])[:, : in_features // 4]
    return torch.stack([codes & 3, codes >> 2], dim=-1)


def sparse24_unpack(values: Tensor, metadata: Tensor) -> Tensor:
    """The dense weight (out, in = 2 * values.shape[1]): each chunk's values at its
    positions, zeros elsewhere."""
    out, cols = values.shape[0], 2 * values.shape[1]
    int_dtype = _bits_dtype(values.dtype)
    bits = values.reshape(out, cols // 4, 2).view(int_dtype)
    dense = torch.zeros(out, cols // 4, 4, dtype=int_dtype, device=values.device)
    dense.scatter_(-1, sparse24_positions(metadata, cols), bits)
    return dense.reshape(out, cols).view(values.dtype)


def sparse24_linear(
    x: Tensor,
    values: Tensor,
    metadata: Tensor,
    bias: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """y = x @ W.T + bias with W = sparse24_unpack(values, metadata), summed in compute_dtype
    (float32, or float64 for an exact reference), rounded once to x's dtype. Dense: unlike the
    op, a non-finite x at a pruned position makes the row NaN (equal for finite x)."""
    return dense_linear(x, sparse24_unpack(values, metadata), bias, compute_dtype)


def sparse24_pack_python(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """sparse24_pack written as plainly as possible, to check the layout itself: Python loops
    over rows and chunks, Python ints, metadata words built bit by bit. Slow: tests only."""
    out, cols = weight.shape
    if cols % 4 != 0:
        raise ValueError(f"in_features must be a multiple of 4 for the 2:4 format, got {cols}")
    int_dtype = _bits_dtype(weight.dtype)
    w_bits = weight.contiguous().view(int_dtype).tolist()  # each weight's bit pattern, as an int
    keep = mask.tolist()
    values, metadata, bad_rows = [], [], []
    for r in range(out):
        row_words = []
        word = 0
        for q in range(cols // 4):
            kept = [p for p in range(4) if keep[r][4 * q + p]]
            if len(kept) > 2 and r not in bad_rows:
                bad_rows.append(r)
            positions = kept[:2]
            for p in range(4):  # fill up with the lowest unused positions
                if len(positions) < 2 and p not in positions:
                    positions.append(p)
            first, second = sorted(positions)
            for p in (first, second):
                values.append(w_bits[r][4 * q + p] if keep[r][4 * q + p] else 0)
            # Bits 0-1: the first position, bits 2-3: the second, at bit 4 * (q % 4).
            for bit, value in enumerate((first & 1, first >> 1, second & 1, second >> 1)):
                word |= value << (4 * (q % 4) + bit)
            if q % 4 == 3:
                row_words.append(word)
                word = 0
        if (cols // 4) % 4 != 0:
            row_words.append(word)  # the last word's padding chunks stay 0
        metadata.extend(w - 2**16 if w >= 2**15 else w for w in row_words)
    if bad_rows:
        raise ValueError(f"mask is not 2:4: rows {bad_rows[:8]} keep more than 2 of 4 consecutive weights")
    values_t = torch.tensor(values, dtype=int_dtype).reshape(out, cols // 2).view(weight.dtype)
    metadata_t = torch.tensor(metadata, dtype=torch.int16).reshape(out, (cols + 15) // 16)
    return values_t.to(weight.device), metadata_t.to(weight.device)
