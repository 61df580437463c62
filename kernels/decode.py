"""A decode step (each cache row's next token) in as few kernel calls as the math allows.

npgpt.model.block, for rows of one new token each: the same operations, but the NumPy glue between
them (split and merge heads, the cache append, the residual views, the op wrappers) ran as ~30 small
steps per layer, ~2 ms of each token. Here a layer is seven kernels on [B, C] arrays: LayerNorm, the
qkv GEMV, attention (each row's key and value into the cache, then its query over that row's
positions), the projection into the stream, LayerNorm, the MLP's two GEMVs (the first applies GELU to
what it computes, the second adds into the stream).

float32 and bf16 weights: the whole step is one region on every core (fused_step), the threads meeting
at a barrier between kernels (a LayerNorm is none: each thread normalizes the rows for itself). int8
and int4 weights: a kernel call each (step): the same region with a rounding kernel before each
product ran them 0.79-0.88x the calls (tg128, alternating in one process),
however its chunks were cut, while float32 and bf16 ran 1.07x faster in it. Each thread rounding its own
copy of the inputs instead (no kernel, no barrier) measured the same: int4 0.82x at batch 1, 0.94x at 4;
int8 0.91x and 1.02x; 0.9x on one thread, and worse with smaller chunks. The same kernel calls made from
one compiled loop over the layers (no Python dispatch between them) measured 0.99-1.07x: not kept.
Tested against npgpt.model.forward on the same cache (tests/test_kernels.py)."""

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .. import quant
from ..inputs import check_ids
from ..model import forward_packed as spec_forward_packed

from .activation import _gelu
from .attention import attend_row
from .jit import DECODE_ROWS, atomic_add, atomic_read, inline, parallel, prefetch4, serial, spin_pause, team
from .matmul import (BIAS, GELU, RESIDUAL, STREAM_AHEAD, bf16_bits, bf16_kmajor, bf16_rows, f32_panel_rows, float_rows,
                     matmul_rows, panel_rows)
from .norm import layer_norm_rows


@inline
def attend_task(qkv, k_cache, v_cache, lengths, scale, out, i):   # task i = (row b, head h): [B, 3C], [B, H, n_ctx, D] x2, [B] -> out[b, head h]
    """Row b's new key and value go to position lengths[b] of its cache row; its query attends to
    positions 0..lengths[b] (causal: all it holds and itself). The cache comes from memory (the weights
    streamed through the caches since the last step read it): the task first prefetches its values, one
    hint a cache line, so they arrive while its keys are scored (attention at batch 4 ~15% faster, int4
    decode, in alternating runs)."""
    H, D = k_cache.shape[1], k_cache.shape[3]
    C = H * D
    b, h = i // H, i % H
    pos = lengths[b]
    for s in range(pos):                                   # ask for this task's values while its keys are scored
        for line in range(0, D, 16):
            prefetch4(v_cache, b, h, s, line)
    for d in range(D):
        k_cache[b, h, pos, d] = qkv[b, C + h * D + d]
        v_cache[b, h, pos, d] = qkv[b, 2 * C + h * D + d]
    o = attend_row(qkv[b, h * D : h * D + D].copy(), k_cache, v_cache, b, h, pos + 1, scale)   # contiguous: vectorizes
    for d in range(D):
        out[b, h * D + d] = o[d]


@parallel
def attend_step(qkv, k_cache, v_cache, lengths, scale, out):   # [B, 3C], [B, H, n_ctx, D] x2, [B] -> out [B, C]
    """Each row's new key and value into its cache, and its query's attention: a task per (row, head)."""
    for i in numba.prange(qkv.shape[0] * k_cache.shape[1]):
        attend_task(qkv, k_cache, v_cache, lengths, scale, out, i)


# One region a step: a thread per core runs the whole step, every kernel of every layer, and the threads
# meet between kernels at a barrier of two shared counters instead of a parallel call each (~75 a token,
# each starting the threads and the first misses of a matrix again). Each kernel is cut into chunks that
# the threads claim one at a time (an atomic add): a thread slowed by a neighbour takes fewer, and one that
# never starts (or a region on one thread) leaves its chunks to the others. Nothing waits on a thread,
# only on chunks, so no schedule can deadlock. The chunks are dealt in parts, one per thread, each with its
# own counter: a thread claims its part's chunks in order, then helps the others with theirs (_claim).
# So each core streams one run of adjacent rows, as a static split would, instead of every other chunk:
# the fp32 step's GEMVs alone, batch 1, alternating in one process, 1.14x (quartiles 1.06-1.18) over
# chunks claimed from one counter.
LN_1, QKV, ATTEND, PROJ, LN_2, FC, FC_PROJ = range(7)      # a layer's kernels, in order
LN_F, HEAD = 7, 8                                          # then the final LayerNorm and the LM head
GEMVS = (QKV, PROJ, FC, FC_PROJ, HEAD)
CHUNK_BYTES = 256 << 10                                    # weight bytes a GEMV chunk streams (whole groups of 8 rows)
# (medians of 5, interleaved: fp32 batch 1 at 32K/64K/128K/256K/512K 45.1/47.4/52.3/53.5/53.6 t/s, bf16 batch 4
# 196/220/227/231/221: below ~128K the claims and barriers cost, above ~512K a thread waits longer at each barrier;
# a GEMV's last two chunks cut 4-16x smaller, so no thread waits a whole chunk, measured 0.97-1.04x in fp32 and bf16)
LINE = 8                                                   # int64 counters a cache line apart


@inline
def _claim(sync, at, parts, me, n, q):                     # the next chunk of kernel counters `at` for thread me, or -1
    """Part q (0, 1, ...) of a thread's round: its own part (me) first, then the others'. sync[at + p * LINE]
    counts the chunks claimed in part p (chunks p * n // parts up to the next part's first)."""
    p = (me + q) % parts
    c = p * n // parts + atomic_add(sync, at + p * LINE, 1)
    return c if c < (p + 1) * n // parts else -1


def panel_size(w):                                         # (rows a panel, bytes a weight) of a 3-D panels array (numba-only; see overload)
    raise NotImplementedError


@overload(panel_size)
def _panel_size(w):
    """quant.BF16Panels' (uint32: two bf16 weights each): 16 rows of 2 bytes; quant.F32Panels': 32 of 4."""
    if w.dtype == types.uint32:
        return lambda w: (16, 2)
    return lambda w: (32, 4)


@inline
def chunk_rows(w, chunk_bytes):                            # weight rows in a GEMV chunk: ~chunk_bytes, a multiple of 8 (panels: whole panels)
    if w.ndim == 3:
        rows, size = panel_size(w)
        r = chunk_bytes // (w.shape[1] * size)
        return max(rows, r - r % rows)
    r = chunk_bytes // (w.shape[1] * w.itemsize)
    return max(8, r - r % 8)


@inline
def weight_count(w):                                       # a GEMV's weight rows (panels: rounded up to whole panels; the chunks past M are empty)
    return w.shape[0] * panel_size(w)[0] if w.ndim == 3 else w.shape[0]


def region_inputs(x, w):                                   # a GEMV's inputs as the region's kernel for w reads them (numba-only; see overload)
    raise NotImplementedError


@overload(region_inputs)
def _region_inputs(x, w):
    """bf16 rows: x rounded to bf16 (the bf16 matmul's rounding), its bits (matmul.bf16_bits); bf16 panels:
    k-major (matmul.bf16_kmajor); float32: x itself."""
    if w.dtype == types.uint16:
        return lambda x, w: bf16_bits(x)
    if w.ndim == 3 and w.dtype == types.uint32:            # quant.BF16Panels: k-major bf16 values (matmul.bf16_kmajor)
        return lambda x, w: bf16_kmajor(x)
    return lambda x, w: x                                  # float32 rows or quant.F32Panels


def weight_rows(xd, w, out, m0, m1, ahead):                # out[:, m0:m1] = xd . w[m0:m1]^T (numba-only; see overload)
    raise NotImplementedError


@overload(weight_rows)
def _weight_rows(xd, w, out, m0, m1, ahead):
    """bf16 rows: matmul.bf16_rows (bf16 pairs), bf16 panels: matmul.panel_rows, each hinting `ahead` bytes
    on (from 4 and from 2 inputs); float32: matmul.float_rows (no hints: see matmul.STREAM_AHEAD), float32 panels:
    matmul.f32_panel_rows (which hints the runs it reads next itself: see jit.F32_RUNS)."""
    if w.dtype == types.uint16:
        return lambda xd, w, out, m0, m1, ahead: bf16_rows(xd, w, out, m0, m1, ahead)
    if w.ndim == 3 and w.dtype == types.uint32:
        return lambda xd, w, out, m0, m1, ahead: panel_rows(xd, w, out, m0, m1, ahead)
    if w.ndim == 3:
        return lambda xd, w, out, m0, m1, ahead: f32_panel_rows(xd, w, out, m0, m1)
    return lambda xd, w, out, m0, m1, ahead: float_rows(xd, w, out, m0, m1)


@inline
def _gemv_chunk(xd, w, b, out, c, R, then, stream, ahead):   # chunk c (R rows) of out = x . w^T + b, then: BIAS, GELU or RESIDUAL (into stream)
    """xd: the inputs from region_inputs; ahead: bf16's hint distance (bytes)."""
    m0, m1 = c * R, min(c * R + R, out.shape[1])
    weight_rows(xd, w, out, m0, m1, ahead)
    for m in range(m0, m1):
        for n in range(out.shape[0]):
            v = out[n, m] if b is None else out[n, m] + b[m]
            if then == RESIDUAL:
                stream[n, m] += v
            elif then == GELU:
                out[n, m] = _gelu(v)
            else:
                out[n, m] = v


@inline
def _weight(kind, layer):                                  # the layer's GEMV weight of kernel `kind` (for the others, any)
    return layer[2] if kind == QKV else layer[4] if kind == PROJ else layer[8] if kind == FC else layer[10]


@inline
def _chunks(kind, layer, head, B, chunk_bytes):            # how many chunks kernel `kind` (attention or a GEMV) is cut into, and a GEMV chunk's rows
    """The head apart from the layer's weights: it may be laid out otherwise (float32: wte's rows, the layers'
    weights panels)."""
    if kind == HEAD:
        R = chunk_rows(head, chunk_bytes)
        return -(-weight_count(head) // R), R
    w = _weight(kind, layer)
    R = chunk_rows(w, chunk_bytes)
    if kind == ATTEND:
        return B * layer[12].shape[1], R
    return -(-weight_count(w) // R), R


@serial
def _kernels(x, h, bufs, layer, ln_f, head, lengths, scale, eps, chunk_bytes, ahead, sync, parts, me, phase, last):   # one thread's share of a layer's kernels
    """A layer's kernels (or, if last, the final LayerNorm and the head), counted in `sync` from kernel
    number `phase` on: claim chunks (thread `me` of `parts`, decode._claim) until none is left, then wait
    until every chunk is done. A LayerNorm is no kernel of its own: each thread normalizes all B rows into its own h (B x C, microseconds) before
    the GEMV that reads them, so no thread waits at a barrier for one row (its counters stay unused). Its
    own function, compiled once per weight format: a step's worker that held it would compile again for
    every layer count. A layer's four GEMVs share one call site (five inlined copies compiled for 46 s, one for 20)."""
    a, qkv, g, y, logits = bufs
    ln_1w, ln_1b, _, b_attn, _, b_proj, ln_2w, ln_2b, _, b_fc, _, b_fcp, k, v = layer
    B = x.shape[0]
    for j in range(2 if last else 7):
        kind = LN_F + j if last else j
        if kind == LN_1 or kind == LN_2 or kind == LN_F:   # x is whole: the barrier after the last GEMV into it passed
            layer_norm_rows(x, ln_1w if kind == LN_1 else ln_2w if kind == LN_2 else ln_f[0],
                            ln_1b if kind == LN_1 else ln_2b if kind == LN_2 else ln_f[1], eps, h)
            phase += 1
            continue
        n, R = _chunks(kind, layer, head, B, chunk_bytes)
        w, src = _weight(kind, layer), a if kind == PROJ else g if kind == FC_PROJ else h   # a GEMV's weight (the head's below) and inputs
        bias = b_attn if kind == QKV else b_proj if kind == PROJ else b_fc if kind == FC else b_fcp   # (not the head's)
        out = qkv if kind == QKV else g if kind == FC else logits if kind == HEAD else y
        then = RESIDUAL if kind == PROJ or kind == FC_PROJ else GELU if kind == FC else BIAS
        xd = region_inputs(src if kind in GEMVS else src[:0], w)   # (bf16: this thread's own copy; the head's as its layers')
        at = (parts + 1) * LINE * phase                    # this kernel's counters: claimed per part, then done
        q = 0
        while q < parts:
            c = _claim(sync, at, parts, me, n, q)
            if c < 0:                                      # this part is all claimed: the next one
                q += 1
                continue
            if kind == ATTEND:
                attend_task(qkv, k, v, lengths, scale, a, c)
            elif kind == HEAD:
                _gemv_chunk(xd, head, None, logits, c, R, BIAS, x, ahead)
            else:                                          # one call site for a layer's four GEMVs: each inlined
                _gemv_chunk(xd, w, bias, out, c, R, then, x, ahead)   # copy took seconds to compile
            atomic_add(sync, at + parts * LINE, 1)
        while atomic_read(sync, at + parts * LINE) < n:
            spin_pause()
        phase += 1


@serial
def _step_worker(x, bufs, layers, ln_f, head, lengths, scale, eps, chunk_bytes, ahead, sync, parts):   # one thread's share of a decode step
    me = atomic_add(sync, sync.shape[0] - 1, 1) % parts     # which part of each kernel's chunks this thread starts on
    h = np.empty_like(x)                                   # this thread's LayerNorm output, a GEMV's inputs
    for l in range(len(layers)):
        _kernels(x, h, bufs, layers[l], ln_f, head, lengths, scale, eps, chunk_bytes, ahead, sync, parts, me, 7 * l, False)
    _kernels(x, h, bufs, layers[-1], ln_f, head, lengths, scale, eps, chunk_bytes, ahead, sync, parts, me, 7 * len(layers), True)   # (reads no layer)


def fused_step(x, bufs, layers, ln_f, head, lengths, scale, eps, chunk_bytes, ahead=0):   # x [B, C] (the stream, in place) -> bufs' logits [B, V]
    """layers: per layer (ln_1 w, b, c_attn w rows, b, attn c_proj w rows, b, ln_2 w, b, c_fc w rows, b,
    mlp c_proj w rows, b, cache keys, values); bufs: scratch (a [B, C], qkv [B, 3C], g [B, 4C], y [B, C])
    and the logits [B, V]; ahead: bf16's hint distance in bytes (rows and panels). Every kernel's chunks, then a barrier, on
    all threads. (A numba parallel region cannot take tuples of arrays: the workers run nogil on the pool's
    Python threads, jit.team.)"""
    parts = numba.get_num_threads()                        # a part of each kernel's chunks per thread
    sync = np.zeros((parts + 1) * LINE * (7 * len(layers) + 2) + 1, dtype=np.int64)   # per kernel: claimed per part, done; threads
    team(_step_worker, x, bufs, layers, ln_f, head, lengths, scale, eps, chunk_bytes, ahead, sync, parts)


def _region_weight(w):                                     # a prepared weight as fused_step reads it (float32, bf16 bits or panels), or None
    if isinstance(w, np.ndarray):
        return w
    return w.bits if isinstance(w, quant.BF16) else w.panels if isinstance(w, (quant.BF16Panels, quant.F32Panels)) else None


def one_region(params, cache):                             # (fused_step's layers, head), or None: int8/int4 weights run kernel by kernel
    layers = []
    for i, layer in enumerate(params["h"]):
        attn, mlp, kv = layer["attn"], layer["mlp"], cache.layer(i)
        ws = [_region_weight(p["weight_t"]) for p in (attn["c_attn"], attn["c_proj"], mlp["c_fc"], mlp["c_proj"])]
        if any(w is None for w in ws):
            return None
        layers.append((layer["ln_1"]["weight"], layer["ln_1"]["bias"], ws[0], attn["c_attn"]["bias"], ws[1], attn["c_proj"]["bias"],
                       layer["ln_2"]["weight"], layer["ln_2"]["bias"], ws[2], mlp["c_fc"]["bias"], ws[3], mlp["c_proj"]["bias"], kv.k, kv.v))
    head = _region_weight(params["lm_head"]["weight"])
    kinds = {tuple((a.dtype, a.ndim, a.flags.c_contiguous) for a in layer) for layer in layers}   # one compiled layer for all
    if head is None or not head.flags.c_contiguous or len(kinds) != 1 or {layers[0][i].dtype for i in (2, 4, 8, 10)} != {head.dtype}:
        return None                                        # (a hand-built dict mixing float32 and bf16, say)
    return tuple(layers), head


def is_step(ids, cache):                                   # a [B, 1] step on a cache of B rows, decode-sized
    return (cache is not None and isinstance(ids, np.ndarray) and ids.ndim == 2 and ids.shape[1] == 1
            and ids.shape[0] <= DECODE_ROWS)


def layer_tail(x, a, layer, eps, h):                       # a layer past its attention, on rows: x [B, C] += ..., in place
    """a: attention's output [B, C]; h: scratch [B, C]. The projection into the stream, LayerNorm, the
    MLP's two GEMVs (GELU in the first, the second adding into the stream): kernel by kernel (step's
    int8 and int4 path, and prefill's last block on each row's last position)."""
    attn, mlp = layer["attn"], layer["mlp"]
    x += matmul_rows(a, attn["c_proj"]["weight_t"], attn["c_proj"]["bias"])
    layer_norm_rows(x, layer["ln_2"]["weight"], layer["ln_2"]["bias"], eps, h)
    g = matmul_rows(h, mlp["c_fc"]["weight_t"], mlp["c_fc"]["bias"], gelu=True)   # [B, 4C], GELU in the GEMV
    x += matmul_rows(g, mlp["c_proj"]["weight_t"], mlp["c_proj"]["bias"])


def step(params, ids, cfg, cache):                         # [B, 1] ids, KVCache of B rows -> logits [B, 1, V]
    cache.check(cfg)
    ids, _ = check_ids(ids, cfg, past=int(cache.lengths.max()), batch=cache.batch)
    lengths = np.ascontiguousarray(cache.lengths)
    x = params["wte"]["weight"][ids[:, 0]] + params["wpe"]["weight"][lengths]      # [B, C]
    B, C = x.shape
    scale = np.float32(1.0 / math.sqrt(cfg.head_dim))
    plan = one_region(params, cache)
    if plan is not None:
        layers, head = plan
        bufs = (np.empty((B, C), np.float32), np.empty((B, 3 * C), np.float32),
                np.empty((B, 4 * C), np.float32), np.empty((B, C), np.float32), np.empty((B, params["lm_head"]["weight"].shape[0]), np.float32))
        fused_step(x, bufs, layers, (params["ln_f"]["weight"], params["ln_f"]["bias"]), head, lengths, scale,
                   np.float32(cfg.eps), CHUNK_BYTES, 0 if head.dtype == np.float32 else STREAM_AHEAD)   # (bf16 only: see matmul)
        cache.advance(1)
        return bufs[-1][:, None]
    h, a = np.empty_like(x), np.empty_like(x)
    for i, layer in enumerate(params["h"]):
        kv, attn = cache.layer(i), layer["attn"]
        layer_norm_rows(x, layer["ln_1"]["weight"], layer["ln_1"]["bias"], cfg.eps, h)
        attend_step(matmul_rows(h, attn["c_attn"]["weight_t"], attn["c_attn"]["bias"]), kv.k, kv.v, lengths, scale, a)
        layer_tail(x, a, layer, cfg.eps, h)
    cache.advance(1)
    layer_norm_rows(x, params["ln_f"]["weight"], params["ln_f"]["bias"], cfg.eps, h)
    return matmul_rows(h, params["lm_head"]["weight"])[:, None]


def forward_packed(params, cache, groups, cfg, ops):       # npgpt.model.forward_packed; one group of steps fused
    if len(groups) == 1 and is_step(groups[0][1], cache):
        start, ids = groups[0]
        if 0 <= start and start + ids.shape[0] <= cache.batch:   # else the spec names what is wrong
            return step(params, ids, cfg, cache.rows(start, start + ids.shape[0]))[:, 0]
    return spec_forward_packed(params, cache, groups, cfg, ops=ops)
