"""Softmax over the last axis; the causal variant scales, masks and normalizes attention scores in place."""

import math

import numpy as np

from .jit import bands, serial


@serial
def softmax_row(row, n):                                   # row[:n] -> probabilities in place; row[n:] -> 0
    peak = -np.inf
    for s in range(n):
        peak = max(peak, row[s])
    total = np.float32(0.0)
    for s in range(n):
        e = np.exp(row[s] - peak)
        row[s] = e
        total += e
    inv = np.float32(1.0) / total
    for s in range(n):
        row[s] *= inv
    for s in range(n, row.shape[0]):
        row[s] = 0.0


@serial
def softmax_rows(x):                                       # [N, S] in place
    for i in range(x.shape[0]):
        softmax_row(x[i], x.shape[1])


def softmax(x):                                            # [..., S] -> [..., S]
    out = np.array(x, dtype=np.float32).reshape(-1, x.shape[-1])
    bands(lambda r: softmax_rows(out[r]), out.shape[0])
    return out.reshape(x.shape)


@serial
def causal_softmax_rows(scores, scale):                    # [R, T, S] in place: softmax(scale * scores + causal mask)
    R, T, S = scores.shape
    for r in range(R):
        for t in range(T):
            row = scores[r, t]
            n = S - T + t + 1                              # query t sees keys 0 .. S-T+t
            for s in range(n):
                row[s] *= scale
            softmax_row(row, n)


def causal_softmax(scores, head_dim):                      # [B, H, T, S] raw q.k -> [B, H, T, S] probabilities, in place
    B, H, T, S = scores.shape
    flat = scores.reshape(B * H, T, S)
    scale = np.float32(1.0 / math.sqrt(head_dim))
    bands(lambda r: causal_softmax_rows(flat[r], scale), B * H)
    return scores
