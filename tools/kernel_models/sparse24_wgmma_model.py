"""Line-by-line NumPy emulation of linear_wgmma_kernel (csrc/cuda/sparse24.cu, namespace wg).

Reuses the machinery of sparse24_tile128_model.py (problem generation, tags, Frag64 = the
H200-verified 64x64 kernel's fragments, the mma.sp A/metadata model, bank statistics). New:
wg layout, x tile in 8x16-byte core matrices, wgmma.mma_async.sp m64n128k32 with A from
registers and B through a matrix descriptor, the async-proxy fence, wgmma in-flight reads.
Every thread of every block; vectorised over the 256 threads.
"""
from __future__ import annotations

import sys
import numpy as np

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparse24_tile128_model as base  # noqa: E402
from sparse24_tile128_model import (write_out_tile, ZERO, UNINIT, T_X, T_Y, decode, encode, Findings, Banks,  # noqa
                       Frag64, Problem, A_ROW, A_VC, M_LANE, M_SHIFT, G, T, lane)

# ---- constants, as in namespace wg
kOut, kTok, kK = 128, 128, 64
kVals = kK // 2
kWords = kK // 16
kStages = 3
kBlockThreads = 256
kAPitch = kVals + 8
kYPitch = kOut + 8
kCoreBytes = 128
kLeadBytes = kCoreBytes
kStrideBytes = (kK // 8) * kCoreBytes
ES = 2
kXBytes = kTok * kK * ES
kABytes = kOut * kAPitch * ES
kMetaBytes = kOut * kWords * 2
kStageBytes = kXBytes + kABytes + kMetaBytes
kBytes = kStages * kStageBytes
assert kStageBytes % 1024 == 0
assert kTok * kYPitch * ES <= kBytes
SMEM0 = 0x400  # shared-window address of smem[] (any 1024-aligned value < 256 KiB - kBytes)

WG_TID = 10_000  # pseudo thread ids of the tensor cores' async reads (per warpgroup)

# config knobs for mutation tests (all False / defaults = the source)
CFG = dict()


def sparse_A(a, e, bf16, findings):
    """Dense 16x32 A per warp from the mma.sp-layout registers a (W,32,4) u32 and e (W,32) u32."""
    W = a.shape[0]
    ah = np.stack([a & 0xFFFF, a >> 16], axis=-1).astype(np.uint16)
    av = decode(ah, bf16)
    Ac = np.zeros((W, 16, 16))
    Ac[:, A_ROW, A_VC] = av
    bits = (e[:, M_LANE] >> M_SHIFT) & 0xF  # (W,16,8): only lanes with (lane & 3) in {0,1} are used
    p0, p1 = bits & 3, bits >> 2
    findings.flag("wgmma.sp metadata nibble with equal positions (undefined)", (p0 == p1).sum())
    Ad = np.zeros((W, 16, 32))
    wi = np.arange(W)[:, None, None]
    ri = np.arange(16)[None, :, None]
    ci = np.arange(8)[None, None, :]
    Ad[wi, ri, 4 * ci + p0] = Ac[:, :, 0::2]
    Ad[wi, ri, 4 * ci + p1] = Ac[:, :, 1::2]
    return Ad


# D fragment: d[4j + c] = row g + 8 (c >> 1), column 8 j + 2 t + (c & 1)
_c = np.arange(64)
D_ROW = G[:, None] + 8 * ((_c[None, :] & 3) >> 1)  # (32, 64)
D_COL = 8 * (_c[None, :] >> 2) + 2 * T[:, None] + (_c[None, :] & 1)
_kk, _nn = np.meshgrid(np.arange(32), np.arange(128), indexing="ij")  # B (k, n)


class Block(base.Block):
    """base.Block (shared memory, cp.async, races) at absolute shared-window addresses, with
    the async proxy's fences and wgmma's in-flight reads."""
    smem0 = SMEM0
    nbytes = kBytes
    race_what = "write and another thread's / the tensor cores' access in one barrier epoch"

    def __init__(self, P: Problem, bid, F: Findings, banks: Banks, f64: Frag64, y_out, y64_out, ycount):
        super().__init__(P, bid, F, banks, f64, y_out, y64_out, ycount)
        self.fence_ep = np.full(self.nbytes // 2, -1, dtype=np.int64)   # epoch of the proxy fence after the last write
        self.wg_inflight = [[], []]  # per warpgroup: (elements, issue epoch) of uncompleted wgmma reads
        self.wg_fenced = [False, False]  # wgmma.fence since the last register write of a / acc

    def _written(self, el):
        self.fence_ep[el] = -1  # a new generic-proxy write: not fenced for the async proxy yet

    def fence_proxy_async(self):
        # every thread executes it: covers its completed writes (all threads' completed writes here)
        sel = (self.fence_ep < 0) & (self.pending == 0)
        self.fence_ep[sel] = self.epoch

    def syncthreads(self):
        for w in range(2):
            if self.wg_inflight[w]:
                self.F.flag("barrier with a wgmma still in flight (no wgmma.wait_group before it)", 1)
        super().syncthreads()

    # ---- wgmma
    def wgmma_issue(self, w, acc, a, e, desc, bf16, step, u):
        """Warpgroup w: acc (256, 64) rows of its threads updated; a (256,4) u32; e (256,) u32; desc (256,) u64."""
        P, F = self.P, self.F
        th = slice(128 * w, 128 * w + 128)
        if not self.wg_fenced[w]:
            F.flag("wgmma issued without a wgmma.fence after register writes", 1)
        d = desc[th]
        if not (d == d[0]).all():
            F.flag("wgmma descriptor not uniform over the warpgroup", 1)
        d = int(d[0])
        start = (d & 0x3FFF) << 4
        lbo = ((d >> 16) & 0x3FFF) << 4
        sbo = ((d >> 32) & 0x3FFF) << 4
        F.flag("descriptor base offset != 0", int(((d >> 49) & 7) != 0))
        F.flag("descriptor layout type != 0 (no swizzle)", int(((d >> 62) & 3) != 0))
        F.flag("descriptor reserved bits set", int((d & ((3 << 14) | (3 << 30) | (7 << 46) | (0x3FF << 52))) != 0))
        addr = start + (_nn // 8) * sbo + (_kk // 8) * lbo + (_nn % 8) * 16 + (_kk % 8) * 2  # (32, 128)
        dat, tg, el = self.read(addr, 1, WG_TID + w, "wgmma B (descriptor)", record=False)
        dat, tg, el = dat[..., 0], tg[..., 0], el[..., 0]
        # tag check: B(k, n) = x[t0 + n, k0 + 32 u + k], zero-fill outside
        tok = self.t0 + _nn
        col = kK * step + 32 * u + _kk
        exp = np.where((tok < P.m) & (col < P.cols), T_X + tok * P.cols + col, ZERO)
        nbad = int((tg != exp).sum())
        F.flag("wgmma B element differs from x[t0 + n, k0 + 32u + k] (or zero-fill)", nbad,
               example=(self.bid, step, u, w))
        # async proxy: the last write of each element fenced (fence.proxy.async) before an earlier barrier
        unf = (self.fence_ep[el] < 0) | (self.fence_ep[el] >= self.epoch)
        unf &= self.tag[el] != UNINIT
        F.flag("wgmma reads an element whose write was not fenced (fence.proxy.async + barrier) before it",
               unf.sum(), example=(self.bid, step, u, w))
        self.wg_inflight[w].append((el.reshape(-1), self.epoch))
        B = decode(dat, bf16)  # (32, 128)
        aw = a[th].reshape(4, 32, 4)
        ew = e[th].reshape(4, 32)
        Ad = sparse_A(aw, ew, bf16, F).reshape(64, 32)
        D = Ad @ B  # (64, 128)
        wq = np.arange(4)[:, None, None]
        upd = D[16 * wq + D_ROW[None], D_COL[None]]  # (4, 32, 64)
        acc[th] += upd.reshape(128, 64)

    def wgmma_wait(self, w):
        for el, e0 in self.wg_inflight[w]:
            for ep in range(e0, self.epoch + 1):
                self.recs[ep].append((el, np.full(el.size, WG_TID + w), False))
        self.wg_inflight[w] = []

    # ---- the kernel
    def run(self):
        P, F = self.P, self.F
        bf16 = P.bf16
        tid = np.arange(kBlockThreads)
        ln = tid & 31
        warp = tid >> 5
        g = ln >> 2
        t = ln & 3
        wrow = (warp >> 2) * 64 + (warp & 3) * 16
        if CFG.get("wrow_bug"):
            wrow = (warp & 1) * 64 + (warp >> 1) * 16
        o0 = (self.bid % P.feature_tiles) * kOut
        t0 = (self.bid // P.feature_tiles) * kTok
        self.t0 = t0
        half, words, rows, cols, m = P.half, P.words, P.rows, P.cols, P.m
        rows_here = int(min(rows - o0, kOut))
        toks_here = int(min(m - t0, kTok))
        F.flag("rows_here / toks_here < 1", int(rows_here < 1) + int(toks_here < 1))
        smem0 = SMEM0
        x_at = lambda st: smem0 + st * kStageBytes  # noqa: E731
        a_at = lambda st: smem0 + st * kStageBytes + kXBytes  # noqa: E731
        m_tile = lambda st: smem0 + st * kStageBytes + kXBytes + kABytes  # noqa: E731  (byte address)

        I32 = (1 << 31) - 1

        def i32(v, what):
            v = np.asarray(v, dtype=np.int64)
            F.flag(f"int32 overflow: {what}", ((v > I32) | (v < -I32 - 1)).sum())
            return v

        kVPieces = (kOut * kVals // 8) // kBlockThreads
        kXPieces = (kTok * kK // 8) // kBlockThreads
        kVRowStep = kBlockThreads // (kVals // 8)
        kXRowStep = 32
        v_row = tid // (kVals // 8)
        v_part = tid % (kVals // 8)
        x_row = 8 * (tid >> 6) + (tid & 7)
        x_part = (tid >> 3) & 7
        if CFG.get("x_map_bug"):
            x_part = (tid >> 2) & 7
        v_stride = i32(kVRowStep * i32(half, "(int)half"), "v_stride")
        x_stride = i32(kXRowStep * i32(cols, "(int)cols"), "x_stride")
        v_src = (o0 + np.where(v_row < rows_here, v_row, 0)) * half + 8 * v_part
        x_src = (t0 + np.where(x_row < toks_here, x_row, 0)) * cols + 8 * x_part
        v_dst = (v_row * kAPitch + 8 * v_part) * ES
        x_dst = (x_row >> 3) * kStrideBytes + x_part * kLeadBytes + (x_row & 7) * 16
        if CFG.get("x_dst_bug"):
            x_dst = (x_row >> 3) * kStrideBytes + x_part * 16 + (x_row & 7) * kLeadBytes

        def copy_tiles(stage, step):
            k0 = i32(step * kK, "k0")
            cols_left = i32(int(cols) - k0, "cols_left")
            for p in range(kVPieces):
                ok = (16 * v_part < cols_left) & (v_row + kVRowStep * p < rows_here)
                off = i32(p * v_stride + k0 // 2, "p * v_stride + k0 / 2")
                dst = a_at(stage) + v_dst + kVRowStep * p * kAPitch * ES
                self.banks.add("cp.async A tile writes (16 B, 8-lane phases)", dst.reshape(32, 8), 16)
                self.cp_async16(tid, dst, "values", np.where(ok, v_src + off, 0), ok, "copy_tiles values")
                exp = (o0 + v_row + kVRowStep * p) * half + k0 // 2 + 8 * v_part
                F.flag("values source differs from (row, col) form", (ok & (v_src + off != exp)).sum())
            for p in range(kXPieces):
                ok = (8 * x_part < cols_left) & (x_row + kXRowStep * p < toks_here)
                if CFG.get("x_bound_bug"):
                    ok = (8 * x_part <= cols_left) & (x_row + kXRowStep * p < toks_here)
                off = i32(p * x_stride + k0, "p * x_stride + k0")
                dst = x_at(stage) + x_dst + (kXRowStep // 8) * p * kStrideBytes
                self.banks.add("cp.async x tile writes (16 B, 8-lane phases)", dst.reshape(32, 8), 16)
                self.cp_async16(tid, dst, "x", np.where(ok, x_src + off, 0), ok, "copy_tiles x")
                exp = (t0 + x_row + kXRowStep * p) * cols + k0 + 8 * x_part
                F.flag("x source differs from (token, col) form", (ok & (x_src + off != exp)).sum())

        read_meta, store_meta = base.stage_meta(self, o0, rows_here, words, m_tile, i32, "store_meta (u16 stores)")

        acc = np.zeros((kBlockThreads, 64))

        def ldmatrix_x4(addr, what):
            regs, tags = base.ldmatrix_x4_of(self, addr.reshape(8, 32), what, "ldmatrix.x4 {what} (8-lane phases)")
            return regs.reshape(256, 4), tags  # tags (8,32,4,2)

        def desc_of(addr):
            addr = np.asarray(addr, dtype=np.uint64)
            lbo, sbo = (kStrideBytes, kLeadBytes) if CFG.get("lbo_sbo_swap") else (kLeadBytes, kStrideBytes)
            # start 16-byte aligned, fits 14 bits after >> 4
            F.flag("descriptor start address not 16-byte aligned", int((addr % 16 != 0).sum()))
            F.flag("descriptor start address >= 256 KiB (lost by & 0x3ffff)", int((addr >= (1 << 18)).sum()))
            return ((addr & np.uint64(0x3FFFF)) >> np.uint64(4)) | (np.uint64(lbo >> 4) << np.uint64(16)) | \
                (np.uint64(sbo >> 4) << np.uint64(32))

        # Prologue
        for s in range(kStages - 1):
            if s < P.steps:
                copy_tiles(s, s)
                store_meta(s, read_meta(s))
            self.commit()

        for step in range(P.steps):
            if CFG.get("fence_before_wait"):
                self.fence_proxy_async()
                self.wait_group(1)
            elif CFG.get("fence_after_barrier"):
                self.wait_group(1)
            else:
                self.wait_group(1)
                if not CFG.get("no_proxy_fence"):
                    self.fence_proxy_async()
            self.syncthreads()
            if CFG.get("fence_after_barrier"):
                self.fence_proxy_async()
            if CFG.get("wgmma_wait_after_barrier") and step > 0:
                for w in range(2):
                    self.wgmma_wait(w)
            nxt = step + kStages - 1
            pair = None

            stage = step % kStages
            ms = m_tile(stage)
            a = [None] * 2
            e = [None] * 2
            for u in range(kK // 32):
                r = wrow + (ln & 7) + 8 * ((ln >> 3) & 1)
                c = 16 * u + 8 * (ln >> 4)
                a[u], atag = ldmatrix_x4(a_at(stage) + (r * kAPitch + c) * ES, "A")
                ea = ms + (((wrow >> 4) * kWords + 2 * u + (t & 1)) * 8 + g) * 4
                F.flag("e load not 4-byte aligned", (ea % 4 != 0).sum())
                self.banks.add("e: ms[] u32 loads", ea.reshape(8, 32), 4)
                ev, e_t, _ = self.read(ea, 2, tid, "e")
                e[u] = ev[..., 0].astype(np.uint32) | (ev[..., 1].astype(np.uint32) << 16)
                etag = np.stack([e_t[..., 0], e_t[..., 1]], -1).reshape(8, 32, 2)
                for wi in range(8):
                    # the spec: warp w % 4 of warpgroup w >> 2 supplies rows 16 (w % 4) .. of its 64
                    R0_spec = o0 + (wi >> 2) * 64 + 16 * (wi & 3)
                    s64 = 2 * step + u
                    if not np.array_equal(atag[wi], self.f64.A(R0_spec, s64)):
                        F.flag("A fragment differs from the 64x64 kernel's (spec rows of the warp)", 1,
                               example=(self.bid, step, u, wi))
                    if not np.array_equal(etag[wi], self.f64.E(R0_spec, s64)):
                        F.flag("metadata register e differs from the 64x64 kernel's", 1,
                               example=(self.bid, step, u, wi))
            self.wg_fenced = [False, False]  # ldmatrix wrote a[], and acc was touched by fence_accumulators
            if not CFG.get("no_wgmma_fence"):
                self.wg_fenced = [True, True]  # wgmma_fence()
            for u in range(kK // 32):
                off = (4 * u * kLeadBytes) if not CFG.get("substep_bug") else (u * kLeadBytes)
                desc = desc_of(np.full(kBlockThreads, x_at(stage) + off))
                for w in range(2):
                    self.wgmma_issue(w, acc, a[u], e[u], desc, bf16, step, u)
            # the refill, issued while the wgmma runs (kernel order since session 9's review)
            if nxt < P.steps:
                copy_tiles(nxt % kStages, nxt)
                pair = read_meta(nxt)
            self.commit()
            if not CFG.get("wgmma_wait_after_barrier"):
                for w in range(2):
                    self.wgmma_wait(w)
            if nxt < P.steps:
                store_meta(nxt % kStages, pair)
        if CFG.get("wgmma_wait_after_barrier"):
            for w in range(2):
                self.wgmma_wait(w)

        # Epilogue
        self.commit()
        self.wait_group(0)
        F.flag("cp.async groups not completed at the epilogue", sum(1 for gr_ in self.groups if not gr_[1]))
        for w in range(2):
            F.flag("accumulators read while a wgmma is in flight", int(bool(self.wg_inflight[w])))
        if not CFG.get("no_epi_barrier"):
            self.syncthreads()
        ys = smem0
        for h in range(2):
            ol = wrow + g + 8 * h
            if P.bias is not None:
                okb = o0 + ol < rows
                bo = np.where(okb, decode(P.bias[np.clip(o0 + ol, 0, rows - 1)], bf16), 0.0)
            else:
                bo = np.zeros(kBlockThreads)
            for j in range(kTok // 8):
                for c in range(2):
                    tl = 8 * j + 2 * t + c
                    idx = tl * kYPitch + ol
                    di = 4 * j + 2 * h + c if not CFG.get("d_index_bug") else 4 * j + h + 2 * c
                    val = acc[:, di] + bo
                    addr = ys + idx * ES
                    self.banks.add("epilogue ys stores (2 B)", addr.reshape(8, 32), 2)
                    self.write(addr, encode(val, bf16)[:, None], (T_Y + tl * kOut + ol)[:, None], tid,
                               "epilogue ys store", shadow=val[:, None])
        self.syncthreads()
        write_out_tile(self, ys, tid, t0, o0)
        self.check_races()


def run_case(rows, cols, m, bias, bf16, seed=0):
    res, F, banks, _, _ = base.emulate(Block, rows, cols, m, bias, bf16, seed)
    return res, F, banks


CASES = [(128, 64, 128), (130, 48, 5), (70, 1040, 129), (256, 4096, 300), (33, 16, 7), (8, 32, 200),
         (136, 80, 131), (24, 192, 40)]

if __name__ == "__main__":
    import time
    all_banks = Banks()
    total_findings = 0
    for k, (rows, cols, m) in enumerate(CASES):
        for bias in (False, True):
            for bf16 in (False, True):
                t_ = time.time()
                res, F, banks = run_case(rows, cols, m, bias, bf16, seed=31 * k + 2 * bias + bf16)
                res["sec"] = round(time.time() - t_, 1)
                print(res, flush=True)
                for kind, n in F.items.items():
                    total_findings += n
                    print("   FINDING:", kind, n, F.examples.get(kind))
                for kind, s in banks.stats.items():
                    a_ = all_banks.stats[kind]
                    a_[0] += s[0]
                    a_[1] += s[1]
                    a_[2] = max(a_[2], s[2])
    print("total findings:", total_findings)
    print("bank conflicts (wavefronts per phase/instruction: mean, max):")
    for kind, (n, tot, mx) in all_banks.stats.items():
        print(f"   {kind}: {n} phases, mean {tot / n:.2f}, max {mx}")
