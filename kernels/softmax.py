"""Softmax over the last axis; the causal variant scales, masks and normalizes attention scores in place."""

import math

import numba
import numpy as np

from .jit import parallel, serial


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


@parallel
def _softmax(x):                                           # [N, S] -> [N, S]
    out = x.copy()
    for i in numba.prange(x.shape[0]):
        softmax_row(out[i], x.shape[1])
    return out


def softmax(x):                                            # [..., S] -> [..., S]
    return _softmax(x.reshape(-1, x.shape[-1])).reshape(x.shape)


@parallel
def _causal_softmax_(scores, scale):                       # [R, T, S] in place: softmax(scale * scores + causal mask)
    R, T, S = scores.shape
    for i in numba.prange(R * T):
        r, t = i // T, i % T
        row = scores[r, t]
        n = S - T + t + 1                                  # query t sees keys 0 .. S-T+t
        for s in range(n):
            row[s] *= scale
        softmax_row(row, n)


def causal_softmax(scores, head_dim):                      # [B, H, T, S] raw q.k -> [B, H, T, S] probabilities, in place
    B, H, T, S = scores.shape
    _causal_softmax_(scores.reshape(B * H, T, S), np.float32(1.0 / math.sqrt(head_dim)))
    return scores
