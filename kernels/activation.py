"""GELU, tanh form (HF gelu_new), elementwise over rows spread across the cores."""

import math

import numba
import numpy as np

from .jit import parallel

SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))


@parallel
def _gelu(x):                                              # [N, F] -> [N, F]
    out = np.empty_like(x)
    for i in numba.prange(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[i, j]
            out[i, j] = np.float32(0.5) * v * (np.float32(1.0) + np.tanh(SQRT_2_OVER_PI * (v + np.float32(0.044715) * v * v * v)))
    return out


def gelu(x):                                               # [..., F] -> [..., F]
    return _gelu(x.reshape(-1, x.shape[-1])).reshape(x.shape)
