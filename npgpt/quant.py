"""Low-precision weight formats: what is stored, and the readable way back to float32.

bf16: the upper 16 bits of each float32 (rounded to nearest even), kept as uint16 bits. A bf16 matmul
rounds its inputs to bf16 too (round_to_bf16), as llama.cpp's bf16 and AVX512-BF16's vdpbf16ps do: each
product of two bf16 values is exact in float32, and the sums are float32.
int8: symmetric per-output-channel: w ~= q * scale with q in [-127, 127] and one float32 scale per
output channel, so a row of outputs loses at most scale/2 per weight. `scale` is shaped to
broadcast over q: [1, out] for a Conv1D weight [in, out], [V, 1] for the LM head [V, C]. The inputs of
an int8 (and int4) matmul are rounded too, as llama.cpp's q8_0 does (round_to_q8): each block of 32
inputs to int8 levels of its own scale, so the kernels multiply integers by integers.
int4: block-wise symmetric, as llama.cpp's q4_0: each block of 32 consecutive inputs of an output
channel has one scale d = (its value of largest magnitude) / -8, rounded to float16, and w ~= q * d with
q in [-8, 7]: 18 bytes a block, as q4_0's (files written before float16 scales keep their float32 ones,
which every path still reads). The spec keeps q unpacked (Int4, the weight's shape). Checkpoint files
keep two per byte in q4_0's order (pack4: rows [out, in]; in each block of 32, byte i holds q + 8 of input i in its low
nibble and of input 16 + i in its high one); the kernels interleave rows in groups of 8 instead (Int4Rows). An int4
matmul rounds its inputs as int8's does (round_to_q8), as llama.cpp's q4_0 meets q8_0 inputs.
Embeddings, LayerNorm and biases stay float32; only matmul weights change format.
"""

from typing import NamedTuple

import numpy as np

from .errors import InputError

FORMATS = ("fp32", "bf16", "int8", "int4")
INT4_BLOCK = 32                                            # inputs per int4 scale, as q4_0


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


# shared by Int8 and Int4: the weight's shape is q's, and both arrays are what it costs
_Q_SHAPE = property(lambda self: self.q.shape)
_Q_NBYTES = property(lambda self: self.q.nbytes + self.scale.nbytes)


class Int8(NamedTuple):
    q: np.ndarray                                          # int8, the weight's shape
    scale: np.ndarray                                      # float32, broadcasts over q along the output channel
    shape = _Q_SHAPE
    nbytes = _Q_NBYTES


class Int4(NamedTuple):
    q: np.ndarray                                          # int8 in [-8, 7], the weight's shape
    scale: np.ndarray                                      # float16 (float32 in older files): the weight's shape, the input axis in blocks of 32
    axis: int                                              # the input axis: 0 for Conv1D [in, out], 1 for the LM head [V, C]
    shape = _Q_SHAPE
    nbytes = _Q_NBYTES


# shared by Int8Rows and Int4Rows: the weight's [out, in], and what the packed rows and scales cost
_ROWS_SHAPE = property(lambda self: (self.n_out, self.n_in))
_ROWS_NBYTES = property(lambda self: self.packed.nbytes + self.scale.nbytes)


class Int8Rows(NamedTuple):
    """Int8 as the kernels keep it: rows of outputs [out, in] interleaved in groups of 8 (built by
    npgpt.kernels.matmul.int8_rows). Group g holds rows 8g .. 8g + 7 (rows past `n_out` are padding,
    q = 0 and scale 0); block j of the group (32 inputs) is 256 bytes, 8 runs of 32: byte 4r + c of run
    i holds q + 128 (as an unsigned byte) of row 8g + r at input 32j + 4i + c. scale[g, r] is row 8g + r's."""
    packed: np.ndarray                                     # uint8 [groups, 256 * blocks]
    scale: np.ndarray                                      # float32 [groups, 8]
    n_out: int
    n_in: int
    shape = _ROWS_SHAPE
    nbytes = _ROWS_NBYTES


class Int4Rows(NamedTuple):
    """Int4 as the kernels keep it: rows of outputs [out, in] interleaved in groups of 8 (built by
    npgpt.kernels.matmul.int4_rows). Group g holds rows 8g .. 8g + 7 (rows past `n_out` are padding,
    q = 0 and scale 0); block j of the group is 128 bytes, 4 runs of 32: byte 4r + c of run i holds q + 8
    of row 8g + r at input 32j + 8i + c in its low nibble and at input 32j + 8i + 4 + c in its high one.
    The 8 rows' scales of block j are scale[g, 8j : 8j + 8]."""
    packed: np.ndarray                                     # uint8 [groups, 128 * blocks]
    scale: np.ndarray                                      # [groups, 8 * blocks]: float16 bits (uint16), or float32 (older files)
    n_out: int
    n_in: int
    shape = _ROWS_SHAPE
    nbytes = _ROWS_NBYTES


_PANELS_SHAPE = property(lambda self: (self.n_out, self.panels.shape[1]))   # BF16Panels' and F32Panels' [out, in]
_PANELS_NBYTES = property(lambda self: self.panels.nbytes)


class BF16Panels(NamedTuple):
    """BF16 as the kernels keep it on CPUs without AVX512-BF16: rows of outputs [out, in] in panels of 16
    (built by npgpt.kernels.matmul.bf16_panels). Panel p holds rows 16p .. 16p + 15 k-major (rows past
    `n_out` are padding, 0): panels[p, k, j] is row 16p + j's weight at input k in its low 16 bits and row
    16p + 8 + j's in its high ones, so one 32-byte load is all 16 rows' weights at k."""
    panels: np.ndarray                                     # uint32 [ceil(out / 16), in, 8]
    n_out: int
    shape = _PANELS_SHAPE
    nbytes = _PANELS_NBYTES


class F32Panels(NamedTuple):
    """float32 weights as the kernels keep them for inference on AVX-512 CPUs: rows of outputs [out, in] in
    panels of 32 (built by npgpt.kernels.matmul.f32_panels). Panel p holds rows 32p .. 32p + 31 k-major (rows
    past `n_out` are padding, 0): panels[p, k, j] is row 32p + j's weight at input k, so two 64-byte loads
    are all 32 rows' weights at k, the layout prefill's products and decode's GEMVs both read."""
    panels: np.ndarray                                     # float32 [ceil(out / 32), in, 32]
    n_out: int
    shape = _PANELS_SHAPE
    nbytes = _PANELS_NBYTES


def offset_nibbles(q, rows, cols):                         # int8 [r, c] in [-8, 7] -> uint8 q + 8 [rows, cols], padded with q = 0
    u = np.full((rows, cols), 8, np.uint8)
    u[: q.shape[0], : q.shape[1]] = (q + np.int8(8)).view(np.uint8)
    return u


def pair_nibbles(u):                                       # uint8 [..., 2h] of 4-bit values -> [..., h]: first half low, second high
    h = u.shape[-1] // 2
    return u[..., :h] | (u[..., h:] << 4)


def split_nibbles(p):                                      # inverse of pair_nibbles
    return np.concatenate([p & 15, p >> 4], axis=-1)


def pack4(q):                                              # int8 rows [out, in] in [-8, 7] -> uint8 [out, 16 * blocks]
    """q4_0's layout: in each block of 32 inputs, byte i holds input i (low nibble) and input 16 + i (high
    nibble), as q + 8; a last partial block is padded with q = 0."""
    blocks = -(-q.shape[1] // INT4_BLOCK)
    u = offset_nibbles(q, q.shape[0], blocks * INT4_BLOCK).reshape(q.shape[0], blocks, INT4_BLOCK)
    return np.ascontiguousarray(pair_nibbles(u).reshape(q.shape[0], blocks * 16))


def unpack4(packed, n_in):                                 # inverse of pack4 -> int8 rows [out, n_in]
    q = split_nibbles(packed.reshape(packed.shape[0], -1, 16)).view(np.int8) - np.int8(8)
    return q.reshape(packed.shape[0], -1)[:, :n_in]


Q8_BLOCK = INT4_BLOCK                                      # inputs per scale of an int8/int4 matmul's rounded inputs, as q8_0


def round_to_q8(x):                                        # float32 [..., K] -> float32 [..., K] on int8 levels
    """Each block of 32 consecutive values (the last may be shorter) becomes q * d with q = rint(x * 127 /
    peak) in [-127, 127] and d = peak / 127, peak the block's largest magnitude: an error of at most d / 2
    per value. A block of zeros stays zero."""
    x = np.asarray(x, dtype=np.float32)
    K = x.shape[-1]
    blocks = np.zeros(x.shape[:-1] + (-(-K // Q8_BLOCK), Q8_BLOCK), np.float32)
    blocks.reshape(x.shape[:-1] + (-1,))[..., :K] = x
    peak = np.abs(blocks).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(peak > 0, np.float32(127.0) / peak, np.float32(0.0))
    q = np.rint(blocks * inv)
    return (q * (peak / np.float32(127.0))).reshape(x.shape[:-1] + (-1,))[..., :K]


def round_to_bf16(x):                                      # float32 [..., K] -> float32 [..., K] on bf16's values
    """Round to nearest even, as to_bf16 (a NaN stays a NaN): a relative error of at most 2**-9 per value."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        rounded = (to_bf16(x).bits.astype(np.uint32) << 16).view(np.float32)
    return np.where(np.isnan(x), x, rounded)


def activations(x, w):                                     # what a matmul with weight w multiplies: its inputs, rounded as w's format says
    if isinstance(w, BF16):
        return round_to_bf16(x)
    return round_to_q8(x) if isinstance(w, (Int8, Int4)) else x


def dequantize(w):                                         # stored weight -> float32 array of its shape
    if isinstance(w, BF16):
        return (w.bits.astype(np.uint32) << 16).view(np.float32)
    if isinstance(w, Int8):
        return w.q.astype(np.float32) * w.scale
    if isinstance(w, Int4):                                # each scale covers 32 inputs (float16 widens exactly)
        n = w.q.shape[w.axis]
        scale = np.repeat(w.scale.astype(np.float32), INT4_BLOCK, axis=w.axis).take(np.arange(n), axis=w.axis)
        return w.q.astype(np.float32) * scale
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


def to_int4(w, axis):                                      # float32 -> Int4, blocks of 32 along `axis` (the input axis)
    w = np.moveaxis(np.asarray(w, dtype=np.float32), axis, -1)   # [..., in]
    n = w.shape[-1]
    blocks = np.zeros(w.shape[:-1] + (-(-n // INT4_BLOCK), INT4_BLOCK), np.float32)
    blocks.reshape(w.shape[:-1] + (-1,))[..., :n] = w     # the last block zero-padded
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]   # signed
    if np.abs(peak).max(initial=0) / 8 > np.finfo(np.float16).max:
        raise InputError(f"int4 scales are float16 (as q4_0's): weights up to {8 * float(np.finfo(np.float16).max):.0f} in "
                         f"magnitude; this one holds {float(np.abs(peak).max()):.3g}")
    with np.errstate(under="ignore"):
        scale = (peak / np.float32(-8.0)).astype(np.float16)   # a block below float16's range (every |w| < 2.4e-7) -> 0
    scale[scale == 0] = 1.0                                # ... and its q = 0
    q = np.clip(np.rint(blocks / scale.astype(np.float32)[..., None]), -8, 7).astype(np.int8).reshape(w.shape[:-1] + (-1,))[..., :n]
    return Int4(np.ascontiguousarray(np.moveaxis(q, -1, axis)), np.ascontiguousarray(np.moveaxis(scale, -1, axis)), axis)


def format_of(w):
    if isinstance(w, (Int4, Int4Rows)):
        return "int4"
    return "bf16" if isinstance(w, (BF16, BF16Panels)) else "int8" if isinstance(w, (Int8, Int8Rows)) else "fp32"


def convert(w, fmt, axis):                                 # a matmul weight in any format -> `fmt`
    """axis: the output-channel axis (1 for Conv1D, 0 for the LM head). Same format: returned as is."""
    if format_of(w) == fmt:
        return w
    w32 = dequantize(w)
    return {"fp32": lambda: w32, "bf16": lambda: to_bf16(w32), "int8": lambda: to_int8(w32, axis),
            "int4": lambda: to_int4(w32, 1 - axis)}[fmt]()


def quantize(params, fmt):
    """params with every matmul weight (c_attn, c_proj, c_fc, LM head) in `fmt`; other arrays shared."""
    def layer(group, names):
        return {n: {**group[n], "weight": convert(group[n]["weight"], fmt, 1)} for n in names}

    blocks = [{**b, "attn": layer(b["attn"], ("c_attn", "c_proj")), "mlp": layer(b["mlp"], ("c_fc", "c_proj"))}
              for b in params["h"]]
    return {**params, "h": blocks, "lm_head": {"weight": convert(params["lm_head"]["weight"], fmt, 0)}}


def params_format(params):
    return format_of(params["h"][0]["attn"]["c_attn"]["weight"])
