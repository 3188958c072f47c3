"""Sparse weight formats: how a pruned ``nn.Linear`` weight is stored, packed, unpacked
and multiplied. :class:`multiflow_kernels.nn.SparseLinear` holds one of these.

``masked``  the dense weight (a trainable ``nn.Parameter``) + 1 bit per weight
            (``pack_mask`` layout). ``masked_linear`` applies the mask inside the kernel
            (CPU, Triton; on CUDA by default the masked weight is built per call and
            multiplied by cuBLAS, faster), forward and backward: pruned weights get
            exactly zero gradient (sparse fine-tuning). On an AVX-512 CPU its GEMM is also the
            faster kernel from 512-2048 rows of x (by the mask's kept fraction and the dtype),
            where ``auto`` picks it (see :func:`choose_format`). Storage: dense + 1/32 (float32) or 1/16 (16-bit) of it.

``bitmap``  the kept values in row order + 1 bit per weight + row and 512-column offsets
            (``bitmap_pack`` layout); ``bitmap_linear`` decodes it inside the kernel.
            Storage at 75% sparsity: values 0.25x + bits 1/32 (float32) or 1/16 (16-bit)
            + 4 bytes of row offset and 4 per 512 columns past the first, per row: 0.284x
            dense float32 and 0.318x float16 / bfloat16 at 768 inputs (0.283x / 0.316x at 3072).

``2:4``     at most 2 kept weights in every 4 consecutive ones of a row (``nm=(2, 4)``
            masks): half the values + 4 bits of positions per 4 weights, in the layout the
            sparse tensor cores read (``sparse24_pack``); ``sparse24_linear`` runs them
            on ``mma.sp`` (CUDA, float16 / bfloat16, sm_80+). Storage: 0.5625x dense
            float16 / bfloat16, 0.53x float32. ``in_features`` must be a multiple of 4.

``auto`` (:func:`choose_format`) picks per layer the format whose kernel is fastest for
the device, dtype and expected rows of ``x``; the rule and the measurements behind it are
in ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import numbers

from collections.abc import Mapping

import torch
from torch import Tensor

from . import ops, reference

__all__ = ["FORMATS", "buffers", "empty", "pack", "unpack", "linear", "stored_mask", "check_24", "choose_format"]

FORMATS = ("masked", "bitmap", "2:4")
AUTO = "auto"

# The tensors of each format, in the order the ops take them. "weight" (masked) is the
# layer's trainable parameter; every other tensor is a buffer.
_TENSORS = {
    "masked": ("weight", "mask_bits"),
    "bitmap": ("values", "bits", "row_ptr", "block_ptr"),
    "2:4": ("values", "metadata"),
}


def check_format(format: str, *, allow_auto: bool = False) -> str:
    """``format`` if it is a known format name, else ValueError listing the known ones."""
    if format in FORMATS or (allow_auto and format == AUTO):
        return format
    if format == AUTO:
        raise ValueError("format 'auto' chooses a format per layer: pass it to sparsify(); a SparseLinear "
                         f"holds one of {list(FORMATS)}")
    known = list(FORMATS) + ([AUTO] if allow_auto else [])
    raise ValueError(f"unknown sparse format {format!r}; available: {known}")


def buffers(format: str) -> tuple[str, ...]:
    """Names of the tensors that hold a weight in ``format``."""
    return _TENSORS[check_format(format)]


def empty(format: str, out_features: int, in_features: int, *, device=None, dtype=None) -> dict[str, Tensor]:
    """Zero-filled tensors of the right shapes for an empty layer (what ``load_state_dict``
    then fills). The bitmap's ``values`` start empty: their length is data, not shape."""
    check_format(format)
    kw = {"device": device, "dtype": dtype}
    words = (in_features + 31) // 32
    if format == "masked":
        return {"weight": torch.zeros(out_features, in_features, **kw),
                "mask_bits": torch.zeros(out_features, words, dtype=torch.int32, device=device)}
    if format == "bitmap":
        return {"values": torch.zeros(0, **kw),
                "bits": torch.zeros(out_features, words, dtype=torch.int32, device=device),
                "row_ptr": torch.zeros(out_features + 1, dtype=torch.int32, device=device),
                "block_ptr": torch.zeros(out_features, ops.block_ptr_cols(in_features), dtype=torch.int32,
                                         device=device)}
    _check_24_features(in_features)
    # every chunk names positions (0, 1) (nibble 0b0100): a valid pattern for the sparse
    # tensor cores even before a checkpoint fills the layer; padding chunks stay 0
    chunks = in_features // 4
    nibbles = torch.zeros((in_features + 15) // 16 * 4, dtype=torch.int32)
    nibbles[:chunks] = 0x4
    word = (nibbles.view(-1, 4) << torch.arange(0, 16, 4, dtype=torch.int32)).sum(-1)
    metadata = word.to(torch.int16).expand(out_features, -1).to(device).contiguous()
    return {"values": torch.zeros(out_features, in_features // 2, **kw), "metadata": metadata}


def _check_24_features(in_features: int, name: str = "") -> None:
    if in_features % 4:
        raise ValueError(f"{name + ': ' if name else ''}the 2:4 format needs in_features to be a multiple of 4, "
                         f"got {in_features}")


def _groups_over_2(mask: Tensor) -> Tensor:
    """bool (out,): the rows of mask (out, in), in % 4 == 0, keeping more than 2 of some 4."""
    return mask.reshape(mask.shape[0], mask.shape[1] // 4, 4).sum(-1).gt(2).any(-1)


def check_24(mask: Tensor, name: str = "mask") -> None:
    """ValueError naming the rows of ``mask`` (bool, out x in) that keep more than 2 of
    4 consecutive weights, or if ``in`` is not a multiple of 4."""
    _check_24_features(mask.shape[-1], name)
    over = _groups_over_2(mask)
    if bool(over.any()):
        rows = over.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
        raise ValueError(f"{name} is not 2:4: {len(rows)} row(s) keep more than 2 of 4 consecutive weights "
                         f"(rows {shown}); prune with nm=(2, 4)")


def bad_bitmap_rows(values_numel: int, bits: Tensor, row_ptr: Tensor, block_ptr: Tensor,
                    in_features: int) -> list[int]:
    """The rows of a bitmap format whose offsets disagree with its bits (``row_ptr`` /
    ``block_ptr`` not the counts of kept weights ``bitmap_pack`` writes, ``values`` of
    another length) or that set a padding bit past ``in_features``. The CUDA kernels trust
    the offsets (no check per call: wrong numbers, never a read outside ``values``), so a
    file or state dict is checked once, when it is loaded."""
    out = bits.shape[0]
    mask = ops.unpack_mask(bits, in_features)
    want_rows, want_blocks = reference.bitmap_offsets(mask)
    wrong = row_ptr.to(torch.int64) != want_rows.to(torch.int64)
    bad = wrong[1:] | wrong[:1]
    bad |= (block_ptr != want_blocks).any(1)
    bad |= (bits != ops.pack_mask(mask)).any(1)  # unpack_mask drops a padding bit; pack_mask does not write it
    rows = bad.nonzero().flatten().tolist()
    if out and int(want_rows[-1]) != values_numel and not rows:
        rows = [out - 1]  # the counts agree but values has another length: its last row is short or long
    return rows


def bad_24_metadata_rows(metadata: Tensor, in_features: int) -> list[int]:
    """The rows of a 2:4 ``metadata`` (int16, out x ceil(in / 16)) that :func:`sparse24_pack`
    could not have written: each 4-column chunk names two positions, the first below the
    second, and the padding chunks of a row's last word are 0. The kernels trust the metadata
    (no check per call), so a file or state dict is checked once, when it is loaded."""
    positions = reference.sparse24_positions(metadata, 16 * metadata.shape[1])  # the padding chunks too
    chunks = in_features // 4
    real, padding = positions[:, :chunks], positions[:, chunks:]
    bad = (real[..., 0] >= real[..., 1]).any(1) | (padding != 0).flatten(1).any(1)
    return bad.nonzero().flatten().tolist()


def is_24(mask: Tensor) -> bool:
    """Whether ``mask`` keeps at most 2 of every 4 consecutive weights of each row."""
    return mask.shape[-1] % 4 == 0 and not bool(_groups_over_2(mask).any())


def pack(format: str, weight: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The tensors of ``format`` holding ``weight * mask`` (weight (out, in), mask bool)."""
    check_format(format)
    if format == "masked":
        return {"weight": weight.masked_fill(~mask, 0), "mask_bits": ops.pack_mask(mask)}
    if format == "bitmap":
        return dict(zip(_TENSORS["bitmap"], ops.bitmap_pack(weight, mask)))
    check_24(mask)
    return dict(zip(_TENSORS["2:4"], ops.sparse24_pack(weight, mask)))


def _args(format: str, tensors: Mapping[str, Tensor]) -> list[Tensor]:
    return [tensors[n] for n in _TENSORS[format]]


def unpack(format: str, tensors: Mapping[str, Tensor], in_features: int) -> Tensor:
    """The dense weight ``W * M`` (out, in) of a packed weight."""
    check_format(format)
    if format == "masked":
        return tensors["weight"].masked_fill(~stored_mask(format, tensors, in_features), 0)
    if format == "bitmap":
        return ops.bitmap_unpack(*_args(format, tensors), in_features)
    return ops.sparse24_unpack(*_args(format, tensors))


def stored_mask(format: str, tensors: Mapping[str, Tensor], in_features: int) -> Tensor:
    """The positions the format stores (bool, out x in). For masked and bitmap this is the
    keep-mask itself; 2:4 stores exactly 2 positions per 4 columns, so a group that kept
    fewer weights also names the zero-filled positions it was padded with."""
    check_format(format)
    if format == "masked":
        return ops.unpack_mask(tensors["mask_bits"], in_features)
    if format == "bitmap":
        return ops.unpack_mask(tensors["bits"], in_features)
    return ops.sparse24_unpack(torch.ones_like(tensors["values"]), tensors["metadata"]) != 0


def linear(format: str, x: Tensor, tensors: Mapping[str, Tensor], in_features: int,
           bias: Tensor | None = None) -> Tensor:
    """``x @ (W * M).T + bias`` on the format's kernel."""
    if format == "masked":
        return ops.masked_linear(x, tensors["weight"], tensors["mask_bits"], bias)
    if format == "bitmap":
        return ops.bitmap_linear(x, *_args(format, tensors), in_features, bias)
    return ops.sparse24_linear(x, *_args(format, tensors), bias)


# Fewest kept weights for which auto stores a 2:4-shaped mask as 2:4, which always stores half
# the weights (0.53x dense float32): a sparser mask is much smaller as a bitmap, which stores
# only the kept ones (0.41x at this density, 0.03x when all are pruned).
AUTO_24_MIN_DENSITY = 0.375

# On CUDA auto keeps a 2:4 mask as 2:4 up to AUTO_CUDA_24_ANY_ROWS rows of x on any layer,
# and up to AUTO_CUDA_24_MAX_ROWS rows on layers of at most AUTO_CUDA_24_MAX_IN inputs
# (above: bitmap, whose CUDA C++ kernel decodes + cuBLAS; see choose_format).
AUTO_CUDA_24_ANY_ROWS = 1
AUTO_CUDA_24_MAX_ROWS = 256
AUTO_CUDA_24_MAX_IN = 768


# On an AVX-512 CPU auto stores a layer as masked (dense weight + bits) from a number of rows
# of x that depends on how much its mask keeps and on the dtype: there masked_linear's GEMM
# (reading the weight in place, no decode) is the faster kernel, at the price of the dense
# weight's memory (see choose_format). Rows: (least kept fraction, least rows for float32 and
# bfloat16, least rows for float16), the first row the mask meets applies; under 24% kept,
# bitmap at any rows (24, not 25: a random "75%-sparse" mask keeps 24.96-25.05%).
AUTO_CPU_MASKED_FROM = ((0.35, 512, 1024), (0.24, 1024, 2048))


def _cpu_masked_min_rows(kept: float, dtype: torch.dtype) -> int | None:
    """The rows of x from which auto picks masked on an AVX-512 CPU, or None (never)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    for least, rows_32_bf16, rows_fp16 in AUTO_CPU_MASKED_FROM:
        if kept >= least:
            return rows_fp16 if dtype == torch.float16 else rows_32_bf16
    return None


def check_rows(rows) -> int:
    """``rows`` (the expected rows of x per call, for ``auto``): an int >= 1, else ValueError."""
    if isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 1:
        raise ValueError(f"rows (the expected rows of x per call, for format='auto') must be an int >= 1, "
                         f"got {rows!r}")
    return int(rows)


def choose_format(mask: Tensor, dtype: torch.dtype, device: torch.device | str, rows: int = 1,
                  capability: tuple[int, int] | None = None) -> str:
    """The format ``auto`` picks for one layer: its keep-``mask``, weight ``dtype``, the
    ``device`` it will run on and the expected ``rows`` of x per call (tokens x batch).
    ``capability``: the CUDA device's compute capability (read from the device if None).

    - CPU: ``2:4`` when the mask is 2:4 and keeps at least ``AUTO_24_MIN_DENSITY`` of the
      weights (a sparser mask is much smaller as a bitmap); else, where torch's CPU
      capability is AVX512, ``masked`` from the rows ``AUTO_CPU_MASKED_FROM`` gives for the
      mask's kept fraction and the dtype: keeping >= 35%, from 512 rows (float32, bfloat16)
      or 1024 (float16); keeping >= 24%, from 1024 / 2048; never below 24% (a random
      "75%-sparse" mask keeps 24.96-25.05%). There
      masked_linear's GEMM is the faster kernel, at the dense weight's memory: pass
      ``format="bitmap"`` to keep the compression. Else ``bitmap``. Without AVX-512 the rule
      keeps bitmap (AVX2, the auto family on this CPU under ATEN_CPU_CAPABILITY=avx2: masked
      is faster on every shape at no row count, dtype or sparsity measured, e.g. float32 at
      63% 0.89-1.14x bitmap's time at 1024 rows, 0.71-1.05x at 2048; the baseline build, also
      every non-x86 one: ~7x slower than bitmap at 2048 rows).
      Measured here (2-core AVX-512, benchmarks/RESULTS.md, the ``auto`` family of session
      12: masked_linear time / bitmap_linear time on the five BLIP / 4096x4096 shapes, each
      format rotating 1 GiB of its own copies): float32 at 63% sparsity 0.64-1.08 at 256
      rows, 0.48-0.82 at 512, at most 0.71 from 1024; at 75% 0.80-1.45 at 256, 0.59-1.20 at
      512, 0.67-1.01 at 1024, 0.47-0.85 at 2048; at 90% 0.79-1.22 even at 2048. bfloat16
      alike (63%: 0.68-0.86 at 512; 75%: 0.74-0.99 at 1024); float16 one step later (63%:
      0.91-1.27 at 512, 0.71-0.99 at 1024; 75%: 0.73-1.25 at 1024, 0.49-1.06 at 2048: three
      shapes faster, 768x768 and 2304x768 3-6% slower). The bitmap family puts bitmap ahead of
      masked at 1-128 rows on every shape. sparse24_linear
      on a 2:4 mask beats bitmap_linear on the same 50% mask at 4-16 rows (1.1-2.2x), is
      0.99-1.4x its speed at 64-256 rows and within 12% of it at 1 row (2048 rows not
      measured: a 2:4 mask stays 2:4).
    - CUDA: ``2:4`` when the mask is 2:4 (and keeps at least ``AUTO_24_MIN_DENSITY``), the
      dtype float16 / bfloat16, ``in_features`` a multiple of 16, the GPU sm_80 or newer,
      and the rows at most ``AUTO_CUDA_24_ANY_ROWS``, or at most ``AUTO_CUDA_24_MAX_ROWS``
      on a layer of at most ``AUTO_CUDA_24_MAX_IN`` inputs; otherwise ``bitmap``. Measured
      on an H200 (float16, benchmarks/RESULTS.md): the CUDA C++ bitmap kernel was faster
      than masked_linear's CUDA default on every measured shape, sparsity and row count
      (and it is the smallest format), so masked is never the faster kernel on CUDA.
      sparse24_linear on 2:4 masks (run 3) against bitmap_linear on 75% masks (run 4, its
      tensor-core kernel for 1-16 rows; run 2's decode + cuBLAS above; runs minutes apart on
      one machine): at 1 row 2:4 was faster or equal on every shape (0.017-0.030 ms against
      0.020-0.046); on the 768-input BLIP layers 2:4 stays at the ~0.018 ms floor up to 256
      rows where the bitmap path costs 0.020-0.030 ms; on 768x3072 (3072 inputs) bitmap was
      2x faster at 16 rows and 1.4x at 256 (2:4 1.06x faster at 64), and on 4096x4096 /
      11008x4096 bitmap was faster from 4 rows (0.020 vs 0.040 ms at 4 rows on 4096x4096).
      2, 3 and 5-15 rows of 2:4 were not measured.
    """
    check_rows(rows)
    device = torch.device(device)
    as_24 = is_24(mask) and mask.numel() > 0 and mask.float().mean().item() >= AUTO_24_MIN_DENSITY
    if device.type != "cuda":
        if as_24:
            return "2:4"
        if rows >= min(min(tier[1:]) for tier in AUTO_CPU_MASKED_FROM) and mask.numel() > 0 \
                and torch.backends.cpu.get_cpu_capability() == "AVX512":
            least = _cpu_masked_min_rows(int(mask.count_nonzero()) / mask.numel(), dtype)  # exact
            if least is not None and rows >= least:
                return "masked"
        return "bitmap"
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    in_features = mask.shape[-1]
    few_rows = rows <= AUTO_CUDA_24_ANY_ROWS or (rows <= AUTO_CUDA_24_MAX_ROWS and in_features <= AUTO_CUDA_24_MAX_IN)
    if as_24 and few_rows and dtype in (torch.float16, torch.bfloat16) \
            and tuple(capability) >= (8, 0) and in_features % 16 == 0:
        return "2:4"
    return "bitmap"
