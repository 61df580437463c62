"""Matrix products. Weights are rows of outputs, W [out, in] (the loader transposes HF's Conv1D once,
see kernels.prepare): decode streams each row once with a contiguous dot on every core; prefill gives
each core a band of output columns and a single-threaded sgemm on the same array transposed."""

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .. import quant

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


def widen(w, m, k):                                        # stored weight element -> float32 (numba-only; see overload)
    raise NotImplementedError


@overload(widen)
def _widen(w, m, k):
    """Chosen per dtype at compile time: bf16 bits << 16 are its float32 (a bit cast, not a conversion);
    int8 converts, its scale applied after the dot. Either way the loops still vectorize."""
    if w.dtype == types.uint16:
        return lambda w, m, k: f32_from_bits(np.uint32(w[m, k]) << np.uint32(16))
    return lambda w, m, k: np.float32(w[m, k])


@parallel
def gemv_stored(x, w, scale, b):                           # [N, K] x bf16 bits or int8 [M, K] rows (scale [M] or None) -> [N, M]
    """Widened in registers: no float32 copy of the row exists. x . (q * scale) is (x . q) * scale."""
    N, K = x.shape
    M = w.shape[0]
    out = np.empty((N, M), dtype=np.float32)
    for m in numba.prange(M):
        for n in range(N):
            s = np.float32(0.0)
            for k in range(K):
                s += x[n, k] * widen(w, m, k)
            if scale is not None:
                s *= scale[m]
            out[n, m] = s if b is None else s + b[m]
    return out


@serial
def _unpack_int4_row(packed, scale, buf):                  # one int4 row (quant.pack4's layout) -> float32 buf [K]
    K = buf.shape[0]
    full = K // 32
    for j in range(full):                                  # whole blocks, branch-free so the loop vectorizes
        d = scale[j]
        for i in range(16):                                # byte i: input i (low nibble) and 16 + i (high)
            byte = np.int32(packed[16 * j + i])            # int32 throughout (numba's default int64 does not vectorize)
            buf[32 * j + i] = np.float32((byte & np.int32(15)) - np.int32(8)) * d
            buf[32 * j + 16 + i] = np.float32((byte >> np.int32(4)) - np.int32(8)) * d
    for k in range(32 * full, K):                          # a last partial block
        byte = np.int32(packed[16 * full + (k - 32 * full) % 16])
        nibble = byte & 15 if k - 32 * full < 16 else byte >> 4
        buf[k] = np.float32(nibble - 8) * scale[full]


INT4_TILE = 64                                             # rows per parallel work item: one scratch row each


@parallel
def gemv_int4(x, packed, scale, b):                        # [N, K] x int4 rows (packed [M, 16 * blocks], scale [M, blocks]) -> [N, M]
    """Each int4 row is unpacked into a float32 scratch row that stays in L1 (the weights are read from
    memory packed, 5 bits a weight), then dotted with every input as the float32 GEMV does."""
    N, K = x.shape
    M = packed.shape[0]
    out = np.empty((N, M), dtype=np.float32)
    for t in numba.prange((M + INT4_TILE - 1) // INT4_TILE):
        buf = np.empty(K, dtype=np.float32)
        for m in range(t * INT4_TILE, min(t * INT4_TILE + INT4_TILE, M)):
            _unpack_int4_row(packed[m], scale[m], buf)
            _dot_rows(x, buf, out, m)
            if b is not None:
                for n in range(N):
                    out[n, m] += b[m]
    return out


@serial
def widen_int4_tile(packed, scale, out):                   # int4 rows [m, 16 * blocks] bytes, scale [m, blocks] -> out float32 [m, K]
    for r in range(out.shape[0]):
        _unpack_int4_row(packed[r], scale[r], out[r])


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


def widen_rows(w, t0, t1, out):                            # rows t0..t1 of a low-precision weight -> out float32 [t1 - t0, K]
    if isinstance(w, quant.Packed4):
        widen_int4_tile(w.packed[t0:t1], w.scale[t0:t1], out)
    else:
        values, scale = stored(w)
        widen_tile(values[t0:t1], None if scale is None else scale[t0:t1], out)


def matmul_rows(x, w, b=None):                             # [..., K] x [M, K] rows (+ [M]) -> [..., M]
    """w: float32 rows, or quant.BF16 / quant.Int8 rows (scale [M]) / quant.Packed4 rows, read as they are stored."""
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    M = w.shape[0]
    if x2.shape[0] <= DECODE_ROWS:
        if isinstance(w, np.ndarray):
            y = gemv(x2, w, b)
        elif isinstance(w, quant.Packed4):
            y = gemv_int4(x2, w.packed, w.scale, b)
        else:
            y = gemv_stored(x2, *stored(w), b)
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
            widen_rows(w, t0, t1, part)
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
