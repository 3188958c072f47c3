"""bitmap_pack / bitmap_unpack's CUDA implementation (triton/bitmap_format.py:
compositions of torch ops) against the CPU ops.

The compositions are plain torch, so they run here on CPU tensors (or on CUDA where
there is a GPU) and must match the CPU kernels bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import multiflow_kernels  # noqa: F401  (registers the ops)
from multiflow_kernels import ops
from multiflow_kernels.triton import bitmap_format

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_weight(n_out, n_in, dtype, sparsity=0.75, seed=0):
    """Fresh random weight and mask at the given sparsity; strictly between 0 and 1,
    row 0 is all pruned and the last row all kept (where there are 3+ rows)."""
    gen = torch.Generator().manual_seed(seed * 7919 + n_in * 101 + n_out * 13)
    w = torch.randn(n_out, n_in, generator=gen).to(dtype)
    mask = torch.rand(n_out, n_in, generator=gen) >= sparsity
    if 0 < sparsity < 1 and n_out >= 3:
        mask[0] = False
        mask[-1] = True
    return w, mask


def on_device(*ts):
    return [t.to(DEVICE) if t is not None else None for t in ts]


# ----------------------------------------------------------------------------- bitmap_pack / bitmap_unpack (torch)


def assert_same_bits(got, want, what):
    """Equal dtypes, shapes and bits (NaN payloads and -0.0 included)."""
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {tuple(got.shape)} vs {want.dtype} {tuple(want.shape)}"
    if got.is_floating_point():
        as_int = torch.int16 if got.element_size() == 2 else torch.int32
        got, want = got.view(as_int), want.view(as_int)
    assert torch.equal(got, want), what


def pack_torch(w, mask):
    return bitmap_format.bitmap_pack_torch(*on_device(w, mask))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_unpack_match_the_cpu_ops(dtype):
    shapes = [(1, 1), (3, 31), (7, 33), (5, 513), (4, 1100), (0, 5), (3, 0), (0, 0)]
    for (n_out, n_in), sparsity in zip(shapes * 3, [0.0] * len(shapes) + [0.75] * len(shapes) + [1.0] * len(shapes)):
        w, mask = make_weight(n_out, n_in, dtype, sparsity)
        want = ops.bitmap_pack(w, mask)
        got = pack_torch(w, mask)
        for name, g, r in zip(("values", "bits", "row_ptr", "block_ptr"), got, want):
            assert_same_bits(g.cpu(), r, f"{name} of {(n_out, n_in)} at sparsity {sparsity}")
        dense = bitmap_format.bitmap_unpack_torch(*got, n_in).cpu()
        assert_same_bits(dense, ops.bitmap_unpack(*want, n_in), f"unpack of {(n_out, n_in)} at sparsity {sparsity}")


def test_pack_unpack_keep_bits_of_special_values():
    w = torch.tensor([[-0.0, float("nan"), float("inf"), 1.0]] * 2)
    w[1, 1] = torch.tensor(0x7FC01234, dtype=torch.int32).view(torch.float32)  # a NaN with a payload
    mask = torch.tensor([[True, True, True, False], [False, True, False, True]])
    got = pack_torch(w, mask)
    want = ops.bitmap_pack(w, mask)
    for g, r in zip(got, want):
        assert_same_bits(g.cpu(), r, "special values")
    assert_same_bits(bitmap_format.bitmap_unpack_torch(*got, 4).cpu(), ops.bitmap_unpack(*want, 4), "special values")


def test_unpack_skips_values_of_padding_bits_as_the_cpu_op():
    # Bits past in_features (never set by pack_mask) still own a value, dropped by unpack.
    w, mask = make_weight(3, 40, torch.float32, seed=5)
    values, bits, row_ptr, block_ptr = ops.bitmap_pack(w, mask)
    bits = bits.clone()
    bits[1, 1] |= 1 << 20  # column 52 of row 1
    row_ptr = row_ptr.clone()
    row_ptr[2:] += 1
    at = int(row_ptr[2]) - 1  # the padding bit's value: last of row 1
    values = torch.cat([values[:at], torch.tensor([123.0]), values[at:]])
    fmt = (values, bits, row_ptr, block_ptr)
    want = ops.bitmap_unpack(*fmt, 40)
    assert torch.equal(want, torch.where(mask, w, 0.0))
    assert torch.equal(bitmap_format.bitmap_unpack_torch(*on_device(*fmt), 40).cpu(), want)


def test_pack_unpack_bad_inputs_as_the_cpu_ops():
    w, mask = make_weight(5, 40, torch.float32)
    values, bits, row_ptr, block_ptr = ops.bitmap_pack(w, mask)
    pack_cases = [
        ((w.double(), mask), "weight must be float32, float16 or bfloat16"),
        ((w[0], mask[0]), "weight must have shape"),
        ((w, mask.int()), "mask must be a bool"),
        ((w, mask[:4]), "mask must have weight's shape"),
        ((w, mask.to("meta")), "mask is on meta but weight is on cpu"),
    ]
    for args, message in pack_cases:
        with pytest.raises(RuntimeError, match=message):
            bitmap_format.bitmap_pack_torch(*args)
        with pytest.raises(RuntimeError, match=message):
            ops.bitmap_pack(*args)
    shifted = row_ptr.clone()
    shifted[1] += 1
    shifted[2:] += 1
    nonzero_head = row_ptr + 1
    unpack_cases = [
        ((values.double(), bits, row_ptr, block_ptr, 40), "values must be float32"),
        ((values, bits[:, :1], row_ptr, block_ptr, 40), "bits must have shape"),
        ((values, bits, row_ptr[:-1], block_ptr, 40), "row_ptr must have shape"),
        ((values, bits, row_ptr, block_ptr.long(), 40), "block_ptr must be an int32"),
        ((values, bits, row_ptr, block_ptr, -1), "in_features must be >= 0"),
        ((values, bits, nonzero_head, block_ptr, 40), "row_ptr\\[0\\] must be 0, got 1"),
        ((values[:-1], bits, row_ptr, block_ptr, 40), "values must have row_ptr\\[-1\\]"),
        ((torch.cat([values, values[:1]]), bits, shifted, block_ptr, 40), "row_ptr does not match bits: row 0 has"),
    ]
    for args, message in unpack_cases:
        with pytest.raises(RuntimeError, match=message):
            bitmap_format.bitmap_unpack_torch(*args)
        with pytest.raises(RuntimeError, match=message):
            ops.bitmap_unpack(*args)
