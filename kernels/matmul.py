"""Matrix products. Weights are rows of outputs, W [out, in] (the loader transposes HF's Conv1D once,
see kernels.prepare): decode streams the rows once on every core, four rows against four inputs at a
time when a batch has four or more; prefill gives each core a band of output columns and a
single-threaded sgemm on the same array transposed."""

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .. import quant

from .jit import DECODE_ROWS, bands, f32_from_bits, inline, parallel, serial


def widen(w, m, k):                                        # stored weight element -> float32 (numba-only; see overload)
    raise NotImplementedError


@overload(widen)
def _widen(w, m, k):
    """Chosen per dtype at compile time: float32 is itself; bf16 bits << 16 are its float32 (a bit cast,
    not a conversion); int8 converts, its scale applied after the dot. The loops still vectorize."""
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
def _dot_4x4(x, n, w, m, out):                             # out[n:n+4, m:m+4] = x[n:n+4] . w[m:m+4]^T (widened)
    """16 dots in registers: each load (of an input or a widened weight) feeds four FMAs, and each weight
    row is widened once for four inputs. A row against four inputs at a time needs 1.25 loads per FMA,
    and the core has fewer load ports than FMA lanes: this tile runs 1.5-2x faster at 8-16 inputs."""
    K = x.shape[1]
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
    for k in range(K):
        w0, w1, w2, w3 = widen(w, m, k), widen(w, m + 1, k), widen(w, m + 2, k), widen(w, m + 3, k)
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
    out[n, m], out[n, m + 1], out[n, m + 2], out[n, m + 3] = a0, a1, a2, a3
    out[n + 1, m], out[n + 1, m + 1], out[n + 1, m + 2], out[n + 1, m + 3] = b0, b1, b2, b3
    out[n + 2, m], out[n + 2, m + 1], out[n + 2, m + 2], out[n + 2, m + 3] = c0, c1, c2, c3
    out[n + 3, m], out[n + 3, m + 1], out[n + 3, m + 2], out[n + 3, m + 3] = d0, d1, d2, d3


@inline
def _scale_bias(out, scale, b, m):                         # out[:, m] *= scale[m], += b[m] (either may be None)
    if scale is not None:
        for n in range(out.shape[0]):
            out[n, m] *= scale[m]
    if b is not None:
        for n in range(out.shape[0]):
            out[n, m] += b[m]


TILE_FROM = 4                                              # from this many inputs, weight rows go four at a time


@parallel
def gemv(x, w, scale, b):                                  # [N, K] x [M, K] rows (scale [M], b [M], or None) -> [N, M]
    """w: float32, bf16 bits or int8, widened in registers: no float32 copy of a row exists, and
    x . (q * scale) is (x . q) * scale. One pass over the weights serves all N inputs. The helpers are
    inlined: a call inside a prange loop costs reference-count updates on the arrays it is passed,
    atomic writes to a cache line every core shares (measured: int8 GEMV at 1 input 1.3-1.8x slower)."""
    N = x.shape[0]
    M = w.shape[0]
    out = np.empty((N, M), dtype=np.float32)
    if N < TILE_FROM:                                      # one row per task
        for m in numba.prange(M):
            for n in range(N):
                out[n, m] = _dot(x, n, w, m)
            _scale_bias(out, scale, b, m)
    else:                                                  # four rows per task
        for t in numba.prange((M + 3) // 4):
            m0, m1 = 4 * t, min(4 * t + 4, M)
            n = 0
            if m1 - m0 == 4:
                while n + 4 <= N:
                    _dot_4x4(x, n, w, m0, out)
                    n += 4
            for m in range(m0, m1):                        # what tiles do not cover: the last N % 4 inputs, M % 4 rows
                for i in range(n, N):
                    out[i, m] = _dot(x, i, w, m)
                _scale_bias(out, scale, b, m)
    return out


@serial
def widen_tile(w, scale, out):                             # bf16 bits or int8 [m, K] (scale [m] or None) -> out float32 [m, K]
    for m in range(w.shape[0]):
        for k in range(w.shape[1]):
            out[m, k] = widen(w, m, k) if scale is None else widen(w, m, k) * scale[m]


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


PREFILL_TILE = 256                                         # low-precision rows widened at a time for sgemm (768 KiB at K=768)


def stored(w):                                             # quant.BF16 / quant.Int8 rows -> (values, scale or None)
    return (w.bits, None) if isinstance(w, quant.BF16) else (w.q, w.scale)


def matmul_rows(x, w, b=None):                             # [..., K] x [M, K] rows (+ [M]) -> [..., M]
    """w: float32 rows, or quant.BF16 / quant.Int8 rows (scale [M]) read as they are stored."""
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    M = w.shape[0]
    if x2.shape[0] <= DECODE_ROWS:
        y = gemv(x2, w, None, b) if isinstance(w, np.ndarray) else gemv(x2, *stored(w), b)
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
            values, scale = stored(w)
            widen_tile(values[t0:t1], None if scale is None else scale[t0:t1], part)
            np.matmul(x, part.T, out=y[:, t0:t1])
    if b is not None:
        y[:, cols] += b[cols]


def linear(x, weight_t, bias):                             # [..., in], [out, in], [out] -> [..., out]; W transposed once at load
    return matmul_rows(x, weight_t, bias)


def lm_head(x, weight):                                    # [..., C], [V, C] -> [..., V]; wte already has rows per output
    return matmul_rows(x, weight)


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
    d2, x2 = dout.reshape(-1, dout.shape[-1]), x.reshape(-1, x.shape[-1])
    return gemm(d2, weight_t).reshape(x.shape), gemm(x2.T, d2), d2.sum(axis=0)


def lm_head_backward(dout, x, weight):                     # [..., V], [..., C], [V, C] -> dx [..., C], dweight [V, C]
    d2, x2 = dout.reshape(-1, dout.shape[-1]), x.reshape(-1, x.shape[-1])
    return gemm(d2, weight).reshape(x.shape), gemm(d2.T, x2)
