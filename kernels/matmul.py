"""Matrix products. Weights are rows of outputs, W [out, in] (the loader transposes HF's Conv1D once,
see kernels.prepare): decode streams the rows once on every core, four rows against four inputs at a
time when a batch has four or more (bf16: a row against four bf16 inputs, as pairs, or without AVX512-BF16
panels of 16 rows against 4 broadcast inputs; int8 and int4: a group of 8 rows against each input, in integers);
prefill gives each of numba's threads a band of output columns: on float32, 32 rows at a time packed into a
panel against pairs of groups of 6 inputs (AVX-512, up to F32_PANEL_UPTO inputs) or a single-threaded sgemm
(called from the kernel, jit.sgemm_nt), 4x4 tiles of bf16 pairs (without AVX512-BF16: panels of 16 bf16 rows against
6 inputs, sgemm-style) and integer dots on the rest."""

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .. import quant

from . import jit
from .activation import _gelu
from .memory import ordinary_pages
from .jit import (DECODE_ROWS, GROUP, PANEL_INPUTS, PANEL_ROWS, bands, bf16_group8, f32_group8, bf16_panel, bf16_panel1, bf16_panel4, bf16_panel4_pair, bits_of_f32, dot_bf16, dot_bf16_4x4, dot_bf16x4,
                  dot_q4, dot_q4x4, dot_q8, dot_q8x4, F32_PANEL, F32_RUNS, f32_from_bits, f32_panel_halves4, f32_panel_run1, f32_panel_run2, f32_panel_runs1, f32_panel_runs2, f32_panel_wide, inline, widen_panels_against, pack_f32_panel,
                  block_peak, pack_panel, parallel, rint, round_block, serial, serialized, sgemm_nt)


def widen(w, m, k):                                        # stored weight element -> float32 (numba-only; see overload)
    raise NotImplementedError


@overload(widen)
def _widen(w, m, k):
    """Chosen per dtype at compile time: float32 is itself; bf16 bits << 16 are its float32 (a bit cast,
    not a conversion). The loops still vectorize."""
    if w.dtype == types.uint16:
        return lambda w, m, k: f32_from_bits(np.uint32(w[m, k]) << np.uint32(16))
    return lambda w, m, k: np.float32(w[m, k])


@inline
def _dot(x, n, w, m):                                      # x[n] . w[m] (widened)
    s = np.float32(0.0)
    for k in range(x.shape[1]):
        s += x[n, k] * widen(w, m, k)
    return s


@inline
def _dot_4_streams(x, n, w, m, q, out):                    # out[n, m + j q] = x[n] . w[m + j q] for j < 4 (widened)
    s0, s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    for k in range(x.shape[1]):
        v = x[n, k]
        s0 += v * widen(w, m, k)
        s1 += v * widen(w, m + q, k)
        s2 += v * widen(w, m + 2 * q, k)
        s3 += v * widen(w, m + 3 * q, k)
    out[n, m], out[n, m + q], out[n, m + 2 * q], out[n, m + 3 * q] = s0, s1, s2, s3


@inline
def _dot_4x4_streams(x, n, w, m, q, out):                  # out[n + i, m + j q] = x[n + i] . w[m + j q] for i, j < 4 (widened)
    """16 dots in registers: each load (of an input or a widened weight) feeds four FMAs, and the four
    weight rows, a quarter of the caller's range apart, are four runs of memory in flight at once."""
    K = x.shape[1]
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
    for k in range(K):
        w0, w1, w2, w3 = widen(w, m, k), widen(w, m + q, k), widen(w, m + 2 * q, k), widen(w, m + 3 * q, k)
        x0, x1, x2, x3 = x[n, k], x[n + 1, k], x[n + 2, k], x[n + 3, k]
        a0 += x0 * w0
        a1 += x0 * w1
        a2 += x0 * w2
        a3 += x0 * w3
        b0 += x1 * w0
        b1 += x1 * w1
        b2 += x1 * w2
        b3 += x1 * w3
        c0 += x2 * w0
        c1 += x2 * w1
        c2 += x2 * w2
        c3 += x2 * w3
        d0 += x3 * w0
        d1 += x3 * w1
        d2 += x3 * w2
        d3 += x3 * w3
    out[n, m], out[n, m + q], out[n, m + 2 * q], out[n, m + 3 * q] = a0, a1, a2, a3
    out[n + 1, m], out[n + 1, m + q], out[n + 1, m + 2 * q], out[n + 1, m + 3 * q] = b0, b1, b2, b3
    out[n + 2, m], out[n + 2, m + q], out[n + 2, m + 2 * q], out[n + 2, m + 3 * q] = c0, c1, c2, c3
    out[n + 3, m], out[n + 3, m + q], out[n + 3, m + 2 * q], out[n + 3, m + 3 * q] = d0, d1, d2, d3


# bf16 inputs for bf16 rows: a bf16 matmul rounds its inputs to bf16 (quant.round_to_bf16), so each product of
# two bf16 values is exact in float32 and AVX512-BF16's vdpbf16ps takes 16 of them a step (jit.dot_bf16).
# Against widening each weight for float32 inputs (the uint32-pair dot below 4 inputs, a row against 4 inputs
# from 4), the decode step, alternating steps in one process: 1.11x at batch 1, 1.19x at 2, 1.34x at 4, 1.40x
# at 8; without vdpbf16ps (jit's plain IR, forced) 1.07x and 1.15x at 1 and 4. Hints ahead from 2 inputs
# instead of 4: 1.00x at 2.
@inline
def _bf16_of(v):                                           # float32 -> its bf16 bits, round to nearest even (a NaN stays a NaN)
    u = np.uint32(bits_of_f32(v))
    if v != v:
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@serial
def bf16_bits_into(x, out):                                # float32 [N, K] -> out uint16 [N, K], each value's bf16 (as quant.round_to_bf16)
    for n in range(x.shape[0]):
        for k in range(x.shape[1]):
            out[n, k] = _bf16_of(x[n, k])


@serial
def bf16_bits(x):                                          # float32 [N, K] -> a new uint16 [N, K] (bf16_bits_into)
    """Also called inside kernels.decode's region, by each thread for its own copy."""
    out = np.empty(x.shape, np.uint16)
    bf16_bits_into(x, out)
    return out


@inline
def bf16_rows(xd, w, out, m0, m1, ahead=0):                # out[:, m0:m1] = xd . w[m0:m1]^T, bf16 rows (bits [M, K])
    """xd: the inputs' bf16 bits (uint16 [N, K]: bf16_bits). Each row against four inputs at a time, then one
    at a time (jit.dot_bf16x4 / dot_bf16 on pairs as uint32: vdpbf16ps, or its plain IR); the last K % 16
    inputs and K odd (pairs do not exist): dots of widened values. ahead: bytes on
    to hint into L2 (decode's GEMVs from 4 inputs: STREAM_AHEAD), never past row m1."""
    N, K = xd.shape
    if K % 2 == 1:
        for m in range(m0, m1):
            for n in range(N):
                s = np.float32(0.0)
                for k in range(K):
                    s += widen(xd, n, k) * widen(w, m, k)
                out[n, m] = s
        return
    xp, wp = xd.view(np.uint32), w.view(np.uint32)
    tail = K // 16 * 16                                    # the dots cover whole runs of 8 pairs, this loop the rest
    hint = ahead if N >= TILE_FROM else 0
    for m in range(m0, m1):
        a = hint if (m1 - m) * 2 * K > hint else 0
        n = 0
        while n + 4 <= N:
            s0, s1, s2, s3 = dot_bf16x4(wp, m, xp, n, a)
            out[n, m], out[n + 1, m], out[n + 2, m], out[n + 3, m] = s0, s1, s2, s3
            n += 4
        while n < N:
            (out[n, m],) = dot_bf16(wp, m, xp, n, a)
            n += 1
        for n in range(N if tail < K else 0):
            s = np.float32(0.0)
            for k in range(tail, K):
                s += widen(xd, n, k) * widen(w, m, k)
            out[n, m] += s


@inline
def _bias(out, b, m, gelu):                                # out[:, m] += b[m] (b may be None), then GELU if asked
    """GELU here, on the thread that computed column m: the MLP's first GEMV hands its successor
    activated values, with no kernel call (or pass over [B, 4C] on one core) of its own."""
    for n in range(out.shape[0]):
        v = out[n, m] + b[m] if b is not None else out[n, m]
        out[n, m] = _gelu(v) if gelu else v


TILE_FROM = 4                                              # from this many inputs, four inputs at a time (bf16 rows' hints too)


# From 4 inputs a streamed bf16 GEMV computes about as long as it reads, and the hardware's prefetchers, which
# run a few lines ahead, leave each core waiting on memory, then computing: a hint per line, this many bytes
# ahead and into L2 (jit.dot_bf16's `ahead`), overlaps the two. Measured on 2 cores, 4 inputs, alternating in one
# process, when bf16 rows still met float32 inputs: 12 matrices 2304x768 or 3072x768 streamed from memory (each core
# half of each) 1.2-1.7x (once 0.97x); the decode step at batch 4 (kernels.decode, chunks of CHUNK_BYTES, no hint
# past a chunk's end) bf16 1.02-1.07x at 8-16 KiB ahead, but float32 0.91-0.95x at 4-32 KiB (twice the bytes for
# the same FMAs: it waits on memory either way, and the hints, a guess, only add to the queue), so float32 gets
# none. Into L1, or past a chunk's end (into the other core's rows), measured worse. On bf16 pairs (vdpbf16ps) a
# lone GEMV against 4 inputs ran 1.17x without hints, 1.41-1.46x with them at 4-8 KiB (against the float32-input
# kernel with its hints). On bf16 panels (AVX2 without AVX512-BF16, panel_rows), from 2 inputs: the model's GEMVs
# at 4 inputs streamed 1.30-1.38x at 2-8 KiB, the decode step 1.12-1.20x at batch 2-8 (one input: 0.97x on a Zen 3,
# 1.21-1.70x on an Emerald Rapids at 8 KiB, 4 and 16 KiB no different there: hinted from one input since stop 35).
STREAM_AHEAD = 8 << 10
# int8 and int4 decode GEMVs (gemv_q8 / gemv_q4, from one input): a hint per line of each block, this many bytes
# on (jit.dot_q8 / dot_q4's `ahead`). At one input int4 is as dense in work as bf16 at 4: a 128-byte block
# (256 products) takes ~50 instructions, so a core that waits on the hardware's prefetchers then computes
# streamed the weights at ~20-27 GB/s. Measured on 2 cores (Zen 3, AVX2), alternating in one process: the 49
# int4 GEMVs of a GPT-2 124M step (69 MB, from memory) 1.27x at 1 KiB ahead, 1.38-1.40x at 2-16 KiB; the decode
# step, medians of 12 steps a round, 0 against 4 KiB: int4 1.14x and 1.22x at batch 1 (16 and 20 rounds),
# 1.07x at 4; int8 1.07x at 1 (0.99-1.07x across 2-8 KiB), 1.05x at 4; npgpt bench tg128 in 4 pairs of processes:
# batch 1 int4 1.24x, int8 1.14x, batch 4 0.98x and 1.03x (medians). A core's last hints reach into the other
# core's first groups (4 KiB a GEMV). Prefill's products, whose group of rows stays in cache across all the
# inputs, get none.
INT_AHEAD = 4 << 10


@inline
def float_rows(x, w, out, m0, m1):                         # out[:, m0:m1] = x . w[m0:m1]^T (widened)
    """Rows m0 .. m1 of a float32 GEMV (or bf16 rows widened) against all N inputs: 4 rows a quarter of
    the range apart at once (4 runs of memory in flight instead of 1), against 4 inputs at a time (16 dots
    in registers, _dot_4x4_streams), the last N % 4 inputs one at a time against the same 4 rows; the last
    (m1 - m0) % 4 rows a dot each. One input against a row at a time, the fp32 decode step, alternating
    processes, 8 rounds on a busy Zen 3: 1.04-1.45x (median 1.10x). From 2 inputs the rows were one run a
    thread before (a row against 4 inputs while they fit in 16 KiB, else 4x4 tiles of adjacent rows): the
    48 GEMVs of a GPT-2 124M layer stack streamed from memory in chunks of 256 KiB on 2 cores (Emerald
    Rapids, alternating in one process, medians of 7) now 1.02x at 1 input, 1.35x at 2, 1.34x at 3 and 4,
    1.07x at 8, 1.14x at 16."""
    N = x.shape[0]
    q = (m1 - m0) // 4
    for m in range(m0, m0 + q):
        n = 0
        while n + 4 <= N:
            _dot_4x4_streams(x, n, w, m, q, out)
            n += 4
        for i in range(n, N):
            _dot_4_streams(x, i, w, m, q, out)
    for m in range(m0 + 4 * q, m1):
        for i in range(N):
            out[i, m] = _dot(x, i, w, m)


@inline
def _runs_into(dst, a, b, tail, i):                        # dst = input i's sums of runs 0 and 1 (a[i]), 2 and 3 (b[i]), then the tail's
    for j in range(dst.shape[0]):
        dst[j] = (a[i, j] + a[i, F32_PANEL + j]) + (b[i, j] + b[i, F32_PANEL + j]) + tail[i, j]


@inline
def f32_panel_rows(x, panels, out, m0, m1):               # out[:, m0:m1] = x . w[m0:m1]^T, w as float32 panels (quant.F32Panels' [P, K, 32])
    """m0 a multiple of 32 (only rows below m1 written). Each panel's k range read as F32_RUNS = 4 runs at once
    (4 runs of memory in flight from one input, as float_rows reads 4 rows): against 4 inputs at a time, half
    the runs a call (jit.f32_panel_halves4: 16 sums), then 2 and 1 inputs all 4 runs a call (jit.f32_panel_runs2
    / runs1). Each output is the sum of its runs' sums, pairwise, and of the last K % 4 steps' (run2 / run1).
    Every run is the same FMA chain whichever call computes it, so every output is the same sum whatever N is."""
    N, K = x.shape
    kn = K // F32_RUNS
    rest = K - F32_RUNS * kn
    c = np.empty((2, 2 * F32_RUNS * F32_PANEL), np.float32)   # runs1 / runs2's [inputs, 4 x 32], or two halves4's [4, 2 x 32]
    t = np.zeros((4, F32_PANEL), np.float32)
    per_input = c.reshape(4, F32_RUNS * F32_PANEL)       # runs1 / runs2's sums: runs 0 and 1, then 2 and 3, of each input
    lo, hi = per_input[:, : 2 * F32_PANEL], per_input[:, 2 * F32_PANEL :]
    for p in range(m0 // F32_PANEL, -(-m1 // F32_PANEL)):
        base = F32_PANEL * p
        top = min(m1, base + F32_PANEL)
        n = 0
        while n < N:
            step = 4 if N - n >= 4 else 2 if N - n >= 2 else 1
            if step == 4:
                f32_panel_halves4(panels, p, 0, kn, x, n, c[:1])   # (c[0]: runs 0, 1 of 4 inputs, [4, 64])
                f32_panel_halves4(panels, p, 2 * kn, kn, x, n, c[1:])   # (c[1]: runs 2, 3)
            elif step == 2:
                f32_panel_runs2(panels, p, 0, kn, x, n, c)
            else:
                f32_panel_runs1(panels, p, 0, kn, x, n, c)
            if rest > 0:
                for i in range(0, step, 2):
                    if step - i >= 2:
                        f32_panel_run2(panels, p, F32_RUNS * kn, rest, x, n + i, t[i : i + 2])
                    else:
                        f32_panel_run1(panels, p, F32_RUNS * kn, rest, x, n + i, t[i : i + 1])
            for i in range(step):
                dst = out[n + i, base:top]
                if step == 4:
                    _runs_into(dst, c[0].reshape(4, 2 * F32_PANEL), c[1].reshape(4, 2 * F32_PANEL), t, i)
                else:
                    _runs_into(dst, lo, hi, t, i)
            n += step


# A GEMV outside the decode step (the LM head and the last block of generation's prefill, the spec's small
# products) in tasks of about this many weight bytes, so float_rows streams 4 runs of each: tasks of one row
# (below 4 inputs) streamed one run. GPT-2's head (154 MB, from memory) at one input, alternating in one
# process, medians of 15 on an Emerald Rapids: 7.81 ms a row a task, 6.19 / 6.10 / 6.02 ms at 16 / 64 / 256
# rows (49 / 196 / 786 KB), a 4-run read of the same bytes (memory.read_streams) 5.84.
GEMV_TASK_BYTES = 64 << 10


@parallel
def gemv(x, w, b, gelu):                                   # [N, K] x [M, K] rows (b [M] or None) -> [N, M] (GELU applied if gelu)
    """w: float32 or bf16 bits, widened in registers: no float32 copy of a row exists. One pass over the
    weights serves all N inputs. The helpers are inlined: a call inside a prange loop costs
    reference-count updates on the arrays it is passed, atomic writes to a cache line every core shares
    (measured: an int8 GEMV at 1 input 1.3-1.8x slower)."""
    N = x.shape[0]
    M = w.shape[0]
    out = np.empty((N, M), dtype=np.float32)
    rows = max(4, GEMV_TASK_BYTES // (x.shape[1] * w.itemsize))   # weight rows a task: 4 runs in flight (float_rows)
    for t in numba.prange((M + rows - 1) // rows):
        m0, m1 = rows * t, min(rows * t + rows, M)
        float_rows(x, w, out, m0, m1)
        for m in range(m0, m1):
            _bias(out, b, m, gelu)
    return out


@parallel
def gemv_f32_panels(x, panels, M, b, gelu):               # [N, K] x quant.F32Panels' panels of M rows (+ b) -> [N, M] (GELU'd if gelu)
    """A panel a task (f32_panel_rows: ~96 KB at K = 768, 4 runs of it in flight)."""
    out = np.empty((x.shape[0], M), dtype=np.float32)
    for p in numba.prange(panels.shape[0]):
        m1 = min(F32_PANEL * p + F32_PANEL, M)
        f32_panel_rows(x, panels, out, F32_PANEL * p, m1)
        for m in range(F32_PANEL * p, m1):
            _bias(out, b, m, gelu)
    return out


@parallel
def _f32_panels_into(w, panels):                           # Conv1D [K, M] -> panels [P, K, 32]: panels[p, k, j] = w[k, 32p + j] (0 past M)
    K, M = w.shape
    for p in numba.prange(panels.shape[0]):
        m0 = F32_PANEL * p
        n = min(F32_PANEL, M - m0)
        for k in range(K):
            src, dst = w[k, m0 : m0 + n], panels[p, k]
            for j in range(n):
                dst[j] = src[j]
            for j in range(n, F32_PANEL):
                dst[j] = np.float32(0.0)


def f32_panels_into(w, panels):                            # a Conv1D weight [in, out] into quant.F32Panels' panels, in place
    _f32_panels_into(np.ascontiguousarray(w, dtype=np.float32), panels)


def f32_panels(w):                                         # Conv1D float32 [in, out] -> quant.F32Panels of its rows [out, in]
    K, M = w.shape
    panels = np.empty((-(-M // F32_PANEL), K, F32_PANEL), np.float32)
    f32_panels_into(w, panels)
    return quant.F32Panels(panels, M)


def f32_unpanel(w):                                        # quant.F32Panels -> its rows, float32 [M, K] (a copy)
    return np.ascontiguousarray(w.panels.transpose(0, 2, 1).reshape(-1, w.panels.shape[1])[: w.n_out])


def f32_unpanel_conv1d(w):                                 # quant.F32Panels -> the Conv1D weight [in, out] (a copy)
    return np.ascontiguousarray(w.panels.transpose(1, 0, 2).reshape(w.panels.shape[1], -1)[:, : w.n_out])


@inline
def _bf16_tail(xb, w, n, m, k0):                           # the products of xb[n] and w[m] from input k0 on, widened
    s = np.float32(0.0)
    for k in range(k0, xb.shape[1]):
        s += widen(xb, n, k) * widen(w, m, k)
    return s


@inline
def bf16_tiles(xb, w, out, m0, m1):                        # out[:, m0:m1] = xb . w[m0:m1]^T, both bf16 bits: 4x4 tiles (prefill)
    """4 rows against 4 inputs at a time (jit.dot_bf16_4x4: each run of pairs loaded once for 4 dots);
    what tiles do not cover (the last N % 4 inputs, M % 4 rows) and K odd: bf16_rows."""
    N, K = xb.shape
    if K % 2 == 1:
        bf16_rows(xb, w, out, m0, m1)
        return
    xp, wp = xb.view(np.uint32), w.view(np.uint32)
    tail = K // 16 * 16
    m = m0
    while m + 4 <= m1:
        n = 0
        while n + 4 <= N:
            t = dot_bf16_4x4(wp, m, xp, n, 0)
            for r in range(4):
                for i in range(4):
                    out[n + i, m + r] = t[4 * r + i] if tail == K else t[4 * r + i] + _bf16_tail(xb, w, n + i, m + r, tail)
            n += 4
        if n < N:
            bf16_rows(xb[n:], w, out[n:], m, m + 4)
        m += 4
    if m < m1:
        bf16_rows(xb, w, out, m, m1)


@parallel
def gemv_bf16(xd, w, b, gelu):                             # bf16 inputs (bf16_bits) and rows (bits: quant.BF16) (+ b) -> [N, M]
    """A weight row a task, against every input (bf16_rows)."""
    N = xd.shape[0]
    M = w.shape[0]
    out = np.empty((N, M), dtype=np.float32)
    for m in numba.prange(M):
        bf16_rows(xd, w, out, m, m + 1)
        _bias(out, b, m, gelu)
    return out


# int8 (quant.Int8Rows) and int4 (quant.Int4Rows): the inputs are rounded to int8 blocks first
# (quant.round_to_q8), so a row's dot is int8 by int8 (or int4) in integer lanes, one float32 multiply
# per block of 32 for 8 rows at once (jit.dot_q8 / dot_q4).
Q8 = quant.Q8_BLOCK


@inline
def _peak(bits, n, j, K):                                  # the largest magnitude in block j of row n (0 past K)
    """bits: x viewed as uint32. Without the sign bit, larger floats have larger bit patterns, so the
    peak is an integer max (a NaN is larger still); a whole block's in vectors (jit.block_peak)."""
    k0 = Q8 * j
    if k0 + Q8 <= K:
        return f32_from_bits(block_peak(bits, n, k0))
    peak = np.uint32(0)
    for k in range(k0, K):
        peak = max(peak, bits[n, k] & np.uint32(0x7FFFFFFF))
    return f32_from_bits(peak)


@inline
def _round_inputs(x, bits, offset, xq, sx, xoff):         # x [N, K] -> int8 levels, block scales, offset * sums of levels
    """As quant.round_to_q8 (scale peak / 127, levels rint(x * 127 / peak)); blocks past K are zeros (so
    whole-block dots over padding add nothing). A row in three passes over its blocks: the peaks, then
    the scales and their inverses, then the levels (whole blocks in vectors, jit.round_block). Block by
    block, each block waited on its own peak, two divisions and rounding, and LLVM kept the rounding
    scalar: 4.7 us for a row of 3072 inputs, 0.9 us in passes (the same levels and scales)."""
    N, K = x.shape
    blocks = sx.shape[1]
    inv = np.empty(blocks, np.float32)
    for n in range(N):
        for j in range(blocks):
            inv[j] = _peak(bits, n, j, K)
        for j in range(blocks):                            # (a loop of divisions alone: vdivps)
            p = inv[j]
            sx[n, j] = p / np.float32(127.0)
            inv[j] = np.float32(127.0) / p if p > 0 else np.float32(0.0)
        for j in range(blocks):
            k0 = Q8 * j
            if k0 + Q8 <= K:
                total = round_block(x, n, k0, inv[j], xq)
            else:
                q = xq[n, k0 : k0 + Q8]
                total = np.int32(0)
                for k in range(Q8):
                    q[k] = np.int8(rint(x[n, k0 + k] * inv[j])) if k0 + k < K else np.int8(0)
                    total += np.int32(q[k])
            xoff[n, j] = total * np.int32(offset)


@inline
def _rounded_inputs(x, bits, blocks, offset):              # -> (xq, sx, xoff) for N inputs, padded to `blocks` blocks
    """xoff: `offset` (the weights' stored offset: 8 for int4, 128 for int8) times each block's sum of levels."""
    N = x.shape[0]
    xq = np.empty((N, blocks * Q8), dtype=np.int8)         # the inputs' int8 levels
    sx = np.empty((N, blocks), dtype=np.float32)
    xoff = np.empty((N, blocks), dtype=np.int32)
    _round_inputs(x, bits, offset, xq, sx, xoff)
    return xq, sx, xoff


@inline
def _groups_into(xq, sx, xoff, packed, scale, g0, g1, blocks, yt, dot, dot4, ahead):   # yt[8g + r, n] for groups g0 .. g1 (rows < M)
    N, M = xq.shape[0], yt.shape[0]
    for g in range(g0, g1):
        rows = min(GROUP, M - GROUP * g)
        n = 0
        while n + 4 <= N:
            v = dot4(packed, scale, g, xq, xoff, sx, n, blocks, ahead)
            for r in range(rows):
                for i in range(4):
                    yt[GROUP * g + r, n + i] = v[GROUP * i + r]
            n += 4
        for i in range(n, N):
            v = dot(packed, scale, g, xq, xoff, sx, i, blocks, ahead)
            for r in range(rows):
                yt[GROUP * g + r, i] = v[r]


@inline
def _gemv_groups(x, bits, packed, scale, M, b, gelu, blocks, offset, dot, dot4, ahead):   # gemv_q8 / gemv_q4's shared body
    """One task per group of 8 rows, its rows' block sums in the lanes of one vector (jit.dot_q8 /
    dot_q4), four inputs at a time sharing each block's loads (and int4's unpacking). Inputs are padded
    with zeros to whole blocks (and rows' padding is q = 0), so partial blocks need nothing of their own."""
    N = x.shape[0]
    xq, sx, xoff = _rounded_inputs(x, bits, blocks, offset)
    out = np.empty((N, M), dtype=np.float32)
    for g in numba.prange(packed.shape[0]):
        _groups_into(xq, sx, xoff, packed, scale, g, g + 1, blocks, out.T, dot, dot4, ahead)   # out.T: yt [M, N]
        for r in range(min(GROUP, M - GROUP * g)):
            _bias(out, b, GROUP * g + r, gelu)
    return out


@parallel
def gemv_q8(x, bits, packed, scale, M, b, gelu, ahead=0):  # [N, K] (and its uint32 view) x quant.Int8Rows (packed, scale, M rows) (+ b [M]) -> [N, M]
    """x . (q * scale) with x rounded to int8 blocks of 32; ahead: bytes on to hint (INT_AHEAD in decode)."""
    return _gemv_groups(x, bits, packed, scale, M, b, gelu, packed.shape[1] // (8 * Q8), 128, dot_q8, dot_q8x4, ahead)


@parallel
def gemv_q4(x, bits, packed, scale, M, b, gelu, ahead=0):  # [N, K] (and its uint32 view) x quant.Int4Rows (packed, scale, M rows) (+ b [M]) -> [N, M]
    """x . (q * d) with x rounded to int8 blocks of 32, d each row's block scales; ahead: as gemv_q8's."""
    return _gemv_groups(x, bits, packed, scale, M, b, gelu, scale.shape[1] // GROUP, 8, dot_q4, dot_q4x4, ahead)


# Prefill's bf16, int8 and int4 products run decode's kernels: 4x4 tiles of bf16 pairs (vdpbf16ps), and the
# integer dots of a group of 8 rows against 4 inputs. Each band writes its rows of the
# product transposed, yt [M, N] (transposed_view), read back by finish_band: a tile's or a group's rows of
# yt are whole lines, where its columns of out [N, M] sit a row apart (at M = 3072, a row is 12 KiB, and
# every one fell in the same set of L1: c_fc ran at half speed). Against widening tiles of rows for sgemm,
# measured on 2 cores at N = 128 and 512: int8/int4 1.3-2.4x on every GPT-2 124M shape. bf16: float32 4x4
# tiles (widening each weight) ran the model's pp128 and pp512 1.07-1.23x the widened sgemm but 0.93x at
# 2048 rows, so from 1024 rows it widened for sgemm; the bf16 tiles on vdpbf16ps ran 1.19x and 1.38x the
# float32 tiles at pp128 and pp512, and 1.16x, 1.14x, 1.17x the widened sgemm at 4 x 512, 2 x 1024 and
# 8 x 512 rows (alternating in one process), so bf16 prefill runs on them at every size.
# A band's inputs in blocks of TILE_INPUT_BYTES (in L2), its rows in chunks of TILE_WEIGHT_BYTES, each chunk against every
# input of a block. Against widening for sgemm, on the model at 128 and 2048 input rows: 512 KiB and 64 KiB 1.23x and
# 0.93x; 256 KiB both 1.16x and 0.87x (rows outer: 0.84x at 2048); whole inputs and rows ~1.0x at 128 rows.
TILE_INPUT_BYTES, TILE_WEIGHT_BYTES = 512 << 10, 64 << 10


@serial
def _bf16_band(xb, w, m0, m1, out, nb, mb):                # out[:, m0:m1] = xb . w[m0:m1]^T, blocks of nb inputs, chunks of mb rows
    """out: the transposed product's view (yt.T). Inputs outer: a block of xb stays in L2 while the band's
    rows stream past it."""
    N = xb.shape[0]
    for n0 in range(0, N, nb):
        n1 = min(n0 + nb, N)
        for c0 in range(m0, m1, mb):
            bf16_tiles(xb[n0:n1], w, out[n0:n1], c0, min(c0 + mb, m1))


@inline
def _bf16_value(v):                                        # float32 -> its bf16 rounding, as float32 (_bf16_of's bits, widened)
    return f32_from_bits(np.uint32(_bf16_of(v)) << np.uint32(16))


def group8(x, n0, k0, dst, rounded):                       # jit.bf16_group8 / f32_group8 where both arrays are C-contiguous (numba-only; see overload)
    raise NotImplementedError


@overload(group8)
def _group8(x, n0, k0, dst, rounded):
    """Chosen by layout at compile time: the vector intrinsics take C-contiguous rows only; any other
    layout (a strided view handed to a kernel) gets the same values one at a time."""
    if x.layout == "C" and dst.layout == "C":
        return lambda x, n0, k0, dst, rounded: bf16_group8(x, n0, k0, dst) if rounded else f32_group8(x, n0, k0, dst)

    def scalar(x, n0, k0, dst, rounded):
        for c in range(8):
            for i in range(PANEL_INPUTS):
                dst[k0 + c, i] = _input_value(x[n0 + i, k0 + c], rounded)
    return scalar


@inline
def _input_value(v, rounded):                              # an input as the panels meet it: bf16-rounded, or as it is
    return _bf16_value(v) if rounded else v


@serial
def groups_into(x, out, g0, g1, rounded):                  # float32 [N, K] -> out float32 [G, K, W], groups g0 .. g1, k-major
    """Group g holds inputs Wg .. Wg + W - 1, out[g, k, i] = x[Wg + i, k] (rounded: to bf16, as quant.round_to_bf16),
    so jit.bf16_panel and f32_panel_wide broadcast the W inputs at k from one place; past the last input, zeros."""
    N, K = x.shape
    W = out.shape[2]
    for g in range(g0, g1):
        if W == PANEL_INPUTS and g * W + W <= N:           # a whole group of 6: 8 columns at a time in vectors, the rest below
            for k0 in range(0, K - K % 8, 8):
                group8(x, g * W, k0, out[g], rounded)
            for k in range(K - K % 8, K):
                for i in range(W):
                    out[g, k, i] = _input_value(x[g * W + i, k], rounded)
            continue
        for i in range(W):
            n = g * W + i
            if n < N:
                for k in range(K):
                    out[g, k, i] = _input_value(x[n, k], rounded)
            else:
                for k in range(K):
                    out[g, k, i] = np.float32(0.0)


@serial
def bf16_groups_into(x, out, g0, g1):                      # groups_into, rounded to bf16 (bf16_panel's inputs)
    groups_into(x, out, g0, g1, True)


@serial
def bf16_kmajor(x):                                        # x [N, K] as a GEMV on panels reads it: one input [1, K, 1], else groups of 4
    W = 1 if x.shape[0] == 1 else 4
    out = np.empty((-(-x.shape[0] // W), x.shape[1], W), np.float32)
    bf16_groups_into(x, out, 0, out.shape[0])
    return out


@inline
def _pack_panel(w, m, rows, panel):                        # rows m .. m + rows - 1 (<= 16) of w (bits) -> panel [K, 8] (jit.pack_panel)
    K = w.shape[1]
    start = 0
    if rows == PANEL_ROWS:
        pack_panel(w, m, panel)
        start = K // 8 * 8
    half = PANEL_ROWS // 2
    for k in range(start, K):                              # the last K % 8 columns; a partial panel: all, its missing rows 0
        for j in range(half):
            lo = np.uint32(w[m + j, k]) if j < rows else np.uint32(0)
            hi = np.uint32(w[m + half + j, k]) if half + j < rows else np.uint32(0)
            panel[k, j] = lo | (hi << np.uint32(16))


@parallel
def _pack_panels(w, panels):
    for p in numba.prange(panels.shape[0]):
        _pack_panel(w, PANEL_ROWS * p, min(PANEL_ROWS, w.shape[0] - PANEL_ROWS * p), panels[p])


def bf16_panels(bits):                                     # bf16 rows (bits, uint16 [M, K]) -> quant.BF16Panels
    M, K = bits.shape
    panels = np.empty((-(-M // PANEL_ROWS), K, PANEL_ROWS // 2), np.uint32)
    _pack_panels(np.ascontiguousarray(bits), panels)
    return quant.BF16Panels(panels, M)


def bf16_unpanel(w):                                       # quant.BF16Panels -> its rows' bits, uint16 [M, K]
    halves = np.concatenate([w.panels & 0xFFFF, w.panels >> 16], axis=2)      # [P, K, 16]: rows 0-7 of each panel, then 8-15
    return np.ascontiguousarray(halves.transpose(0, 2, 1).reshape(-1, w.panels.shape[1])[: w.n_out].astype(np.uint16))


@inline
def panel_rows(xq, panels, out, m0, m1, ahead=0):          # out[:, m0:m1] = x . w[m0:m1]^T: xq from bf16_groups_into, panels of quant.BF16Panels
    """m0 a multiple of 16. Each panel against every group of inputs (jit.bf16_panel / bf16_panel4 /
    bf16_panel1 by the groups' width: 6, 4 or 1), only rows below m1 and inputs below out's N written.
    ahead: bytes on to hint into L2 while a panel is read (decode's region passes STREAM_AHEAD), never past
    row m1's panel. The region's bf16 step on a Zen 3, alternating in one process (medians of 21): 1.16x at
    batch 2, 1.20x at 4, 1.12x at 8 with 8 KiB hints, one input 0.97x; on an Emerald Rapids, npgpt bench
    tg128 at batch 1 in three rounds alternating processes: 1.21-1.70x with them, so every width gets them.
    Groups of 4 (decode from 2 inputs) with AVX-512 (jit.PANEL_WIDE): panel p with panel p + half of the
    range at once (jit.bf16_panel4_pair: 512-bit FMAs, two runs of memory in flight), an odd last panel
    alone; the same sums bit for bit."""
    N, W = out.shape[0], xq.shape[2]
    c = np.empty((W, PANEL_ROWS), np.float32)
    end = -(-m1 // PANEL_ROWS)
    first = m0 // PANEL_ROWS
    if W == 4 and jit.PANEL_WIDE:                          # panels p and p + half together (jit.bf16_panel4_pair)
        half = (end - first) // 2
        c2 = np.empty((4, 2 * PANEL_ROWS), np.float32)
        for p in range(first, first + half):
            q = p + half
            a = ahead if (end - q) * panels.shape[1] * 32 > ahead else 0
            for g in range(xq.shape[0]):
                bf16_panel4_pair(panels[p], panels[q], xq[g], c2, a)
                for i in range(min(4, N - g * 4)):
                    for m in range(PANEL_ROWS * p, PANEL_ROWS * p + PANEL_ROWS):   # (p < q: a whole panel)
                        out[g * 4 + i, m] = c2[i, m - PANEL_ROWS * p]
                    for m in range(PANEL_ROWS * q, min(m1, PANEL_ROWS * q + PANEL_ROWS)):
                        out[g * 4 + i, m] = c2[i, PANEL_ROWS + m - PANEL_ROWS * q]
        first += 2 * half
    for p in range(first, end):
        top = min(m1, PANEL_ROWS * p + PANEL_ROWS)
        a = ahead if (end - p) * panels.shape[1] * 32 > ahead else 0   # (a panel: 32 bytes a k)
        for g in range(xq.shape[0]):
            if W == 1:
                bf16_panel1(panels[p], xq[g], c, a)
            elif W == 4:
                bf16_panel4(panels[p], xq[g], c, a)
            else:
                bf16_panel(panels[p], xq[g], c, a)
            for i in range(min(W, N - g * W)):
                for m in range(PANEL_ROWS * p, top):
                    out[g * W + i, m] = c[i, m - PANEL_ROWS * p]


@inline
def _share(region, j, parts):                              # part j of `parts` near-equal consecutive parts of a 1-D region (the last ones may be short or empty)
    each = -(-region.shape[0] // max(1, parts))
    h0 = min(region.shape[0], j * each)
    return region[h0 : min(region.shape[0], h0 + each)]


@inline
def wide_panel_rows(xq, panels, out, m0, m1):              # panel_rows for groups of 6 on AVX-512: two panels widened at once
    """As panel_rows (m0 a multiple of 16, only rows below m1 and inputs below out's N written): panels p and
    p + 1 widened into one float32 panel of 32 rows by the first pair of groups as it meets them
    (jit.widen_panels_against), then every other pair against that panel (jit.f32_panel_wide: the float32
    prompts' kernel, 24 FMAs a k); an odd last group, or panel, one at a time (panel_rows). The same float32
    FMAs, k in order, as bf16_panel on each panel and group: the sums are bit for bit those of the narrow
    path. While two panels meet the groups, each pair's call hints its share of the next two into L2 (the
    weights come from memory: a prompt reads each once).
    Widening each two panels once, not per k in every pair's call (jit.bf16_panel_wide before, which spent
    3 of its 27 vector operations a k on the two widening ops and a shuffle, on the FMAs' ports): GPT-2's
    bf16 prompts on an Emerald Rapids, alternating in one process (medians of 21 and 9): pp128 1.07x,
    pp512 1.03x; against fp32 in the same runs, pp128 1.09x (1.02x before), pp512 1.00x (0.97x before).
    The widening inside the first pair's call, not a pass of its own before it (stop 40's jit.widen_panels,
    whose loads and stores to L2 took ~5% of a 128-input product): GPT-2's products alone, alternating in one
    process (medians of 25), 1.05-1.06x at 128 inputs, 0.99-1.01x at 512."""
    N, W, G = out.shape[0], xq.shape[2], xq.shape[0]
    K = panels.shape[1]
    c = np.empty((2 * W, 2 * PANEL_ROWS), np.float32)
    panel = np.empty((K, 2 * PANEL_ROWS), np.float32)
    end = -(-m1 // PANEL_ROWS)
    p = m0 // PANEL_ROWS
    while p + 2 <= end:
        base = PANEL_ROWS * p
        top = min(m1, base + 2 * PANEL_ROWS)
        after = panels[min(end, p + 2) : min(end, p + 4)].reshape(-1)   # the next two panels, hinted as the groups pass
        g = 0
        while g + 2 <= G:
            if g == 0:                                     # the first pair widens the two panels as it goes
                widen_panels_against(panels[p], panels[p + 1], panel, xq[0], xq[1], c, _share(after, 0, G // 2))
            else:
                f32_panel_wide(panel, xq[g], xq[g + 1], c, _share(after, g // 2, G // 2))
            for i in range(min(2 * W, N - g * W)):
                dst, src = out[g * W + i, base:top], c[i]
                for j in range(top - base):
                    dst[j] = src[j]
            g += 2
        if g < G:
            panel_rows(xq[g:], panels, out[g * W :], base, top)
        p += 2
    if p < end:
        panel_rows(xq, panels, out, PANEL_ROWS * p, m1)


@parallel
def gemv_panels(xq, N, panels, M, b, gelu):                # bf16 inputs (bf16_kmajor) of N rows and quant.BF16Panels (+ b) -> [N, M]
    """A panel a task, against every input (panel_rows)."""
    out = np.empty((N, M), dtype=np.float32)
    for p in numba.prange(panels.shape[0]):
        m1 = min(PANEL_ROWS * p + PANEL_ROWS, M)
        panel_rows(xq, panels, out, PANEL_ROWS * p, m1)
        for m in range(PANEL_ROWS * p, m1):
            _bias(out, b, m, gelu)
    return out


def _panel_product(x, w, out, b, then, scratch):           # matmul_into for quant.BF16Panels
    """Groups of 6 inputs (bf16_groups_into, bands of groups on every core), then each core a band of
    panels against all of them (panel_rows), finished on the same thread. A panel's outputs for an input
    are 16 adjacent columns, so the product goes straight into out (RESIDUAL: into scratch, then added),
    not transposed: at 512 inputs, reading a transposed product back ran bf16 pp512-all 0.78-0.94x fp32.
    On an AVX2 Zen 3, bf16 / fp32 in one npgpt bench run, rounds alternating processes: pp128 1.00-1.07x,
    pp512 0.98-1.17x, pp512-all 0.98-1.02x (the 3x3 split tiles before: pp128 0.73-0.92x, pp512 0.72-0.81x)."""
    N, K = x.shape
    M = w.n_out
    y = scratch[: N * M].reshape(N, M) if then == RESIDUAL else out   # the stream is added to, not written
    xg = _grouped(x, -(-N // PANEL_INPUTS), True)        # the inputs' bf16 values in groups of 6, k-major
    if jit.PANEL_WIDE:                                     # groups a block (_panel_band): as float32's panels
        step = _wide_block(N) // PANEL_INPUTS
    else:
        step = max(1, PANEL_INPUT_BYTES // (xg.itemsize * K * PANEL_INPUTS))

    with serialized():
        _panel_bands(xg, w.panels, y, b, then, out, step, min(numba.get_num_threads(), w.panels.shape[0]), jit.PANEL_WIDE)


@parallel
def _panel_bands(xg, panels, y, b, then, out, step, P, wide):   # _panel_product's P bands of panels, numba's threads
    n, M = panels.shape[0], out.shape[1]
    for p in numba.prange(P):
        c0, c1 = PANEL_ROWS * (p * n // P), min(PANEL_ROWS * ((p + 1) * n // P), M)
        _panel_band(xg, panels, y, c0, c1, step, wide)
        finish_band(y[:, c0:c1], b[c0:c1], then, out, c0, False)


@parallel
def _groups_bands(x, xg, P, rounded):                      # groups_into on P bands of groups, numba's threads
    G = xg.shape[0]
    for p in numba.prange(P):
        groups_into(x, xg, p * G // P, (p + 1) * G // P, rounded)


def _grouped(x, G, rounded):                               # x [N, K] -> float32 [G, K, 6] (groups_into), in bands above ROUND_INLINE_VALUES
    xg = np.empty((G, x.shape[1], PANEL_INPUTS), np.float32)
    if G <= max(1, ROUND_INLINE_VALUES // (x.shape[1] * PANEL_INPUTS)):
        groups_into(x, xg, 0, G, rounded)
    else:
        with serialized():
            _groups_bands(x, xg, min(numba.get_num_threads(), G), rounded)
    return xg


# A prompt's inputs are rounded (bf16 groups, int8 levels) on the calling thread up to this many values,
# in bands above: waking the other core (~70 us) costs more than rounding half of them (0.25-0.3 ns a
# value). Against always in bands, the model alternating in one process (medians of 21 pairs): pp128
# bf16 1.04x, int8 1.02x, int4 1.03x; pp512 bf16 1.01x (medians of 9).
ROUND_INLINE_VALUES = 1 << 19


def _wide_block(N):                                        # inputs a block on AVX-512's wide panels: near-equal blocks of up to F32_PANEL_UPTO, whole pairs of groups
    each = -(-N // -(-N // F32_PANEL_UPTO))
    return -(-each // (2 * PANEL_INPUTS)) * 2 * PANEL_INPUTS


# A core's band of panels meets its inputs in blocks of about this many bytes (whole groups), every panel
# against one block before the next block: the block stays in cache while the panels pass (AVX2's narrow
# panels; AVX-512's wide ones take float32's blocks of up to F32_PANEL_UPTO inputs, _wide_block: there each
# block widens every panel again, and 1 MB blocks at K = 3072 were 14 groups, each panel widened ~6 times at
# 512 inputs; GPT-2's bf16 prompts alternating in one process, medians of 9: 1.04-1.05x). Without blocks,
# each panel streamed every input from memory: at 2048 inputs of K = 3072 (25 MB of groups) the MLP's
# c_proj ran 0.92x fp32's sgemm on 2 cores. Blocks of 0.5, 1, 2 MB against none there (two runs):
# 1.04/1.08, 1.07/1.08, 1.07/0.97x; at K = 768, 2304 rows: 0.98/1.07, 0.99/1.07, 0.98/1.06x.
PANEL_INPUT_BYTES = 1 << 20


@serial
def _panel_band(xg, panels, out, m0, m1, step, wide):      # panel_rows (wide: wide_panel_rows) on a core's band, the inputs in blocks of `step` groups
    N = out.shape[0]
    G, W = xg.shape[0], xg.shape[2]
    for g0 in range(0, G, step):
        g1 = min(g0 + step, G)
        if wide:
            wide_panel_rows(xg[g0:g1], panels, out[g0 * W : min(N, g1 * W)], m0, m1)
        else:
            panel_rows(xg[g0:g1], panels, out[g0 * W : min(N, g1 * W)], m0, m1)


def _tiled_product(x, w, out, b, then, scratch):          # matmul_into for quant.BF16 rows: 4x4 tiles of bf16 pairs
    """jit.dot_bf16_4x4: vdpbf16ps where the CPU has it, else the same sums in plain IR (kernels.rows gives
    such CPUs quant.BF16Panels instead). The inputs' bf16 values multiplied exactly, summed in float32."""
    N, K = x.shape
    yt, rows = transposed_view(scratch, w.shape[0], N), w.bits
    xb = np.empty((N, K), np.uint16)                       # the inputs' bf16 bits, bands of rows on every core
    if N <= DECODE_ROWS:
        bf16_bits_into(x, xb)
    else:
        with serialized():
            _bf16_bits_bands(x, xb, min(numba.get_num_threads(), N))
    nb = max(4, TILE_INPUT_BYTES // (4 * K) // 4 * 4)
    mb = max(4, TILE_WEIGHT_BYTES // (rows.itemsize * K) // 4 * 4)

    with serialized():
        _tile_bands(xb, rows, yt, b, then, out, nb, mb, min(numba.get_num_threads(), w.shape[0]))


@parallel
def _bf16_bits_bands(x, xb, P):                            # bf16_bits_into on P bands of rows, numba's threads
    N = x.shape[0]
    for p in numba.prange(P):
        r0, r1 = p * N // P, (p + 1) * N // P
        bf16_bits_into(x[r0:r1], xb[r0:r1])


@parallel
def _tile_bands(xb, rows, yt, b, then, out, nb, mb, P):   # _tiled_product's P bands of rows, numba's threads
    M = rows.shape[0]
    for p in numba.prange(P):
        c0, c1 = p * M // P, (p + 1) * M // P
        _bf16_band(xb, rows, c0, c1, yt.T, nb, mb)
        finish_band(yt[c0:c1], b[c0:c1], then, out, c0, True)


@serial
def _round_band(x, bits, offset, xq, sx, xoff):            # rows of x -> int8 levels, block scales, offset sums (as _rounded_inputs)
    _round_inputs(x, bits, offset, xq, sx, xoff)


def rounded_rows(x, offset, blocks):                       # x [N, K] -> (xq, sx, xoff) padded to `blocks` blocks, bands of rows
    """quant.round_to_q8's levels and scales (xq * sx is its result), and `offset` times each block's sum of levels."""
    x = np.ascontiguousarray(x)
    N, bits = x.shape[0], x.view(np.uint32)
    xq, sx = np.empty((N, blocks * Q8), np.int8), np.empty((N, blocks), np.float32)
    xoff = np.empty((N, blocks), np.int32)
    if N <= max(DECODE_ROWS, ROUND_INLINE_VALUES // x.shape[1]):
        _round_band(x, bits, offset, xq, sx, xoff)
    else:
        with serialized():
            _round_bands(x, bits, offset, xq, sx, xoff, min(numba.get_num_threads(), N))
    return xq, sx, xoff


@parallel
def _round_bands(x, bits, offset, xq, sx, xoff, P):       # _round_band on P bands of rows, numba's threads
    N = x.shape[0]
    for p in numba.prange(P):
        r0, r1 = p * N // P, (p + 1) * N // P
        _round_inputs(x[r0:r1], bits[r0:r1], offset, xq[r0:r1], sx[r0:r1], xoff[r0:r1])


@serial
def _groups_q8(xq, sx, xoff, packed, scale, g0, g1, yt):   # quant.Int8Rows (packed, scale): groups g0 .. g1 into yt [M, N]
    _groups_into(xq, sx, xoff, packed, scale, g0, g1, packed.shape[1] // (8 * Q8), yt, dot_q8, dot_q8x4, 0)


@serial
def _groups_q4(xq, sx, xoff, packed, scale, g0, g1, yt):   # quant.Int4Rows (packed, scale): groups g0 .. g1 into yt [M, N]
    _groups_into(xq, sx, xoff, packed, scale, g0, g1, scale.shape[1] // GROUP, yt, dot_q4, dot_q4x4, 0)


# An integer band's product goes, sub_groups(N) groups of 8 rows by up to SUB_INPUTS inputs at a time, into a
# transposed buffer of its thread's (~256 KB, in L2) and is finished from there at once. Into one [M, N] scratch
# a band at a time, the head's 512-input product (transposed: 109 MB, fresh pages each pass) ran 466 ms (172
# best) against 195 (150), and at 2048 inputs 1.9 s against 0.85; the layers' products (M <= 3072) alike at 512
# inputs (medians of 7, alternating in one process). Blocks of 256 inputs then ran the layers' products at 2048
# inputs 1.2-1.5x faster than all 2048 at once (the sub-band's weights stay in L2 across the blocks), and
# 1.00-1.06x at 512; the order of the two loops measured the same.
SUB_BYTES = 256 << 10
SUB_INPUTS = 256


def sub_groups(N):                                         # groups of 8 rows an integer product finishes at a time, at N inputs
    return max(1, SUB_BYTES // (4 * GROUP * (-(-min(N, SUB_INPUTS) // 16) * 16 + 16)))


def _integer_product(x, w, out, b, then):                  # matmul_into for quant.Int8Rows / Int4Rows
    """The inputs rounded once (bands of rows), then bands of groups of 8 weight rows, a band per thread,
    each finished (bias, GELU, residual) from their transposed product sub_groups by SUB_INPUTS at a time."""
    N = x.shape[0]
    int4 = isinstance(w, quant.Int4Rows)
    xq, sx, xoff = rounded_rows(x, 8 if int4 else 128, w.scale.shape[1] // GROUP if int4 else w.packed.shape[1] // (8 * Q8))
    with serialized():
        (_q4_bands if int4 else _q8_bands)(xq, sx, xoff, w.packed, w.scale, b, then, out,
                                           min(numba.get_num_threads(), w.packed.shape[0]), sub_groups(N), max(1, min(N, SUB_INPUTS)))


@inline
def _group_bands(xq, sx, xoff, packed, scale, b, then, out, P, groups, sub, nb):   # _q8_bands / _q4_bands' shared body
    G, M, N = packed.shape[0], out.shape[1], xq.shape[0]
    for p in numba.prange(P):
        yt = np.empty((GROUP * sub, -(-nb // 16) * 16 + 16), np.float32)   # rows padded as transposed_view's
        for ga in range(p * G // P, (p + 1) * G // P, sub):
            gb = min(ga + sub, (p + 1) * G // P)
            c0, c1 = GROUP * ga, min(GROUP * gb, M)
            for n0 in range(0, N, nb):
                n1 = min(n0 + nb, N)
                part = yt[: c1 - c0, : n1 - n0]
                groups(xq[n0:n1], sx[n0:n1], xoff[n0:n1], packed[ga:gb], scale[ga:gb], 0, gb - ga, part)
                finish_band(part, b[c0:c1], then, out[n0:n1], c0, True)


@parallel
def _q8_bands(xq, sx, xoff, packed, scale, b, then, out, P, sub, nb):   # _integer_product's P bands of groups (int8), numba's threads
    _group_bands(xq, sx, xoff, packed, scale, b, then, out, P, _groups_q8, sub, nb)


@parallel
def _q4_bands(xq, sx, xoff, packed, scale, b, then, out, P, sub, nb):   # the same for int4
    _group_bands(xq, sx, xoff, packed, scale, b, then, out, P, _groups_q4, sub, nb)


@parallel
def _transpose_into(a, out):                               # [R, C] -> out [C, R]
    R, C = a.shape
    tile = 32                                              # tile by tile: reads and writes stay within cache lines
    for ti in numba.prange((R + tile - 1) // tile):
        r0 = ti * tile
        r1 = min(r0 + tile, R)
        for c0 in range(0, C, tile):
            c1 = min(c0 + tile, C)
            for r in range(r0, r1):
                for c in range(c0, c1):
                    out[c, r] = a[r, c]


def transpose_into(a, out):                                # [R, C] -> into out [C, R], which must be C-contiguous
    if out.shape != a.shape[::-1] or out.dtype != a.dtype or not out.flags.c_contiguous:
        raise ValueError(f"transpose_into: {a.dtype} {a.shape} into {out.dtype} {out.shape}")
    _transpose_into(a, out)


def transpose(a):                                          # [R, C] -> [C, R], contiguous
    """~20x faster than NumPy's .T copy. The result is NumPy-allocated: NumPy asks Linux for huge
    pages on large arrays (numba's allocator does not), and decode GEMV reads them ~10% faster."""
    out = np.empty(a.shape[::-1], dtype=a.dtype)
    _transpose_into(a, out)
    return out


def matmul_rows(x, w, b=None, gelu=False):                 # [..., K] x [M, K] rows (+ [M]) -> [..., M], GELU'd if gelu
    """w: float32 rows, quant.BF16 rows or BF16Panels, quant.Int8Rows or quant.Int4Rows, read as they are stored.
    gelu: gelu(x . w^T + b) in the same kernel (kernels.decode's MLP)."""
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    M = w.shape[0]
    if x2.shape[0] <= DECODE_ROWS:
        if isinstance(w, quant.Int4Rows):
            y = gemv_q4(x2, x2.view(np.uint32), w.packed, w.scale, w.n_out, b, gelu, INT_AHEAD)
        elif isinstance(w, quant.Int8Rows):
            y = gemv_q8(x2, x2.view(np.uint32), w.packed, w.scale, w.n_out, b, gelu, INT_AHEAD)
        elif isinstance(w, quant.BF16):
            y = gemv_bf16(bf16_bits(x2), w.bits, b, gelu)
        elif isinstance(w, quant.BF16Panels):
            y = gemv_panels(bf16_kmajor(x2), x2.shape[0], w.panels, w.n_out, b, gelu)
        elif isinstance(w, quant.F32Panels):
            y = gemv_f32_panels(x2, w.panels, w.n_out, b, gelu)
        else:
            y = gemv(x2, w, b, gelu)
    else:
        y = np.empty((x2.shape[0], M), dtype=np.float32)
        matmul_into(x2, w, y, np.zeros(M, np.float32) if b is None else b, GELU if gelu else BIAS)
    return y.reshape(*x.shape[:-1], M)


def transposed_view(scratch, M, N):                        # a product transposed, [M, N], in scratch: rows padded
    """Rows N rounded up to 16 floats, plus 16: reading 16 rows down a column (finish_band) then touches 16
    sets of L1. At a power-of-two N of 512 or more, unpadded rows put all 16 in one or two sets."""
    ld = -(-N // 16) * 16 + 16
    return scratch[: M * ld].reshape(M, ld)[:, :N]


def scratch_size(N, M):                                    # float32 elements matmul_into's scratch needs for an [N, M] product
    return (N + 32) * M


BIAS, GELU, RESIDUAL = 0, 1, 2                             # what a prefill product does with its band (matmul_into)


def matmul_into(x, w, out, b, then=BIAS, scratch=None):   # x [N, K] . w rows [M, K]^T + b [M] -> out [N, M], per `then`
    """Prefill's product: each core takes a band of the weight's rows (it reads only its share of W; x is
    small) and, on the same thread while the band is still in cache, finishes its columns of out:
    BIAS: out = x . w^T + b; GELU: out = gelu(x . w^T + b); RESIDUAL: out += x . w^T + b (a block's
    output joins the stream). int8/int4 rows meet int8-rounded inputs, bf16 rows bf16-rounded ones, as the spec.
    scratch: float32, scratch_size(N, M) elements, where products wait to be finished (kernels.prefill passes
    one buffer to every product of a pass: a fresh array per band is fresh pages to fault in; integer rows
    use none, see SUB_BYTES)."""
    if isinstance(w, (quant.Int8Rows, quant.Int4Rows)):
        return _integer_product(x, w, out, b, then)
    N, M = x.shape[0], w.shape[0]
    # np.empty touches no page: where every product goes straight into out, this scratch costs nothing
    scratch = np.empty(scratch_size(N, M), np.float32) if scratch is None else scratch
    if isinstance(w, quant.BF16):                          # (inputs on bf16's values, as the spec)
        return _tiled_product(x, w, out, b, then, scratch)
    if isinstance(w, quant.BF16Panels):
        return _panel_product(x, w, out, b, then, scratch)
    if isinstance(w, quant.F32Panels):                     # in blocks of inputs up to F32_PANEL_UPTO, near-equal, whole pairs of groups
        x = np.ascontiguousarray(x)
        each = _wide_block(N)
        for n0 in range(0, N, each):
            _f32_panel_product(x[n0 : n0 + each], w, out[n0 : n0 + each], b, then, scratch)
        return
    if jit.PANEL_WIDE and N <= F32_PANEL_UPTO and x.flags.c_contiguous and w.flags.c_contiguous:
        return _f32_panel_product(x, w, out, b, then, scratch)
    if jit.SGEMM and x.flags.c_contiguous and w.flags.c_contiguous and out.flags.c_contiguous:
        with jit.numba_bands():
            _sgemm_bands(x, w, b, then, out, scratch, N < TRANSPOSED_BELOW, min(numba.get_num_threads(), M), jit.SGEMM)
        return
    bands(lambda cols: _gemm_band(x, w, b, then, out, cols, scratch), M, inline_upto=1)


@inline
def _finish(o, v, then):                                   # one output element from its product + bias v
    if then == GELU:
        return _gelu(v)
    return o + v if then == RESIDUAL else v


@inline
def _finish_rows(y, b, then, out, c0):                     # out[:, c0 : c0 + m] from y [N, m] + b [m]
    for n in range(y.shape[0]):
        src, dst = y[n], out[n, c0 : c0 + y.shape[1]]      # sliced: numba's wraparound on indices from range(c0, ..) kept loops scalar
        for j in range(src.shape[0]):
            dst[j] = _finish(dst[j], src[j] + b[j], then)


@inline
def _finish_in_place(b, then, out, c0):                    # out[:, c0 : c0 + m] holds the product: + b [m] (then GELU)
    """Not _finish_rows with y = out's columns: the two overlap, so the vectorized loop's alias check
    failed on every row and the scalar one ran (pp512 4-5% slower)."""
    for n in range(out.shape[0]):
        dst = out[n, c0 : c0 + b.shape[0]]
        for j in range(dst.shape[0]):
            dst[j] = _finish(dst[j], dst[j] + b[j], then)


@inline
def _finish_columns(yt, b, then, out, c0):                 # the same from yt [m, N] (y transposed)
    m, N = yt.shape
    first = BIAS if then == GELU else then                 # GELU: once the band is written, row by row
    for j0 in range(0, m - m % 16, 16):
        bias = b[j0 : j0 + 16]
        for n in range(N):
            dst = out[n, c0 + j0 : c0 + j0 + 16]
            for j in range(16):                            # a gather down 16 of yt's rows, then one vector
                dst[j] = _finish(dst[j], yt[j0 + j, n] + bias[j], first)
    for j in range(m - m % 16, m):
        for n in range(N):
            out[n, c0 + j] = _finish(out[n, c0 + j], yt[j, n] + b[j], first)
    if then == GELU:                                       # (GELU on 16 values at a time ran 2.5x slower: not vectorized)
        for n in range(N):
            dst = out[n, c0 : c0 + m]
            for j in range(m):
                dst[j] = _gelu(dst[j])


@serial
def finish_band(y, b, then, out, c0, transposed):          # out[:, c0 : c0 + m] from a band's product (yt [m, N] if transposed) and b [m]
    """Straight (not transposed), BIAS and GELU find the product in out's columns already (y is not read).
    Each `then` is its own loop nest (the constant folds away in each), so none branches per
    element: with one loop and the branch inside, the GELU ran scalar, 10x slower. Transposed, 16
    columns at a time: each output row's 16 read down yt (a gather) and written as one vector, 2.2x
    faster than copying tile by tile and adding the bias after (0.058 against 0.127 ms, 1152 x 128)."""
    if transposed:
        if then == GELU:
            _finish_columns(y, b, GELU, out, c0)
        elif then == RESIDUAL:
            _finish_columns(y, b, RESIDUAL, out, c0)
        else:
            _finish_columns(y, b, BIAS, out, c0)
    elif then == RESIDUAL:
        _finish_rows(y, b, RESIDUAL, out, c0)
    elif then == GELU:
        _finish_in_place(b, GELU, out, c0)
    else:
        _finish_in_place(b, BIAS, out, c0)


# Below this many input rows a float32 band's product runs transposed, w_band . x^T into a scratch [cols, N]
# read back by finish_band: OpenBLAS (SkylakeX kernels, one thread) ran the product alone 15-20% faster
# at 128 rows (92-96 against 78-83 GFLOP/s at K = 768 and 3072), the same at 512. In the model, interleaved
# in one process (medians of 7): pp128 1.05-1.06x, pp256 1.02x; bf16's widened tiles 0.98x (not used there).
TRANSPOSED_BELOW = 512


def _product(x, rows, b, then, out, c0, scratch, transposed=False):   # out's columns c0 .. c0 + len(rows) from x . rows^T + b
    """scratch: the whole product's (scratch_size(N, M)); these columns' share of it is used."""
    N, m, M = x.shape[0], rows.shape[0], out.shape[1]
    if transposed and N < TRANSPOSED_BELOW:                # yt [m, N]: rows c0 .. c0 + m of a [M, N] scratch
        yt = transposed_view(scratch, M, N)[c0 : c0 + m]
        np.matmul(rows, x.T, out=yt)
        finish_band(yt, b, then, out, c0, True)
        return
    y = scratch[: N * M].reshape(N, M)[:, c0 : c0 + m] if then == RESIDUAL else out[:, c0 : c0 + m]   # the stream is added to, not written
    np.matmul(x, rows.T, out=y)
    finish_band(y, b, then, out, c0, False)


@parallel
def _sgemm_bands(x, w, b, then, out, scratch, transposed, P, fn):   # matmul_into on float32 rows: P bands of w's rows, numba's threads
    """_product's bands, each a single-threaded cblas_sgemm called from numba's threads (jit.sgemm_nt, fn =
    jit.SGEMM), finished on the same thread. Against the same bands on `bands`' Python threads, which a
    band's hand-off wakes, the model's fp32 pp128 measured 1.21x and pp512 1.04x (attention's heads and
    LayerNorm moved to numba's threads too; alternating in one process, medians of 12 rounds, quartiles
    1.09-1.39x and 1.01-1.11x, a 2-core Ice Lake VM)."""
    N, M = x.shape[0], w.shape[0]
    ld = -(-N // 16) * 16 + 16                             # transposed_view's row length
    for p in numba.prange(P):
        c0, c1 = p * M // P, (p + 1) * M // P
        if transposed:                                     # yt [m, N] = w_band . x^T, rows c0 .. c1 of a [M, N] scratch
            yt = scratch[: M * ld].reshape(M, ld)[c0:c1, :N]
            sgemm_nt(fn, w[c0:c1], x, yt)
            finish_band(yt, b[c0:c1], then, out, c0, True)
        else:
            y = (scratch[: N * M].reshape(N, M) if then == RESIDUAL else out)[:, c0:c1]
            sgemm_nt(fn, x, w[c0:c1], y)
            finish_band(y, b[c0:c1], then, out, c0, False)


# Float32 prompts on AVX-512 (jit.PANEL_WIDE), up to F32_PANEL_UPTO inputs: OpenBLAS's sgemm replaced by
# float32 panels packed per call (jit.f32_panel_wide), or, on quant.F32Panels, read as they are (more inputs
# than this: in blocks of up to this many, each panel read once a block). See _f32_panel_product.
F32_PANEL_UPTO = 512


@inline
def _pack_f32(w, m, panel):                                # rows m .. m + 31 of w [M, K] -> panel [K, 32], k-major (rows past M: zeros)
    M, K = w.shape
    rows = min(F32_PANEL, M - m)
    start = 0
    if rows == F32_PANEL:                                  # whole runs of 8 columns in vectors (jit.pack_f32_panel), the rest here
        pack_f32_panel(w, m, panel)
        start = K // 8 * 8
    for k in range(start, K):
        for j in range(F32_PANEL):
            panel[k, j] = w[m + j, k] if j < rows else np.float32(0.0)


@inline
def _panel_groups(panel, xg, c, out, m, top, after):      # a packed panel (rows m .. top - 1 of out) against every pair of groups
    """jit.f32_panel_wide per pair of groups, each call hinting its share of `after` (the next panel's
    weights) into L2; only inputs below out's N written."""
    N, G, W = out.shape[0], xg.shape[0], xg.shape[2]
    for g in range(0, G, 2):
        f32_panel_wide(panel, xg[g], xg[g + 1], c, _share(after, g // 2, G // 2))
        for i in range(min(2 * W, N - g * W)):
            dst, src = out[g * W + i, m:top], c[i]
            for j in range(top - m):
                dst[j] = src[j]


@serial
def f32_panel_band(xg, w, out, m0, m1):                    # out[:, m0:m1] = x . w[m0:m1]^T: xg from groups_into, an even count of groups
    """m0 a multiple of 32. Per 32 rows of w: packed into a panel (_pack_f32), then against every pair of
    groups (jit.f32_panel_wide), only rows below m1 and inputs below out's N written. While a panel meets
    the groups, each pair's call hints its share of the next panel's rows into L2 (the weights come from
    memory: a prompt reads each once)."""
    K, W = w.shape[1], xg.shape[2]
    panel = np.empty((K, F32_PANEL), np.float32)
    c = np.empty((2 * W, F32_PANEL), np.float32)
    flat = w.reshape(-1)                                   # (rows m .. m + 31 are one run of flat)
    for m in range(m0, m1, F32_PANEL):
        _pack_f32(w, m, panel)
        top = min(m1, m + F32_PANEL)
        _panel_groups(panel, xg, c, out, m, top, flat[top * K : min(m1, top + F32_PANEL) * K])


@serial
def f32_panels_band(xg, panels, out, m0, m1):              # f32_panel_band on weights already packed (quant.F32Panels' panels)
    c = np.empty((2 * xg.shape[2], F32_PANEL), np.float32)
    end = -(-m1 // F32_PANEL)
    for p in range(m0 // F32_PANEL, end):
        m = F32_PANEL * p
        _panel_groups(panels[p], xg, c, out, m, min(m1, m + F32_PANEL), panels[min(end, p + 1) : min(end, p + 2)].reshape(-1))


@parallel
def _f32_panel_bands(xg, w, y, b, then, out, P):          # _f32_panel_product's P bands of 32-row panels, numba's threads
    M = out.shape[1]                                       # (w: float32 rows, packed as they are met, or quant.F32Panels' panels)
    n = w.shape[0] if w.ndim == 3 else -(-M // F32_PANEL)
    for p in numba.prange(P):
        c0, c1 = F32_PANEL * (p * n // P), min(F32_PANEL * ((p + 1) * n // P), M)
        if w.ndim == 3:
            f32_panels_band(xg, w, y, c0, c1)
        else:
            f32_panel_band(xg, w, y, c0, c1)
        finish_band(y[:, c0:c1], b[c0:c1], then, out, c0, False)


def _f32_panel_product(x, w, out, b, then, scratch):       # matmul_into for float32 rows or quant.F32Panels (C-contiguous x and w) on AVX-512
    """The inputs in groups of 6, k-major (groups_into, an even count), then each core a band of w's rows,
    32 at a time k-major in an L2-sized panel met by every pair of groups (jit.f32_panel_wide, as bf16's
    widened panels are): quant.F32Panels' as they are (kernels.prepare's layer weights since stop 40), rows
    packed per call (the tied head, training's rows; the figures below are from then). Products straight into out (RESIDUAL: into scratch, then added), finished on the same thread. On an Emerald Rapids (2 zmm FMAs a cycle), GPT-2's prefill products on both cores, calls
    alternating in one process (best / median of 21 GFLOP/s, before the hints): at 128 inputs 243-265 /
    225-248 against OpenBLAS's 210-237 / 197-217; at 512 inputs 267-290 / 245-259 against 246-268 /
    215-251. At 2048 inputs no faster (271-298 against 242-304 best of 9; b4 pp512 0.81-0.83x in the
    model; blocks of inputs with the band's panels packed once, no better): there OpenBLAS runs.
    In the model, alternating in one process (medians of 21 and 9): pp128 1.15x, pp512 1.04x, hints of
    the next panel included (without them 1.07x and 0.97x in the same run)."""
    N, K = x.shape
    M = w.shape[0]
    y = scratch[: N * M].reshape(N, M) if then == RESIDUAL else out
    G = -(-N // PANEL_INPUTS)
    xg = _grouped(x, G + G % 2, False)
    w = w.panels if isinstance(w, quant.F32Panels) else w
    with serialized():
        _f32_panel_bands(xg, w, y, b, then, out, min(numba.get_num_threads(), -(-M // F32_PANEL)))


def _gemm_band(x, w, b, then, out, cols, scratch):         # out's columns `cols` from x [N, K] . w[cols]^T + b[cols] (float32 rows)
    _product(x, w[cols], b[cols], then, out, cols.start, scratch, transposed=True)


# int8 (quant.Int8Rows) and int4 (quant.Int4Rows): rows interleaved in groups of 8, so one 32-byte load holds
# 4 (int8) or 8 (int4) consecutive weights of each of 8 rows (see jit.dot_q8), in decode and prefill alike.
def int8_rows(q, scale):                                   # int8 rows [M, K], float32 scale [M] -> quant.Int8Rows
    """Rows past M (to a whole group) and inputs past K (to a whole block) are padding: q = 0, scale 0."""
    M, K = q.shape
    G, blocks = -(-M // GROUP), -(-K // Q8)
    u = np.full((G * GROUP, blocks * Q8), 128, np.uint8)
    u[:M, :K] = q.view(np.uint8) ^ np.uint8(0x80)          # q + 128 as an unsigned byte
    u = u.reshape(G, GROUP, blocks, 8, 4).transpose(0, 2, 3, 1, 4)   # g, j, i, r, c: k = 32j + 4i + c
    s = np.zeros(G * GROUP, np.float32)
    s[:M] = scale
    return quant.Int8Rows(np.ascontiguousarray(u).reshape(G, blocks * 256), s.reshape(G, GROUP), M, K)


def int8_unrows(w):                                        # quant.Int8Rows -> (q int8 rows [M, K], scale [M])
    G, blocks = w.packed.shape[0], w.packed.shape[1] // 256
    u = w.packed.reshape(G, blocks, 8, GROUP, 4).transpose(0, 3, 1, 2, 4).reshape(G * GROUP, blocks * Q8)
    return (np.ascontiguousarray(u[: w.n_out, : w.n_in] ^ np.uint8(0x80)).view(np.int8),
            np.ascontiguousarray(w.scale.ravel()[: w.n_out]))


# int4 (quant.Int4Rows): rows interleaved in groups of 8, so one 32-byte load holds 8 weights of each of 8
# rows (see jit.dot_q4).
def int4_rows(q, scale):                                   # int8 rows [M, K] in [-8, 7], scale [M, blocks] -> quant.Int4Rows
    """Rows past M (to a whole group) and inputs past K (to a whole block) are padding: q = 0, scale 0.
    float16 scales are kept as their bits (uint16: numba has no float16 arrays; jit.dot_q4 widens them),
    float32 ones (older files) as they are."""
    M, K = q.shape
    G, blocks = -(-M // GROUP), -(-K // Q8)
    u = quant.offset_nibbles(q, G * GROUP, blocks * Q8).reshape(G, GROUP, blocks, 4, 2, 4)   # g, r, j, i, half, c
    u = u.transpose(0, 2, 3, 1, 4, 5)                      # g, j, i, r, half, c: k = 32j + 8i + 4 half + c
    packed = u[..., 0, :] | (u[..., 1, :] << 4)
    s = np.zeros((G * GROUP, blocks), np.float16 if scale.dtype == np.float16 else np.float32)
    s[:M] = scale
    s = np.ascontiguousarray(s.reshape(G, GROUP, blocks).transpose(0, 2, 1)).reshape(G, -1)
    return quant.Int4Rows(np.ascontiguousarray(packed).reshape(G, blocks * 128), s.view(np.uint16) if s.dtype == np.float16 else s, M, K)


def int4_unrows(w):                                        # quant.Int4Rows -> (q int8 rows [M, K], scale [M, blocks])
    G, blocks = w.packed.shape[0], w.scale.shape[1] // GROUP
    p = w.packed.reshape(G, blocks, 4, GROUP, 4)
    u = np.stack([p & 15, p >> 4], axis=4).transpose(0, 3, 1, 2, 4, 5).reshape(G * GROUP, blocks * Q8)
    scale = w.scale.view(np.float16) if w.scale.dtype == np.uint16 else w.scale
    scale = scale.reshape(G, blocks, GROUP).transpose(0, 2, 1).reshape(G * GROUP, blocks)
    return (np.ascontiguousarray(u[: w.n_out, : w.n_in].view(np.int8) - np.int8(8)),
            np.ascontiguousarray(scale[: w.n_out, : -(-w.n_in // Q8)]))


def linear(x, weight_t, bias):                             # [..., in], [out, in], [out] -> [..., out]; W transposed once at load
    return matmul_rows(x, weight_t, bias)


def lm_head(x, weight):                                    # [..., C], [V, C] -> [..., V]; wte already has rows per output
    """matmul_rows, the logits of a prompt's positions in ordinary pages (memory.ordinary_pages: the largest
    array a pass makes, fresh each call)."""
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    if x2.shape[0] <= DECODE_ROWS:
        return matmul_rows(x, weight)
    V = weight.shape[0]
    y = ordinary_pages((x2.shape[0], V))
    matmul_into(x2, weight, y, np.zeros(V, np.float32), BIAS)
    return y.reshape(*x.shape[:-1], V)


def gemm(a, b):                                            # [N, K] x [K, M] -> [N, M] float32, on every core
    """One single-threaded sgemm per core on a band of a's rows, or of b's columns when a has fewer rows
    than b has columns (transposed views are fine: BLAS reads them as they are)."""
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.float32)
    if a.shape[0] >= b.shape[1]:
        bands(lambda r: np.matmul(a[r], b, out=out[r]), a.shape[0], inline_upto=1)
    else:
        bands(lambda c: np.matmul(a, b[:, c], out=out[:, c]), b.shape[1], inline_upto=1)
    return out


def linear_backward(dout, x, weight_t, bias):              # [..., out], [..., in], [out, in], [out] -> dx, dweight [in, out], dbias [out]
    """weight_t: float32 rows, or quant.F32Panels (an inference model's layout, unpacked into rows here: a
    model made trainable, Model.trainable_params, keeps rows)."""
    d2, x2 = dout.reshape(-1, dout.shape[-1]), x.reshape(-1, x.shape[-1])
    weight_t = f32_unpanel(weight_t) if isinstance(weight_t, quant.F32Panels) else weight_t
    return gemm(d2, weight_t).reshape(x.shape), gemm(x2.T, d2), d2.sum(axis=0)


def lm_head_backward(dout, x, weight):                     # [..., V], [..., C], [V, C] -> dx [..., C], dweight [V, C]
    d2, x2 = dout.reshape(-1, dout.shape[-1]), x.reshape(-1, x.shape[-1])
    return gemm(d2, weight).reshape(x.shape), gemm(d2.T, x2)
