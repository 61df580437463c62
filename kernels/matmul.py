"""Matrix products. Weights are rows of outputs, W [out, in] (the loader transposes HF's Conv1D once,
see kernels.prepare): decode streams each row once with a contiguous dot on every core; prefill gives
each core a band of output columns and a single-threaded sgemm on the same array transposed."""

import numba
import numpy as np

from npgpt import quant

from .jit import DECODE_ROWS, bands, f32_from_bits, parallel, serial


@serial
def _dot_rows(x, row, out, m):                             # out[:, m] = x [N, K] . row [K]
    N, K = x.shape
    n = 0
    while n + 4 <= N:                                      # four dots at once share each load of the row
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for k in range(K):
            r = row[k]
            s0 += x[n, k] * r
            s1 += x[n + 1, k] * r
            s2 += x[n + 2, k] * r
            s3 += x[n + 3, k] * r
        out[n, m], out[n + 1, m], out[n + 2, m], out[n + 3, m] = s0, s1, s2, s3
        n += 4
    while n < N:
        s = np.float32(0.0)
        for k in range(K):
            s += x[n, k] * row[k]
        out[n, m] = s
        n += 1


@parallel
def gemv(x, w, b):                                         # [N, K] x [M, K] rows (+ [M] or None) -> [N, M]
    M = w.shape[0]
    out = np.empty((x.shape[0], M), dtype=np.float32)
    for m in numba.prange(M):                              # one pass over each weight row serves all N inputs
        _dot_rows(x, w[m], out, m)
        if b is not None:
            for n in range(x.shape[0]):
                out[n, m] += b[m]
    return out


@parallel
def gemv_bf16(x, bits, b):                                 # [N, K] x bf16 [M, K] rows (uint16) -> [N, M]
    """Widened in registers: bf16 << 16 is its float32, and the loop still vectorizes."""
    N, K = x.shape
    M = bits.shape[0]
    out = np.empty((N, M), dtype=np.float32)
    for m in numba.prange(M):
        for n in range(N):
            s = np.float32(0.0)
            for k in range(K):
                s += x[n, k] * f32_from_bits(np.uint32(bits[m, k]) << np.uint32(16))
            out[n, m] = s if b is None else s + b[m]
    return out


@parallel
def gemv_int8(x, q, scale, b):                             # [N, K] x int8 [M, K] rows, scale [M] -> [N, M]
    N, K = x.shape
    M = q.shape[0]
    out = np.empty((N, M), dtype=np.float32)
    for m in numba.prange(M):
        for n in range(N):
            s = np.float32(0.0)
            for k in range(K):
                s += x[n, k] * np.float32(q[m, k])
            out[n, m] = s * scale[m] if b is None else s * scale[m] + b[m]   # x . (q * scale), reassociated
    return out


@serial
def bf16_tile(bits, out):                                  # bf16 bits [m, K] -> out float32 [m, K]
    wide = out.view(np.uint32)
    for m in range(bits.shape[0]):
        for k in range(bits.shape[1]):
            wide[m, k] = np.uint32(bits[m, k]) << np.uint32(16)


@serial
def int8_tile(q, scale, out):                              # int8 [m, K], scale [m] -> out float32 [m, K]
    for m in range(q.shape[0]):
        for k in range(q.shape[1]):
            out[m, k] = np.float32(q[m, k]) * scale[m]


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


def transpose(a):                                          # [R, C] -> [C, R], contiguous
    """~20x faster than NumPy's .T copy. The result is NumPy-allocated: NumPy asks Linux for huge
    pages on large arrays (numba's allocator does not), and decode GEMV reads them ~10% faster."""
    out = np.empty(a.shape[::-1], dtype=a.dtype)
    _transpose_into(a, out)
    return out


PREFILL_TILE = 256                                         # low-precision rows widened at a time for sgemm (768 KiB at K=768)


def matmul_rows(x, w, b=None):                             # [..., K] x [M, K] rows (+ [M]) -> [..., M]
    """w: float32 rows, or quant.BF16 / quant.Int8 rows (scale [M]) read as they are stored."""
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    M = w.shape[0]
    if x2.shape[0] <= DECODE_ROWS:
        if isinstance(w, quant.BF16):
            y = gemv_bf16(x2, w.bits, b)
        elif isinstance(w, quant.Int8):
            y = gemv_int8(x2, w.q, w.scale, b)
        else:
            y = gemv(x2, w, b)
    else:
        y = np.empty((x2.shape[0], M), dtype=np.float32)
        bands(lambda cols: _gemm_band(x2, w, b, y, cols), M, inline_upto=1)
    return y.reshape(*x.shape[:-1], M)


def _gemm_band(x, w, b, y, cols):                          # y[:, cols] = x [N, K] . w[cols]^T (+ b[cols])
    """Each core takes a band of the weight's rows: it reads only its share of W, and x is small.
    Low-precision rows are widened one tile at a time, so no float32 copy of W ever exists."""
    if isinstance(w, np.ndarray):
        np.matmul(x, w[cols].T, out=y[:, cols])
    else:
        tile = np.empty((min(PREFILL_TILE, cols.stop - cols.start), x.shape[1]), dtype=np.float32)
        for t0 in range(cols.start, cols.stop, PREFILL_TILE):
            t1 = min(t0 + PREFILL_TILE, cols.stop)
            part = tile[: t1 - t0]
            if isinstance(w, quant.BF16):
                bf16_tile(w.bits[t0:t1], part)
            else:
                int8_tile(w.q[t0:t1], w.scale[t0:t1], part)
            np.matmul(x, part.T, out=y[:, t0:t1])
    if b is not None:
        y[:, cols] += b[cols]


def linear(x, weight_t, bias):                             # [..., in], [out, in], [out] -> [..., out]; W transposed once at load
    return matmul_rows(x, weight_t, bias)


def lm_head(x, weight):                                    # [..., C], [V, C] -> [..., V]; wte already has rows per output
    return matmul_rows(x, weight)
