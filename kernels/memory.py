"""Memory-bound probes: the machine's read bandwidth, which bounds decode speed (npgpt bench)."""

import numba
import numpy as np

from .jit import parallel


@parallel
def read_all(a):                                           # [R, C] -> [R] row sums: touches every byte once, all cores
    out = np.empty(a.shape[0], dtype=np.float32)
    for i in numba.prange(a.shape[0]):
        s = np.float32(0.0)
        for j in range(a.shape[1]):
            s += a[i, j]
        out[i] = s
    return out
