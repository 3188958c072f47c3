"""Sparse fine-tuning layers (family ``masked_linear``): ``masked_linear`` forward and
forward + backward against dense ``F.linear`` and against dense with the mask multiplied in
(``F.linear(x, W * M)``, the plain-torch way to keep pruned weights at zero).

Rows of x 1 ... 2048, BLIP-base shapes (768x768, 2304x768, 3072x768, 768x3072), 75% of the
weights pruned (the kernels' cost does not depend on it). Copies of the weight filling 256 MiB
(CPU) / 512 MiB (CUDA) are rotated so the caches do not hold it between calls (CUDA: CUDA events, median after warm-up).
Reported per case: time, achieved TFLOP/s (2 * rows * in * out per product: one forward,
three forward + backward) and GB/s of the bytes the op must move at least (x, weight, mask
bits, y; backward adds grad_out, x, weight and bits again, grad_x and grad_weight). Prints a
table, writes JSON (machine, versions, date, commit) to --out as masked_linear_<device>.json.

    .venv/bin/python benchmarks/bench_masked_linear.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (ROTATION_BYTES, family_main, results_dir, rotating_copies, time_samples,  # noqa: E402
                    torch_dtypes, write_json)

SHAPES = {"768x768": (768, 768), "2304x768": (2304, 768), "3072x768": (3072, 768), "768x3072": (768, 3072)}
IMPLS = ("dense", "dense_mask_mul", "masked_linear")


def _buffers(shape, dtype, device, n_buffers, sparsity=0.75):
    from multiflow_kernels import ops

    g = torch.Generator(device=device).manual_seed(0)
    bufs = []
    for _ in range(n_buffers):
        mask = torch.rand(shape, generator=g, device=device) >= sparsity
        w = (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype).requires_grad_()
        bufs.append({"w": w, "bits": ops.pack_mask(mask), "mask": mask.to(dtype)})
    return bufs


def _impls(bufs, x):
    """Forward of each implementation, each call on the next weight buffer."""
    from multiflow_kernels import ops

    it = iter(range(10**12))

    def pick():
        return bufs[next(it) % len(bufs)]

    impls = {
        "dense": lambda: (lambda b: (F.linear(x, b["w"]), b))(pick()),
        "dense_mask_mul": lambda: (lambda b: (F.linear(x, b["w"] * b["mask"]), b))(pick()),
        "masked_linear": lambda: (lambda b: (ops.masked_linear(x, b["w"], b["bits"], None), b))(pick()),
    }
    if x.is_cuda and importlib.util.find_spec("triton") is not None:
        # the op's default CUDA path is cuBLAS (masked_cublas.py); the Triton kernels beside it
        impls["masked_triton"] = lambda: (lambda b: (_masked_triton(x, b["w"], b["bits"]), b))(pick())
    return impls


class _MaskedTriton(torch.autograd.Function):
    """The Triton kernels with autograd, as the op runs them under MULTIFLOW_MASKED_CUDA=triton."""

    @staticmethod
    def forward(ctx, x, w, bits):
        from multiflow_kernels.triton.masked_linear import masked_linear_triton

        ctx.save_for_backward(x, w, bits)
        return masked_linear_triton(x, w, bits, None)

    @staticmethod
    def backward(ctx, g):
        from multiflow_kernels.triton.masked_linear import masked_linear_backward_triton

        x, w, bits = ctx.saved_tensors
        gx, gw, _ = masked_linear_backward_triton(g.contiguous(), x, w, bits, [True, True, False])
        return gx, gw, None


def _masked_triton(x, w, bits):
    return _MaskedTriton.apply(x, w, bits)


def bench_shape(shape, rows_list, dtype, device, timing):
    out_f, in_f = shape
    n_buffers = rotating_copies(out_f * in_f * torch.empty(0, dtype=dtype).element_size(), device)
    bufs = _buffers(shape, dtype, device, n_buffers)
    es = bufs[0]["w"].element_size()
    w_bytes, bits_bytes = out_f * in_f * es, bufs[0]["bits"].numel() * 4
    g = torch.Generator(device=device).manual_seed(1)
    rows_out = []
    for rows in rows_list:
        x = torch.randn(rows, in_f, generator=g, device=device).to(dtype).requires_grad_()
        grad_out = torch.randn(rows, out_f, generator=g, device=device).to(dtype)
        x_bytes, y_bytes = rows * in_f * es, rows * out_f * es
        flops = 2 * rows * in_f * out_f
        r = {"rows": rows, "forward": {}, "forward_backward": {}}
        for name, fwd in _impls(bufs, x).items():
            extra = bits_bytes if name in ("masked_linear", "masked_triton") else (w_bytes if name == "dense_mask_mul" else 0)
            with torch.no_grad():
                s_f = time_samples(lambda: fwd()[0], device, **timing)

            def fwd_bwd():
                y, b = fwd()
                return torch.autograd.grad(y, (x, b["w"]), grad_out)

            s_fb = time_samples(fwd_bwd, device, **timing)
            t_f, t_fb = statistics.median(s_f), statistics.median(s_fb)
            # least bytes: forward x, W (+ bits / mask), y; backward grad_out, x, W (+ bits / mask), grad_x, grad_W
            fb_bytes = 2 * x_bytes + y_bytes + 3 * w_bytes + 2 * extra + y_bytes + x_bytes
            r["forward"][name] = {"time_s": t_f, "best_s": min(s_f), "TFLOPs": flops / t_f / 1e12,
                                  "GBps": (x_bytes + w_bytes + extra + y_bytes) / t_f / 1e9}
            r["forward_backward"][name] = {"time_s": t_fb, "best_s": min(s_fb), "TFLOPs": 3 * flops / t_fb / 1e12, "GBps": fb_bytes / t_fb / 1e9}
        rows_out.append(r)
    return {"weight_copies": n_buffers, "rows": rows_out}


def run(device: str = "cpu", quick: bool = False, out=None, dtypes=None) -> Path:
    """The ``masked_linear`` family: prints the table, writes masked_linear_<device>.json to ``out``."""
    import multiflow_kernels  # noqa: F401  (registers the ops)

    device = torch.device(device)
    cuda = device.type == "cuda"
    if quick:
        shapes, rows_list = ["768x768", "3072x768"], [1, 64, 256]
    else:
        shapes, rows_list = list(SHAPES), [1, 4, 16, 64, 256, 2048]
    dtypes = torch_dtypes(dtypes, cuda)
    timing = {"min_seconds": 0.05 if (quick or cuda) else 0.2, "max_runs": 100}
    print(f"masked_linear vs dense F.linear and F.linear(x, W * M), {device}, 75% pruned, weight copies "
          f"rotated ({ROTATION_BYTES[device.type] >> 20} MiB); ms per call (median), TFLOP/s achieved; ratio = masked_linear time / dense time"
          + ("; on CUDA 'masked' is the op's default (cuBLAS on the masked weight), 'triton' the Triton kernels" if cuda else ""))
    tri = f" {'triton':>8}" if cuda and importlib.util.find_spec("triton") is not None else ""
    print(f"{'shape':>9} {'dtype':>8} {'rows':>5} | {'fwd dense':>9} {'W*M':>8} {'masked':>8} {'ratio':>6} {'TFLOP/s':>7}{tri} | "
          f"{'f+b dense':>9} {'W*M':>8} {'masked':>8} {'ratio':>6} {'TFLOP/s':>7}{tri}")
    results = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for shape_name in shapes:
            case = bench_shape(SHAPES[shape_name], rows_list, dtype, device, timing)
            results.append({"shape": shape_name, "dtype": dname, **case})
            for r in case["rows"]:
                cells = []
                for mode in ("forward", "forward_backward"):
                    m = r[mode]
                    triton_ms = f" {m['masked_triton']['time_s'] * 1e3:>8.3f}" if "masked_triton" in m else ""
                    cells.append(f"{m['dense']['time_s'] * 1e3:>9.3f} {m['dense_mask_mul']['time_s'] * 1e3:>8.3f} "
                                 f"{m['masked_linear']['time_s'] * 1e3:>8.3f} "
                                 f"{m['masked_linear']['time_s'] / m['dense']['time_s']:>5.2f}x "
                                 f"{m['masked_linear']['TFLOPs']:>7.3f}{triton_ms}")
                print(f"{shape_name:>9} {dname:>8} {r['rows']:>5} | {cells[0]} | {cells[1]}")
    path = write_json(Path(out or results_dir(quick=quick)), f"masked_linear_{device.type}", {
        "benchmark": "masked_linear", "family": "masked_linear", "device": str(device), "quick": quick,
        "sparsity": 0.75, "rotation_bytes": ROTATION_BYTES[device.type], "timing": timing,
        "note": "time_s: median seconds per call, best_s: fastest sample; forward under no_grad; forward_backward = forward + "
                "torch.autograd.grad for x and the weight; GBps counts the least bytes the op must move",
        "results": results})
    print(f"wrote {path}")
    return path


def main():
    family_main(run, __doc__, "2 shapes, 3 row counts (seconds)")


if __name__ == "__main__":
    main()
