"""One small call of each CUDA C++ kernel, for compute-sanitizer (benchmarks/gpu_check.sh).

Small awkward shapes (not multiples of any block), every result synchronised and compared
with the plain-torch twin, so a kernel that reads or writes out of bounds is caught by
memcheck and a wrong answer by the comparison.
"""
import itertools
import os
import sys
from pathlib import Path

import torch

import multiflow_kernels  # noqa: F401
from multiflow_kernels import ops
from multiflow_kernels import reference as R

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _bitmap_inputs import assert_linear_earned  # noqa: E402  (the tests' earned bound)


def _check_24_linear(values, meta, bias, xs, env=None) -> int:
    """sparse24_linear against its twin on each x of ``xs``, under the environment setting
    ``env`` (name, value) if given; the number of calls."""
    if env:
        os.environ[env[0]] = env[1]
    try:
        for xx in xs:
            torch.testing.assert_close(ops.sparse24_linear(xx, values, meta, bias).float(),
                                       R.sparse24_linear(xx, values, meta, bias).float(), rtol=2e-2, atol=2e-2)
    finally:
        if env:
            os.environ.pop(env[0])
    return len(xs)


def main() -> int:
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    calls = 0
    tiles128 = []  # (values, metadata, bias, xs) for the 128 x 128 tile kernels, checked last

    x = torch.randn(3, 37, 129, generator=g).to(dev, torch.bfloat16)
    mask = (torch.rand(3, 37, generator=g) > 0.3).to(dev)
    acc, ref = torch.rand(129, device=dev), None
    ref = acc.clone()
    ops.sq_sum_accumulate_(acc, x, mask)
    R.sq_sum_accumulate_(ref, x, mask)
    torch.testing.assert_close(acc, ref, rtol=1e-4, atol=1e-4)
    calls += 1
    # the paths real sizes take: 16-byte loads (768 features) and several token chunks added
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(300, 768, generator=g).to(dev, dtype)
        mask = (torch.rand(300, generator=g) > 0.2).to(dev)
        acc = torch.rand(768, device=dev)
        ref = acc.clone()
        ops.sq_sum_accumulate_(acc, x, mask)
        R.sq_sum_accumulate_(ref, x, mask)
        torch.testing.assert_close(acc, ref, rtol=1e-4, atol=1e-3)
        calls += 1

    ws = [torch.randn(s, generator=g).to(dev) for s in ((33, 65), (7, 3), (0, 5), (130, 17))]
    acts = [torch.rand(w.shape[1], generator=g).to(dev) for w in ws]
    imp_out, imp_in, w_scale = ops.flow_importance(ws, acts)
    r_out, r_in, r_scale = R.flow_importance(ws, acts)
    assert all(torch.equal(a, b) for a, b in zip(imp_out, r_out)) and torch.equal(w_scale, r_scale)
    calls += 1

    total = sum(w.numel() for w in ws)
    for k in (1, total // 2, total):
        assert torch.equal(ops.kth_smallest_group(ws, k, True), R.kth_smallest_group(ws, k, True))
    ks = [w.numel() // 3 for w in ws]
    assert torch.equal(ops.kth_smallest_each(ws, ks, False), R.kth_smallest_each(ws, ks, False))
    t = R.kth_smallest_group(ws, total // 2, True)
    assert torch.equal(ops.count_at_most(ws, t, True), R.count_at_most(ws, t, True))
    th = ops.flow_kth_each(ws, imp_out, imp_in, w_scale, ks)
    assert torch.equal(th, R.flow_kth_each(ws, imp_out, imp_in, w_scale, ks))
    got = ops.flow_masks(ws, imp_out, imp_in, w_scale, th)
    assert all(torch.equal(a, b) for a, b in zip(got, R.flow_masks(ws, imp_out, imp_in, w_scale, th)))
    sc = torch.randn(9, 20, generator=g).to(dev)
    assert torch.equal(ops.nm_mask(sc, 2, 4), R.nm_mask(sc, 2, 4))
    calls += 6

    for cols in (70, 64):  # 64: whole words only (the whole-word pack / unpack kernels)
        m = torch.rand(5, cols, generator=g).to(dev) > 0.5
        bits = ops.pack_mask(m)
        assert torch.equal(bits, R.pack_mask(m)) and torch.equal(ops.unpack_mask(bits, cols), m)
        calls += 2

    # 2:4: pack / unpack, and linear on each path: warp-per-row (few rows), mma.sp
    # (float16 / bfloat16, in % 16 == 0), decode + cuBLAS (float32 many rows, in % 16 != 0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for out_f, in_f in ((70, 48), (33, 100)):
            w = torch.randn(out_f, in_f, generator=g).to(dev, dtype)
            m24 = ops.nm_mask(torch.rand(out_f, in_f, generator=g).to(dev), 2, 4)
            values, meta = ops.sparse24_pack(w, m24)
            rv, rm = R.sparse24_pack(w, m24)
            assert torch.equal(values, rv) and torch.equal(meta, rm)
            assert torch.equal(ops.sparse24_unpack(values, meta), R.sparse24_unpack(rv, rm))
            bias = torch.randn(out_f, generator=g).to(dev, dtype)

            def xs(*rows_list):
                return [torch.randn(rows, in_f, generator=g).to(dev, dtype) for rows in rows_list]

            calls += _check_24_linear(values, meta, bias, xs(1, 5, 16, 17, 130))
            # the few-row kernel with a half-warp per row (MULTIFLOW_SPARSE24_GEMV=half); odd
            # out_f: the last warp's second half has no row
            calls += _check_24_linear(values, meta, bias, xs(1, 3), ("MULTIFLOW_SPARSE24_GEMV", "half"))
            # for the 128 x 128 tile kernels, at the end: 70 x 48 (the 33 x 100 layer has
            # in % 16 != 0: no tensor cores): 130 rows of x are two token tiles, the second almost
            # empty; 70 outputs, a partial feature tile
            if dtype != torch.float32 and in_f % 16 == 0:
                tiles128.append((values, meta, bias, xs(5, 130)))
            calls += 2
    # bitmap_linear in CUDA C++ (csrc/cuda/bitmap.cu, the private op): the few-row kernels
    # (gemv_tc, the default for 16-bit types, 1-16 rows of x; gemv for float32 and under
    # MULTIFLOW_BITMAP_GEMV=v1, 1-8 rows; tc2: gemv_tc's lean decode; 2100 columns: five
    # 512-column chunks / three 1024-column passes, the last partial) and the dense decode +
    # cuBLAS above; rows all pruned and all kept
    for gemv, dtype in itertools.product(("tc", "v1", "tc2"), (torch.float16, torch.bfloat16, torch.float32)):
        os.environ["MULTIFLOW_BITMAP_GEMV"] = gemv
        for out_f, in_f in ((37, 2100), (5, 33)):
            w = torch.randn(out_f, in_f, generator=g).to(dev, dtype)
            mb = (torch.rand(out_f, in_f, generator=g) > 0.75).to(dev)
            mb[0] = False
            mb[-1] = True
            fmt = ops.bitmap_pack(w, mb)
            bias = torch.randn(out_f, generator=g).to(dev, dtype)
            for rows in (1, 3, 8, 9, 16, 130):
                xx = torch.randn(rows, in_f, generator=g).to(dev, dtype)
                got = ops._bitmap_linear_cuda(xx, *fmt, in_f, bias)
                # 2100 inputs in bfloat16: a fixed 2e-2 is tighter than plain torch's own
                # error (seen on the H200); the bound the CUDA tests use instead
                assert_linear_earned(got.cpu(), xx.cpu(), [t.cpu() for t in fmt], in_f, bias.cpu(),
                                     f"_bitmap_linear_cuda {dtype} {out_f}x{in_f} rows={rows}")
                calls += 1
    # hostile formats (row_ptr / block_ptr are trusted on CUDA: wrong numbers allowed, but no
    # read outside values): each tensor its own allocation (gpu_check.sh turns the caching
    # allocator off for memcheck), so a read past values' end is an error memcheck reports
    w = torch.randn(19, 1100, generator=g).to(dev, torch.float16)
    mb = (torch.rand(19, 1100, generator=g) > 0.75).to(dev)
    values, bits, row_ptr, block_ptr = ops.bitmap_pack(w, mb)
    hostile = [
        (values[:3].clone(), bits, row_ptr, block_ptr),
        (values, bits, torch.randint(-(2**31), 2**31 - 1, row_ptr.shape, generator=g).int().to(dev), block_ptr),
        (values, bits, row_ptr, torch.randint(-(2**31), 2**31 - 1, block_ptr.shape, generator=g).int().to(dev)),
        (values, bits, torch.full_like(row_ptr, 2**31 - 1), torch.full_like(block_ptr, 2**31 - 1)),
        # every bit set (padding bits too) with the offsets of the real mask: each chunk's
        # bits reach past its staged values (tc2 relies on its shared-memory slack there)
        (values, torch.full_like(bits, -1), row_ptr, block_ptr),
    ]
    # every bit set on 4096 columns (8 chunks, so the last warp stages too) at ~25% density:
    # its last row's reads run past the warps' buffers, into tc2's slack (1100 columns use only
    # 3 of the 8 warps, whose reads stay inside the next warps' buffers)
    w4 = torch.randn(19, 4096, generator=g).to(dev, torch.float16)
    v4, b4, r4, p4 = ops.bitmap_pack(w4, (torch.rand(19, 4096, generator=g) > 0.75).to(dev))
    wide = (v4, torch.full_like(b4, -1), r4, p4)
    for gemv, rows in itertools.product(("tc", "v1", "tc2"), (1, 5, 9, 16)):
        os.environ["MULTIFLOW_BITMAP_GEMV"] = gemv
        xx = torch.randn(rows, 1100, generator=g).to(dev, torch.float16)
        for fmt in hostile:
            assert ops._bitmap_linear_cuda(xx, *fmt, 1100, None).shape == (rows, 19)
            calls += 1
        x4 = torch.randn(rows, 4096, generator=g).to(dev, torch.float16)
        assert ops._bitmap_linear_cuda(x4, *wide, 4096, None).shape == (rows, 19)
        calls += 1
    os.environ.pop("MULTIFLOW_BITMAP_GEMV")
    # last (new, never run on a GPU before: a sticky CUDA error here must not cost the other
    # kernels' checks): the 128 x 128 tile kernels (tile128; wgmma on sm_90) over many stages (1040 columns:
    # 17 stages, the last 16 columns) and two feature tiles, the second partial (136 = 128 + 8:
    # 16-byte output pieces); 70 x 48 / 5 rows: one partial stage and tile
    w = torch.randn(136, 1040, generator=g).to(dev, torch.float16)
    values, meta = ops.sparse24_pack(w, ops.nm_mask(torch.rand(136, 1040, generator=g).to(dev), 2, 4))
    xx = torch.randn(200, 1040, generator=g).to(dev, torch.float16)
    w2 = torch.randn(70, 48, generator=g).to(dev, torch.bfloat16)
    packed2 = ops.sparse24_pack(w2, ops.nm_mask(torch.rand(70, 48, generator=g).to(dev), 2, 4))
    x2 = torch.randn(5, 48, generator=g).to(dev, torch.bfloat16)
    for kind in ("tile128", "wgmma") if torch.cuda.get_device_capability() == (9, 0) else ("tile128",):
        for args in [(values, meta, None, [xx]), (*packed2, None, [x2]), *tiles128]:
            calls += _check_24_linear(*args, ("MULTIFLOW_SPARSE24_GEMM", kind))
    torch.cuda.synchronize()
    print(f"{calls} calls checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
