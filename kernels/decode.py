"""A decode step (each cache row's next token) in as few kernel calls as the math allows.

npgpt.model.block, for rows of one new token each: the same operations, but the NumPy glue between
them (split and merge heads, the cache append, the residual views, the op wrappers) ran as ~30 small
steps per layer, ~2 ms of each token. Here a layer is six kernel calls on [B, C] arrays: LayerNorm,
the qkv GEMV, one attention kernel that writes each row's key and value into the cache and attends
over that row's positions, the projection, LayerNorm, the MLP's two GEMVs (the first applies GELU to
what it computes, on the thread that computed it).
Tested against npgpt.model.forward on the same cache (tests/test_kernels.py)."""

import math

import numba
import numpy as np

from ..model import forward_packed as spec_forward_packed
from ..inputs import check_ids

from .attention import attend_row
from .jit import DECODE_ROWS, parallel, prefetch4
from .matmul import matmul_rows
from .norm import layer_norm_rows


@parallel
def attend_step(qkv, k_cache, v_cache, lengths, scale, out):   # [B, 3C], [B, H, n_ctx, D] x2, [B] -> out [B, C]
    """Row b's new key and value go to position lengths[b] of its cache row; its query attends to
    positions 0..lengths[b] (causal: all it holds and itself). One task per (row, head). The cache comes
    from memory (the weights streamed through the caches since the last step read it): each task first
    prefetches its values, one hint a cache line, so they arrive while its keys are scored (attention
    at batch 4 ~15% faster, int4 decode, in alternating runs)."""
    B = qkv.shape[0]
    H, D = k_cache.shape[1], k_cache.shape[3]
    C = H * D
    for i in numba.prange(B * H):
        b, h = i // H, i % H
        pos = lengths[b]
        for s in range(pos):                               # ask for this task's values while its keys are scored
            for line in range(0, D, 16):
                prefetch4(v_cache, b, h, s, line)
        for d in range(D):
            k_cache[b, h, pos, d] = qkv[b, C + h * D + d]
            v_cache[b, h, pos, d] = qkv[b, 2 * C + h * D + d]
        o = attend_row(qkv[b, h * D : h * D + D].copy(), k_cache, v_cache, b, h, pos + 1, scale)   # contiguous: vectorizes
        for d in range(D):
            out[b, h * D + d] = o[d]


def is_step(ids, cache):                                   # a [B, 1] step on a cache of B rows, decode-sized
    return (cache is not None and isinstance(ids, np.ndarray) and ids.ndim == 2 and ids.shape[1] == 1
            and ids.shape[0] <= DECODE_ROWS)


def step(params, ids, cfg, cache):                         # [B, 1] ids, KVCache of B rows -> logits [B, 1, V]
    cache.check(cfg)
    ids, _ = check_ids(ids, cfg, past=int(cache.lengths.max()), batch=cache.batch)
    lengths = np.ascontiguousarray(cache.lengths)
    x = params["wte"]["weight"][ids[:, 0]] + params["wpe"]["weight"][lengths]      # [B, C]
    h, a = np.empty_like(x), np.empty_like(x)
    scale = np.float32(1.0 / math.sqrt(cfg.head_dim))
    eps = cfg.eps
    for i, layer in enumerate(params["h"]):
        kv, attn, mlp = cache.layer(i), layer["attn"], layer["mlp"]
        layer_norm_rows(x, layer["ln_1"]["weight"], layer["ln_1"]["bias"], eps, h)
        attend_step(matmul_rows(h, attn["c_attn"]["weight_t"], attn["c_attn"]["bias"]), kv.k, kv.v, lengths, scale, a)
        x += matmul_rows(a, attn["c_proj"]["weight_t"], attn["c_proj"]["bias"])
        layer_norm_rows(x, layer["ln_2"]["weight"], layer["ln_2"]["bias"], eps, h)
        g = matmul_rows(h, mlp["c_fc"]["weight_t"], mlp["c_fc"]["bias"], gelu=True)   # [B, 4C], GELU in the GEMV
        x += matmul_rows(g, mlp["c_proj"]["weight_t"], mlp["c_proj"]["bias"])
    cache.advance(1)
    layer_norm_rows(x, params["ln_f"]["weight"], params["ln_f"]["bias"], eps, h)
    return matmul_rows(h, params["lm_head"]["weight"])[:, None]


def forward_packed(params, cache, groups, cfg, ops):       # npgpt.model.forward_packed; one group of steps fused
    if len(groups) == 1 and is_step(groups[0][1], cache):
        start, ids = groups[0]
        if 0 <= start and start + ids.shape[0] <= cache.batch:   # else the spec names what is wrong
            return step(params, ids, cfg, cache.rows(start, start + ids.shape[0]))[:, 0]
    return spec_forward_packed(params, cache, groups, cfg, ops=ops)
