"""Causal attention. Decode (few queries): one fused pass per query row that reads the KV cache in
place. Prefill: heads split in bands over the cores; per head, q.k and p.v as sgemm around an
in-place causal softmax kernel."""

import math

import numba
import numpy as np

from .jit import bands, parallel
from .softmax import causal_softmax_rows, softmax_row

FUSED_MAX_QUERIES = 4                                      # more queries than this: the BLAS path wins (bench-measured)


@parallel
def fused_attention(q, k, v, S, scale):                    # [B, H, T, D], [B, H, >=S, D] x2 -> [B, H, T, D]; keys 0..S-1
    B, H, T, D = q.shape
    out = np.empty((B, H, T, D), dtype=np.float32)
    for i in numba.prange(B * H * T):
        b, h, t = i // (H * T), (i // T) % H, i % T
        n = S - T + t + 1                                  # causal: query t sees keys 0 .. S-T+t
        qt = q[b, h, t].copy()                             # contiguous copies let the d-loops vectorize
        p = np.empty(n, dtype=np.float32)
        for s in range(n):
            ks = k[b, h, s]
            acc = np.float32(0.0)
            for d in range(D):
                acc += qt[d] * ks[d]
            p[s] = acc * scale
        softmax_row(p, n)
        o = np.zeros(D, dtype=np.float32)
        for s in range(n):
            w, vs = p[s], v[b, h, s]
            for d in range(D):
                o[d] += w * vs[d]
        out[b, h, t] = o
    return out


def contiguous_keys(a):                                    # [B, H, S, D] -> C-contiguous [B, H, >=S, D] holding it
    """A KV-cache view is the first S positions of a contiguous [B, H, n_ctx, D] buffer: hand the kernel
    that buffer (no copy; the d-loops vectorize only on contiguous rows). Anything else is copied."""
    buf = a.base
    if (isinstance(buf, np.ndarray) and buf.flags.c_contiguous and buf.ndim == 4 and buf.shape[:2] == a.shape[:2]
            and buf.shape[3] == a.shape[3] and a.strides == buf.strides and a.__array_interface__["data"][0] == buf.__array_interface__["data"][0]):
        return buf
    return np.ascontiguousarray(a)


def attention(q, k, v):                                    # [B, H, T, D], [B, H, S, D] x2 -> [B, H, T, D]
    B, H, T, D = q.shape
    if T <= FUSED_MAX_QUERIES:
        return fused_attention(q, contiguous_keys(k), contiguous_keys(v), k.shape[2], np.float32(1.0 / math.sqrt(D)))
    q3, k3, v3 = (a.reshape(B * H, *a.shape[2:]) for a in (q, k, v))          # [B*H, T or S, D]
    out = np.empty((B * H, T, D), dtype=np.float32)
    scale = np.float32(1.0 / math.sqrt(D))
    bands(lambda heads: _prefill_band(q3[heads], k3[heads], v3[heads], scale, out[heads]), B * H)
    return out.reshape(B, H, T, D)


def _prefill_band(q, k, v, scale, out):                    # [n, T, D], [n, S, D] x2 -> out [n, T, D]
    scores = np.matmul(q, k.transpose(0, 2, 1))            # [n, T, S], single-threaded sgemm per head
    causal_softmax_rows(scores, scale)
    np.matmul(scores, v, out=out)
