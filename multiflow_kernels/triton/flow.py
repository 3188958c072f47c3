"""flow_importance and flow_scores in Triton: the CUDA implementation of the ops.

Batched over layers: each pass is ONE launch for the whole list of layers, whatever
their shapes and dtypes. A small int64 table (one row of ``_NF`` fields per layer:
data pointers, shape, stride, dtype code, offsets into the shared buffers) travels to
the device with one copy; a program turns a pointer field into a typed pointer with
``.to(tl.pointer_type(...))`` and branches on the dtype code (uniform per program, so
the branch costs nothing). This works under TRITON_INTERPRET=1 too, on CPU tensors.

Tiling (as the CPU kernel, csrc/cpu/flow.cpp): a tile is TILE_ROWS rows x BLOCK_C
columns of one layer; ``tile_layer[t]`` names the layer of global tile t.

    1. _abs_max_kernel     per tile: max |w| (as int bits: exact, NaN wins) -> tile_max
    2. _prep_kernel        per layer: w_scale from its tile maxima; r = root_a * r_scale
                           (all zero stays all zero)
    3. _importance_kernel  per tile: A = (|w| * w_scale) * r, float64 row and column
                           sums of the tile -> row / column partials
    4. _means_kernel       per (layer, chunk of outputs): partials summed in tile order,
                           divided by the count in float64 (IEEE), rounded to float32
    5. _scores_kernel      per tile: (imp_out_i * (|w_ij| * w_scale)) * imp_in_j

Exactness: the float32 products are the reference's (IEEE multiplies in the same
order, nothing fused). ``root_a = sqrt(clamp_min(a, 0))`` is computed with torch's own
ops on the weights' device so that it is the reference's bit for bit (torch's CPU sqrt
is not always correctly rounded; its CUDA sqrt is). The float64 sums run in another
order than torch's; see csrc/cpu/flow.cpp for why the float32 means still agree.
Deterministic: no atomics, every sum in an order fixed by the shapes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import _check_flow_args, _flow_args_ok

# Fields of a layer's row in the metadata table (tl.constexpr globals: the kernels read them).
# The pointer fields come first: they change every call, the others depend on the shapes
# only (see _layout), so a call writes its pointers into a copy of a cached table.
_W = tl.constexpr(0)  # weight data pointer
_IMP_OUT = tl.constexpr(1)  # data pointer of its imp_out (rows,) float32
_IMP_IN = tl.constexpr(2)  # data pointer of its imp_in (cols,) float32
_SCORES = tl.constexpr(3)  # data pointer of its scores (rows, cols) float32, or 0
_ROWS = tl.constexpr(4)
_COLS = tl.constexpr(5)
_STRIDE = tl.constexpr(6)  # row stride of the weight, in elements (columns are contiguous)
_DTYPE = tl.constexpr(7)  # 0 float32, 1 float16, 2 bfloat16
_R_OFF = tl.constexpr(8)  # offset of its r in root_a / r_buf
_TILE_BEGIN = tl.constexpr(9)
_N_RB = tl.constexpr(10)  # row blocks (0 for an empty weight)
_N_CB = tl.constexpr(11)  # column blocks
_ROW_PART = tl.constexpr(12)  # offset of its row partials (n_cb x rows float64)
_COL_PART = tl.constexpr(13)  # offset of its column partials (n_rb x cols float64)
_NF = tl.constexpr(16)
_N_POINTERS = 4  # fields [0, _N_POINTERS): the pointers
_FIELD_ORDER = (_W, _IMP_OUT, _IMP_IN, _SCORES, _ROWS, _COLS, _STRIDE, _DTYPE, _R_OFF, _TILE_BEGIN, _N_RB, _N_CB,
                _ROW_PART, _COL_PART)
assert [f.value for f in _FIELD_ORDER] == list(range(len(_FIELD_ORDER))), "_layout writes a row in field order"
_ROW_PAD = (0,) * (_NF.value - len(_FIELD_ORDER))

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# A tile: TILE_ROWS x BLOCK_C, walked BLOCK_R rows at a time (16 x 128 elements per
# step, 16 per thread with 4 warps; the column sums of a tile stay in registers).
TILE_ROWS = 64
BLOCK_R = 16
BLOCK_C = 128
BLOCK_LAYER = 1024  # elements per step of the per-layer kernels


@triton.jit
def _load_abs_rows(addr, dtype, stride, r0, row_end, cols, col_ok, BLOCK_R: tl.constexpr):
    """|w| as float32 for rows [r0, r0 + BLOCK_R) (those < row_end) x cols of the weight
    at addr (int64); 0 where masked. Returns (rows, row mask, element mask, |w|)."""
    rr = r0 + tl.arange(0, BLOCK_R)
    row_ok = rr < row_end
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rr[:, None] * stride + cols[None, :]
    if dtype == 0:
        x = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif dtype == 1:
        x = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        # bfloat16 is float32's upper half: |w|'s float32 bits from the raw 16 bits, exact for
        # every value (Triton 3.8's interpreter converts bfloat16 subnormals wrongly with .to:
        # 1.01e-39 became 4.41e-39, 9.2e-41 became 0)
        raw = tl.load(addr.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0)
        x = ((raw.to(tl.int32) & 0x7FFF) << 16).to(tl.float32, bitcast=True)
    return rr, row_ok, mask, tl.abs(x)


@triton.jit
def _pow2_scale(bits):
    """reference.pow2_scale from the int32 bits of a maximum m >= 0 (NaN bits when a
    NaN was seen): 2^-e with m * 2^-e in [0.5, 1), e = frexp exponent clamped to
    [-126, 126]; 1 for 0 and non-finite m. Subnormal m (biased exponent 0) clamps to -126."""
    biased = bits >> 23
    e = tl.minimum(tl.maximum(biased - 126, -126), 126)
    scale = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return tl.where((bits == 0) | (biased == 255), 1.0, scale)


@triton.jit
def _tile_coords(meta, tile_layer, TILE_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: (tile, layer, its table row, row block, column block, first
    row, end row, columns, which columns exist, weight address, dtype code, row stride)."""
    t = tl.program_id(0)
    l = tl.load(tile_layer + t).to(tl.int64)
    m = meta + l * _NF
    local = t - tl.load(m + _TILE_BEGIN)
    n_cb = tl.load(m + _N_CB)
    rb = local // n_cb
    cb = local % n_cb
    row_end = tl.minimum(tl.load(m + _ROWS), (rb + 1) * TILE_ROWS)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < tl.load(m + _COLS)
    return (t, l, m, rb, cb, rb * TILE_ROWS, row_end, cols, col_ok, tl.load(m + _W), tl.load(m + _DTYPE),
            tl.load(m + _STRIDE))


@triton.jit
def _abs_max_kernel(meta, tile_layer, tile_max, TILE_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    t, l, m, rb, cb, row0, row_end, cols, col_ok, addr, dtype, stride = _tile_coords(meta, tile_layer, TILE_ROWS,
                                                                                   BLOCK_C)
    # The bits of a float >= 0 order like the float, and NaN's lie above +inf's: an
    # integer max is exact and propagates NaN, as torch.max does.
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    for r0 in range(row0, row_end, BLOCK_R):
        rr, row_ok, mask, x = _load_abs_rows(addr, dtype, stride, r0, row_end, cols, col_ok, BLOCK_R)
        acc = tl.maximum(acc, x.to(tl.int32, bitcast=True))
    tl.store(tile_max + t, tl.max(tl.max(acc, axis=1), axis=0))


@triton.jit
def _prep_kernel(meta, tile_max, root_a, r_buf, w_scale, BLOCK: tl.constexpr):
    l = tl.program_id(0).to(tl.int64)
    m = meta + l * _NF
    idx = tl.arange(0, BLOCK)

    tile_begin = tl.load(m + _TILE_BEGIN)
    n_tiles = tl.load(m + _N_RB) * tl.load(m + _N_CB)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for t0 in range(0, n_tiles, BLOCK):
        acc = tl.maximum(acc, tl.load(tile_max + tile_begin + t0 + idx, mask=t0 + idx < n_tiles, other=0))
    tl.store(w_scale + l, _pow2_scale(tl.max(acc, axis=0)))

    # r = root_a * pow2_scale(root_a) (an all-zero root_a stays zero: scale 1).
    n_cols = tl.load(m + _COLS)
    r_off = tl.load(m + _R_OFF)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for c0 in range(0, n_cols, BLOCK):
        v = tl.load(root_a + r_off + c0 + idx, mask=c0 + idx < n_cols, other=0.0)
        acc = tl.maximum(acc, v.to(tl.int32, bitcast=True) & 0x7FFFFFFF)  # -0.0 counts as 0
    r_bits = tl.max(acc, axis=0)
    r_scale = _pow2_scale(r_bits)
    for c0 in range(0, n_cols, BLOCK):
        ok = c0 + idx < n_cols
        v = tl.load(root_a + r_off + c0 + idx, mask=ok, other=0.0)
        tl.store(r_buf + r_off + c0 + idx, v * r_scale, mask=ok)


@triton.jit
def _importance_kernel(meta, tile_layer, r_buf, w_scale, row_part, col_part, TILE_ROWS: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    t, l, m, rb, cb, row0, row_end, cols, col_ok, addr, dtype, stride = _tile_coords(meta, tile_layer, TILE_ROWS,
                                                                                   BLOCK_C)
    n_rows = tl.load(m + _ROWS)
    scale = tl.load(w_scale + l)
    r = tl.load(r_buf + tl.load(m + _R_OFF) + cols, mask=col_ok, other=0.0)
    row_out = row_part + tl.load(m + _ROW_PART) + cb * n_rows
    col_acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    for r0 in range(row0, row_end, BLOCK_R):
        rr, row_ok, mask, x = _load_abs_rows(addr, dtype, stride, r0, row_end, cols, col_ok, BLOCK_R)
        # Masked lanes must add exactly 0 (r may be inf or NaN, and 0 * inf is NaN).
        a = tl.where(mask, (x * scale) * r[None, :], 0.0).to(tl.float64)
        col_acc += tl.sum(a, axis=0)
        tl.store(row_out + rr, tl.sum(a, axis=1), mask=row_ok)
    tl.store(col_part + tl.load(m + _COL_PART) + rb * tl.load(m + _COLS) + cols, col_acc, mask=col_ok)


@triton.jit
def _mean_of_partials(parts, n_parts, length, count, out_addr, idx, BLOCK: tl.constexpr):
    ok = idx < length
    s = tl.zeros([BLOCK], dtype=tl.float64)
    for k in range(0, n_parts):
        s += tl.load(parts + k * length + idx, mask=ok, other=0.0)
    mean = tl.fdiv(s, tl.maximum(count, 1).to(tl.float64), ieee_rounding=True)
    tl.store(out_addr.to(tl.pointer_type(tl.float32)) + idx, mean.to(tl.float32), mask=ok)


@triton.jit
def _means_kernel(meta, row_part, col_part, BLOCK: tl.constexpr):
    l = tl.program_id(0).to(tl.int64)
    m = meta + l * _NF
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_rows = tl.load(m + _ROWS)
    n_cols = tl.load(m + _COLS)
    _mean_of_partials(row_part + tl.load(m + _ROW_PART), tl.load(m + _N_CB), n_rows, n_cols, tl.load(m + _IMP_OUT),
                      idx, BLOCK)
    _mean_of_partials(col_part + tl.load(m + _COL_PART), tl.load(m + _N_RB), n_cols, n_rows, tl.load(m + _IMP_IN),
                      idx, BLOCK)


@triton.jit
def _scores_kernel(meta, tile_layer, w_scale, TILE_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    t, l, m, rb, cb, row0, row_end, cols, col_ok, addr, dtype, stride = _tile_coords(meta, tile_layer, TILE_ROWS,
                                                                                   BLOCK_C)
    scale = tl.load(w_scale + l)
    n_cols = tl.load(m + _COLS)
    imp_out = tl.load(m + _IMP_OUT).to(tl.pointer_type(tl.float32))
    out = tl.load(m + _SCORES).to(tl.pointer_type(tl.float32))
    i_in = tl.load(tl.load(m + _IMP_IN).to(tl.pointer_type(tl.float32)) + cols, mask=col_ok, other=0.0)
    for r0 in range(row0, row_end, BLOCK_R):
        rr, row_ok, mask, x = _load_abs_rows(addr, dtype, stride, r0, row_end, cols, col_ok, BLOCK_R)
        i_out = tl.load(imp_out + rr, mask=row_ok, other=0.0)
        score = (i_out[:, None] * (x * scale)) * i_in[None, :]
        tl.store(out + rr[:, None] * n_cols + cols[None, :], score, mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
class _Layout(NamedTuple):
    """What the launches need that depends on the layers' shapes only (see _layout)."""

    table: Tensor  # CPU int64: the metadata rows (pointer fields 0), then the layer of every tile
    n_layers: int
    n_tiles: int
    max_dim: int
    row_part: int  # float64 row partials over all layers
    col_part: int  # float64 column partials over all layers


_LAYOUT_CACHE_SIZE = 64  # distinct layer lists kept (a model's groups need a few)


@functools.lru_cache(maxsize=_LAYOUT_CACHE_SIZE)
def _layout(key: tuple[tuple[int, int, int, torch.dtype], ...]) -> _Layout:
    """The table of the layers ``key`` = ((rows, cols, row stride, dtype), ...), without
    their pointers. Cached: pruning calls the launchers with the same layer lists again
    and again (one call per group of layers per masks_from_stats call), and building the
    table is most of a launcher's host time. Bounded (LRU), and a shared read-only CPU
    tensor: callers copy it before writing pointers into it."""
    rows_meta, tiles_per_layer = [], []
    n_tiles = r_off = row_part = col_part = 0
    for rows, cols, stride, dtype in key:
        n_rb = -(-rows // TILE_ROWS) if rows and cols else 0  # ceil; not triton.cdiv (a JIT call from Python)
        n_cb = -(-cols // BLOCK_C) if rows and cols else 0
        # the fields in _FIELD_ORDER's order (a tuple: indexing by the tl.constexpr
        # fields costs a conversion each)
        rows_meta.extend((0,) * _N_POINTERS + (
            rows, cols, stride, _DTYPE_CODES[dtype], r_off, n_tiles, n_rb, n_cb, row_part, col_part,
        ) + _ROW_PAD)
        tiles_per_layer.append(n_rb * n_cb)
        n_tiles += n_rb * n_cb
        r_off += cols
        row_part += n_cb * rows
        col_part += n_rb * cols
    tile_layer = torch.repeat_interleave(torch.arange(len(key)), torch.tensor(tiles_per_layer))
    table = torch.cat([torch.tensor(rows_meta, dtype=torch.int64), tile_layer])
    max_dim = max(max(rows, cols) for rows, cols, _, _ in key)
    return _Layout(table, len(key), n_tiles, max_dim, row_part, col_part)


class _Plan:
    """The metadata table, the outputs and the buffers of one call."""

    def __init__(self, op: str, weights: list[Tensor], act_sq_norms: list[Tensor], with_scores: bool):
        if not _flow_args_ok(weights, act_sq_norms):
            _check_flow_args(op, weights, act_sq_norms)
        device = weights[0].device
        f32 = dict(dtype=torch.float32, device=device)
        # Rows with contiguous columns (a transposed weight is copied once).
        self.weights = [w.contiguous() if w.shape[1] > 1 and w.stride(1) != 1 else w for w in weights]
        self.imp_out = [torch.empty(w.shape[0], **f32) for w in weights]
        self.imp_in = [torch.empty(w.shape[1], **f32) for w in weights]
        self.scores = [torch.empty(tuple(w.shape), **f32) for w in weights] if with_scores else None
        self.w_scale = torch.empty(len(weights), **f32)
        # sqrt(clamp_min(a, 0)) with torch's own ops, as the reference computes it. On
        # CUDA (elementwise IEEE sqrt) one call over all layers; elsewhere per layer.
        acts = [a.detach() for a in act_sq_norms]
        if device.type == "cuda":
            self.root_a = torch.cat(acts).clamp_min_(0).sqrt_()
        else:
            self.root_a = torch.cat([a.clamp_min(0).sqrt() for a in acts])
        self.r_buf = torch.empty_like(self.root_a)

        layout = _layout(tuple((*w.shape, w.stride(0), w.dtype) for w in self.weights))
        self.n_layers, self.n_tiles, self.max_dim = layout.n_layers, layout.n_tiles, layout.max_dim
        # The cached table with this call's pointers, sent with one copy. On CUDA from
        # pinned memory, queued without waiting: a copy from pageable memory would make
        # the host wait for the whole stream (the caching host allocator keeps the
        # pinned block until the copy has run).
        pointers = []
        for l, w in enumerate(self.weights):
            pointers += (w.data_ptr(), self.imp_out[l].data_ptr(), self.imp_in[l].data_ptr(),
                         self.scores[l].data_ptr() if with_scores else 0)
        host = torch.empty(layout.table.shape, dtype=torch.int64, pin_memory=device.type == "cuda")
        host.copy_(layout.table)
        n_meta = self.n_layers * _NF.value
        host[:n_meta].view(self.n_layers, _NF.value)[:, :_N_POINTERS] = torch.tensor(
            pointers, dtype=torch.int64).view(self.n_layers, _N_POINTERS)
        table = host.to(device, non_blocking=True)
        self.meta, self.tile_layer = table[:n_meta], table[n_meta:]
        self.row_part = torch.empty(layout.row_part, dtype=torch.float64, device=device)
        self.col_part = torch.empty(layout.col_part, dtype=torch.float64, device=device)
        self.tile_max = torch.empty(self.n_tiles, dtype=torch.int32, device=device)


def _run_importance(p: _Plan) -> None:
    tiles = (p.n_tiles,)
    if p.n_tiles:
        _abs_max_kernel[tiles](p.meta, p.tile_layer, p.tile_max, TILE_ROWS, BLOCK_R, BLOCK_C)
    _prep_kernel[(p.n_layers,)](p.meta, p.tile_max, p.root_a, p.r_buf, p.w_scale, BLOCK_LAYER)
    if p.n_tiles:
        _importance_kernel[tiles](p.meta, p.tile_layer, p.r_buf, p.w_scale, p.row_part, p.col_part, TILE_ROWS,
                                  BLOCK_R, BLOCK_C)
    if p.max_dim:
        _means_kernel[(p.n_layers, triton.cdiv(p.max_dim, BLOCK_LAYER))](p.meta, p.row_part, p.col_part,
                                                                        BLOCK_LAYER)


def flow_importance_triton(weights: list[Tensor], act_sq_norms: list[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """multiflow::flow_importance with the Triton kernels (CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1). Same contract as :func:`multiflow_kernels.ops.flow_importance`."""
    weights, act_sq_norms = list(weights), list(act_sq_norms)
    if not weights and not act_sq_norms:
        return [], [], torch.empty(0, dtype=torch.float32)
    p = _Plan("multiflow::flow_importance", weights, act_sq_norms, with_scores=False)
    _run_importance(p)
    return p.imp_out, p.imp_in, p.w_scale


def flow_scores_triton(weights: list[Tensor], act_sq_norms: list[Tensor]) -> list[Tensor]:
    """multiflow::flow_scores with the Triton kernels. Same contract as
    :func:`multiflow_kernels.ops.flow_scores`."""
    weights, act_sq_norms = list(weights), list(act_sq_norms)
    if not weights and not act_sq_norms:
        return []
    p = _Plan("multiflow::flow_scores", weights, act_sq_norms, with_scores=True)
    _run_importance(p)
    if p.n_tiles:
        _scores_kernel[(p.n_tiles,)](p.meta, p.tile_layer, p.w_scale, TILE_ROWS, BLOCK_R, BLOCK_C)
    return p.scores
