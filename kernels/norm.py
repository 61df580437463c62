"""LayerNorm over the last axis, row by row; many rows are split in bands over the cores."""

import numpy as np

from .jit import bands, serial


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
    bands(lambda r: layer_norm_rows(x2[r], weight, bias, eps, out[r]), x2.shape[0])
    return out.reshape(x.shape)
