"""The CUDA selection and flow ops queue their work without making the host wait.

Each op's tables go up from pinned memory with a non-blocking copy (csrc/cuda/select.cu,
multiflow_kernels/triton/flow.py): a copy from pageable memory, a ``.item()`` or a read
back would make the host wait for everything queued on the stream, and the GPU then
idles while the host prepares the next launch (the profile of masks_from_stats on an
H200: 22 such waits a call, 4.9 ms of GPU work in 15 ms). Under
``torch.cuda.set_sync_debug_mode("error")`` torch raises on every synchronising call it
makes, so these tests fail if one comes back. The results are checked against the CPU
ops after the sync-free section.

Needs an NVIDIA GPU (marked ``cuda``; skipped without one).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import multiflow_kernels  # noqa: F401  (registers the ops)
from multiflow_kernels import ops


@contextlib.contextmanager
def no_host_sync():
    """Raise on any synchronising CUDA call torch makes inside the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def layers(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(33, 65), (7, 3), (130, 17), (64, 1000)]
    ws = [torch.randn(s, generator=g).mul(0.1 * (i + 1)).to(device) for i, s in enumerate(shapes)]
    acts = [torch.rand(s[1], generator=g).to(device) for s in shapes]
    return ws, acts


@pytest.mark.cuda
def test_selection_ops_do_not_wait_for_the_device():
    ws_cpu, _ = layers("cpu")
    ws = [w.cuda() for w in ws_cpu]
    total = sum(w.numel() for w in ws)
    ks = [max(1, w.numel() // 3) for w in ws]
    # warm-up: first calls may allocate (pinned blocks, the caching allocator's segments)
    ops.count_at_most(ws, ops.kth_smallest_group(ws, total // 2, True), True)
    ops.kth_smallest_each(ws, ks, True)
    with no_host_sync():
        t = ops.kth_smallest_group(ws, total // 2, True)
        counts = ops.count_at_most(ws, t, True)
        each = ops.kth_smallest_each(ws, ks, True)
    t_cpu = ops.kth_smallest_group(ws_cpu, total // 2, True)
    assert torch.equal(t.cpu(), t_cpu)
    assert torch.equal(counts.cpu(), ops.count_at_most(ws_cpu, t_cpu, True))
    assert torch.equal(each.cpu(), ops.kth_smallest_each(ws_cpu, ks, True))


@pytest.mark.cuda
def test_flow_ops_do_not_wait_for_the_device():
    ws_cpu, acts_cpu = layers("cpu", seed=1)
    ws, acts = [w.cuda() for w in ws_cpu], [a.cuda() for a in acts_cpu]
    ks = [max(1, w.numel() // 2) for w in ws]

    def run(ws, acts):
        imp_out, imp_in, w_scale = ops.flow_importance(ws, acts)
        thresholds = ops.flow_kth_each(ws, imp_out, imp_in, w_scale, ks)
        return thresholds, ops.flow_masks(ws, imp_out, imp_in, w_scale, thresholds)

    run(ws, acts)  # warm-up: Triton compiles its kernels on the first call
    with no_host_sync():
        thresholds, masks = run(ws, acts)
    want_t, want_masks = run(ws_cpu, acts_cpu)
    torch.testing.assert_close(thresholds.cpu(), want_t, rtol=1e-5, atol=0)
    for got, want in zip(masks, want_masks):
        # scores equal to a threshold up to rounding may differ between devices
        assert (got.cpu() != want).float().mean().item() < 1e-3
