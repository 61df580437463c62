"""numba kernels for GPT-2's hot paths, as an op table with the call shapes of npgpt.model's ops.

Layout: the kernel GEMV streams weight rows, so `prepare` stores each Conv1D weight [in, out] once as
`weight_t` [out, in] (the LM head, wte [V, C], already has that layout), in the format's own layout of
rows (float32 on AVX-512: panels of 32 rows, quant.F32Panels). Calling the NumPy spec's
`linear` on a prepared dict fails loudly (no `weight` key) instead of multiplying the wrong way.
"""

import numpy as np

from .. import quant
from .. import optim as optim_spec
from ..backward import SPEC
from ..model import REFERENCE
from ..model import forward as spec_forward

from . import activation, attention, jit, matmul, memory, norm, optim, softmax
from . import decode, prefill
from .jit import blas_per_band as runtime
from .jit import serialized

KERNELS = REFERENCE._replace(layer_norm=norm.layer_norm, linear=matmul.linear, gelu=activation.gelu,
                             attention=attention.attention, lm_head=matmul.lm_head)
BACKWARD = SPEC._replace(layer_norm=norm.layer_norm_backward, linear=matmul.linear_backward, gelu=activation.gelu_backward,
                         attention=attention.attention_backward, lm_head=matmul.lm_head_backward,
                         cross_entropy=softmax.cross_entropy_backward)
OPTIM = optim_spec.SPEC._replace(adamw_update=optim.adamw_update, sum_of_squares=optim.sum_of_squares)


def forward(params, ids, cfg, ops, cache=None, last=False):   # npgpt.model.forward, with a decode step or a prefill fused
    """The numba backend's forward pass: a decode step (kernels.decode) or a prefill of rows sharing one
    length (kernels.prefill) runs fused; anything else (ragged rows, decode-sized prompts) runs the spec
    with the kernels' op table."""
    if decode.is_step(ids, cache):
        return decode.step(params, ids, cfg, cache)
    if prefill.fits(ids, cache):
        return prefill.forward(params, ids, cfg, cache, last)
    return spec_forward(params, ids, cfg, ops=ops, cache=cache, last=last)


forward_packed = decode.forward_packed


def _bf16_rows(bits):                                      # bf16 rows' bits [out, in] as this CPU's kernels read them
    """quant.BF16 rows where the CPU has vdpbf16ps (jit.BF16_PAIRS), else quant.BF16Panels (16 rows k-major)."""
    return quant.BF16(bits) if jit.BF16_PAIRS else matmul.bf16_panels(bits)


def rows(w, f32_panels=False):                            # Conv1D weight [in, out] in any format -> rows [out, in]
    """f32_panels: float32 weights as quant.F32Panels (rows in panels of 32, k-major), else plain rows."""
    if isinstance(w, quant.BF16):
        return _bf16_rows(matmul.transpose(w.bits))
    if isinstance(w, quant.Int8):
        return matmul.int8_rows(w.q.T, w.scale.ravel())
    if isinstance(w, quant.Int4):                          # blocks run along the input axis 0
        return matmul.int4_rows(w.q.T, w.scale.T)
    return matmul.f32_panels(w) if f32_panels else matmul.transpose(w)


def head_rows(w):                                          # LM head [V, C]: already rows; int8 and int4 into groups of 8 rows
    if isinstance(w, quant.BF16):
        return _bf16_rows(w.bits)
    if isinstance(w, quant.Int4):
        return matmul.int4_rows(w.q, w.scale)
    return matmul.int8_rows(w.q, w.scale.ravel()) if isinstance(w, quant.Int8) else w


def transpose_linear(layer):                               # {"weight": [in, out], "bias"} -> {"weight_t": [out, in], "bias"}
    return {"weight_t": rows(layer["weight"]), "bias": layer["bias"]}


def prepare(params, training=False):
    """params in the kernels' layout; arrays the kernels read as they are (embeddings, LayerNorm) are shared.
    float32 linear weights: on AVX-512 (jit.PANEL_WIDE) as panels of 32 rows (quant.F32Panels), which prompts'
    products read as they are (no packing per call) and decode streams; training (its backward reads rows:
    matmul.linear_backward) and other CPUs get rows. The tied LM head stays wte's rows either way."""
    with serialized():                                     # the transposes are parallel kernels
        return _prepare(params, jit.PANEL_WIDE and not training)


def _in_huge_pages(w, source, pages):                   # w (prepared from source) with the arrays prepare made moved to pages
    """Arrays w shares with source (an fp32 head is wte itself, bf16 rows' bits on vdpbf16ps) stay where they are:
    the caller's arrays, and training writes them in place."""
    theirs = {id(a) for a in (source if isinstance(source, tuple) else (source,)) if isinstance(a, np.ndarray)}
    move = lambda a: pages.copy(a) if isinstance(a, np.ndarray) and id(a) not in theirs else a
    return type(w)(*map(move, w)) if isinstance(w, tuple) else move(w)


def _prepare(params, f32_panels):
    pages = memory.HugePages()                             # the streamed weights in huge pages (memory.HugePages)

    def linear(layer):
        return {"weight_t": _in_huge_pages(rows(layer["weight"], f32_panels), layer["weight"], pages), "bias": layer["bias"]}

    blocks = [{**block, "attn": {name: linear(block["attn"][name]) for name in ("c_attn", "c_proj")},
               "mlp": {name: linear(block["mlp"][name]) for name in ("c_fc", "c_proj")}}
              for block in params["h"]]
    head = params["lm_head"]["weight"]
    return {**params, "h": blocks, "lm_head": {"weight": _in_huge_pages(head_rows(head), head, pages)}}


def prepare_again(prepared, params, layers=None):
    """After fp32 `params` changed in place (a training step): rewrite the prepared linear weights in
    place, no new arrays (of the blocks `layers` only, when given). Everything else `prepare` shares
    with params already sees the change."""
    with serialized():
        for i in range(len(params["h"])) if layers is None else layers:
            block, source = prepared["h"][i], params["h"][i]
            for group in ("attn", "mlp"):
                for name, layer in block[group].items():
                    if isinstance(layer["weight_t"], quant.F32Panels):
                        matmul.f32_panels_into(source[group][name]["weight"], layer["weight_t"].panels)
                    else:
                        matmul.transpose_into(source[group][name]["weight"], layer["weight_t"])


def unrows(w):                                             # inverse of rows: [out, in] -> Conv1D [in, out]
    if isinstance(w, quant.BF16):
        return quant.BF16(matmul.transpose(w.bits))
    if isinstance(w, quant.BF16Panels):
        return quant.BF16(matmul.transpose(matmul.bf16_unpanel(w)))
    if isinstance(w, quant.F32Panels):
        return matmul.f32_unpanel_conv1d(w)
    if isinstance(w, quant.Int8Rows):
        q, scale = matmul.int8_unrows(w)
        return quant.Int8(np.ascontiguousarray(q.T), scale.reshape(1, -1))
    if isinstance(w, quant.Int4Rows):
        q, scale = matmul.int4_unrows(w)
        return quant.Int4(np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T), 0)
    return matmul.transpose(w)


def unprepare(params):
    """The checkpoint layout of prepared params (new arrays for the linear weights; the rest shared)."""
    with serialized():
        blocks = [{**block, **{group: {name: {"weight": unrows(layer["weight_t"]), "bias": layer["bias"]}
                                       for name, layer in block[group].items()} for group in ("attn", "mlp")}}
                  for block in params["h"]]
    head = params["lm_head"]["weight"]
    if isinstance(head, quant.BF16Panels):
        head = quant.BF16(matmul.bf16_unpanel(head))
    elif isinstance(head, quant.Int8Rows):
        q, scale = matmul.int8_unrows(head)
        head = quant.Int8(q, scale.reshape(-1, 1))
    elif isinstance(head, quant.Int4Rows):
        head = quant.Int4(*matmul.int4_unrows(head), 1)
    return {**params, "h": blocks, "lm_head": {"weight": head}}


__all__ = ["KERNELS", "forward", "forward_packed", "unprepare", "BACKWARD", "OPTIM", "prepare_again", "prepare", "runtime", "serialized", "activation", "attention", "decode", "prefill", "matmul", "memory", "norm", "optim", "softmax"]
