"""AdamW's update and the gradient norm's sum of squares: one pass over each tensor, on every core.

The spec (npgpt.optim) makes five temporaries the size of the tensor per update, and a float64 copy
per norm; these read and write each element once. `adamw_rows` does the spec's float32 operations in
the spec's order and without fastmath (no FMA contraction), so its results are bit-identical to it.
"""

import math

import numba
import numpy as np

from .jit import exact, parallel


@exact
def adamw_flat(p, g, m, v, shrink, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, root_c2, eps):   # [N] x4, in place
    for i in numba.prange(p.shape[0]):
        gi = g[i]
        pi = p[i] * shrink
        mi = m[i] * beta1 + one_minus_beta1 * gi
        vi = v[i] * beta2 + one_minus_beta2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = pi - step_size * mi / (np.sqrt(vi) / root_c2 + eps)


def adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, t):   # as npgpt.optim.adamw_update
    f = np.float32
    g = np.ascontiguousarray(g, dtype=np.float32)
    adamw_flat(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
               f(1.0 - lr * weight_decay) if weight_decay else f(1.0), f(beta1), f(1.0 - beta1), f(beta2), f(1.0 - beta2),
               f(lr / (1.0 - beta1**t)), f(math.sqrt(1.0 - beta2**t)), f(eps))


@parallel
def _sum_of_squares(g):                                    # [N] float32 -> float64
    total = 0.0
    for i in numba.prange(g.shape[0]):
        x = np.float64(g[i])
        total += x * x
    return total


def sum_of_squares(g):                                     # as npgpt.optim.sum_of_squares
    return float(_sum_of_squares(np.ascontiguousarray(g, dtype=np.float32).reshape(-1)))
