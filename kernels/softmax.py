"""Softmax over the last axis; the causal variant scales, masks and normalizes attention scores in place."""

import math

import numpy as np

from .jit import bands, f32_from_bits, serial


LOG2E = np.float32(1.4426950408889634)
# 2**f on [-1/2, 1/2]: Taylor coefficients (ln 2)**k / k!, degree 6; relative error 1.2e-7, below float32's 6e-8 x 2
P1, P2, P3 = np.float32(0.6931471805599453), np.float32(0.2402265069591007), np.float32(0.05550410866482158)
P4, P5, P6 = np.float32(0.009618129107628477), np.float32(0.0013333558146428443), np.float32(0.00015403530393381606)


@serial
def softmax_row(row, n):                                   # row[:n] -> probabilities in place, row[n:] -> 0; returns log-sum-exp
    """exp is computed as 2**k * 2**f with the 2**k built from exponent bits, so the loop vectorizes
    (numba's np.exp is a scalar libm call: 6 ns an element, most of prefill attention's time)."""
    peak = -np.inf
    for s in range(n):
        peak = max(peak, row[s])
    total = np.float32(0.0)
    for s in range(n):
        y = max((row[s] - peak) * LOG2E, np.float32(-127.0))   # <= 0; below 2**-127 the result is 0
        k = np.floor(y + np.float32(0.5))
        f = y - k
        two_k = f32_from_bits(np.uint32(np.int32(k) + np.int32(127)) << np.uint32(23))
        row[s] = two_k * (np.float32(1.0) + f * (P1 + f * (P2 + f * (P3 + f * (P4 + f * (P5 + f * P6))))))
        total += row[s]
    inv = np.float32(1.0) / total
    for s in range(n):
        row[s] *= inv
    for s in range(n, row.shape[0]):
        row[s] = 0.0
    return peak + np.log(total)


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


@serial
def cross_entropy_rows(z, targets, losses):                # [N, V] logits -> d(sum of losses)/dz in place; losses [N]
    V = z.shape[1]
    for i in range(z.shape[0]):
        t = targets[i]
        if t < 0:                                          # not scored: no loss, no gradient
            losses[i] = 0.0
            z[i, :] = 0.0
            continue
        zt = z[i, t]
        losses[i] = softmax_row(z[i], V) - zt              # log-sum-exp minus the target's logit
        z[i, t] -= np.float32(1.0)                         # softmax - one-hot


def cross_entropy_backward(logits, targets):               # [N, V], [N] ids (-1: not scored) -> (mean loss, dlogits [N, V])
    """Fused: the logits buffer becomes the gradient in place, so only one [N, V] buffer ever exists."""
    z = logits if logits.flags.c_contiguous and logits.dtype == np.float32 else np.ascontiguousarray(logits, np.float32)
    losses = np.empty(z.shape[0], dtype=np.float64)
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    bands(lambda r: cross_entropy_rows(z[r], targets[r], losses[r]), z.shape[0])
    n = int((targets >= 0).sum())
    z *= np.float32(1.0 / n)
    return float(losses.sum() / n), z
