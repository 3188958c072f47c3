"""multiflow::sparse24_pack / sparse24_unpack / sparse24_linear on CPU against plain torch.

pack and unpack move bits, so they must match the references exactly: the vectorised
torch twin (reference.sparse24_pack) and a pure-Python packer that builds the metadata
words bit by bit (reference.sparse24_pack_python), which checks the layout itself.
sparse24_linear's tolerance is earned (tests/_earned.py): the exact result is the dense
masked expression in float64; the kernel's error must be within a small multiple of plain
torch's error in the test dtype (F.linear on the dense masked weight), plus a few units of
rounding of the output dtype relative to sum |x| |w|.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from _earned import assert_linear_earned
from _guard_pages import run_guarded
from _isa_harness import isas_of_this_cpu, results_at_thread_counts, run_with_isa

import multiflow_kernels  # noqa: F401  (registers the ops)
from multiflow_kernels import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IN_FEATURES = [4, 12, 20, 36, 100]  # multiples of 4, not of 16: every row ends in a partial word
OUT_FEATURES = [1, 3, 17]
LEADING = [(), (1,), (2, 3), (0,)]
KINDS = ["nm", "sparser", "all_pruned"]


def make_weight(n_out, n_in, dtype, seed=0, kind="nm"):
    """Fresh random weight and 2:4 mask. kind="nm": nm_mask of random scores (2 of every
    4); "sparser": that mask thinned at random (0, 1 or 2 per chunk), with row 0 all
    pruned where there are 2+ rows; "all_pruned": nothing kept."""
    gen = torch.Generator().manual_seed(seed * 7919 + n_in * 101 + n_out * 13)
    w = torch.randn(n_out, n_in, generator=gen).to(dtype)
    if kind == "all_pruned" or n_in == 0:
        return w, torch.zeros(n_out, n_in, dtype=torch.bool)
    mask = ops.nm_mask(torch.rand(n_out, n_in, generator=gen), 2, 4)
    if kind == "sparser":
        mask &= torch.rand(n_out, n_in, generator=gen) < 0.6
        if n_out >= 2:
            mask[0] = False
    return w, mask


def as_bits(t):
    """t's elements as integers of its size: compares NaN payloads and -0.0 exactly."""
    return t.view(torch.int32 if t.dtype.itemsize == 4 else torch.int16)


def masked(w, mask):
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype))


def assert_same_pack(got, want, what):
    for name, g, r in zip(("values", "metadata"), got, want):
        assert g.dtype == r.dtype, f"{what}: {name} dtype"
        assert g.shape == r.shape, f"{what}: {name} shape"
        assert torch.equal(as_bits(g), as_bits(r)), f"{what}: {name}"


# ----------------------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_out", OUT_FEATURES)
@pytest.mark.parametrize("n_in", IN_FEATURES)
def test_pack_matches_python_packer_and_round_trips(n_in, n_out, dtype, kind):
    w, mask = make_weight(n_out, n_in, dtype, kind=kind)
    got = ops.sparse24_pack(w, mask)
    assert got[0].shape == (n_out, n_in // 2) and got[1].shape == (n_out, (n_in + 15) // 16)
    assert_same_pack(got, reference.sparse24_pack_python(w, mask), "python packer")
    assert_same_pack(got, reference.sparse24_pack(w, mask), "torch reference")
    dense = ops.sparse24_unpack(*got)
    assert dense.dtype == dtype
    assert torch.equal(as_bits(dense), as_bits(masked(w, mask)))
    assert torch.equal(as_bits(reference.sparse24_unpack(*got)), as_bits(masked(w, mask)))


def test_layout_by_hand():
    """Fillers at the lowest unused positions, values in column order, the sign bit of the
    int16 word, and the zero padding chunks of a row's last word."""
    w = torch.arange(1.0, 25.0).reshape(1, 24)
    keep = [
        [2],  # chunk 0: value at 2, filler at 0 -> positions (0, 2), values (0, w2)
        [],  # chunk 1: two fillers -> (0, 1), values (0, 0)
        [0],  # chunk 2: (0, 1), values (w8, 0)
        [3, 1],  # chunk 3: (1, 3), values (w13, w15)
        [2, 3],  # chunk 4: (2, 3), in the next word
        [1],  # chunk 5: (0, 1), values (0, w21)
    ]
    mask = torch.zeros(1, 24, dtype=torch.bool)
    for q, positions in enumerate(keep):
        for p in positions:
            mask[0, 4 * q + p] = True
    values, metadata = ops.sparse24_pack(w, mask)
    assert values.tolist() == [[0.0, 3.0, 0.0, 0.0, 9.0, 0.0, 14.0, 16.0, 19.0, 20.0, 0.0, 22.0]]
    codes = [0 | 2 << 2, 0 | 1 << 2, 0 | 1 << 2, 1 | 3 << 2, 2 | 3 << 2, 0 | 1 << 2]
    word0 = codes[0] | codes[1] << 4 | codes[2] << 8 | codes[3] << 12  # 0xD448: the sign bit is set
    word1 = codes[4] | codes[5] << 4  # padding chunks 6 and 7 are 0
    assert metadata.tolist() == [[word0 - 2**16, word1]]
    assert_same_pack((values, metadata), reference.sparse24_pack_python(w, mask), "python packer")


def test_pack_keeps_bits_of_special_values():
    nan_payload = torch.tensor([0x7FC01234], dtype=torch.int32).view(torch.float32).item()
    w = torch.tensor([[-0.0, nan_payload, float("inf"), 1.0, 2.0, float("-inf"), -0.0, 3.0]])
    mask = torch.tensor([[True, True, False, False, False, True, True, False]])
    values, metadata = ops.sparse24_pack(w, mask)
    assert torch.equal(as_bits(values), as_bits(torch.tensor([[-0.0, nan_payload, float("-inf"), -0.0]])))
    dense = ops.sparse24_unpack(values, metadata)
    assert torch.equal(as_bits(dense), as_bits(masked(w, mask)))
    for dtype in (torch.float16, torch.bfloat16):
        wd = w.to(dtype)
        got = ops.sparse24_pack(wd, mask)
        assert_same_pack(got, reference.sparse24_pack_python(wd, mask), f"python packer {dtype}")
        assert torch.equal(as_bits(ops.sparse24_unpack(*got)), as_bits(masked(wd, mask)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nm_mask_of_magnitudes_packs(dtype):
    """The masks a user makes (N:M selection on |W|) pack, keep exactly the chosen weights,
    and name two distinct increasing positions per chunk."""
    w = torch.randn(33, 260).to(dtype)
    mask = ops.nm_mask(w.abs(), 2, 4)
    values, metadata = ops.sparse24_pack(w, mask)
    assert torch.equal(ops.sparse24_unpack(values, metadata), masked(w, mask))
    positions = reference.sparse24_positions(metadata, 260)
    assert bool((positions[..., 0] < positions[..., 1]).all())
    assert torch.equal(values, w.reshape(33, 65, 4).gather(-1, positions).reshape(33, 130))


def test_pack_reads_mask_bytes_other_than_one_as_true():
    """A bool tensor whose bytes are not 0 / 1 (bytes viewed as bool) packs as the mask torch
    sees: not a chunk code out of range (wrong weights, reads past the table)."""
    w = torch.arange(1.0, 17.0).reshape(2, 8)
    raw = torch.tensor([[1, 2, 0, 0, 0, 0, 3, 255], [0, 7, 0, 9, 1, 0, 0, 0]], dtype=torch.uint8)
    mask = raw.view(torch.bool)
    clean = raw != 0
    values, meta = ops.sparse24_pack(w, mask)
    assert torch.equal(values, ops.sparse24_pack(w, clean)[0]) and torch.equal(meta, ops.sparse24_pack(w, clean)[1])
    assert torch.equal(ops.sparse24_unpack(values, meta), w * clean)
    bad = torch.tensor([[3, 0, 1, 2, 0, 0, 0, 0]], dtype=torch.uint8).view(torch.bool)
    with pytest.raises(ValueError, match=r"row 0 keeps 3 of columns 0\.\.3"):
        ops.sparse24_pack(w[:1], bad)


def test_empty_shapes():
    for n_out, n_in in [(0, 8), (3, 0), (0, 0)]:
        w, mask = make_weight(n_out, n_in, torch.float32)
        got = ops.sparse24_pack(w, mask)
        assert_same_pack(got, reference.sparse24_pack(w, mask), f"({n_out}, {n_in})")
        assert ops.sparse24_unpack(*got).shape == (n_out, n_in)
        x = torch.randn(2, n_in)
        assert torch.equal(ops.sparse24_linear(x, *got), torch.zeros(2, n_out))
        b = torch.randn(n_out)
        assert torch.equal(ops.sparse24_linear(x, *got, b), b.expand(2, n_out))


def test_non_contiguous_inputs():
    w = torch.randn(72, 9).T  # (9, 72), column-major
    mask = ops.nm_mask(torch.rand(9, 72), 2, 4).T.contiguous().T  # (9, 72), column-major
    got = ops.sparse24_pack(w, mask)
    assert_same_pack(got, ops.sparse24_pack(w.contiguous(), mask.contiguous()), "strided pack")
    values, metadata = got
    x = torch.randn(72, 5).T
    want = ops.sparse24_linear(x.contiguous(), values, metadata)
    assert torch.equal(ops.sparse24_linear(x, values.T.contiguous().T, metadata.T.contiguous().T), want)
    assert torch.equal(ops.sparse24_unpack(values.T.contiguous().T, metadata), ops.sparse24_unpack(values, metadata))


# ----------------------------------------------------------------------------- linear


def check_linear(x, w, mask, b, what="y"):
    fmt = ops.sparse24_pack(w, mask)
    y = ops.sparse24_linear(x, *fmt, b)
    assert_linear_earned(y, x, masked(w, mask), b, what)
    assert_linear_earned(reference.sparse24_linear(x, *fmt, b), x, masked(w, mask), b, "reference " + what)
    return y


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("n_out", OUT_FEATURES)
@pytest.mark.parametrize("n_in", IN_FEATURES)
def test_linear_matches_dense_masked_linear(n_in, n_out, leading, dtype, with_bias):
    w, mask = make_weight(n_out, n_in, dtype, seed=1, kind="sparser")
    gen = torch.Generator().manual_seed(n_in + 31 * n_out)
    x = torch.randn(*leading, n_in, generator=gen).to(dtype)
    b = torch.randn(n_out, generator=gen).to(dtype) if with_bias else None
    y = check_linear(x, w, mask, b)
    assert y.shape == (*leading, n_out)
    if n_out >= 2:  # row 0 is all pruned: exactly the bias (or 0)
        expect = b[0] if b is not None else torch.zeros((), dtype=dtype)
        assert torch.equal(y[..., 0], expect.expand(y[..., 0].shape))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 16, 17, 33, 70])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_many_tokens_and_rows(m, dtype):
    """Several parallel row blocks (37 rows: an odd one out of the 2-row register blocks),
    every x-block remainder, full words and a partial last word (1300 = 81 * 16 + 4)."""
    w, mask = make_weight(37, 1300, dtype, seed=3)
    x = torch.randn(m, 1300).to(dtype)
    check_linear(x, w, mask, torch.randn(37).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_multiplies_only_named_positions(dtype):
    """As the sparse tensor cores do: a non-finite x reaches exactly the rows that name its
    column (a filler position is named, with value 0, and 0 * inf is NaN), not the rows
    that prune it; a kept NaN weight makes its row NaN."""
    w, mask = make_weight(6, 48, dtype, seed=5, kind="sparser")
    x = torch.randn(3, 48).to(dtype)
    x[1, 7] = float("inf")
    w[2, 0] = float("nan")
    mask[2, :4] = torch.tensor([True, False, False, False])
    values, metadata = ops.sparse24_pack(w, mask)
    y = ops.sparse24_linear(x, values, metadata)
    columns = reference.sparse24_positions(metadata, 48) + 4 * torch.arange(12)[:, None]  # (6, 12, 2)
    names_7 = (columns == 7).flatten(1).any(1)
    assert 0 < int(names_7.sum()) < 6  # some rows name column 7, some do not
    expect = torch.zeros(3, 6, dtype=torch.bool)
    expect[1] = names_7
    expect[:, 2] = True
    assert torch.equal(~y.isfinite(), expect)


# ----------------------------------------------------------------------------- opcheck, compile, errors, determinism


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    w, mask = make_weight(7, 100, dtype, seed=4, kind="sparser")
    torch.library.opcheck(torch.ops.multiflow.sparse24_pack.default, (w, mask))
    fmt = ops.sparse24_pack(w, mask)
    torch.library.opcheck(torch.ops.multiflow.sparse24_unpack.default, fmt)
    x = torch.randn(2, 3, 100).to(dtype)
    for b in (None, torch.randn(7).to(dtype)):
        torch.library.opcheck(torch.ops.multiflow.sparse24_linear.default, (x, *fmt, b))


def test_compiles_with_torch_compile():
    def sparse_layer(x, w, scores, b):
        values, metadata = ops.sparse24_pack(w, ops.nm_mask(scores, 2, 4))
        return ops.sparse24_linear(x, values, metadata, b)

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 36, generator=gen)
    w = torch.randn(11, 36, generator=gen)
    scores = torch.rand(11, 36, generator=gen)
    b = torch.randn(11, generator=gen)
    got = torch.compile(sparse_layer, fullgraph=True, backend="aot_eager")(x, w, scores, b)
    assert torch.equal(got, sparse_layer(x, w, scores, b))


def test_not_2_4_mask_names_the_rows():
    w = torch.randn(20, 16)
    mask = ops.nm_mask(torch.rand(20, 16), 2, 4)
    mask[3, 4:8] = torch.tensor([True, True, True, False])
    mask[11, 12:16] = True
    message = r"mask is not 2:4: rows \[3, 11\] keep more than 2 of 4 consecutive weights"
    with pytest.raises(ValueError, match=message + r" \(2 rows in total; row 3 keeps 3 of columns 4\.\.7\)"):
        ops.sparse24_pack(w, mask)
    mask[:, :4] = True  # every row: the message names the first 8 and counts them all
    message = r"rows \[0, 1, 2, 3, 4, 5, 6, 7, \.\.\.\] keep .* \(20 rows in total; row 0 keeps 4 of columns 0\.\.3\)"
    with pytest.raises(ValueError, match=message):
        ops.sparse24_pack(w, mask)
    for pack in (reference.sparse24_pack, reference.sparse24_pack_python):
        with pytest.raises(ValueError, match=r"mask is not 2:4: rows \[0, 1, 2, 3, 4, 5, 6, 7\]"):
            pack(w, mask)


def test_bad_inputs_name_the_argument():
    w, mask = make_weight(5, 40, torch.float32, kind="sparser")
    values, metadata = ops.sparse24_pack(w, mask)
    x = torch.randn(3, 40)
    b = torch.randn(5)
    pack_cases = [
        ((w.double(), mask), "weight must be float32, float16 or bfloat16, got Double"),
        ((w[0], mask[0]), "weight must have shape"),
        ((w[:, :38], mask[:, :38]), "in_features must be a multiple of 4 for the 2:4 format, got 38"),
        ((w, mask.int()), "mask must be a bool"),
        ((w, mask[:4]), "mask must have weight's shape"),
    ]
    for args, message in pack_cases:
        with pytest.raises(RuntimeError, match=message):
            ops.sparse24_pack(*args)
    format_cases = [
        ((values.double(), metadata), "values must be float32, float16 or bfloat16, got Double"),
        ((values[0], metadata), r"values must have shape \(out_features, in_features / 2\)"),
        ((values[:, :19], metadata), "in_features must be a multiple of 4 for the 2:4 format, got 38"),
        ((values, metadata.int()), "metadata must be an int16 tensor"),
        ((values, metadata[:, :2]), r"metadata must have shape \(out_features, ceil\(in_features / 16\)\) = \(5, 3\)"),
        ((values, metadata[:4]), r"metadata must have shape .* = \(5, 3\)"),
        ((values, metadata[0]), r"metadata must have shape .* = \(5, 3\)"),
    ]
    for args, message in format_cases:
        with pytest.raises(RuntimeError, match=message):
            ops.sparse24_unpack(*args)
        with pytest.raises(RuntimeError, match=message):
            ops.sparse24_linear(x, *args, None)
    linear_cases = [
        ((x.half(), values, metadata, b), "x must have values' dtype Float, got Half"),
        ((x.half(), values.half(), metadata, b), "bias must have x's dtype Half, got Float"),
        ((x[:, :36], values, metadata, b), "in_features mismatch: x.shape\\[-1\\] = 36 but in_features = 40"),
        ((x[0, 0], values, metadata, b), "x must have shape \\(..., in_features\\), got a 0-d tensor"),
        ((x, values, metadata, b[:3]), r"bias must have shape \(out_features,\) = \(5,\)"),
        ((x, values, metadata, b.half()), "bias must have x's dtype Float, got Half"),
    ]
    for args, message in linear_cases:
        with pytest.raises(RuntimeError, match=message):
            ops.sparse24_linear(*args)


def test_fake_kernels_check_like_the_kernels():
    """The meta (fake) kernels state the same contract: shapes, and the same errors."""
    w, mask = make_weight(5, 40, torch.float32)
    meta = torch.device("meta")
    values, metadata = ops.sparse24_pack(w.to(meta), mask.to(meta))
    assert values.shape == (5, 20) and metadata.shape == (5, 3) and metadata.dtype == torch.int16
    assert ops.sparse24_unpack(values, metadata).shape == (5, 40)
    assert ops.sparse24_linear(torch.empty(2, 3, 40, device=meta), values, metadata).shape == (2, 3, 5)
    with pytest.raises(RuntimeError, match="in_features must be a multiple of 4 for the 2:4 format, got 38"):
        ops.sparse24_pack(w[:, :38].to(meta), mask[:, :38].to(meta))
    with pytest.raises(RuntimeError, match="metadata must have shape"):
        ops.sparse24_unpack(values, metadata[:, :2])
    with pytest.raises(RuntimeError, match="in_features mismatch"):
        ops.sparse24_linear(torch.empty(2, 36, device=meta), values, metadata)


def test_same_result_at_any_thread_count():
    w, mask = make_weight(300, 1100, torch.float32, seed=2, kind="sparser")
    x = torch.randn(37, 1100)
    b = torch.randn(300)

    def run():
        fmt = ops.sparse24_pack(w, mask)
        return fmt, ops.sparse24_unpack(*fmt), ops.sparse24_linear(x, *fmt, b)

    first, *rest = results_at_thread_counts(run, (1, 2, 1))
    for other in rest:
        for a, c in zip(first[0], other[0]):
            assert torch.equal(a, c)
        assert torch.equal(first[1], other[1])
        assert torch.equal(first[2], other[2])


ISA_SCRIPT = """
import sys, torch
import multiflow_kernels
from multiflow_kernels import ops
w, mask, x, b = torch.load(sys.argv[1])
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for name in ("f32", "f16", "bf16"):
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]
    fmt = ops.sparse24_pack(w.to(dtype), mask)
    ys = [ops.sparse24_linear(x[:m].to(dtype), *fmt, b.to(dtype)) for m in (1, 3, 5, 9)]
    out[name] = (fmt, ops.sparse24_unpack(*fmt), ys)
torch.save(out, sys.argv[2])
"""


@pytest.mark.parametrize("isa", isas_of_this_cpu())
def test_every_isa_path(isa, tmp_path):
    w, mask = make_weight(71, 1060, torch.float32, seed=6, kind="sparser")  # 1060 = 66 * 16 + 4
    x = torch.randn(9, 1060)
    b = torch.randn(71)
    got = run_with_isa(isa, ISA_SCRIPT, (w, mask, x, b), tmp_path)
    for name, dtype in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
        wd, xd, bd = w.to(dtype), x.to(dtype), b.to(dtype)
        fmt, dense, ys = got[name]
        assert_same_pack(fmt, reference.sparse24_pack(wd, mask), f"{name} pack ({isa})")
        wm = masked(wd, mask)
        assert torch.equal(dense, wm), f"{name} unpack ({isa})"
        for m, y in zip((1, 3, 5, 9), ys):
            assert_linear_earned(y, xd[:m], wm, bd, f"{name} y, M = {m} ({isa})")


# ----------------------------------------------------------------------------- every code, special values, guard pages

# The vector steps are 16 (AVX2) or 32 (AVX-512) columns: every scalar remainder length
# (cols % 32 in 4, 8, ..., 28) and a few whole steps.
AWKWARD_COLS = [4, 8, 12, 16, 20, 24, 28, 36, 56, 100, 772]


def random_bits(shape, dtype, gen):
    """A tensor of dtype whose elements are uniformly random bit patterns (NaNs with payloads,
    subnormals, -0.0 and infinities included)."""
    bits = torch.randint(-(2**31), 2**31, shape, generator=gen, dtype=torch.int64)
    return bits.to(as_bits(torch.empty(0, dtype=dtype)).dtype).view(dtype)


def sparse24_words(cols):
    return (cols + 15) // 16


def every_code_metadata(rows, cols, gen):
    """int16 metadata in which chunk q of row r has code (r + 5 q) % 16, so with 16 rows every
    chunk of the row, in every nibble of a word and every step of a kernel, meets all 16 codes
    (lo == hi and lo > hi included). The padding chunks of the last word get random bits."""
    chunks = 4 * sparse24_words(cols)
    codes = (torch.arange(rows)[:, None] + 5 * torch.arange(chunks)[None, :]) % 16
    codes[:, cols // 4 :] = torch.randint(0, 16, (rows, chunks - cols // 4), generator=gen)
    words = (codes.reshape(rows, -1, 4) << torch.tensor([0, 4, 8, 12])).sum(-1)
    return (words - (words >= 2**15).long() * 2**16).to(torch.int16)


def unpack_last_write_wins(values, metadata):
    """unpack's contract for any metadata, in plain torch: zeros, then each chunk's first value
    at its first position, then its second value at its second position (which wins when the
    two are equal). Two scatters, each with one index per chunk, so the order is defined
    (reference.sparse24_unpack scatters both values at once: with equal positions torch leaves
    the winner undefined)."""
    rows, cols = values.shape[0], 2 * values.shape[1]
    bits = as_bits(values).reshape(rows, cols // 4, 2)
    positions = reference.sparse24_positions(metadata, cols)
    dense = torch.zeros(rows, cols // 4, 4, dtype=bits.dtype)
    dense.scatter_(-1, positions[..., :1], bits[..., :1])
    dense.scatter_(-1, positions[..., 1:], bits[..., 1:])
    return dense.reshape(rows, cols).view(values.dtype)


def test_unpack_last_write_wins_by_hand():
    """The twin above against a row written out: codes 0b0000 (both at 0), 0b0111 (3, 1) and
    0b1111 (both at 3)."""
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    metadata = torch.tensor([[0b0000 | 0b0111 << 4 | 0b1111 << 8]], dtype=torch.int16)
    want = [[2.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0, 3.0, 0.0, 0.0, 0.0, 6.0]]
    assert unpack_last_write_wins(values, metadata).tolist() == want
    assert ops.sparse24_unpack(values, metadata).tolist() == want


def special_values_weight(rows, cols, dtype, gen):
    """A weight of the values whose bits a conversion could lose: NaNs with payloads (quiet
    and signalling, both signs), -0.0, infinities, subnormals, the largest finite, at random
    places among random ones."""
    if dtype == torch.float32:
        specials = [0x7FC01234, 0xFFC00001, 0x7F800001, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001,
                    0x807FFFFF, 0x7F7FFFFF]
    elif dtype == torch.float16:
        specials = [0x7E12, 0xFE01, 0x7C01, 0x8000, 0x7C00, 0xFC00, 0x0001, 0x83FF, 0x7BFF]
    else:
        specials = [0x7FC1, 0xFFC1, 0x7F81, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x807F, 0x7F7F]
    int_dtype = as_bits(torch.empty(0, dtype=dtype)).dtype
    table = torch.tensor(specials, dtype=torch.int64)
    table = (table - (table >= 2 ** (8 * dtype.itemsize - 1)).long() * 2 ** (8 * dtype.itemsize)).to(int_dtype)
    w = as_bits(torch.randn(rows, cols, generator=gen).to(dtype)).clone()
    pick = torch.rand(rows, cols, generator=gen) < 0.5
    w[pick] = table[torch.randint(0, len(specials), (int(pick.sum()),), generator=gen)]
    return w.view(dtype)


EVERY_CODE_SCRIPT = """
import sys, torch
import multiflow_kernels
from multiflow_kernels import ops
unpack_cases, pack_cases = torch.load(sys.argv[1])
out = {"capability": torch.backends.cpu.get_cpu_capability()}
out["unpack"] = [ops.sparse24_unpack(values, metadata) for values, metadata in unpack_cases]
out["pack"] = []
for w, mask in pack_cases:
    fmt = ops.sparse24_pack(w, mask)
    out["pack"].append((fmt, ops.sparse24_unpack(*fmt)))
torch.save(out, sys.argv[2])
"""


@pytest.mark.parametrize("isa", isas_of_this_cpu())
def test_every_code_and_special_values_on_every_isa_path(isa, tmp_path):
    """unpack of metadata holding all 16 codes in every chunk (invalid ones included: the
    vector paths must write what the scalar loop writes), and pack / unpack round trips of
    weights full of special values, in every dtype and on every ISA path, to the bit."""
    gen = torch.Generator().manual_seed(11)
    unpack_cases, pack_cases = [], []
    for dtype in DTYPES:
        for cols in AWKWARD_COLS + [64, 1056]:
            unpack_cases.append((random_bits((16, cols // 2), dtype, gen), every_code_metadata(16, cols, gen)))
            w = special_values_weight(5, cols, dtype, gen)
            mask = ops.nm_mask(torch.rand(5, cols, generator=gen), 2, 4) & (torch.rand(5, cols, generator=gen) < 0.8)
            pack_cases.append((w, mask))
    got = run_with_isa(isa, EVERY_CODE_SCRIPT, (unpack_cases, pack_cases), tmp_path)
    for (values, metadata), dense in zip(unpack_cases, got["unpack"]):
        what = f"unpack {values.dtype} cols={2 * values.shape[1]} ({isa})"
        assert dense.dtype == values.dtype, what
        assert torch.equal(as_bits(dense), as_bits(unpack_last_write_wins(values, metadata))), what
    for (w, mask), (fmt, dense) in zip(pack_cases, got["pack"]):
        what = f"{w.dtype} cols={w.shape[1]} ({isa})"
        assert_same_pack(fmt, reference.sparse24_pack_python(w, mask), "pack " + what)
        assert torch.equal(as_bits(dense), as_bits(masked(w, mask))), "round trip " + what


GUARD_SCRIPT = r"""
import torch
import multiflow_kernels  # noqa: F401
from multiflow_kernels import ops
from _guard_pages import at_page_end

g = torch.Generator().manual_seed(0)
n = 0
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for cols in (4, 12, 20, 28, 32, 36, 48, 64, 100, 772):
        for rows in (1, 5):
            w = torch.randn(rows, cols, generator=g).to(dtype)
            mask = ops.nm_mask(torch.rand(rows, cols, generator=g), 2, 4)
            want = ops.sparse24_pack(w.clone(), mask.clone())
            got = ops.sparse24_pack(at_page_end(w), at_page_end(mask))
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (dtype, cols, rows)
            dense = ops.sparse24_unpack(at_page_end(want[0]), at_page_end(want[1]))
            assert torch.equal(dense, torch.where(mask, w, torch.zeros((), dtype=dtype))), (dtype, cols, rows)
            bad = mask.clone()
            bad[-1, -4:] = True  # the last chunk of the last row keeps 4: the error path reads it too
            try:
                ops.sparse24_pack(at_page_end(w), at_page_end(bad))
            except ValueError as e:
                assert f"row {rows - 1} keeps 4 of columns {cols - 4}..{cols - 1}" in str(e), e
            else:
                raise AssertionError("a mask that is not 2:4 was packed")
            n += 1
print("ok", n, torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="mmap + mprotect guard pages: Linux only")
@pytest.mark.parametrize("isa", isas_of_this_cpu())
def test_loads_never_leave_the_tensors(isa):
    """pack's weight and mask, unpack's values and metadata each end right before a page with
    no access (cols not a multiple of the 16 / 32 columns of a vector step, and multiples too):
    any load past one of them kills the process (run apart, so a crash fails this test only)."""
    run_guarded(GUARD_SCRIPT, isa)
