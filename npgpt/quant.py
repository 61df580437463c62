"""Low-precision weight formats: what is stored, and the readable way back to float32.

bf16: the upper 16 bits of each float32 (rounded to nearest even), kept as uint16 bits.
int8: symmetric per-output-channel: w ~= q * scale with q in [-127, 127] and one float32 scale per
output channel, so a row of outputs loses at most scale/2 per weight. `scale` is shaped to
broadcast over q: [1, out] for a Conv1D weight [in, out], [V, 1] for the LM head [V, C].
Embeddings, LayerNorm and biases stay float32; only matmul weights change format.
"""

from typing import NamedTuple

import numpy as np

from .errors import InputError

FORMATS = ("fp32", "bf16", "int8")


def check_format(name):
    if name not in FORMATS:
        raise InputError(f"unknown weights format {name!r}; choose one of {', '.join(FORMATS)}")


class BF16(NamedTuple):
    bits: np.ndarray                                       # uint16, the weight's shape

    @property
    def shape(self):
        return self.bits.shape

    @property
    def nbytes(self):
        return self.bits.nbytes


class Int8(NamedTuple):
    q: np.ndarray                                          # int8, the weight's shape
    scale: np.ndarray                                      # float32, broadcasts over q along the output channel

    @property
    def shape(self):
        return self.q.shape

    @property
    def nbytes(self):
        return self.q.nbytes + self.scale.nbytes


def dequantize(w):                                         # stored weight -> float32 array of its shape
    if isinstance(w, BF16):
        return (w.bits.astype(np.uint32) << 16).view(np.float32)
    if isinstance(w, Int8):
        return w.q.astype(np.float32) * w.scale
    return w


def to_bf16(w):                                            # float32 -> BF16, round to nearest even
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    return BF16(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16))


def to_int8(w, axis):                                      # float32 -> Int8, one scale per index of `axis`
    """axis: the output-channel axis (1 for Conv1D [in, out], 0 for the LM head [V, C])."""
    w = np.asarray(w, dtype=np.float32)
    peak = np.abs(w).max(axis=1 - axis, keepdims=True)     # [1, out] or [V, 1]
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return Int8(q, scale)


def format_of(w):
    return "bf16" if isinstance(w, BF16) else "int8" if isinstance(w, Int8) else "fp32"


def convert(w, fmt, axis):                                 # a matmul weight in any format -> `fmt`
    """axis: the output-channel axis (1 for Conv1D, 0 for the LM head). Same format: returned as is."""
    if format_of(w) == fmt:
        return w
    w32 = dequantize(w)
    return {"fp32": lambda: w32, "bf16": lambda: to_bf16(w32), "int8": lambda: to_int8(w32, axis)}[fmt]()


def quantize(params, fmt):
    """params with every matmul weight (c_attn, c_proj, c_fc, LM head) in `fmt`; other arrays shared."""
    def layer(group, names):
        return {n: {**group[n], "weight": convert(group[n]["weight"], fmt, 1)} for n in names}

    blocks = [{**b, "attn": layer(b["attn"], ("c_attn", "c_proj")), "mlp": layer(b["mlp"], ("c_fc", "c_proj"))}
              for b in params["h"]]
    return {**params, "h": blocks, "lm_head": {"weight": convert(params["lm_head"]["weight"], fmt, 0)}}


def params_format(params):
    return format_of(params["h"][0]["attn"]["c_attn"]["weight"])
