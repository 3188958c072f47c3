"""multiflow::pack_mask / unpack_mask (1 bit per mask element in int32 words) against
their plain-torch twins, on CPU and, where there is a GPU, CUDA.

Packing is exact, so every comparison is torch.equal.
"""

from __future__ import annotations

import pytest
import torch
from _isa_harness import isas_of_this_cpu, results_at_thread_counts, run_with_isa

import multiflow_kernels  # noqa: F401  (registers the ops)
from multiflow_kernels import ops, reference

ROWS = [0, 1, 5]
COLS = [0, 1, 31, 32, 33, 63, 64, 65, 100, 1000]
KINDS = ["random", "all_true", "all_false", "sparse"]

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda_only])]


def make_mask(kind: str, shape: tuple[int, int], gen: torch.Generator, device="cpu") -> torch.Tensor:
    if kind == "random":
        return (torch.rand(shape, generator=gen) < 0.5).to(device)
    if kind == "sparse":  # mostly False: whole zero words next to lone bits
        return (torch.rand(shape, generator=gen) < 0.02).to(device)
    return torch.full(shape, kind == "all_true", dtype=torch.bool, device=device)


def random_words(rows: int, cols: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """Every bit pattern of int32, padding bits included (unpack must ignore them)."""
    words = (cols + 31) // 32
    return torch.randint(-(2**31), 2**31, (rows, words), generator=gen, dtype=torch.int64).to(torch.int32).to(device)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("rows", ROWS)
def test_pack_matches_reference_and_round_trips(rows, cols, kind, device):
    gen = torch.Generator().manual_seed(rows * 1009 + cols)
    mask = make_mask(kind, (rows, cols), gen, device)
    bits = ops.pack_mask(mask)
    assert bits.dtype == torch.int32 and bits.shape == (rows, (cols + 31) // 32) and bits.device == mask.device
    assert torch.equal(bits, reference.pack_mask(mask))
    back = ops.unpack_mask(bits, cols)
    assert back.dtype == torch.bool and back.shape == (rows, cols)
    assert torch.equal(back, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("rows", ROWS)
def test_unpack_matches_reference_and_ignores_padding_bits(rows, cols, device):
    gen = torch.Generator().manual_seed(rows * 7 + cols)
    bits = random_words(rows, cols, gen, device)
    got = ops.unpack_mask(bits, cols)
    assert torch.equal(got, reference.unpack_mask(bits, cols))
    # Packing again clears the padding bits and nothing else.
    repacked = ops.pack_mask(got)
    if cols % 32:
        keep = (1 << (cols % 32)) - 1
        expected_last = (bits[:, -1].to(torch.int64) & keep).to(torch.int32)
        assert torch.equal(repacked[:, -1], expected_last)
    assert torch.equal(repacked[:, : cols // 32], bits[:, : cols // 32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 20000), (2000, 100), (1, 100_000), (700, 8193)], ids=str)
def test_large_shapes_cross_tiles(shape, device):
    # Several column blocks (8192 columns) and row blocks, ragged at both ends.
    gen = torch.Generator().manual_seed(shape[0] + shape[1])
    mask = make_mask("random", shape, gen, device)
    bits = ops.pack_mask(mask)
    assert torch.equal(bits, reference.pack_mask(mask))
    assert torch.equal(ops.unpack_mask(bits, shape[1]), mask)


@pytest.mark.parametrize("device", DEVICES)
def test_bit_layout(device):
    # One bit at a time: column 32w + b sets bit b of word w, bit 31 is the sign bit.
    cols = 70
    for c in range(cols):
        mask = torch.zeros(2, cols, dtype=torch.bool, device=device)
        mask[1, c] = True
        bits = ops.pack_mask(mask).cpu()
        expected = torch.zeros(2, 3, dtype=torch.int32)
        expected[1, c // 32] = -(2**31) if c % 32 == 31 else 1 << (c % 32)
        assert torch.equal(bits, expected), f"column {c}"
    words = ops.pack_mask(torch.ones(1, 64, dtype=torch.bool, device=device)).cpu()
    assert words.tolist() == [[-1, -1]]
    assert ops.pack_mask(torch.ones(1, 33, dtype=torch.bool, device=device)).cpu().tolist() == [[-1, 1]]


@pytest.mark.parametrize("device", DEVICES)
def test_unpack_negative_words(device):
    bits = torch.tensor([[-(2**31), -1], [2**31 - 1, 0]], dtype=torch.int32, device=device)
    got = ops.unpack_mask(bits, 40).cpu()
    assert got[0, :31].sum() == 0 and got[0, 31] and got[0, 32:].all()
    assert got[1, :31].all() and not got[1, 31] and not got[1, 32:].any()


@pytest.mark.parametrize("device", DEVICES)
def test_bool_bytes_other_than_one_are_true(device):
    # A bool tensor made by viewing bytes can hold 2..255: packed as True.
    raw = torch.tensor([[0, 1, 2, 128, 255] * 14], dtype=torch.uint8, device=device)
    assert torch.equal(ops.pack_mask(raw.view(torch.bool)), reference.pack_mask(raw != 0))


# ----------------------------------------------------------------------------- layouts


def _mask_layouts(gen: torch.Generator, device="cpu"):
    """(name, mask) pairs of non-contiguous bool masks (made on `device`, then viewed)."""

    def rand(*shape):
        return (torch.rand(shape, generator=gen) < 0.5).to(device)

    base = rand(40, 2 * 70 + 3)
    yield "transposed", rand(70, 40).t()
    yield "column_stride_2", base[:, :140:2]
    yield "column_slice", base[:, 3 : 3 + 70]  # rows padded: read in place
    yield "row_slice", base[5:30:3, :70]
    yield "expanded_rows", rand(70).expand(11, 70)
    yield "expanded_cols", rand(9, 1).expand(9, 45)
    wide = rand(20, 8 * 64 + 1)
    yield "whole_word_rows_strided", wide[:, : 8 * 64]  # C % 32 == 0 but rows padded
    yield "whole_word_rows_unaligned", wide[:, 1 : 1 + 8 * 64]  # and not 16-byte aligned


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_mask(device):
    gen = torch.Generator().manual_seed(3)
    for name, mask in _mask_layouts(gen, device):
        assert not mask.is_contiguous(), name
        bits = ops.pack_mask(mask)
        assert torch.equal(bits, reference.pack_mask(mask.contiguous())), name
        assert torch.equal(ops.unpack_mask(bits, mask.shape[1]), mask), name


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_contiguous_views(device):
    # Contiguous rows of whole words, but starting 1..15 bytes past an alignment.
    gen = torch.Generator().manual_seed(12)
    flat = (torch.rand(64 * 96 + 16, generator=gen) < 0.5).to(device)
    for offset in (0, 1, 8, 15):
        mask = flat[offset : offset + 64 * 96].view(64, 96)
        assert torch.equal(ops.pack_mask(mask), reference.pack_mask(mask)), offset
        assert torch.equal(ops.pack_mask(mask[:1]), reference.pack_mask(mask[:1])), offset


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_bits(device):
    gen = torch.Generator().manual_seed(4)
    wide = random_words(12, 5 * 32, gen, device)
    for bits in (wide[:, 1:4], wide[::3, :3], random_words(3, 12 * 32, gen, device).t()):
        assert not bits.is_contiguous()
        cols = bits.shape[1] * 32 - 5
        assert torch.equal(ops.unpack_mask(bits, cols), reference.unpack_mask(bits, cols))


def test_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(9, 77, generator=gen) < 0.5
    bits = random_words(9, 77, gen)
    mask0, bits0 = mask.clone(), bits.clone()
    ops.pack_mask(mask)
    ops.unpack_mask(bits, 77)
    assert torch.equal(mask, mask0) and torch.equal(bits, bits0)


# ----------------------------------------------------------------------------- determinism and ISAs


def test_same_result_for_every_thread_count():
    gen = torch.Generator().manual_seed(6)
    mask = torch.rand(3000, 1111, generator=gen) < 0.5

    def pack_and_unpack():
        bits = ops.pack_mask(mask)
        return bits, ops.unpack_mask(bits, 1111)

    results = results_at_thread_counts(pack_and_unpack)
    for bits, back in results:
        assert torch.equal(bits, results[0][0]) and torch.equal(back, mask)


_ISA_SCRIPT = r"""
import sys, torch
import multiflow_kernels
from multiflow_kernels import ops
inputs = torch.load(sys.argv[1])
out = {"capability": torch.backends.cpu.get_cpu_capability(), "bits": [], "masks": []}
for mask, bits in zip(inputs["masks"], inputs["bits"]):
    out["bits"].append(ops.pack_mask(mask))
    out["masks"].append(ops.unpack_mask(bits, mask.shape[1]))
torch.save(out, sys.argv[2])
"""


@pytest.mark.parametrize("isa", isas_of_this_cpu())
def test_every_isa_path_matches_reference(isa, tmp_path):
    # The inner loops are compiled per ISA and picked from torch's CPU capability,
    # which ATEN_CPU_CAPABILITY overrides: run each path in its own process.
    gen = torch.Generator().manual_seed(11)
    shapes = [(5, c) for c in (1, 31, 32, 33, 63, 64, 65, 96, 100, 1000)] + [(3, 20000)]
    masks = [make_mask("random", s, gen) for s in shapes]
    bits = [random_words(r, c, gen) for r, c in shapes]
    got = run_with_isa(isa, _ISA_SCRIPT, {"masks": masks, "bits": bits}, tmp_path)
    for mask, b, got_bits, got_mask in zip(masks, bits, got["bits"], got["masks"]):
        assert torch.equal(got_bits, reference.pack_mask(mask)), tuple(mask.shape)
        assert torch.equal(got_mask, reference.unpack_mask(b, mask.shape[1])), tuple(mask.shape)


# ----------------------------------------------------------------------------- opcheck, compile, errors


def _opcheck_samples(device: str):
    gen = torch.Generator().manual_seed(8)
    for rows, cols in [(5, 33), (1, 1), (0, 40), (4, 0), (3, 64), (7, 1000)]:
        mask = make_mask("random", (rows, cols), gen, device)
        yield "pack", (mask,)
        yield "unpack", (random_words(rows, cols, gen, device), cols)
    yield "pack", ((torch.rand(40, 6, generator=gen) < 0.5).t().to(device),)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for which, args in _opcheck_samples(device):
        op = torch.ops.multiflow.pack_mask.default if which == "pack" else torch.ops.multiflow.unpack_mask.default
        torch.library.opcheck(op, args)


def test_compiles_with_torch_compile():
    def round_trip(scores):
        keep = scores > 0
        return ops.unpack_mask(ops.pack_mask(keep), keep.shape[1])

    gen = torch.Generator().manual_seed(9)
    scores = torch.randn(6, 45, generator=gen)
    got = torch.compile(round_trip, fullgraph=True, backend="aot_eager")(scores)
    assert torch.equal(got, scores > 0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.pack_mask(torch.ones(3, 8)), r"mask must be a bool tensor, got Float"),
        (lambda: ops.pack_mask(torch.ones(3, 8, dtype=torch.uint8)), r"mask must be a bool tensor, got Byte"),
        (lambda: ops.pack_mask(torch.ones(8, dtype=torch.bool)), r"mask must have shape \(R, C\), got a 1-d tensor"),
        (lambda: ops.pack_mask(torch.ones(2, 3, 8, dtype=torch.bool)), r"mask must have shape \(R, C\), got a 3-d"),
        (lambda: ops.unpack_mask(torch.zeros(3, 2, dtype=torch.int64), 40), r"bits must be an int32 tensor, got Long"),
        (lambda: ops.unpack_mask(torch.zeros(2, dtype=torch.int32), 40), r"bits must have shape \(R, W\), got a 1-d"),
        (lambda: ops.unpack_mask(torch.zeros(3, 1, dtype=torch.int32), 40), r"W = ceil\(cols / 32\) = 2 words per row"),
        (lambda: ops.unpack_mask(torch.zeros(3, 3, dtype=torch.int32), 64), r"W = ceil\(cols / 32\) = 2 words per row"),
        (lambda: ops.unpack_mask(torch.zeros(3, 1, dtype=torch.int32), 0), r"W = ceil\(cols / 32\) = 0 words per row"),
        (lambda: ops.unpack_mask(torch.zeros(3, 0, dtype=torch.int32), -1), r"cols must be >= 0, got -1"),
    ],
    ids=[
        "mask_float",
        "mask_uint8",
        "mask_1d",
        "mask_3d",
        "bits_int64",
        "bits_1d",
        "too_few_words",
        "too_many_words",
        "words_for_zero_cols",
        "negative_cols",
    ],
)
def test_errors_name_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ----------------------------------------------------------------------------- CUDA only


@pytest.mark.cuda
@cuda_only
def test_cuda_matches_cpu_and_is_deterministic():
    gen = torch.Generator().manual_seed(10)
    for shape in [(1, 1), (5, 33), (1000, 1000), (3, 100_001), (100_000, 7)]:
        mask = make_mask("random", shape, gen)
        bits = ops.pack_mask(mask.cuda())
        assert torch.equal(bits.cpu(), ops.pack_mask(mask)), shape
        assert torch.equal(bits, ops.pack_mask(mask.cuda())), shape
        words = random_words(*shape, gen)
        assert torch.equal(ops.unpack_mask(words.cuda(), shape[1]).cpu(), ops.unpack_mask(words, shape[1])), shape


@pytest.mark.cuda
@cuda_only
def test_cuda_writes_every_output_element():
    # Poison the caching allocator's next blocks: any element the kernels skip shows.
    for rows, cols in [(37, 1000), (5, 33)]:
        torch.cuda.synchronize()
        junk = torch.full((rows * cols + 4096,), 0x7F, dtype=torch.uint8, device="cuda")
        del junk
        mask = torch.zeros(rows, cols, dtype=torch.bool, device="cuda")
        assert int(ops.pack_mask(mask).abs().sum()) == 0
        assert not ops.unpack_mask(torch.zeros(rows, (cols + 31) // 32, dtype=torch.int32, device="cuda"), cols).any()
