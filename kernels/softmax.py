"""Softmax over the last axis; the causal variant scales, masks and normalizes attention scores in place."""

import math

import numpy as np

from .jit import bands, bits_of_f32, f32_from_bits, inline, serial


LOG2E = np.float32(1.4426950408889634)
# exp(d) = 2**k * exp(r), k = round(d / ln 2), r = d - k ln 2 in [-ln 2 / 2, ln 2 / 2], with ln 2 split in two
# (Cody and Waite): LN2_HI has 8 significant bits, so k * LN2_HI is exact and r keeps float32 precision
# however large |d| is (a float32 d / ln 2 would lose up to 4e-6 of it at d = -69)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
MIN_EXP_ARG = np.float32(-127.0 * 0.6931471805599453)     # below, exp underflows to 0 (2**k has no exponent bits left)
# exp(r): Taylor coefficients 1 / k!, degree 6; relative error 1.2e-7 at |r| = ln 2 / 2, about 2 ulp of float32
E2, E3, E4 = np.float32(1 / 2), np.float32(1 / 6), np.float32(1 / 24)
E5, E6 = np.float32(1 / 120), np.float32(1 / 720)


@inline
def _order_key(b):                                         # float32 bits (int32) -> an int32 in the floats' order; its own inverse
    """Negative floats' bit patterns run backwards: flipping all but the sign bit turns them round, so
    comparing keys as integers compares the floats. A float max as an integer max vectorizes; as a
    float max it did not (LLVM keeps a float max reduction scalar unless it may assume no NaN): the peak
    pass took two-thirds of a 128 x 1280 softmax. The int32 cast keeps it 8 lanes wide: numba types an
    int32 expression as int64, and the max then ran 4 lanes of int64 compares and blends (0.16 ns an
    element, now 0.06)."""
    return np.int32(b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@serial
def softmax_row(row, n, scale):                            # row[:n] -> softmax(scale * row[:n]) in place, row[n:] -> 0; returns its log-sum-exp
    """exp is computed as 2**k * exp(r) with the 2**k built from exponent bits, so the loop vectorizes
    (numba's np.exp is a scalar libm call: 6 ns an element, most of prefill attention's time). All in
    float32, the scale folded into exp's argument (scale > 0, so the peak of the scaled row is scale
    times the row's): with the peak a float64 (-np.inf), the peak ran scalar and the exponentials 4
    lanes wide in float64, 1.5-1.7x slower over attention's 128 x 512 score blocks."""
    top = _order_key(bits_of_f32(np.float32(-np.inf)))
    for s in range(n):
        top = max(top, _order_key(bits_of_f32(row[s])))
    peak = f32_from_bits(np.uint32(_order_key(top)))
    total = np.float32(0.0)
    for s in range(n):
        d = max((row[s] - peak) * scale, MIN_EXP_ARG)      # <= 0
        k = np.floor(d * LOG2E + np.float32(0.5))
        r = (d - k * LN2_HI) - k * LN2_LO
        two_k = f32_from_bits(np.uint32(np.int32(k) + np.int32(127)) << np.uint32(23))
        row[s] = two_k * (np.float32(1.0) + r * (np.float32(1.0) + r * (E2 + r * (E3 + r * (E4 + r * (E5 + r * E6))))))
        total += row[s]
    inv = np.float32(1.0) / total
    for s in range(n):
        row[s] *= inv
    for s in range(n, row.shape[0]):
        row[s] = 0.0
    return peak * scale + np.log(total)


@serial
def softmax_rows(x):                                       # [N, S] in place
    for i in range(x.shape[0]):
        softmax_row(x[i], x.shape[1], np.float32(1.0))


def softmax(x):                                            # [..., S] -> [..., S]
    out = np.array(x, dtype=np.float32).reshape(-1, x.shape[-1])
    bands(lambda r: softmax_rows(out[r]), out.shape[0])
    return out.reshape(x.shape)


@serial
def causal_softmax_rows(scores, scale):                    # [R, T, S] in place: softmax(scale * scores + causal mask)
    R, T, S = scores.shape
    for r in range(R):
        for t in range(T):
            softmax_row(scores[r, t], S - T + t + 1, scale)   # query t sees keys 0 .. S-T+t


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
        losses[i] = softmax_row(z[i], V, np.float32(1.0)) - zt   # log-sum-exp minus the target's logit
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
