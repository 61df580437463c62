"""Causal attention. Decode (few queries): one fused pass per query row that reads the KV cache in
place. Prefill: heads split in bands over the cores; per head, q.k and p.v as sgemm around an
in-place causal softmax kernel."""

import math

import numba
import numpy as np

from .jit import bands, inline, parallel, serial
from .softmax import causal_softmax_rows, softmax_row

FUSED_MAX_QUERIES = 4                                      # more queries than this: the BLAS path wins (bench-measured)
QUERY_BLOCK = 128


@inline
def attend_row(q, k, v, b, h, n, scale):                   # q [D] (contiguous), keys/values [B, H, >=n, D] -> [D]
    """One query against positions 0..n-1 of row b, head h: scores, softmax, the weighted sum of values."""
    p = np.empty(n, dtype=np.float32)
    for s in range(n):
        ks = k[b, h, s]
        acc = np.float32(0.0)
        for d in range(q.shape[0]):
            acc += q[d] * ks[d]
        p[s] = acc
    softmax_row(p, n, scale)
    o = np.zeros(q.shape[0], dtype=np.float32)
    for s in range(n):
        w, vs = p[s], v[b, h, s]
        for d in range(q.shape[0]):
            o[d] += w * vs[d]
    return o


@parallel
def fused_attention(q, k, v, lengths, scale):              # [B, H, T, D], [B, H, >=S, D] x2, [B] -> [B, H, T, D]
    B, H, T, D = q.shape
    out = np.empty((B, H, T, D), dtype=np.float32)
    for i in numba.prange(B * H * T):
        b, h, t = i // (H * T), (i // T) % H, i % T
        n = lengths[b] - T + t + 1                         # causal: query t sees keys 0 .. length-T+t of its row
        out[b, h, t] = attend_row(q[b, h, t].copy(), k, v, b, h, n, scale)   # a contiguous copy: the d-loops vectorize
    return out


def contiguous_keys(a):                                    # [B, H, S, D] -> C-contiguous [B, H, >=S, D] holding it
    """A KV-cache view is the first S positions of some rows of a contiguous [rows, H, n_ctx, D] buffer:
    hand the kernel those rows of the buffer whole (a slice along the first axis: contiguous, no copy;
    the d-loops vectorize only on contiguous rows). Anything else is copied."""
    buf = a.base
    if (isinstance(buf, np.ndarray) and buf.flags.c_contiguous and buf.ndim == 4 and buf.shape[1] == a.shape[1]
            and buf.shape[3] == a.shape[3] and a.strides == buf.strides):
        offset = a.__array_interface__["data"][0] - buf.__array_interface__["data"][0]
        first, rest = divmod(offset, buf.strides[0])
        if rest == 0 and 0 <= first and first + a.shape[0] <= buf.shape[0]:
            return buf[first : first + a.shape[0]]
    return np.ascontiguousarray(a)


def attention(q, k, v, mask=None, lengths=None):           # [B, H, T, D], [B, H, S, D] x2 -> [B, H, T, D]
    """As npgpt.model.attention: mask, dropout on the probabilities [B, H, T, S]; lengths [B], each row's own."""
    B, H, T, D = q.shape
    S = k.shape[2]
    if T <= FUSED_MAX_QUERIES and mask is None:
        ends = np.full(B, S, np.int64) if lengths is None else np.ascontiguousarray(lengths, dtype=np.int64)
        return fused_attention(q, contiguous_keys(k), contiguous_keys(v), ends, np.float32(1.0 / math.sqrt(D)))
    if lengths is not None and (np.asarray(lengths) != S).any():   # rows of different lengths: each row on its own keys
        return np.concatenate([attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n],
                                         None if mask is None else mask[b : b + 1, :, :, :n]) for b, n in enumerate(lengths)])
    q3, k3, v3 = (a.reshape(B * H, *a.shape[2:]) for a in (q, k, v))          # [B*H, T or S, D]
    m3 = None if mask is None else mask.reshape(B * H, T, -1)
    out = np.empty((B * H, T, D), dtype=np.float32)
    scale = np.float32(1.0 / math.sqrt(D))
    bands(lambda heads: prefill_heads(q3[heads], k3[heads], v3[heads], scale, out[heads], None if m3 is None else m3[heads]),
          B * H, inline_upto=1)
    return out.reshape(B, H, T, D)


def prefill_heads(q, k, v, scale, out, mask=None):         # [n, T, D], [n, S, D] x2 -> out [n, T, D]
    """Per head, per block of queries: only the keys a block can see, so the masked upper triangle of
    q.k^T is mostly never computed (T=512: 62% of the products)."""
    T, S = q.shape[1], k.shape[1]
    for h in range(q.shape[0]):
        for t0 in range(0, T, QUERY_BLOCK):
            t1 = min(t0 + QUERY_BLOCK, T)
            seen = S - T + t1                              # keys visible to the block's last query
            scores = q[h, t0:t1] @ k[h, :seen].T           # [t1 - t0, seen], single-threaded sgemm
            causal_softmax_rows(scores[None], scale)
            if mask is not None:
                scores *= mask[h, t0:t1, :seen]            # dropout on the probabilities
            np.matmul(scores, v[h, :seen], out=out[h, t0:t1])


@serial
def softmax_backward_rows(p, dp, scale):                   # [T, S] probabilities, d/dp -> d/dscores in place of dp
    for t in range(p.shape[0]):
        total = np.float32(0.0)
        for s in range(p.shape[1]):
            total += dp[t, s] * p[t, s]
        for s in range(p.shape[1]):
            dp[t, s] = p[t, s] * (dp[t, s] - total) * scale


def _backward_band(dout, q, k, v, scale, dq, dk, dv, mask=None):   # [n, T, D] x2, [n, S, D] x2 -> dq, dk, dv for n heads
    for h in range(q.shape[0]):
        p = q[h] @ k[h].T                                  # [T, S], recomputed as the spec does
        causal_softmax_rows(p[None], scale)
        np.matmul(p.T if mask is None else (p * mask[h]).T, dout[h], out=dv[h])
        dp = dout[h] @ v[h].T
        if mask is not None:
            dp *= mask[h]                                  # back through dropout: the same mask
        softmax_backward_rows(p, dp, scale)
        np.matmul(dp, k[h], out=dq[h])
        np.matmul(dp.T, q[h], out=dk[h])


def attention_backward(dout, q, k, v, mask=None):          # [B, H, T, D] x2, [B, H, S, D] x2 (, mask [B, H, T, S]) -> dq, dk, dv
    B, H, T, D = q.shape
    S = k.shape[2]
    d3, q3, k3, v3 = (np.ascontiguousarray(a).reshape(B * H, -1, D) for a in (dout, q, k, v))
    m3 = None if mask is None else mask.reshape(B * H, T, S)
    dq, dk, dv = np.empty((B * H, T, D), np.float32), np.empty((B * H, S, D), np.float32), np.empty((B * H, S, D), np.float32)
    scale = np.float32(1.0 / math.sqrt(D))
    bands(lambda r: _backward_band(d3[r], q3[r], k3[r], v3[r], scale, dq[r], dk[r], dv[r], None if m3 is None else m3[r]),
          B * H, inline_upto=1)
    return dq.reshape(B, H, T, D), dk.reshape(B, H, S, D), dv.reshape(B, H, S, D)
