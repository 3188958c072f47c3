"""multiflow::bitmap_pack / bitmap_unpack / bitmap_linear on CPU against plain torch.

pack and unpack move bits, so they must match the reference exactly. bitmap_linear's
tolerance is earned: the exact result is the dense masked expression in float64; the
kernel's error must be within a small multiple of plain torch's error in the test dtype
(F.linear on the dense masked weight), plus a few units of rounding of the output dtype
relative to sum |x| |w|.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _earned import assert_linear_earned
from _guard_pages import run_guarded
from _isa_harness import isas_of_this_cpu, results_at_thread_counts, run_with_isa

import multiflow_kernels  # noqa: F401  (registers the ops)
from multiflow_kernels import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IN_FEATURES = [1, 31, 33, 100, 513, 1100]
OUT_FEATURES = [1, 7]
LEADING = [(), (3,), (2, 5)]


def make_weight(n_out, n_in, dtype, seed=0, kind="mixed"):
    """Fresh random weight and mask; kind="mixed": row 0 all pruned, last row all kept
    (where there are 3+ rows), the rest random at 75% sparsity."""
    gen = torch.Generator().manual_seed(seed * 7919 + n_in * 101 + n_out * 13)
    w = torch.randn(n_out, n_in, generator=gen).to(dtype)
    if kind == "mixed":
        mask = torch.rand(n_out, n_in, generator=gen) < 0.25
        if n_out >= 3:
            mask[0] = False
            mask[-1] = True
    else:
        mask = torch.full((n_out, n_in), kind == "all_kept")
    return w, mask


def pack(w, mask):
    return ops.bitmap_pack(w, mask)


# ----------------------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_out", OUT_FEATURES)
@pytest.mark.parametrize("n_in", IN_FEATURES)
@pytest.mark.parametrize("kind", ["mixed", "all_kept", "all_pruned"])
def test_pack_matches_reference_and_round_trips(n_in, n_out, dtype, kind):
    w, mask = make_weight(n_out, n_in, dtype, kind=kind)
    got = pack(w, mask)
    want = reference.bitmap_pack(w, mask)
    for name, g, r in zip(("values", "bits", "row_ptr", "block_ptr"), got, want):
        assert g.dtype == r.dtype, name
        assert torch.equal(g, r), name
    assert torch.equal(got[1], ops.pack_mask(mask))
    dense = ops.bitmap_unpack(*got, n_in)
    masked = torch.where(mask, w, torch.zeros((), dtype=dtype))
    assert dense.dtype == dtype
    assert torch.equal(dense, masked)
    assert torch.equal(reference.bitmap_unpack(*got, n_in), masked)


def test_pack_keeps_bits_of_special_values():
    w = torch.tensor([[-0.0, float("nan"), float("inf"), 1.0]] * 2)
    mask = torch.tensor([[True, True, True, False], [False, True, False, True]])
    values, bits, row_ptr, block_ptr = pack(w, mask)
    assert torch.equal(values.view(torch.int32), torch.tensor([-0.0, float("nan"), float("inf"), float("nan"), 1.0]).view(torch.int32))
    dense = ops.bitmap_unpack(values, bits, row_ptr, block_ptr, 4)
    assert torch.equal(dense.view(torch.int32), torch.where(mask, w, 0.0).view(torch.int32))


def test_empty_shapes():
    for n_out, n_in in [(0, 5), (3, 0), (0, 0)]:
        w, mask = make_weight(n_out, n_in, torch.float32)
        got = pack(w, mask)
        for g, r in zip(got, reference.bitmap_pack(w, mask)):
            assert torch.equal(g, r)
        assert ops.bitmap_unpack(*got, n_in).shape == (n_out, n_in)
        x = torch.randn(2, n_in)
        y = ops.bitmap_linear(x, *got, n_in, None)
        assert torch.equal(y, torch.zeros(2, n_out))
    w, mask = make_weight(4, 10, torch.float32)
    got = pack(w, mask)
    assert ops.bitmap_linear(torch.randn(0, 10), *got, 10, None).shape == (0, 4)


def test_non_contiguous_inputs():
    w = torch.randn(70, 9).T
    mask = (torch.rand(70, 9) < 0.3).T
    got = pack(w, mask)
    want = pack(w.contiguous(), mask.contiguous())
    for g, r in zip(got, want):
        assert torch.equal(g, r)
    x = torch.randn(70, 5).T
    assert torch.equal(ops.bitmap_linear(x, *got, 70, None), ops.bitmap_linear(x.contiguous(), *got, 70, None))


# ----------------------------------------------------------------------------- linear


def check_linear(x, w, mask, b, what="y"):
    fmt = pack(w, mask)
    n_in = w.shape[1]
    y = ops.bitmap_linear(x, *fmt, n_in, b)
    wm = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
    assert_linear_earned(y, x, wm, b, what)
    assert_linear_earned(reference.bitmap_linear(x, *fmt, n_in, b), x, wm, b, "reference " + what)
    return y


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("n_out", OUT_FEATURES)
@pytest.mark.parametrize("n_in", IN_FEATURES)
def test_linear_matches_dense_masked_linear(n_in, n_out, leading, dtype, with_bias):
    w, mask = make_weight(n_out, n_in, dtype, seed=1)
    gen = torch.Generator().manual_seed(n_in + 31 * n_out)
    x = torch.randn(*leading, n_in, generator=gen).to(dtype)
    b = torch.randn(n_out, generator=gen).to(dtype) if with_bias else None
    y = check_linear(x, w, mask, b)
    assert y.shape == (*leading, n_out)
    if n_out >= 3:  # row 0 is all pruned: exactly the bias (or 0)
        expect = b[0] if b is not None else torch.zeros((), dtype=dtype)
        assert torch.equal(y[..., 0], expect.expand(y[..., 0].shape))


@pytest.mark.parametrize("kind", ["all_kept", "all_pruned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_uniform_masks(kind, dtype):
    w, mask = make_weight(9, 700, dtype, kind=kind)
    x = torch.randn(4, 700).to(dtype)
    check_linear(x, w, mask, torch.randn(9).to(dtype))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16, 33, 50, 70])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_many_tokens_and_rows(m, dtype):
    """Several parallel row blocks and 512-column segments, none of them full; on AVX-512
    M = 1 takes the one-row kernel, 2-4 the register kernel, 5 and more the transposed-x
    kernel (at most half the weights kept, as here: 1, 2, 3, 4 and 5 groups of 16 rows)."""
    w, mask = make_weight(100, 1300, dtype, seed=3)
    x = torch.randn(m, 1300).to(dtype)
    check_linear(x, w, mask, torch.randn(100).to(dtype))


# ----------------------------------------------------------------------------- opcheck, errors, determinism


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    w, mask = make_weight(7, 600, dtype, seed=4)
    torch.library.opcheck(torch.ops.multiflow.bitmap_pack.default, (w, mask))
    fmt = pack(w, mask)
    torch.library.opcheck(torch.ops.multiflow.bitmap_unpack.default, (*fmt, 600))
    x = torch.randn(2, 3, 600).to(dtype)
    for b in (None, torch.randn(7).to(dtype)):
        torch.library.opcheck(torch.ops.multiflow.bitmap_linear.default, (x, *fmt, 600, b))


def test_bad_inputs_name_the_argument():
    w, mask = make_weight(5, 40, torch.float32)
    values, bits, row_ptr, block_ptr = pack(w, mask)
    x = torch.randn(3, 40)
    b = torch.randn(5)
    pack_cases = [
        ((w.double(), mask), "weight must be float32, float16 or bfloat16"),
        ((w[0], mask[0]), "weight must have shape"),
        ((w, mask.int()), "mask must be a bool"),
        ((w, mask[:4]), "mask must have weight's shape"),
    ]
    for args, message in pack_cases:
        with pytest.raises(RuntimeError, match=message):
            ops.bitmap_pack(*args)
    bad_row_ptr = row_ptr.clone()
    bad_row_ptr[1] += 1
    bad_row_ptr[2:] += 1
    format_cases = [
        ((values.double(), bits, row_ptr, block_ptr, 40), "values must be float32"),
        ((values[None], bits, row_ptr, block_ptr, 40), "values must be 1-D"),
        ((values[:-1], bits, row_ptr, block_ptr, 40), "values must have row_ptr\\[-1\\]"),
        ((values, bits.long(), row_ptr, block_ptr, 40), "bits must be an int32"),
        ((values, bits[:, :1], row_ptr, block_ptr, 40), "bits must have shape"),
        ((values, bits, row_ptr.long(), block_ptr, 40), "row_ptr must be an int32"),
        ((values, bits, row_ptr[:-1], block_ptr, 40), "row_ptr must have shape"),
        ((values, bits, row_ptr, block_ptr.long(), 40), "block_ptr must be an int32"),
        ((values, bits, row_ptr, block_ptr[:3], 40), "block_ptr must have shape"),
        ((values, bits, row_ptr, block_ptr, 70), "bits must have shape"),
        ((values, bits, row_ptr, block_ptr, -1), "in_features must be >= 0"),
        ((torch.cat([values, values[:1]]), bits, bad_row_ptr, block_ptr, 40), "row_ptr does not match bits"),
    ]
    for args, message in format_cases:
        with pytest.raises(RuntimeError, match=message):
            ops.bitmap_unpack(*args)
        with pytest.raises(RuntimeError, match=message):
            ops.bitmap_linear(x, *args, None)
    linear_cases = [
        ((x.half(), values, bits, row_ptr, block_ptr, 40, b), "x must have values' dtype"),
        ((x[:, :30], values, bits, row_ptr, block_ptr, 40, b), "in_features mismatch"),
        ((x, values, bits, row_ptr, block_ptr, 40, b[:3]), "bias must have shape"),
        ((x, values, bits, row_ptr, block_ptr, 40, b.half()), "bias must have x's dtype"),
    ]
    for args, message in linear_cases:
        with pytest.raises(RuntimeError, match=message):
            ops.bitmap_linear(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_same_result_at_any_thread_count(dtype):
    """pack, unpack and linear on 300 rows (the parallel tasks split them) at 1 and 2 threads."""
    w, mask = make_weight(300, 1100, dtype, seed=2)
    x = torch.randn(37, 1100).to(dtype)
    b = torch.randn(300).to(dtype)

    def run():
        fmt = pack(w, mask)
        return fmt, ops.bitmap_unpack(*fmt, 1100), ops.bitmap_linear(x, *fmt, 1100, b)

    first, *rest = results_at_thread_counts(run, (1, 2, 1))
    for other in rest:
        for a, c in zip(first[0], other[0]):
            assert torch.equal(a, c)
        assert torch.equal(first[1], other[1]) and torch.equal(first[2], other[2])
    assert torch.equal(first[1], torch.where(mask, w, torch.zeros((), dtype=dtype)))


ISA_SCRIPT = """
import sys, torch
import multiflow_kernels
from multiflow_kernels import ops
w, mask, x, b = torch.load(sys.argv[1])
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for name in ("f32", "f16", "bf16"):
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]
    fmt = ops.bitmap_pack(w.to(dtype), mask)
    ys = [ops.bitmap_linear(x[:m].to(dtype), *fmt, w.shape[1], b.to(dtype)) for m in (1, 3, 5)]
    out[name] = (fmt, ops.bitmap_unpack(*fmt, w.shape[1]), ys)
torch.save(out, sys.argv[2])
"""


@pytest.mark.parametrize("isa", isas_of_this_cpu())
def test_every_isa_path(isa, tmp_path):
    w, mask = make_weight(70, 1100, torch.float32, seed=6)
    x = torch.randn(5, 1100)
    b = torch.randn(70)
    got = run_with_isa(isa, ISA_SCRIPT, (w, mask, x, b), tmp_path)
    for name, dtype in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
        wd, xd, bd = w.to(dtype), x.to(dtype), b.to(dtype)
        fmt, dense, ys = got[name]
        for g, r in zip(fmt, reference.bitmap_pack(wd, mask)):
            assert torch.equal(g, r), f"{name} pack ({isa})"
        wm = torch.where(mask, wd, torch.zeros((), dtype=dtype))
        assert torch.equal(dense, wm), f"{name} unpack ({isa})"
        for m, y in zip((1, 3, 5), ys):
            assert_linear_earned(y, xd[:m], wm, bd, f"{name} y, M = {m} ({isa})")


# Every ISA path, and AVX-512 also without its AVX512-VBMI2 kernels (MULTIFLOW_CPU_VBMI2
# steers only those): "1" takes VBMI2 where the CPU has it.
ISA_VBMI2 = [(isa, "1") for isa in isas_of_this_cpu()] + [("avx512", "0")] * ("avx512" in isas_of_this_cpu())

CONVERT_SCRIPT = """
import sys, torch
import multiflow_kernels
from multiflow_kernels import ops
cases = torch.load(sys.argv[1])
out = {"capability": torch.backends.cpu.get_cpu_capability(), "got": []}
for w, mask in cases:
    fmt = ops.bitmap_pack(w, mask)
    out["got"].append((fmt, ops.bitmap_unpack(*fmt, w.shape[1])))
torch.save(out, sys.argv[2])
"""

# Row lengths around the vector widths (8 / 16 columns per step, 32 per word) and a block (512).
CONVERT_COLS = [1, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 47, 48, 63, 64, 65, 100, 511, 513, 1100]


def random_bits_weight(rows, cols, dtype, gen):
    """Random element bits (NaN payloads, infinities, subnormals, -0.0 among them)."""
    if dtype == torch.float32:
        return torch.randint(-(2**31), 2**31 - 1, (rows, cols), generator=gen, dtype=torch.int32).view(dtype)
    return torch.randint(-(2**15), 2**15 - 1, (rows, cols), generator=gen, dtype=torch.int16).view(dtype)


def as_bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize(("isa", "vbmi2"), ISA_VBMI2, ids=[f"{i}-{v}" for i, v in ISA_VBMI2])
def test_pack_unpack_every_isa_path_bit_exact(isa, vbmi2, tmp_path):
    """Every ISA's pack / unpack row kernels (AVX-512's 16-bit ones with and without
    AVX512-VBMI2) against the plain-torch twin, bit for bit, on random element bits, row
    lengths around each vector width and densities from none to all (a row's last vector is
    where the stores of one row could reach the next's)."""
    gen = torch.Generator().manual_seed(31)
    cases = []
    for dtype in DTYPES:
        for cols in CONVERT_COLS:
            for density in (0.0, 0.1, 0.5, 0.97, 1.0):
                rows = 1 + (cols % 5)
                cases.append((random_bits_weight(rows, cols, dtype, gen), torch.rand(rows, cols, generator=gen) < density))
    got = run_with_isa(isa, CONVERT_SCRIPT, cases, tmp_path, MULTIFLOW_CPU_VBMI2=vbmi2)["got"]
    for (w, mask), (fmt, dense) in zip(cases, got):
        what = f"{w.dtype} {tuple(w.shape)} keeps {int(mask.sum())} ({isa})"
        want = reference.bitmap_pack(w, mask)
        assert torch.equal(as_bits(fmt[0]), as_bits(want[0])), "values " + what
        for name, g, r in zip(("bits", "row_ptr", "block_ptr"), fmt[1:], want[1:]):
            assert torch.equal(g, r), f"{name} {what}"
        assert torch.equal(as_bits(dense), as_bits(torch.where(mask, w, torch.zeros((), dtype=w.dtype)))), "unpack " + what


def test_row_ptr_non_contiguous_and_out_of_order():
    """A non-contiguous row_ptr is read correctly; a row_ptr whose rows leave values (each
    row's own count still matching its bits) is rejected before any row is read."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    mask = torch.rand(64, 96, generator=g) > 0.5
    values, bits, row_ptr, block_ptr = ops.bitmap_pack(w, mask)
    x = torch.randn(3, 96, generator=g)
    strided = torch.stack([row_ptr, row_ptr], 1)[:, 0]
    assert not strided.is_contiguous()
    assert torch.equal(ops.bitmap_linear(x, values, bits, strided, block_ptr, 96),
                       ops.bitmap_linear(x, values, bits, row_ptr, block_ptr, 96))
    assert torch.equal(ops.bitmap_unpack(values, bits, strided, block_ptr, 96), w * mask)
    shifted = row_ptr.clone()
    shifted[1:-1] += 1 << 30  # middle rows' counts unchanged, their ranges far past values
    with pytest.raises(RuntimeError, match="row_ptr must be non-decreasing"):
        ops.bitmap_linear(x, values, bits, shifted, block_ptr, 96)
    with pytest.raises(RuntimeError, match="row_ptr must be non-decreasing"):
        ops.bitmap_unpack(values, bits, shifted, block_ptr, 96)


@pytest.mark.parametrize("rows", [1, 3, 8, 40])  # the one-row, few-row, transposed-x and tiled kernels
@pytest.mark.parametrize("where", [0, 17, 46, 62])  # first block, middle blocks, last row pair
def test_row_ptr_out_of_order_is_named_on_every_kernel(rows, where):
    """bitmap_linear checks row_ptr's order per block of rows, inside its parallel loop: the
    error still names the first row out of order, whichever kernel and block meet it, and no
    row is read past values (a second bad pair far past values: a read there would fault)."""
    g = torch.Generator().manual_seed(where)
    w = torch.randn(64, 80, generator=g)
    mask = torch.rand(64, 80, generator=g) > 0.6
    values, bits, row_ptr, block_ptr = ops.bitmap_pack(w, mask)
    x = torch.randn(rows, 80, generator=g)
    bad = row_ptr.clone()
    bad[where + 1] = bad[where] - 1  # row `where` ends before it starts
    if where + 3 < 64:
        bad[where + 3] = 1 << 30  # and a later row starts far past values
    first = int(torch.nonzero(bad[:-1] > bad[1:])[0])
    assert first == where
    with pytest.raises(RuntimeError, match=rf"non-decreasing, but row_ptr\[{where}\] = "):
        ops.bitmap_linear(x, values, bits, bad, block_ptr, 80)


# ----------------------------------------------------------------------------- one row of x


def rows_of_density(n_out, n_in, densities, seed):
    """A mask whose row r keeps about densities[r % len] of its columns (exact counts vary)."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.tensor([densities[r % len(densities)] for r in range(n_out)], dtype=torch.float64)
    return torch.rand(n_out, n_in, generator=gen, dtype=torch.float64) < d[:, None]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_in", [17, 32, 95, 700, 1056, 2600])
def test_one_row_any_density(n_in, dtype):
    """One row of x takes the kernel that compresses x (AVX-512, AVX2) and, below 1 kept weight in
    128 columns, the set-bit walk; the rows here cross both, with the last rows' values at the very
    end of `values` (the loads near it must not read past it)."""
    mask = rows_of_density(37, n_in, [0.0, 1 / 300, 1 / 130, 1 / 64, 1 / 15, 0.25, 0.6, 1.0, 0.37], seed=n_in)
    gen = torch.Generator().manual_seed(n_in + 1)
    w = torch.randn(37, n_in, generator=gen).to(dtype)
    b = torch.randn(37, generator=gen).to(dtype)
    for x in (torch.randn(n_in, generator=gen).to(dtype), torch.randn(1, 1, n_in, generator=gen).to(dtype)):
        check_linear(x, w, mask, b, f"one row, in={n_in}")
        check_linear(x, w, mask, None, f"one row, no bias, in={n_in}")
    # A row alone at the end of its own values tensor (its values are the whole tensor).
    for r in (1, 4, 6):
        check_linear(torch.randn(1, n_in, generator=gen).to(dtype), w[r:r + 1], mask[r:r + 1], None, f"row {r} alone")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_row_sums_do_not_depend_on_blocking(dtype):
    """The one-row kernels reduce the 16-lane sums of up to 16 rows at once: a row's result
    is bitwise the same whatever the thread count and wherever the row sits in its block of
    rows (the weight's rows 5.. packed alone give the same numbers as in the whole weight)."""
    mask = rows_of_density(70, 1100, [0.25, 0.004, 0.6, 0.1, 1 / 3], seed=3)
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(70, 1100, generator=gen).to(dtype)
    x = torch.randn(1, 1100, generator=gen).to(dtype)
    fmt = pack(w, mask)
    first, *rest = results_at_thread_counts(lambda: ops.bitmap_linear(x, *fmt, 1100), (1, 2, 1))
    for other in rest:
        assert torch.equal(first, other)
    for r0 in (5, 16, 33):
        part = ops.bitmap_linear(x, *pack(w[r0:].contiguous(), mask[r0:].contiguous()), 1100)
        assert torch.equal(part, first[:, r0:]), r0


def test_one_row_kernel_without_vbmi2():
    """On a CPU with AVX512-VBMI2 the one-row kernel lists kept columns with a byte compress
    on rows of at most 1/3 density; MULTIFLOW_CPU_VBMI2=0 keeps the two-compress kernel for
    every row (what CPUs without VBMI2 run). The one-row tests again in a process set so."""
    env = dict(os.environ, MULTIFLOW_CPU_VBMI2="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "one_row_any_density or reject_counts or one_row_non_finite or one_row_sums"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("isa", [i for i in isas_of_this_cpu()[:-1]])  # the best one runs in this process
def test_one_row_tests_on_every_isa(isa):
    """The one-row tests (counts, any density, non-finite x and weights, sums that do not
    depend on the blocking) again in a process on each lower ISA: AVX2's one-row kernel, and
    the baseline build's row kernel."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
           "one_row_any_density or reject_counts or one_row_non_finite or one_row_sums or non_finite_weights_stay"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("rows_bad", [[0], [36], [5, 30], [15, 16]])
@pytest.mark.parametrize("density", [0.002, 0.3])
def test_kernels_reject_counts_that_do_not_match_bits(rows_bad, density, m):
    """The one-row and transposed-x kernels check each row's count themselves; a row_ptr
    whose counts disagree with bits is rejected (one row: sparse rows walk their bits, denser
    ones are compressed; several: a row's column list is made ahead of the previous row's
    sums, at a 16-row block's end too)."""
    mask = rows_of_density(37, 1300, [density], seed=9)
    mask[:, 0] = True  # every row keeps at least one weight, so a count can move down
    w = torch.randn(37, 1300)
    values, bits, row_ptr, block_ptr = pack(w, mask)
    x = torch.randn(m, 1300)
    for shift in (1, -1):
        bad = row_ptr.clone()
        for r in rows_bad:
            bad[r + 1:] += shift
        if bad[-1] < 0 or (bad[1:] < bad[:-1]).any():
            continue
        vals = torch.randn(int(bad[-1]))
        with pytest.raises(RuntimeError, match="row_ptr does not match bits"):
            ops.bitmap_linear(x, vals, bits, bad, block_ptr, 1300)


@pytest.mark.parametrize("shift", [1, -1])
def test_unpack_rejects_block_ptr_that_does_not_match_bits(shift):
    """block_ptr (what the CUDA kernels read to start a 512-column chunk) is checked by the CPU
    unpack against the bits, naming the row and block; the CPU bitmap_linear does not read it
    (documented), so its result stays right."""
    mask = rows_of_density(6, 1600, [0.3], seed=4)
    w = torch.randn(6, 1600)
    values, bits, row_ptr, block_ptr = pack(w, mask)
    bad = block_ptr.clone()
    bad[4, 2] += shift  # row 4, the block starting at column 1536
    with pytest.raises(RuntimeError, match=r"block_ptr does not match bits: row 4 keeps \d+ weights before column "
                                           r"1536 but block_ptr\[4, 2\] = "):
        ops.bitmap_unpack(values, bits, row_ptr, bad, 1600)
    assert torch.equal(ops.bitmap_unpack(values, bits, row_ptr, block_ptr, 1600), w * mask)
    x = torch.randn(3, 1600)
    torch.testing.assert_close(ops.bitmap_linear(x, values, bits, row_ptr, bad, 1600), x @ (w * mask).T)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_one_row_non_finite_x_like_f_linear(value, dtype):
    """An inf / NaN of x at a column that some rows prune still reaches those rows as
    0 * inf = NaN, like F.linear on the dense masked weight, whatever the number of rows of
    x (the kernels that multiply kept columns only are skipped then)."""
    w, mask = make_weight(9, 100, dtype, seed=5)
    mask[:, 40] = False
    mask[2, 40] = True
    fmt = pack(w, mask)
    wm = torch.where(mask, w, torch.zeros((), dtype=dtype))
    for m, row in ((1, 0), (3, None), (6, None), (20, None), (6, 5), (20, 17), (40, 1)):
        x = torch.randn(m, 100).to(dtype)
        if row is None:
            x[:, 40] = value  # every row
        else:
            x[row, 40] = value  # one row only, past the first group of 16 too
        y = ops.bitmap_linear(x, *fmt, 100, None)
        want = torch.nn.functional.linear(x, wm)
        assert torch.equal(y.isnan(), want.isnan()), f"m={m}, row={row}"
        assert torch.equal(y.isinf(), want.isinf()), f"m={m}, row={row}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [2, 4, 5])
def test_few_rows_any_density_up_to_the_end_of_values(m, dtype):
    """Several rows of x: each 16-value load may run into the next weight rows' values but
    never past the tensor, whatever the density (very sparse rows read near the end often)."""
    n_in = 1100
    mask = rows_of_density(23, n_in, [0.0, 1 / 300, 1 / 64, 0.25, 1.0, 0.02], seed=m)
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(23, n_in, generator=gen).to(dtype)
    x = torch.randn(m, n_in, generator=gen).to(dtype)
    check_linear(x, w, mask, None, f"m={m}")
    for r in (1, 3, 4):  # one weight row alone: its values are the whole tensor
        check_linear(x, w[r:r + 1], mask[r:r + 1], None, f"m={m}, row {r} alone")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3])
def test_non_finite_weights_stay_in_their_rows(m, dtype):
    """The kernels' 16-value loads run into the next rows' values: an inf / NaN weight there
    must not reach this row (0 * inf), here or in the rows before it."""
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(5, 64, generator=gen).to(dtype)
    mask = torch.rand(5, 64, generator=gen) < 0.5
    w[1] = float("inf")
    w[3] = float("nan")
    fmt = pack(w, mask)
    x = torch.randn(m, 64, generator=gen).to(dtype)
    y = ops.bitmap_linear(x, *fmt, 64, None)
    want = torch.nn.functional.linear(x.double(), torch.where(mask, w, torch.zeros((), dtype=dtype)).double())
    for r in (0, 2, 4):
        assert torch.isfinite(y[:, r]).all(), f"row {r}: {y[:, r]}"
        assert torch.allclose(y[:, r].double(), want[:, r], rtol=2e-2, atol=2e-2), f"row {r}"
    assert torch.equal(y[:, 1].isnan(), want[:, 1].isnan()) and torch.equal(y[:, 3].isnan(), want[:, 3].isnan())


@pytest.mark.parametrize("m", [1, 3, 7])
def test_padding_bits_are_rejected(m):
    """A set bit past in_features in a row's last word names a column x does not have: the
    op says so (unpack too), whatever the path, even when row_ptr counts it."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=gen)
    mask = torch.rand(6, 40, generator=gen) < 0.5
    values, bits, row_ptr, block_ptr = pack(w, mask)
    bits = bits.clone()
    bits[4, 1] |= 1 << 20  # column 52 of 40
    counts = mask.sum(1)
    counts[4] += 1
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()
    vals = torch.randn(int(row_ptr[-1]), generator=gen)
    x = torch.randn(m, 40, generator=gen)
    with pytest.raises(RuntimeError, match=r"bits sets bits past in_features = 40 in row 4"):
        ops.bitmap_linear(x, vals, bits, row_ptr, block_ptr, 40)
    with pytest.raises(RuntimeError, match=r"bits sets bits past in_features = 40 in row 4"):
        ops.bitmap_unpack(vals, bits, row_ptr, block_ptr, 40)


def test_one_row_same_result_at_any_thread_count():
    w, mask = make_weight(300, 1056, torch.float32, seed=8)
    fmt = pack(w, mask)
    x = torch.randn(1, 1056)
    first, *rest = results_at_thread_counts(lambda: ops.bitmap_linear(x, *fmt, 1056, None), (1, 2, 1))
    for other in rest:
        assert torch.equal(first, other)


@pytest.mark.parametrize("m", [2, 5, 9])
def test_float32_whole_words_use_x_in_place(m):
    """float32 x with in_features a multiple of 32 is read in place, not copied: every path."""
    w, mask = make_weight(21, 96, torch.float32, seed=m)
    x = torch.randn(m, 96)
    check_linear(x, w, mask, torch.randn(21), f"m={m}")
    check_linear(x[:, None, :].expand(m, 2, 96), w, mask, None, f"m={m}, expanded x")


GUARD_SCRIPT = r"""
import torch
import multiflow_kernels  # noqa: F401
from multiflow_kernels import ops
from _guard_pages import at_page_end

g = torch.Generator().manual_seed(0)
n = 0
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for n_in in (31, 32, 64, 100, 512, 1056):
        for density in (0.0, 0.005, 0.3, 0.9, 1.0):
            for rows in (1, 5):
                w = torch.randn(rows, n_in, generator=g).to(dtype)
                mask = torch.rand(rows, n_in, generator=g) < density
                values, bits, row_ptr, block_ptr = (at_page_end(t) for t in ops.bitmap_pack(at_page_end(w), at_page_end(mask)))
                dense = ops.bitmap_unpack(values, bits, row_ptr, block_ptr, n_in)
                assert torch.equal(dense, torch.where(mask, w, torch.zeros((), dtype=dtype))), (dtype, n_in, density, rows)
                wm = torch.where(mask, w, torch.zeros((), dtype=dtype)).double()
                for m in (1, 2, 5, 17):
                    x = at_page_end(torch.randn(m, n_in, generator=g).to(dtype))
                    y = ops.bitmap_linear(x, values, bits, row_ptr, block_ptr, n_in, None)
                    want = torch.nn.functional.linear(x.double(), wm)
                    scale = torch.nn.functional.linear(x.double().abs(), wm.abs()) + 1
                    assert ((y.double() - want).abs() <= 0.02 * scale).all(), (dtype, n_in, density, rows, m)
                    n += 1
                if int(row_ptr[-1] - row_ptr[-2]) > 0:  # the last row claims one value fewer
                    bad = row_ptr.clone()
                    bad[-1] -= 1
                    short = at_page_end(values[:-1].clone())
                    for m in (1, 3, 6):
                        try:
                            ops.bitmap_linear(at_page_end(torch.randn(m, n_in).to(dtype)), short, bits, at_page_end(bad),
                                              block_ptr, n_in, None)
                        except RuntimeError as e:
                            assert "row_ptr does not match bits" in str(e), e
                        else:
                            raise AssertionError("a wrong count was accepted")
print("ok", n, torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="mmap + mprotect guard pages: Linux only")
@pytest.mark.parametrize(("isa", "vbmi2"), ISA_VBMI2, ids=[f"{i}-{v}" for i, v in ISA_VBMI2])
def test_loads_never_leave_the_tensors(isa, vbmi2):
    """values, bits, row_ptr and x (and pack's weight and mask) each end right before a page
    with no access: any load past one of them kills the process (run apart, so a crash fails
    this test only); every ISA's kernels (pack, unpack, linear), the one-row kernel with and
    without AVX512-VBMI2."""
    run_guarded(GUARD_SCRIPT, isa, MULTIFLOW_CPU_VBMI2=vbmi2)


def test_values_beyond_int32_offsets_are_refused():
    """row_ptr is int32, so a format may hold at most 2^31 - 1 values: more is refused by name
    (checked on meta tensors, which cost no memory; the CPU and CUDA ops run the same check)."""
    values = torch.empty(2**31, device="meta", dtype=torch.float16)
    bits = torch.empty(4, 1, device="meta", dtype=torch.int32)
    row_ptr = torch.empty(5, device="meta", dtype=torch.int32)
    block_ptr = torch.empty(4, 0, device="meta", dtype=torch.int32)
    with pytest.raises(RuntimeError, match="at most 2\\^31 - 1 elements"):
        torch.ops.multiflow.bitmap_unpack(values, bits, row_ptr, block_ptr, 20)
    x = torch.empty(3, 20, device="meta", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="at most 2\\^31 - 1 elements"):
        torch.ops.multiflow.bitmap_linear(x, values, bits, row_ptr, block_ptr, 20, None)


def test_pack_linear_unpack_compile_with_torch_compile():
    """bitmap_pack (its values' length is data: an unbacked size in the fake kernel), then
    bitmap_linear and bitmap_unpack on its output, in one graph (aot_eager, fullgraph)."""

    def layer(x, w, mask, b):
        fmt = ops.bitmap_pack(w, mask)
        return ops.bitmap_linear(x, *fmt, w.shape[1], b), ops.bitmap_unpack(*fmt, w.shape[1])

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 600, generator=gen)
    w = torch.randn(11, 600, generator=gen)
    mask = torch.rand(11, 600, generator=gen) > 0.7
    b = torch.randn(11, generator=gen)
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, w, mask, b)
    want = layer(x, w, mask, b)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(want[1], w * mask)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_row_ptr_order_error_comes_first_whatever_the_threads(threads):
    """A row_ptr both out of order (row 40) and miscounted (row 4) names the order, as the
    serial check before the kernels did, whatever the thread count (a task stops at its
    first bad block, so which blocks checked their order varies); with no rows of x (no row
    read) the order is still checked."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 80, generator=g)
    mask = torch.rand(64, 80, generator=g) > 0.6
    values, bits, row_ptr, block_ptr = ops.bitmap_pack(w, mask)
    bad = row_ptr.clone()
    bad[5] += 1  # rows 4 and 5 miscounted, still in order
    bad[41] = bad[40] - 1  # row 40 out of order
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 3, 8, 40, 0):
            with pytest.raises(RuntimeError, match=r"non-decreasing, but row_ptr\[40\] = "):
                ops.bitmap_linear(torch.randn(rows, 80, generator=g), values, bits, bad, block_ptr, 80)
    finally:
        torch.set_num_threads(old)
