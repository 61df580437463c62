"""LayerNorm over the last axis, row by row; many rows are split in bands over the cores."""

import numba
import numpy as np

from .jit import DECODE_ROWS, bands, parallel, serial

# Up to this many elements LayerNorm runs on the calling thread: a hand-off to the other core costs more
# than it saves (C = 768, medians of 300: 128 rows 24 us inline against 116 in bands, 512 rows 96 against
# 157, 1024 rows 191 against 173, 2048 rows 409 against 330).
INLINE_ELEMENTS = 1024 * 768


def inline_rows(C):                                        # rows of width C that layer_norm_rows takes on one thread
    return max(DECODE_ROWS, INLINE_ELEMENTS // C)


@serial
def layer_norm_rows(x, weight, bias, eps, out):            # [N, C], [C], [C] -> out [N, C]
    N, C = x.shape
    for n in range(N):
        mean = np.float32(0.0)
        for c in range(C):
            mean += x[n, c]
        mean /= np.float32(C)
        var = np.float32(0.0)
        for c in range(C):                                 # two passes, like np.var: no cancellation
            d = x[n, c] - mean
            var += d * d
        inv = np.float32(1.0) / np.sqrt(var / np.float32(C) + np.float32(eps))
        for c in range(C):
            out[n, c] = (x[n, c] - mean) * inv * weight[c] + bias[c]


def layer_norm(x, weight, bias, eps):                      # [..., C], [C], [C] -> [..., C]
    x2 = x.reshape(-1, x.shape[-1])
    out = np.empty(x2.shape, dtype=np.float32)
    bands(lambda r: layer_norm_rows(x2[r], weight, bias, eps, out[r]), x2.shape[0], inline_upto=inline_rows(x2.shape[1]))
    return out.reshape(x.shape)


@serial
def layer_norm_backward_rows(dout, x, weight, eps, dx, dweight, dbias):   # [N, C] x2, [C] -> dx [N, C]; adds into dweight, dbias
    N, C = x.shape
    xhat = np.empty(C, dtype=np.float32)
    for n in range(N):
        mean = np.float32(0.0)
        for c in range(C):
            mean += x[n, c]
        mean /= np.float32(C)
        var = np.float32(0.0)
        for c in range(C):
            d = x[n, c] - mean
            var += d * d
        rstd = np.float32(1.0) / np.sqrt(var / np.float32(C) + np.float32(eps))
        mean_dxhat = np.float32(0.0)
        mean_dxhat_xhat = np.float32(0.0)
        for c in range(C):
            xhat[c] = (x[n, c] - mean) * rstd
            g = dout[n, c] * weight[c]
            mean_dxhat += g
            mean_dxhat_xhat += g * xhat[c]
            dweight[c] += dout[n, c] * xhat[c]
            dbias[c] += dout[n, c]
        mean_dxhat /= np.float32(C)
        mean_dxhat_xhat /= np.float32(C)
        for c in range(C):
            dx[n, c] = (dout[n, c] * weight[c] - mean_dxhat - xhat[c] * mean_dxhat_xhat) * rstd


def layer_norm_backward(dout, x, weight, bias, eps):       # [..., C] x2, [C] x2 -> dx [..., C], dweight [C], dbias [C]
    x2, d2 = x.reshape(-1, x.shape[-1]), np.ascontiguousarray(dout.reshape(-1, x.shape[-1]))
    dx = np.empty(x2.shape, dtype=np.float32)
    partials = {}                                          # one (dweight, dbias) per band, summed after

    def band(r):
        partials[r.start] = dw, db = np.zeros(x2.shape[1], np.float32), np.zeros(x2.shape[1], np.float32)
        layer_norm_backward_rows(d2[r], x2[r], weight, eps, dx[r], dw, db)
    bands(band, x2.shape[0])
    order = sorted(partials)                               # bands finish in any order; sum them in a fixed one
    return dx.reshape(x.shape), sum(partials[k][0] for k in order), sum(partials[k][1] for k in order)


@parallel
def layer_norm_bands(x, weight, bias, eps, out, P):        # layer_norm_rows on P bands of rows at once, numba's threads
    N = x.shape[0]
    for p in numba.prange(P):
        r0, r1 = p * N // P, (p + 1) * N // P
        layer_norm_rows(x[r0:r1], weight, bias, eps, out[r0:r1])
