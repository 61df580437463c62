"""LayerNorm over the last axis, one row per loop iteration, rows spread over the cores."""

import numba
import numpy as np

from .jit import parallel


@parallel
def _layer_norm(x, weight, bias, eps):                     # [N, C], [C], [C] -> [N, C]
    N, C = x.shape
    out = np.empty((N, C), dtype=np.float32)
    for n in numba.prange(N):
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
    return out


def layer_norm(x, weight, bias, eps):                      # [..., C], [C], [C] -> [..., C]
    return _layer_norm(x.reshape(-1, x.shape[-1]), weight, bias, eps).reshape(x.shape)
