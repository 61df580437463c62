"""A prefill pass (many new tokens per row, into a KV cache or none) with the spec's glue fused away.

npgpt.model.forward for T new tokens on B rows that share one length (or no cache): the same
operations, but
- each product's bias, bias + GELU, or residual add runs on the thread that computed its band of
  columns, right after it: one pass over data still in cache, instead of a NumPy op or a band
  dispatch of its own, and a new array, per step; below 512 rows that pass also reads the band's
  product back from its transposed form (matmul.finish_band);
- attention reads each head's queries, keys and values where the qkv product left them, writes the
  keys and values into the cache, and writes its output where the projection reads it (no split or
  merge of heads);
- the activations live in buffers allocated once a pass and reused by every layer;
- with only the last logits wanted (`last`), the last block past its c_attn runs on each row's last
  position alone (_last_positions): 1.06x at pp128 and 1.09x at pp512, fp32 (medians of 12 alternating
  pairs in one process).
Decode-sized work (kernels.decode.step) and ragged rows take their own paths. Tested against
npgpt.model.forward (tests/test_kernels.py)."""

import math

import numba
import numpy as np

from ..inputs import check_ids

from . import jit
from .attention import attend_heads
from .decode import layer_tail
from .jit import DECODE_ROWS, serialized
from .matmul import BIAS, GELU, RESIDUAL, lm_head, matmul_into, scratch_size
from .norm import inline_rows, layer_norm_bands, layer_norm_rows


def fits(ids, cache):                                      # a prefill this pass takes: more than decode-sized, rows of one length
    if not isinstance(ids, np.ndarray) or ids.ndim not in (1, 2) or ids.size <= DECODE_ROWS:
        return False
    return cache is None or (cache.batch > 0 and bool((cache.lengths == cache.lengths[0]).all()))


def _layer_norm(x, ln, eps, out):                          # [N, C] -> out [N, C], bands of rows on numba's threads (inline up to norm.inline_rows)
    N = x.shape[0]
    if N <= inline_rows(x.shape[1]):
        layer_norm_rows(x, ln["weight"], ln["bias"], eps, out)
    else:
        with serialized():
            layer_norm_bands(x, ln["weight"], ln["bias"], eps, out, min(numba.get_num_threads(), N))


def _attend(qkv, kv, past, T, H, scale, out, queries=None):      # qkv [B*T, 3C] -> out [B*T, C]; keys and values into kv (or None)
    """Head by head (attention.attend_heads: the B*H heads over numba's threads), each as attention's prefill
    does it (query blocks against only the keys they can see), on views of qkv, the cache and out: nothing
    is copied but each head's new keys and values into the cache. queries: only each row's last `queries`
    positions attend (their rows of out are written, no others); every position's key and value still counts."""
    first = T - (T if queries is None else queries)        # each row's first position that attends
    with serialized():
        if kv is None:
            none = np.empty((0, 0, 0, 0), np.float32)
            attend_heads(qkv, none, none, False, past, T, H, scale, out, first, jit.PANEL_WIDE)
        else:
            attend_heads(qkv, kv.k, kv.v, True, past, T, H, scale, out, first, jit.PANEL_WIDE)


def _last_positions(x, qkv, a, layer, kv, past, B, T, H, scale, eps):   # the last block for each row's last position -> [B, C]
    """With only the last logits wanted (generation's prefill), the last block's other positions matter
    only as keys and values: they go into the cache (and are attended to) as always, but only each row's
    last query attends, and the projection, LayerNorm and MLP run on B rows instead of B*T (at GPT-2's
    shapes 9/12 of the block's products and most of its attention; llama.cpp skips the same MLP rows)."""
    _attend(qkv, kv, past, T, H, scale, a, queries=1)
    ends = np.arange(1, B + 1) * T - 1                     # each row's last position in [B*T]
    x = x[ends]                                            # [B, C], a copy
    layer_tail(x, a[ends], layer, eps, np.empty_like(x))   # as a decode step's
    return x


def forward(params, ids, cfg, cache=None, last=False):    # [T] or [B, T] ids -> logits, as npgpt.model.forward
    if cache is not None:
        cache.check(cfg)
    past = 0 if cache is None else int(cache.lengths[0])
    ids, one_sequence = check_ids(ids, cfg, past=past, batch=None if cache is None else cache.batch)   # [B, T]
    B, T = ids.shape
    N, C, H = B * T, cfg.n_embd, cfg.n_head
    x = (params["wte"]["weight"][ids] + params["wpe"]["weight"][past + np.arange(T)]).reshape(N, C)   # [N, C], the stream
    F = params["h"][0]["mlp"]["c_fc"]["bias"].shape[0]
    h, a = np.empty((N, C), np.float32), np.empty((N, C), np.float32)   # LayerNorm's output, attention's
    qkv, g = np.empty((N, 3 * C), np.float32), np.empty((N, F), np.float32)
    work = np.empty(scratch_size(N, max(3 * C, F)), np.float32)   # every product's scratch (matmul_into)
    scale = np.float32(1.0 / math.sqrt(cfg.head_dim))
    for i, layer in enumerate(params["h"]):
        attn, mlp = layer["attn"], layer["mlp"]
        kv = None if cache is None else cache.layer(i)
        _layer_norm(x, layer["ln_1"], cfg.eps, h)
        matmul_into(h, attn["c_attn"]["weight_t"], qkv, attn["c_attn"]["bias"], BIAS, work)
        if last and i == len(params["h"]) - 1:
            x = _last_positions(x, qkv, a, layer, kv, past, B, T, H, scale, cfg.eps)   # [B, C]
            break
        _attend(qkv, kv, past, T, H, scale, a)
        matmul_into(a, attn["c_proj"]["weight_t"], x, attn["c_proj"]["bias"], RESIDUAL, work)
        _layer_norm(x, layer["ln_2"], cfg.eps, h)
        matmul_into(h, mlp["c_fc"]["weight_t"], g, mlp["c_fc"]["bias"], GELU, work)
        matmul_into(g, mlp["c_proj"]["weight_t"], x, mlp["c_proj"]["bias"], RESIDUAL, work)
    if cache is not None:
        cache.advance(T)
    out = np.empty_like(x)
    _layer_norm(x, params["ln_f"], cfg.eps, out)
    logits = lm_head(out, params["lm_head"]["weight"]).reshape(B, 1 if last else T, -1)
    return logits[0] if one_sequence else logits
