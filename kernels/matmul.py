"""Matrix products. Weights are rows of outputs, W [out, in] (the loader transposes HF's Conv1D once,
see kernels.prepare): decode streams each row once with a contiguous dot on every core; prefill gives
each core a band of output columns and a single-threaded sgemm on the same array transposed."""

import numba
import numpy as np

from .jit import DECODE_ROWS, bands, parallel



@parallel
def gemv(x, w, b):                                         # [N, K] x [M, K] rows (+ [M] or None) -> [N, M]
    N, K = x.shape
    M = w.shape[0]
    out = np.empty((N, M), dtype=np.float32)
    for m in numba.prange(M):                              # one pass over each weight row serves all N inputs
        row = w[m]
        n = 0
        while n + 4 <= N:                                  # four dots at once share each load of the row
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
        if b is not None:
            for n in range(N):
                out[n, m] += b[m]
    return out


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


def matmul_rows(x, w, b=None):                             # [..., K] x [M, K] rows (+ [M]) -> [..., M]
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    if x2.shape[0] <= DECODE_ROWS:
        y = gemv(x2, w, b)
    else:
        y = np.empty((x2.shape[0], w.shape[0]), dtype=np.float32)
        bands(lambda cols: _gemm_band(x2, w[cols], None if b is None else b[cols], y[:, cols]), w.shape[0], inline_upto=1)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _gemm_band(x, w, b, out):                              # [N, K] x [m, K]^T (+ [m]) -> out [N, m], a band of output columns
    """Each core takes a band of the weight's rows: it reads only its share of W, and x is small."""
    np.matmul(x, w.T, out=out)
    if b is not None:
        out += b


def linear(x, weight_t, bias):                             # [..., in], [out, in], [out] -> [..., out]; W transposed once at load
    return matmul_rows(x, weight_t, bias)


def lm_head(x, weight):                                    # [..., C], [V, C] -> [..., V]; wte already has rows per output
    return matmul_rows(x, weight)
