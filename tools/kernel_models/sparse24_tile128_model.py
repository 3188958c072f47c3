"""Line-by-line NumPy emulation of linear_mma128_kernel (csrc/cuda/sparse24.cu, namespace tile128).

Every thread of a block (vectorised over the 256 threads / 8 warps x 32 lanes), every block of the
grid. Shared memory is an array of 2-byte elements (every access in the kernel is 2-byte aligned)
with, per element: data bits, a logical tag (what global element it holds), a pending-cp.async
count and, for the epilogue tile, a float64 shadow. Races are checked per barrier epoch: cp.async
writes are live from their issue epoch to the epoch of the wait_group that completes them.
"""
from __future__ import annotations

import sys
from pathlib import Path
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from multiflow_kernels import reference as ref  # noqa: E402

# ---- constants, as in the source
kOut, kTok, kK = 128, 128, 64
kVals = kK // 2
kWords = kK // 16
kStages = 3
kBlockThreads = 256
kAPitch = kVals + 8
kXPitch = kK + 8
kYPitch = kOut + 8
ES = 2  # sizeof(scalar_t) for half / bf16
kABytes = kOut * kAPitch * ES
kXBytes = kTok * kXPitch * ES
kMetaBytes = kOut * kWords * 2
kStageBytes = kABytes + kXBytes + kMetaBytes
kBytes = kStages * kStageBytes
assert kABytes % 16 == 0 and kXBytes % 16 == 0 and kStageBytes % 16 == 0
assert kTok * kYPitch * ES <= kBytes
FILLER = 0x4444

# tags: logical identity of a 2-byte element
ZERO = -1      # cp.async zero-fill
UNINIT = -2    # never written
T_A, T_X, T_M, T_Y = 1 << 40, 2 << 40, 3 << 40, 4 << 40
T_FILL = T_M + (1 << 39)


def decode(u16, bf16):
    u16 = np.asarray(u16, dtype=np.uint16)
    if bf16:
        return (u16.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return u16.view(np.float16).astype(np.float64)


def encode(f64, bf16):
    # the kernel rounds its float32 (acc + bias) to scalar_t: float64 -> float32 -> 16-bit here
    t = torch.from_numpy(np.ascontiguousarray(f64, dtype=np.float64)).float()
    return t.to(torch.bfloat16 if bf16 else torch.float16).view(torch.int16).numpy().view(np.uint16)


class Findings:
    def __init__(self):
        self.items = defaultdict(int)
        self.examples = {}

    def flag(self, kind, n=1, example=None):
        if n:
            self.items[kind] += int(n)
            if kind not in self.examples and example is not None:
                self.examples[kind] = example


class Banks:
    """Worst / total wavefront counts per access kind."""

    def __init__(self):
        self.stats = defaultdict(lambda: [0, 0, 0])  # accesses, sum degree, max degree

    def add(self, kind, byte_addrs, nbytes):
        # byte_addrs: (..., P) addresses of one phase (P lanes); nbytes per lane
        a = np.asarray(byte_addrs).reshape(-1, np.asarray(byte_addrs).shape[-1])
        words = (a[:, :, None] // 4 + np.arange(max(1, nbytes // 4))[None, None, :]).reshape(a.shape[0], -1)
        if nbytes < 4:
            words = a // 4
        for row in words:
            u = np.unique(row)
            deg = np.bincount(u % 32, minlength=32).max()
            s = self.stats[kind]
            s[0] += 1
            s[1] += deg
            s[2] = max(s[2], deg)


# ---------------------------------------------------------------------------------------
# the mma.sp model (PTX m16n8k32 .f16/.bf16, sparsity selector 0), all warps at once
lane = np.arange(32)
G, T = lane >> 2, lane & 3
# A compressed (16 x 16): register q, half h of lane l -> row g + 8 (q & 1), value col 2t + h + 8 (q >> 1)
A_ROW = (G[:, None, None] + 8 * (np.arange(4)[None, :, None] & 1)).repeat(2, axis=2)
A_VC = 2 * T[:, None, None] + np.arange(2)[None, None, :] + 8 * (np.arange(4)[None, :, None] >> 1)
# B (32 x 8): register q, half h -> k 8q + 2t + h, n g
B_K = 8 * np.arange(4)[None, :, None] + 2 * T[:, None, None] + np.arange(2)[None, None, :]
B_N = np.broadcast_to(G[:, None, None], (32, 4, 2))
# metadata: row R, chunk c (cols 4c..4c+3, values 2c, 2c+1) in lane 4 (R % 8) + c // 4,
# bits 16 (R // 8) + 4 (c % 4)
_R = np.arange(16)[:, None]
_C = np.arange(8)[None, :]
M_LANE = 4 * (_R % 8) + _C // 4
M_SHIFT = 16 * (_R // 8) + 4 * (_C % 4)


def mma_sp(acc, a, b, e, bf16, findings):
    """acc (W, 32, 4) float64 += mma.sp(a (W,32,4) u32, b (W,32,4) u32, e (W,32) u32)."""
    W = a.shape[0]
    ah = np.stack([a & 0xFFFF, a >> 16], axis=-1).astype(np.uint16)  # (W,32,4,2)
    bh = np.stack([b & 0xFFFF, b >> 16], axis=-1).astype(np.uint16)
    av, bv = decode(ah, bf16), decode(bh, bf16)
    Ac = np.zeros((W, 16, 16))
    Ac[:, A_ROW, A_VC] = av
    Bm = np.zeros((W, 32, 8))
    Bm[:, B_K, B_N] = bv
    bits = (e[:, M_LANE] >> M_SHIFT) & 0xF  # (W,16,8)
    p0, p1 = bits & 3, bits >> 2
    bad = p0 == p1
    findings.flag("mma.sp metadata nibble with equal positions (undefined)", bad.sum())
    Ad = np.zeros((W, 16, 32))
    wi = np.arange(W)[:, None, None]
    ri = np.arange(16)[None, :, None]
    ci = np.arange(8)[None, None, :]
    Ad[wi, ri, 4 * ci + p0] = Ac[:, :, 0::2]
    Ad[wi, ri, 4 * ci + p1] = Ac[:, :, 1::2]
    D = Ad @ Bm  # (W,16,8)
    acc[:, :, 0] += D[:, G, 2 * T]
    acc[:, :, 1] += D[:, G, 2 * T + 1]
    acc[:, :, 2] += D[:, G + 8, 2 * T]
    acc[:, :, 3] += D[:, G + 8, 2 * T + 1]


# ---------------------------------------------------------------------------------------
# the verified 64x64 kernel's fragments, from its explicit shared-memory loads, as logical tags
class Frag64:
    """Logical (tag) content of linear_mma_kernel's a[i][q], b[q], e[i] for an mma tile whose
    first feature is R0, first token T0, at 32-column k-step s (zero-fill / filler included)."""

    def __init__(self, P):
        self.P = P

    def _as(self, grow, vcol):  # s.a[stage][row * kAStride + col] after load_step
        P = self.P
        ok = (grow < P.rows) & (vcol < P.half)
        return np.where(ok, T_A + grow * P.half + vcol, ZERO)

    def A(self, R0, s):
        # a[i][0] = as + r*S + 2t, a[1] = (r+8), a[2] = r, +8, a[3] = (r+8), +8; r = g (in the mma tile)
        # each is a 4-byte load: elements (.., 2t) low half, (.., 2t+1) high half
        out = np.zeros((32, 4, 2), dtype=np.int64)
        r = G
        for q, (dr, dc) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
            for h in range(2):
                out[:, q, h] = self._as(R0 + r + dr, 16 * s + 2 * T + dc + h)
        return out

    def B(self, T0, s):
        P = self.P
        out = np.zeros((32, 4, 2), dtype=np.int64)
        for q in range(4):  # b[q] = xr[8q], xr = xs + (g)*S + 2t
            for h in range(2):
                tok = T0 + G
                col = 32 * s + 8 * q + 2 * T + h
                ok = (tok < P.m) & (col < P.cols)
                out[:, q, h] = np.where(ok, T_X + tok * P.cols + col, ZERO)
        return out

    def E(self, R0, s):
        P = self.P
        out = np.zeros((32, 2), dtype=np.int64)
        for hh, dr in enumerate([0, 8]):  # ms[r*2 + (t&1)] | ms[(r+8)*2 + (t&1)] << 16
            grow = R0 + G + dr
            wd = 2 * s + (T & 1)
            ok = (grow < P.rows) & (wd < P.words)
            out[:, hh] = np.where(ok, T_M + grow * P.words + wd, T_FILL)
        return out


# ---------------------------------------------------------------------------------------
class Problem:
    def __init__(self, rows, cols, m, bias, bf16, seed):
        rng = np.random.default_rng(seed)
        self.rows, self.cols, self.m, self.bf16 = rows, cols, m, bf16
        dt = torch.bfloat16 if bf16 else torch.float16
        w = torch.from_numpy(rng.standard_normal((rows, cols))).to(dt)
        # chunks keeping 2, 1 or 0 weights at random positions
        keep_n = rng.choice([0, 1, 2, 2, 2], size=(rows, cols // 4))
        perm = np.argsort(rng.random((rows, cols // 4, 4)), axis=-1)
        mask = np.zeros((rows, cols // 4, 4), dtype=bool)
        for k in range(2):
            np.put_along_axis(mask, perm[..., k:k + 1], (keep_n > k)[..., None], axis=-1)
        mask = torch.from_numpy(mask.reshape(rows, cols))
        values, metadata = ref.sparse24_pack(w, mask)
        self.w_dense = ref.sparse24_unpack(values, metadata)
        assert torch.equal(self.w_dense, torch.where(mask, w, torch.zeros((), dtype=dt)))
        x = torch.from_numpy(rng.standard_normal((m, cols))).to(dt)
        b = torch.from_numpy(rng.standard_normal(rows)).to(dt) if bias else None
        self.y_ref = (x.double() @ self.w_dense.double().T + (b.double() if bias else 0)).numpy()
        self.y_ref16 = ref.sparse24_linear(x, values, metadata, b, compute_dtype=torch.float64)
        self.values = values.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
        self.metadata = metadata.contiguous().numpy().view(np.uint16).reshape(-1)
        self.x = x.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
        self.bias = None if b is None else b.view(torch.int16).numpy().view(np.uint16)
        self.half = cols // 2
        self.words = cols // 16
        self.dt = dt
        # host side (launch_mma128)
        self.feature_tiles = -(-rows // kOut)
        self.blocks = self.feature_tiles * (-(-m // kTok))
        self.steps = -(-cols // kK)
        self.vec_out = rows % 8 == 0


class Block:
    # where smem[] starts in the addresses the kernel model uses, and its bytes (the wgmma
    # model's Block, a subclass, uses absolute shared-window addresses and its own layout)
    smem0 = 0
    nbytes = kBytes
    race_what = "write and another thread's access in one barrier epoch"

    def __init__(self, P: Problem, bid, F: Findings, banks: Banks, f64: Frag64, y_out, y64_out, ycount):
        self.P, self.bid, self.F, self.banks, self.f64 = P, bid, F, banks, f64
        self.y_out, self.y64_out, self.ycount = y_out, y64_out, ycount
        n = self.nbytes // 2
        rng = np.random.default_rng(1000 + bid)
        self.data = rng.integers(0, 1 << 16, n).astype(np.uint16)  # garbage
        self.tag = np.full(n, UNINIT, dtype=np.int64)
        self.shadow = np.full(n, np.nan)
        self.pending = np.zeros(n, dtype=np.int32)
        self.epoch = 0
        self.recs = defaultdict(list)  # epoch -> [(elems, tids, is_write)]
        self.groups = []  # committed: list of (entries, completed)
        self.open = []

    # ---- shared memory primitives
    def _range(self, byte_addr, nbytes, what):
        ba = np.asarray(byte_addr)
        bad = (ba < self.smem0) | (ba + nbytes > self.smem0 + self.nbytes)
        self.F.flag(f"smem out of bounds: {what}", bad.sum(), example=(self.bid, (ba[bad][:4] - self.smem0).tolist()))
        return not bad.any()

    def _el(self, byte_addr, nelem):
        """The 2-byte elements of smem[] from each address on: (..., nelem)."""
        return (np.asarray(byte_addr) - self.smem0)[..., None] // 2 + np.arange(nelem)

    def _rec(self, elems, tids, write, ep=None):
        self.recs[self.epoch if ep is None else ep].append(
            (np.asarray(elems).reshape(-1), np.asarray(tids).reshape(-1), write))

    def _written(self, el):
        """Hook: elements el got new data (a store, or a cp.async completing)."""

    def read(self, byte_addr, nelem, tids, what, record=True):
        """byte_addr (...,), reads nelem consecutive 2-byte elements each. Returns (data, tags) (..., nelem)."""
        byte_addr = np.asarray(byte_addr)
        assert (byte_addr % 2 == 0).all()
        if not self._range(byte_addr, 2 * nelem, what):
            byte_addr = np.clip(byte_addr, self.smem0, self.smem0 + self.nbytes - 2 * nelem)
        el = self._el(byte_addr, nelem)
        tids_b = np.broadcast_to(np.asarray(tids)[..., None], el.shape)
        pend = self.pending[el] > 0
        self.F.flag(f"read of an element with a cp.async still pending: {what}", pend.sum(), example=(self.bid, self.epoch))
        unin = self.tag[el] == UNINIT
        self.F.flag(f"read of never-written smem: {what}", unin.sum(), example=(self.bid, self.epoch))
        if record:
            self._rec(el, tids_b, False)
        return self.data[el], self.tag[el], el

    def write(self, byte_addr, data, tags, tids, what, shadow=None):
        byte_addr = np.asarray(byte_addr)
        data = np.asarray(data)
        nelem = data.shape[-1]
        if not self._range(byte_addr, 2 * nelem, what):
            return
        el = self._el(byte_addr, nelem)
        tids_b = np.broadcast_to(np.asarray(tids)[..., None], el.shape)
        pend = self.pending[el] > 0
        self.F.flag(f"write over a pending cp.async: {what}", pend.sum())
        self._rec(el, tids_b, True)
        self.data[el] = data
        self.tag[el] = tags
        self._written(el)
        if shadow is not None:
            self.shadow[el] = shadow

    def cp_async16(self, tids, dst, src_name, src_idx, ok, what):
        P = self.P
        src = getattr(P, src_name)
        dst = np.asarray(dst)
        self.F.flag(f"cp.async smem dst not 16-byte aligned: {what}", (dst % 16 != 0).sum())
        if not self._range(dst, 16, what):
            return
        # global side: in bounds and 16-byte aligned when in_bounds (bases are 16-byte aligned)
        oob = ok & ((src_idx < 0) | (src_idx + 8 > src.size))
        self.F.flag(f"cp.async global read out of bounds: {what}", oob.sum(), example=(self.bid, src_idx[oob][:4].tolist()))
        self.F.flag(f"cp.async global src not 16-byte aligned: {what}", (ok & ((src_idx * 2) % 16 != 0)).sum())
        sidx = np.where(ok, np.clip(src_idx, 0, src.size - 8), 0)[:, None] + np.arange(8)
        data = np.where(ok[:, None], src[sidx], 0).astype(np.uint16)
        base_tag = {"values": T_A, "x": T_X}[src_name]
        tags = np.where(ok[:, None], base_tag + sidx, ZERO)
        el = self._el(dst, 8)
        np.add.at(self.pending, el.reshape(-1), 1)
        self.open.append((el, np.broadcast_to(np.asarray(tids)[:, None], el.shape), data, tags, self.epoch))

    def commit(self):
        self.groups.append([self.open, False])
        self.open = []

    def wait_group(self, n):
        upto = len(self.groups) - n
        for gi in range(max(upto, 0)):
            grp = self.groups[gi]
            if grp[1]:
                continue
            for el, tids, data, tags, e0 in grp[0]:
                np.add.at(self.pending, el.reshape(-1), -1)
                self.data[el] = data
                self.tag[el] = tags
                self._written(el)
                for ep in range(e0, self.epoch + 1):
                    self.recs[ep].append((el.reshape(-1), tids.reshape(-1), True))
            grp[1] = True

    def syncthreads(self):
        self.epoch += 1

    def check_races(self):
        n = self.nbytes // 2
        for ep, lst in self.recs.items():
            if not lst:
                continue
            el = np.concatenate([a for a, _, _ in lst])
            td = np.concatenate([b for _, b, _ in lst])
            wr = np.concatenate([np.full(a.size, w) for a, _, w in lst])
            amin = np.full(n, 1 << 30)
            amax = np.full(n, -1)
            np.minimum.at(amin, el, td)
            np.maximum.at(amax, el, td)
            haswr = np.zeros(n, bool)
            haswr[el[wr]] = True
            race = haswr & (amax >= 0) & (amin != amax)
            self.F.flag(f"shared-memory race ({self.race_what})", race.sum(),
                        example=(self.bid, ep, np.nonzero(race)[0][:4].tolist()))

    # ---- the kernel
    def run(self):
        P, F = self.P, self.F
        bf16 = P.bf16
        tid = np.arange(kBlockThreads)
        ln = tid & 31
        warp = tid >> 5
        g = ln >> 2
        t = ln & 3
        wo = (warp & 1) * 64
        wt = (warp >> 1) * 32
        o0 = (self.bid % P.feature_tiles) * kOut
        t0 = (self.bid // P.feature_tiles) * kTok
        half, words, rows, cols, m = P.half, P.words, P.rows, P.cols, P.m

        a_tile = lambda st: st * kStageBytes  # noqa: E731  (byte offsets into smem)
        x_tile = lambda st: st * kStageBytes + kABytes  # noqa: E731
        m_tile = lambda st: st * kStageBytes + kABytes + kXBytes  # noqa: E731

        I32 = (1 << 31) - 1

        def i32(v, what):  # an int expression of the kernel: flag overflow
            v = np.asarray(v, dtype=np.int64)
            F.flag(f"int32 overflow: {what}", ((v > I32) | (v < -I32 - 1)).sum())
            return v

        # The thread's copies (sparse24.cu, the block before copy_tiles)
        kVPieces = (kOut * kVals // 8) // kBlockThreads
        kXPieces = (kTok * kK // 8) // kBlockThreads
        kVRowStep = kBlockThreads // (kVals // 8)
        kXRowStep = kBlockThreads // (kK // 8)
        v_row = tid // (kVals // 8)
        v_part = tid % (kVals // 8)
        x_row = tid // (kK // 8)
        x_part = tid % (kK // 8)
        rows_here = int(min(rows - o0, kOut))
        toks_here = int(min(m - t0, kTok))
        F.flag("rows_here / toks_here < 1", int(rows_here < 1) + int(toks_here < 1))
        v_stride = i32(kVRowStep * i32(half, "(int)half"), "v_stride")
        x_stride = i32(kXRowStep * i32(cols, "(int)cols"), "x_stride")
        # element offsets of the per-thread pointers (int64 arithmetic in the source)
        v_src = (o0 + np.where(v_row < rows_here, v_row, 0)) * half + 8 * v_part
        x_src = (t0 + np.where(x_row < toks_here, x_row, 0)) * cols + 8 * x_part
        smem0 = 0
        v_dst = smem0 + (v_row * kAPitch + 8 * v_part) * ES
        x_dst = smem0 + kABytes + (x_row * kXPitch + 8 * x_part) * ES

        def copy_tiles(stage, step):
            k0 = i32(step * kK, "k0")
            cols_left = i32(int(cols) - k0, "cols_left")
            at = stage * kStageBytes
            for p in range(kVPieces):
                ok = (16 * v_part < cols_left) & (v_row + kVRowStep * p < rows_here)
                off = i32(p * v_stride + k0 // 2, "p * v_stride + k0 / 2")
                self.cp_async16(tid, v_dst + at + kVRowStep * p * kAPitch * ES, "values",
                                np.where(ok, v_src + off, 0), ok, "copy_tiles values")
                # same element as the original index form (row o0 + v_row + 64p, value k0/2 + 8 v_part)?
                exp = (o0 + v_row + kVRowStep * p) * half + k0 // 2 + 8 * v_part
                F.flag("values source differs from (row, col) form", (ok & (v_src + off != exp)).sum())
            for p in range(kXPieces):
                ok = (8 * x_part < cols_left) & (x_row + kXRowStep * p < toks_here)
                off = i32(p * x_stride + k0, "p * x_stride + k0")
                self.cp_async16(tid, x_dst + at + kXRowStep * p * kXPitch * ES, "x",
                                np.where(ok, x_src + off, 0), ok, "copy_tiles x")
                exp = (t0 + x_row + kXRowStep * p) * cols + k0 + 8 * x_part
                F.flag("x source differs from (token, col) form", (ok & (x_src + off != exp)).sum())

        read_meta, store_meta = stage_meta(self, o0, rows_here, words, m_tile, i32, "store_meta (u16 store)")

        acc = np.zeros((4, 4, 8, 32, 4))  # [i][j] x warps x lanes x 4

        wtid = tid.reshape(8, 32)
        wl = ln.reshape(8, 32)
        wwo = wo.reshape(8, 32)
        wwt = wt.reshape(8, 32)

        def ldmatrix_x4(addr, what):
            return ldmatrix_x4_of(self, addr, what, "ldmatrix {what}")

        # Prologue
        for s in range(kStages - 1):
            if s < P.steps:
                copy_tiles(s, s)
                store_meta(s, read_meta(s))
            self.commit()

        for step in range(P.steps):
            self.wait_group(1)
            self.syncthreads()
            nxt = step + kStages - 1
            refill = nxt % kStages
            pair = None
            if nxt < P.steps:
                copy_tiles(refill, nxt)
                pair = read_meta(nxt)
            self.commit()

            stage = step % kStages
            as_ = a_tile(stage)
            xs = x_tile(stage)
            ms = m_tile(stage)
            for u in range(kK // 32):
                a = [None] * 4
                e = [None] * 4
                for i in range(4):
                    r = wwo + 16 * i + (wl & 7) + 8 * ((wl >> 3) & 1)
                    c = 16 * u + 8 * (wl >> 4)
                    a[i], atag = ldmatrix_x4(as_ + (r * kAPitch + c) * ES, "A")
                    rg = wwo + 16 * i + (wl >> 2)
                    w = 2 * u + ((wl & 3) & 1)
                    ea = ms + ((((wwo >> 4) + i) * kWords + w) * 8 + (wl >> 2)) * 4
                    F.flag("e load not 4-byte aligned", (ea % 4 != 0).sum())
                    self.banks.add("e: ms[] u32 loads", ea, 4)
                    ev, e_t, _ = self.read(ea, 2, wtid, "e")
                    e[i] = ev[..., 0].astype(np.uint32) | (ev[..., 1].astype(np.uint32) << 16)
                    etag = np.stack([e_t[..., 0], e_t[..., 1]], -1)
                    # same logical elements as the verified 64x64 kernel's fragments?
                    for wi in range(8):
                        R0 = o0 + (wi & 1) * 64 + 16 * i
                        s64 = 2 * step + u
                        if not np.array_equal(atag[wi], self.f64.A(R0, s64)):
                            F.flag("A fragment differs from the 64x64 kernel's", 1, example=(self.bid, step, u, wi, i))
                        if not np.array_equal(etag[wi], self.f64.E(R0, s64)):
                            F.flag("metadata register e differs from the 64x64 kernel's", 1,
                                   example=(self.bid, step, u, wi, i))
                for j in range(4):
                    tok = wwt + 8 * j + (wl & 7)
                    c = 32 * u + 8 * (wl >> 3)
                    b, btag = ldmatrix_x4(xs + (tok * kXPitch + c) * ES, "B")
                    for wi in range(8):
                        T0 = t0 + (wi >> 1) * 32 + 8 * j
                        if not np.array_equal(btag[wi], self.f64.B(T0, 2 * step + u)):
                            F.flag("B fragment differs from the 64x64 kernel's", 1, example=(self.bid, step, u, wi, j))
                    for i in range(4):
                        mma_sp(acc[i][j], a[i], b, e[i], bf16, F)
            if nxt < P.steps:
                store_meta(refill, pair)

        # Epilogue
        self.commit()
        self.wait_group(0)  # cp_async_wait_all
        F.flag("cp.async groups not completed at the epilogue", sum(1 for gr_ in self.groups if not gr_[1]))
        self.syncthreads()
        ys = 0
        for i in range(4):
            for h in range(2):
                ol = wo + 16 * i + g + 8 * h
                if P.bias is not None:
                    okb = o0 + ol < rows
                    F.flag("bias read out of bounds", (okb & (o0 + ol >= P.bias.size)).sum())
                    bo = np.where(okb, decode(P.bias[np.clip(o0 + ol, 0, rows - 1)], bf16), 0.0)
                else:
                    bo = np.zeros(kBlockThreads)
                for j in range(4):
                    for c in range(2):
                        tl = wt + 8 * j + 2 * t + c
                        idx = tl * kYPitch + ol
                        val = acc[i][j].reshape(kBlockThreads, 4)[:, 2 * h + c] + bo
                        addr = ys + idx * ES
                        self.banks.add("epilogue ys stores (2 B)", addr.reshape(8, 32), 2)
                        self.write(addr, encode(val, bf16)[:, None], (T_Y + tl * kOut + ol)[:, None], tid,
                                   "epilogue ys store", shadow=val[:, None])
        self.syncthreads()
        write_out_tile(self, ys, tid, t0, o0)
        self.check_races()


def stage_meta(blk, o0, rows_here, words, m_tile, i32, bank_label):
    """StageMeta of both 128 x 128 tile kernels: thread t loads metadata words 2 (t & 1) and
    2 (t & 1) + 1 of row t >> 1 of a step into one register (read_meta, a stage ahead), then
    stores them pre-paired to the stage's metadata tile (store_meta). Returns the two."""
    P, F = blk.P, blk.F
    tid = np.arange(kBlockThreads)
    meta_row = tid >> 1
    meta_word = 2 * (tid & 1)
    meta_ok = meta_row < rows_here
    meta_src = np.where(meta_ok, (o0 + meta_row) * words, 0)

    def read_meta(step):
        wd = i32(step * kWords + meta_word, "wd")
        lo = np.full(kBlockThreads, FILLER, dtype=np.uint32)
        hi = np.full(kBlockThreads, FILLER, dtype=np.uint32)
        lo_t = np.full(kBlockThreads, T_FILL, dtype=np.int64)
        hi_t = np.full(kBlockThreads, T_FILL, dtype=np.int64)
        for k, (arr, arr_t) in enumerate([(lo, lo_t), (hi, hi_t)]):
            okk = meta_ok & (wd + k < words)
            idx = meta_src + wd + k
            F.flag("metadata global read out of bounds", (okk & ((idx < 0) | (idx >= P.metadata.size))).sum())
            arr[okk] = P.metadata[idx[okk]]
            arr_t[okk] = T_M + idx[okk]
        # the kernel's unconditional __ldg loads (clamped word index) must be in bounds
        for k in range(2):
            idx = meta_src + np.where(wd + k < words, wd + k, 0)
            F.flag("metadata __ldg out of bounds", ((idx < 0) | (idx >= P.metadata.size)).sum())
        return (lo | (hi << 16)), np.stack([lo_t, hi_t], -1)

    def store_meta(stage, pair):
        val, tags = pair
        meta_at = ((meta_row >> 4) * kWords + meta_word) * 16 + (meta_row & 7) * 2 + ((meta_row >> 3) & 1)
        for k in range(2):
            addr = m_tile(stage) + (meta_at + 16 * k) * 2
            blk.banks.add(bank_label, addr.reshape(8, 32), 2)
            v = ((val >> (16 * k)) & 0xFFFF).astype(np.uint16)[:, None]
            blk.write(addr, v, tags[:, k:k + 1], tid, "store_meta")

    return read_meta, store_meta


def ldmatrix_x4_of(blk, addr, what, bank_label):
    """ldmatrix.x4 by the 8 warps: addr (8,32) byte addresses (lane l supplies row l & 7 of
    matrix l >> 3); returns regs (8,32,4) u32 and tags (8,32,4,2). bank_label: a format
    string of ``what`` for the bank statistics."""
    blk.F.flag(f"ldmatrix row address not 16-byte aligned: {what}", (addr % 16 != 0).sum())
    for q in range(4):
        blk.banks.add(bank_label.format(what=what), addr[:, 8 * q:8 * q + 8], 16)
    d, tg, _ = blk.read(addr, 8, np.arange(kBlockThreads).reshape(8, 32), f"ldmatrix {what}")  # (8,32,8)
    src = 8 * np.arange(4)[None, :] + (lane >> 2)[:, None]  # (32 lanes, 4 regs): supplying lane
    e0 = 2 * (lane & 3)[:, None]
    lo = d[:, src, e0].astype(np.uint32)
    hi = d[:, src, e0 + 1].astype(np.uint32)
    regs = lo | (hi << 16)
    tags = np.stack([tg[:, src, e0], tg[:, src, e0 + 1]], -1)
    return regs, tags


def write_out_tile(blk, ys, tid, t0, o0):
    """The epilogue's second half (both 128 x 128 tile kernels, write_tile in sparse24.cu):
    block ``blk``'s staged tile at shared byte address ``ys`` written to y, every store checked
    (alignment, bounds, the ys element it reads) and counted."""
    P, F = blk.P, blk.F
    m, rows = P.m, P.rows
    yflat, y64, yc = blk.y_out, blk.y64_out, blk.ycount
    ysz = m * rows
    if P.vec_out:
        for p in range((kTok * kOut // 8) // kBlockThreads):
            piece = tid + p * kBlockThreads
            tl = piece >> 4
            part = piece & 15
            tok = t0 + tl
            o = o0 + 8 * part
            live = (tok < m) & (o < rows)
            saddr = ys + (tl * kYPitch + 8 * part) * ES
            F.flag("epilogue int4 smem read not 16-byte aligned", (saddr % 16 != 0).sum())
            gidx = tok * rows + o
            F.flag("epilogue int4 global store not 16-byte aligned", (live & ((gidx * ES) % 16 != 0)).sum())
            blk.banks.add("epilogue ys int4 reads (8-lane phases)", saddr.reshape(32, 8), 16)
            d, tg, el = blk.read(saddr[live], 8, tid[live], "epilogue int4 read")
            exp = T_Y + tl[live, None] * kOut + 8 * part[live, None] + np.arange(8)
            F.flag("epilogue read the wrong ys element", (tg != exp).sum())
            gi = gidx[live, None] + np.arange(8)
            F.flag("y store out of bounds", ((gi < 0) | (gi >= ysz)).sum())
            F.flag("y store to a feature >= rows", ((o[live, None] + np.arange(8)) >= rows).sum())
            gi = np.clip(gi, 0, ysz - 1)
            np.add.at(yc, gi.reshape(-1), 1)
            yflat[gi] = d
            y64[gi] = blk.shadow[el]
    else:
        for p in range((kTok * kOut) // kBlockThreads):
            piece = tid + p * kBlockThreads
            tl = piece // kOut
            ol = piece % kOut
            tok = t0 + tl
            o = o0 + ol
            live = (tok < m) & (o < rows)
            saddr = ys + (tl * kYPitch + ol) * ES
            blk.banks.add("epilogue ys scalar reads", saddr.reshape(8, 32), 2)
            d, tg, el = blk.read(saddr[live], 1, tid[live], "epilogue scalar read")
            F.flag("epilogue read the wrong ys element", (tg[:, 0] != T_Y + tl[live] * kOut + ol[live]).sum())
            gi = tok[live] * rows + o[live]
            F.flag("y store out of bounds", ((gi < 0) | (gi >= ysz)).sum())
            gi = np.clip(gi, 0, ysz - 1)
            np.add.at(yc, gi, 1)
            yflat[gi] = d[:, 0]
            y64[gi] = blk.shadow[el[:, 0]]


def emulate_64(P: Problem, F: Findings):
    """The verified 64x64 kernel's math on its own fragments (from Frag64 with data): checks the
    mma.sp model reproduces x @ W.T + bias."""
    f = Frag64(P)
    steps64 = -(-P.cols // 32)
    y = np.zeros((P.m, P.rows))

    def fetch(tags):
        tags = np.asarray(tags)
        out = np.zeros(tags.shape, dtype=np.uint16)
        for base, arr in [(T_A, P.values), (T_X, P.x), (T_M, P.metadata)]:
            sel = (tags >= base) & (tags < base + (1 << 39))
            out[sel] = arr[tags[sel] - base]
        out[tags == T_FILL] = FILLER
        return out

    for R0 in range(0, P.rows, 16):
        for T0 in range(0, P.m, 8):
            acc = np.zeros((1, 32, 4))
            for s in range(steps64):
                a = fetch(f.A(R0, s)).astype(np.uint32)
                b = fetch(f.B(T0, s)).astype(np.uint32)
                e = fetch(f.E(R0, s)).astype(np.uint32)
                mma_sp(acc, (a[..., 0] | a[..., 1] << 16)[None], (b[..., 0] | b[..., 1] << 16)[None],
                       (e[:, 0] | e[:, 1] << 16)[None], P.bf16, F)
            for l in range(32):
                for k in range(4):
                    o = R0 + G[l] + 8 * (k >> 1)
                    tok = T0 + 2 * T[l] + (k & 1)
                    if o < P.rows and tok < P.m:
                        y[tok, o] = acc[0, l, k] + (decode(P.bias[o], P.bf16) if P.bias is not None else 0)
    return y


def emulate(block_cls, rows, cols, m, bias, bf16, seed=0):
    """Every block of block_cls (this model's Block or the wgmma model's) on one random
    problem; returns (results, findings, bank statistics, problem, error scale)."""
    P = Problem(rows, cols, m, bias, bf16, seed)
    F = Findings()
    banks = Banks()
    f64 = Frag64(P)
    yflat = np.zeros(m * rows, dtype=np.uint16)
    y64 = np.full(m * rows, np.nan)
    yc = np.zeros(m * rows, dtype=np.int64)
    for bid in range(P.blocks):
        block_cls(P, bid, F, banks, f64, yflat, y64, yc).run()
    F.flag("y element written != 1 times", (yc != 1).sum(), example=np.nonzero(yc != 1)[0][:4].tolist())
    y64 = y64.reshape(m, rows)
    scale = np.maximum(np.abs(P.y_ref), 1e-3 * max(1e-30, np.abs(P.y_ref).max()))
    rel = float(np.nanmax(np.abs(y64 - P.y_ref) / scale)) if y64.size else 0.0
    if np.isnan(y64).any():
        rel = float("inf")
    yq = decode(yflat, bf16).reshape(m, rows)
    ref16 = P.y_ref16.double().numpy()
    res = dict(case=(rows, cols, m, "bias" if bias else "nobias", "bf16" if bf16 else "fp16"), blocks=P.blocks,
               steps=P.steps, vec_out=P.vec_out, max_rel_f64=rel, rounded_mismatches=int((yq != ref16).sum()),
               max_abs_rounded=float(np.abs(yq - ref16).max()) if yq.size else 0.0)
    return res, F, banks, P, scale


def run_case(rows, cols, m, bias, bf16, seed=0, check64=False):
    res, F, banks, P, scale = emulate(Block, rows, cols, m, bias, bf16, seed)
    if check64:
        y64k = emulate_64(P, F)
        res["max_rel_64x64_model"] = float(np.max(np.abs(y64k - P.y_ref) / scale))
    return res, F, banks


if __name__ == "__main__":
    import time
    cases = [(128, 64, 128), (130, 48, 5), (70, 1040, 129), (256, 4096, 300), (33, 16, 7), (8, 32, 200)]
    extra = [(136, 80, 131), (128, 128, 256), (24, 192, 40)]
    all_banks = Banks()
    for k, (rows, cols, m) in enumerate(cases + extra):
        for bias in (False, True):
            bf16 = bool((k + bias) % 2)
            t_ = time.time()
            res, F, banks = run_case(rows, cols, m, bias, bf16, seed=17 * k + bias,
                                     check64=(rows * cols * m <= 2_000_000))
            res["sec"] = round(time.time() - t_, 1)
            print(res, flush=True)
            for kind, n in F.items.items():
                print("   FINDING:", kind, n, F.examples.get(kind))
            for kind, s in banks.stats.items():
                a = all_banks.stats[kind]
                a[0] += s[0]
                a[1] += s[1]
                a[2] = max(a[2], s[2])
    print("bank conflicts (wavefronts per phase/instruction: mean, max):")
    for kind, (n, tot, mx) in all_banks.stats.items():
        print(f"   {kind}: {n} phases, mean {tot / n:.2f}, max {mx}")
