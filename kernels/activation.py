"""GELU, tanh form (HF gelu_new), elementwise; many rows are split in bands over the cores."""

import math

import numpy as np

from .jit import bands, inline, serial

SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))
# tanh as a rational function (the 13/6 minimax form Eigen uses for float32): max error 4e-7 against
# float64 tanh, and unlike a libm call it vectorizes. Beyond +-7.9 tanh is +-1 in float32.
TANH_CLAMP = np.float32(7.90531110763549805)
A1, A3, A5, A7 = np.float32(4.89352455891786e-03), np.float32(6.37261928875436e-04), np.float32(1.48572235717979e-05), np.float32(5.12229709037114e-08)
A9, A11, A13 = np.float32(-8.60467152213735e-11), np.float32(2.00018790482477e-13), np.float32(-2.76076847742355e-16)
B0, B2, B4, B6 = np.float32(4.89352518554385e-03), np.float32(2.26843463243900e-03), np.float32(1.18534705686654e-04), np.float32(1.19825839466702e-06)


@serial
def tanh(u):                                               # float32 -> float32
    u = min(max(u, -TANH_CLAMP), TANH_CLAMP)
    u2 = u * u
    p = u * (A1 + u2 * (A3 + u2 * (A5 + u2 * (A7 + u2 * (A9 + u2 * (A11 + u2 * A13))))))
    return p / (B0 + u2 * (B2 + u2 * (B4 + u2 * B6)))


@inline
def _gelu(v):                                              # float32 -> float32, as npgpt.model.gelu
    return np.float32(0.5) * v * (np.float32(1.0) + tanh(SQRT_2_OVER_PI * (v + np.float32(0.044715) * v * v * v)))


@serial
def gelu_rows(x, out):                                     # [N, F] -> out [N, F]
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[i, j] = _gelu(x[i, j])


def gelu(x):                                               # [..., F] -> [..., F]
    x2 = x.reshape(-1, x.shape[-1])
    out = np.empty(x2.shape, dtype=np.float32)
    bands(lambda r: gelu_rows(x2[r], out[r]), x2.shape[0])
    return out.reshape(x.shape)


@serial
def gelu_backward_rows(dout, x, dx):                       # [N, F] x2 -> dx [N, F]
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[i, j]
            t = tanh(SQRT_2_OVER_PI * (v + np.float32(0.044715) * v * v * v))
            slope = SQRT_2_OVER_PI * (np.float32(1.0) + np.float32(3 * 0.044715) * v * v)
            dx[i, j] = dout[i, j] * (np.float32(0.5) * (np.float32(1.0) + t) + np.float32(0.5) * v * (np.float32(1.0) - t * t) * slope)


def gelu_backward(dout, x):                                # [..., F] x2 -> dx [..., F]
    x2, d2 = x.reshape(-1, x.shape[-1]), np.ascontiguousarray(dout.reshape(-1, x.shape[-1]))
    dx = np.empty(x2.shape, dtype=np.float32)
    bands(lambda r: gelu_backward_rows(d2[r], x2[r], dx[r]), x2.shape[0])
    return dx.reshape(x.shape)
