"""Causal attention. Decode (few queries): one fused pass per query row that reads the KV cache in
place. Prefill: heads split over numba's threads (attend_heads), one kernel per head (causal_head); with a
dropout mask (training), per head q.k and p.v as sgemm around an in-place causal softmax kernel."""

import math

import numba
import numpy as np

from . import jit
from .jit import F32_PANEL, PANEL_INPUTS, TILE_COLS, TILE_ROWS, bands, f32_panel_wide, f32_panel_wide_at, f32_tile, inline, parallel, serial
from .matmul import group8
from .softmax import causal_softmax_rows, softmax_row

FUSED_MAX_QUERIES = 4                                      # more queries than this: the BLAS path wins (bench-measured)
QUERY_BLOCK = 128                                          # queries per sgemm block with a dropout mask


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


@inline
def _keys_packed(k, W):                                    # keys [S, D] -> [ceil(S / W), D, W]: packed[p, d, j] = k[p * W + j, d] (0 past S)
    S, D = k.shape
    packed = np.zeros(((S + W - 1) // W, D, W), dtype=np.float32)
    for p in range(packed.shape[0]):
        for d in range(D):
            for j in range(min(W, S - p * W)):
                packed[p, d, j] = k[p * W + j, d]
    return packed


@serial
def causal_head(q, k, v, scale, out):                      # one head: q [T, D], keys and values [S, D] -> out [T, D]
    """Causal attention of one head, in blocks of 6 queries, each against only the keys it can see (the
    masked triangle costs < 16 keys a query, against a quarter of the work in blocks of 128): the block's
    scores against 16 keys at a time (jit.f32_tile, keys packed once as k^T), each row's softmax in place
    while the block's scores are in L1, then p.v straight from the values' rows, 16 dims at a time.
    Any row strides; each row's elements must be one float apart (attention's callers pass views of
    rows)."""
    T, D = q.shape
    S = k.shape[0]
    R, W = TILE_ROWS, TILE_COLS
    P = (S + W - 1) // W
    packed = _keys_packed(k, W)
    values = np.ascontiguousarray(v)                       # rows 4 D bytes apart, not 12 C (a copy, unless the cache's)
    block = np.zeros((R, D), dtype=np.float32)             # the block's queries (rows past T stay as they were: never written out)
    probs = np.zeros((R, P * W), dtype=np.float32)
    tile = np.empty((R, W), dtype=np.float32)
    whole = D - D % W                                      # dims in runs of 16; the rest one at a time
    for t0 in range(0, T, R):
        rows = min(R, T - t0)
        block[:rows] = q[t0 : t0 + rows]
        seen = S - T + t0 + rows                           # keys the block's last query sees
        for p in range((seen + W - 1) // W):
            f32_tile(block, packed[p], 0, 0, D, probs[:, p * W : p * W + W])
        for i in range(rows):
            softmax_row(probs[i, :seen], S - T + t0 + i + 1, scale)   # query t0 + i sees keys 0 .. S-T+t0+i; 0 past them
        for j0 in range(0, whole, W):
            if rows == R:
                f32_tile(probs, values, 0, j0, seen, out[t0 : t0 + R, j0 : j0 + W])
            else:                                          # the last block's rows past T: into a tile, not past out's end
                f32_tile(probs, values, 0, j0, seen, tile)
                out[t0 : t0 + rows, j0 : j0 + W] = tile[:rows]
        for i in range(rows):
            for j in range(whole, D):
                acc = np.float32(0.0)
                for s in range(seen):
                    acc += probs[i, s] * values[s, j]
                out[t0 + i, j] = acc


@serial
def causal_head_wide(q, k, v, scale, out):                 # causal_head on AVX-512: blocks of 12 queries, 32 keys or dims a product
    """causal_head's blocks on the float32 prompts' kernel (jit.f32_panel_wide: 32 columns against two groups
    of 6 inputs, k-major, 24 sums in zmm registers): the block's 12 queries in two groups, d-major, against
    32 keys at a time (packed once as k^T, [D, 32] each), the scores straight into the block's rows of
    probabilities (jit.f32_panel_wide_at); each row's softmax in place; the block's probabilities into two
    groups, key-major (group8: 8 keys at a time, a transpose in vectors), against 32 dims of the values at
    a time (packed once, [S, 32] each, reading v's rows in order). The same FMAs in the same order as
    causal_head, so the same outputs bit for bit (tested). A 12 x 32 form of f32_tile on the rows as they
    are ran slower than f32_tile (its 12 strided rows' addresses, recomputed each k, took the FMAs' ports).
    One GPT-2 head (D = 64) on one core of an Emerald Rapids, best of 20: T = 512 1.28-1.29x causal_head,
    T = 128 1.16-1.17x. Since stop 41 the scores no longer go through a [12, 32] copy (numba's slice
    assignment: 11-17% of a head's time) and the values are packed row by row: GPT-2's 12 heads at T = 512
    1.10-1.14x, T = 128 1.10-1.12x (quartiles of 15 alternating rounds in one process, bit for bit the same)."""
    T, D = q.shape
    S = k.shape[0]
    R, W = 2 * PANEL_INPUTS, F32_PANEL
    P, Q = (S + W - 1) // W, (D + W - 1) // W
    keys = _keys_packed(k, W)
    values = np.empty((Q, S, W), dtype=np.float32)         # values[h, s, j] = v[s, h * W + j] (0 past D)
    for s in range(S):                                     # (each row of v read once, in order)
        for h in range(Q):
            n = min(W, D - h * W)
            for j in range(n):
                values[h, s, j] = v[s, h * W + j]
            for j in range(n, W):
                values[h, s, j] = np.float32(0.0)
    queries = np.zeros((2, D, PANEL_INPUTS), dtype=np.float32)   # the block's queries in two groups, k-major (0 past T)
    probs = np.zeros((R, P * W), dtype=np.float32)
    weights = np.zeros((2, P * W, PANEL_INPUTS), dtype=np.float32)   # the block's probabilities in two groups, key-major
    c = np.empty((R, W), dtype=np.float32)
    none = np.empty(0, dtype=np.float32)
    for t0 in range(0, T, R):
        rows = min(R, T - t0)
        for i in range(R):
            for d in range(D):
                queries[i // PANEL_INPUTS, d, i % PANEL_INPUTS] = q[t0 + i, d] if i < rows else np.float32(0.0)
        seen = S - T + t0 + rows                           # keys the block's last query sees
        for p in range((seen + W - 1) // W):
            f32_panel_wide_at(keys[p], queries[0], queries[1], probs, p * W, none)
        for i in range(rows):
            softmax_row(probs[i, :seen], S - T + t0 + i + 1, scale)   # query t0 + i sees keys 0 .. S-T+t0+i; 0 past them
        for k0 in range(0, seen, 8):                       # (columns past seen, to a whole 8, go along unread: K = seen below)
            group8(probs, 0, k0, weights[0], False)
            group8(probs, PANEL_INPUTS, k0, weights[1], False)
        for h in range(Q):
            f32_panel_wide(values[h, :seen], weights[0, :seen], weights[1, :seen], c, none)
            for i in range(rows):
                for j in range(min(W, D - h * W)):
                    out[t0 + i, h * W + j] = c[i, j]


@inline
def _causal(q, k, v, scale, out, wide):                    # causal_head_wide if wide (AVX-512: jit.PANEL_WIDE), else causal_head
    if wide:
        causal_head_wide(q, k, v, scale, out)
    else:
        causal_head(q, k, v, scale, out)


@parallel
def attend_heads(qkv, k_cache, v_cache, cached, past, T, H, scale, out, first, wide):   # prefill's attention over numba's threads
    """Every (row, head) of qkv [B*T, 3C] (rows of T positions: queries, keys, values side by side), a
    causal_head each (wide: causal_head_wide), straight from views of qkv: with `cached`, each head's keys
    and values go into the cache [B, H, n_ctx, D] at positions past .. past + T first and attention reads
    them from there. Only each row's positions from `first` on attend (their rows of out [B*T, C] are
    written)."""
    C = out.shape[1]
    D = C // H
    B = qkv.shape[0] // T
    for i in numba.prange(B * H):
        b, h = i // H, i % H
        rows = qkv[b * T : (b + 1) * T]
        q, o = rows[first:, h * D : h * D + D], out[b * T + first : (b + 1) * T, h * D : h * D + D]
        k, v = rows[:, C + h * D : C + h * D + D], rows[:, 2 * C + h * D : 2 * C + h * D + D]
        if cached:
            k_cache[b, h, past : past + T] = k
            v_cache[b, h, past : past + T] = v
            _causal(q, k_cache[b, h, : past + T], v_cache[b, h, : past + T], scale, o, wide)
        else:
            _causal(q, k, v, scale, o, wide)


def prefill_heads(q, k, v, scale, out, mask=None):         # [n, T, D], [n, S, D] x2 -> out [n, T, D]
    """Per head: causal_head (causal_head_wide on AVX-512); with a dropout mask, per block of 128 queries
    as sgemm against only the keys the block can see (T=512: 62% of the masked upper triangle of q.k^T never
    computed)."""
    T, S = q.shape[1], k.shape[1]
    for h in range(q.shape[0]):
        if mask is None and q.strides[2] == k.strides[2] == v.strides[2] == out.strides[2] == 4:
            _causal(q[h], k[h], v[h], scale, out[h], jit.PANEL_WIDE)
            continue
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
