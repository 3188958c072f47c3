"""bitmap_pack and bitmap_unpack on CUDA: compositions of torch ops, no Triton.

They are one-time conversions (a model is packed once, unpacked to inspect it), so
plain torch ops are fast enough; the bits come from the ops' own CUDA kernels
(pack_mask / unpack_mask). Output is bit-identical to the CPU kernels
(csrc/cpu/bitmap.cpp): elements are copied through an integer view of their bits
(NaN payloads and -0.0 kept), and unpack rejects a set padding bit (a bit at a column
>= in_features, which pack_mask never sets) as the CPU kernel does.

The arguments are checked as the CPU op checks them, with the same messages:
the shared contract in ops.py, then the padding bits and the counts against row_ptr.
Those last checks read row_ptr on the host (one device sync), acceptable for a one-time
conversion; bitmap_linear (bitmap_linear.py) does not pay it.

Both functions are plain torch, so they run on CPU tensors too (the tests compare
them with the CPU ops there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import BITMAP_BLOCK_COLS as BLOCK_COLS
from ..ops import BITMAP_MAX_NNZ, _check_bitmap_format, _check_weight_and_mask

# The integer type of each weight dtype's bits: copies through it move bits, not values.
_BITS_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bitmap_pack_torch(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """multiflow::bitmap_pack from torch ops: ``(values, bits, row_ptr, block_ptr)``."""
    _check_weight_and_mask("multiflow::bitmap_pack", weight, mask)
    weight = weight.contiguous()
    mask = mask.contiguous()
    rows, cols = weight.shape
    values = weight.view(_BITS_OF[weight.dtype])[mask].view(weight.dtype)  # row-major order
    bits = torch.ops.multiflow.pack_mask(mask)
    # Kept weights per (row, 512-column block), the last block padded with False.
    blocks = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    padded = torch.zeros((rows, blocks * BLOCK_COLS), dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.view(torch.uint8)
    per_block = padded.view(rows, blocks, BLOCK_COLS).sum(2, dtype=torch.int64)
    # Kept before each block b >= 1 (block 0's offset, 0, is not stored).
    block_ptr = (per_block.cumsum(1) - per_block)[:, 1:].to(torch.int32)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=mask.device)
    row_ptr[1:] = per_block.sum(1).cumsum(0)
    torch._check(
        values.numel() <= BITMAP_MAX_NNZ,
        lambda: "multiflow::bitmap_pack: the bitmap format holds at most 2^31 - 1 kept weights (row_ptr is int32), "
        f"the mask keeps {values.numel()}",
    )
    return values, bits, row_ptr.to(torch.int32), block_ptr


def bitmap_unpack_torch(values: Tensor, bits: Tensor, row_ptr: Tensor, block_ptr: Tensor, in_features: int) -> Tensor:
    """multiflow::bitmap_unpack from torch ops: the dense (out_features, in_features) weight."""
    op = "multiflow::bitmap_unpack"
    _check_bitmap_format(op, values, bits, row_ptr, block_ptr, in_features)
    rows, words = bits.shape
    # Every bit of the words, padding included: a set padding bit is an error (below).
    keep = torch.ops.multiflow.unpack_mask(bits.contiguous(), words * 32)
    _check_counts(op, values, keep, row_ptr, in_features)
    dense = torch.zeros((rows, words * 32), dtype=values.dtype, device=values.device)
    int_type = _BITS_OF[values.dtype]
    dense.view(int_type)[keep] = values.contiguous().view(int_type)
    return dense[:, :in_features].contiguous()


def _check_counts(op: str, values: Tensor, keep: Tensor, row_ptr: Tensor, in_features: int) -> None:
    """row_ptr against values, then each row's padding bits and its kept count in the bits
    against row_ptr, with the CPU kernels' messages and in their order; one transfer to
    the host."""
    row_ptr = row_ptr.long()
    counts = keep.sum(1, dtype=torch.int64)
    padded = keep[:, in_features:].any(1)
    wrong = (row_ptr.diff() != counts) | padded
    # The first wrong row (argmax returns the first maximum), -1 when none.
    first = torch.where(wrong.any(), wrong.int().argmax(), -1) if wrong.numel() else row_ptr.new_tensor(-1)
    pad_first = padded[first.clamp(min=0)] if wrong.numel() else row_ptr.new_tensor(False)
    head, last, r, is_pad = torch.stack([row_ptr[0], row_ptr[-1], first, pad_first.long()]).tolist()
    torch._check(head == 0, lambda: f"{op}: row_ptr[0] must be 0, got {head}")
    torch._check(
        values.numel() == last,
        lambda: f"{op}: values must have row_ptr[-1] = {last} elements (the kept weights), got {values.numel()}",
    )
    torch._check(
        r < 0 or not is_pad,
        lambda: f"{op}: bits sets bits past in_features = {in_features} in row {r} "
        "(the last word's padding bits must be 0, as pack_mask leaves them)",
    )
    torch._check(
        r < 0,
        lambda: f"{op}: row_ptr does not match bits: row {r} has {int(counts[r])} kept weights in bits "
        f"but row_ptr[{r + 1}] - row_ptr[{r}] = {int(row_ptr[r + 1] - row_ptr[r])}",
    )
