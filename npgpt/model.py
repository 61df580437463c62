"""GPT-2, the specification: every operation the model performs, as NumPy over a weight dict.

`params` mirrors the Hugging Face checkpoint: params["h"][3]["attn"]["c_attn"]["weight"] is the
tensor `h.3.attn.c_attn.weight`. Linear weights use HF's Conv1D layout, `x @ W + b` with W [in, out].
The hot operations are looked up in an op table (`ops`), so the same block structure runs on the
NumPy reference below or on the numba kernels in `kernels/`.
"""

import math
from typing import Callable, NamedTuple

import numpy as np

from .cache import Packed, PackedLayer
from .inputs import check_ids
from .quant import activations, dequantize


def layer_norm(x, weight, bias, eps):                      # [..., C], [C], [C] -> [..., C]
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x):                                               # [...] -> [...], tanh form (HF gelu_new)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):                                            # [..., S] -> [..., S]
    e = np.exp(x - x.max(axis=-1, keepdims=True))          # shifting by the max keeps exp finite
    return e / e.sum(axis=-1, keepdims=True)


def linear(x, weight, bias):                               # [..., in], [in, out], [out] -> [..., out]
    return activations(x, weight) @ dequantize(weight) + bias   # inputs rounded as the format says (npgpt.quant); weights as float32


def causal_mask(T, S, lengths=None):                       # -> [T, S], or [B, 1, T, S] for rows of their own lengths [B]
    """0 where a query may look, -inf elsewhere. The T queries are the last T positions of each row's
    length (all S without lengths): query t of a row of length n sees keys 0 .. n - T + t."""
    if lengths is None:
        return np.triu(np.full((T, S), -np.inf, dtype=np.float32), k=S - T + 1)
    last_seen = np.asarray(lengths)[:, None, None, None] - T + np.arange(T)[:, None]   # [B, 1, T, 1]
    return np.where(np.arange(S) <= last_seen, np.float32(0.0), np.float32(-np.inf))


def attention_weights(q, k, lengths=None):                 # [B, H, T, D], [B, H, S, D] (, [B]) -> [B, H, T, S], rows sum to 1
    scores = np.einsum("bhtd,bhsd->bhts", q, k, optimize=True) / math.sqrt(q.shape[-1])
    return softmax(scores + causal_mask(q.shape[2], k.shape[2], lengths))


def dropout(x, mask):                                      # [...], None or a mask [...] -> [...]
    return x if mask is None else x * mask


def attention(q, k, v, mask=None, lengths=None):           # [B, H, T, D], [B, H, S, D] x2 -> [B, H, T, D]
    """mask: dropout on the probabilities [B, H, T, S] (training). lengths [B]: each row's own length
    (keys beyond it are not the row's and get no weight); None: every row holds all S."""
    return np.einsum("bhts,bhsd->bhtd", dropout(attention_weights(q, k, lengths), mask), v, optimize=True)


def lm_head(x, weight):                                    # [..., C], [V, C] -> [..., V]
    return activations(x, weight) @ dequantize(weight).T


def cross_entropy(logits, targets):                        # [..., V], [...] ids -> [...] nats
    z = logits.astype(np.float64)                          # float64: a 50257-way log-sum-exp loses digits in float32
    peak = z.max(axis=-1, keepdims=True)
    log_total = np.log(np.exp(z - peak).sum(axis=-1)) + peak[..., 0]
    return log_total - np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]


class Dropout:
    """GPT-2's dropout, for training: embd_pdrop (on the embeddings' sum), attn_pdrop (on the attention
    probabilities), resid_pdrop (on each block's two outputs before they join the residual stream).
    A mask holds 0 where an element is dropped (probability p) and 1/(1-p) where it is kept, so the
    expectation is unchanged. Every mask drawn is kept in `masks`, in forward order: 1 + 3 per block
    (None where p is 0), for the backward pass."""

    def __init__(self, embd=0.0, attn=0.0, resid=0.0, rng=None):
        self.embd, self.attn, self.resid, self.rng = embd, attn, resid, rng
        self.masks = []

    def mask(self, p, shape):                              # -> None (p = 0) or float32 [shape]
        m = None if p == 0 else (self.rng.random(shape, dtype=np.float32) >= p) * np.float32(1.0 / (1.0 - p))
        self.masks.append(m)
        return m


class _NoDropout(Dropout):                                 # inference: no masks, nothing kept
    def mask(self, p, shape):
        return None


NO_DROPOUT = _NoDropout()


class Ops(NamedTuple):
    """The operations a backend supplies; each has the call shape of the function named here."""

    layer_norm: Callable
    linear: Callable
    gelu: Callable
    attention: Callable
    lm_head: Callable


REFERENCE = Ops(layer_norm=layer_norm, linear=linear, gelu=gelu, attention=attention, lm_head=lm_head)


def split_heads(qkv, n_head):                              # [B, T, 3C] -> [3, B, H, T, C/H]: q, k, v
    B, T, C3 = qkv.shape
    return qkv.reshape(B, T, 3, n_head, C3 // (3 * n_head)).transpose(2, 0, 3, 1, 4)


def merge_heads(x):                                        # [B, H, T, D] -> [B, T, H*D]
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def self_attention(x, c_attn, c_proj, *, n_head, ops, kv=None, drop=NO_DROPOUT):   # [B, T, C] -> [B, T, C]
    q, k, v = split_heads(ops.linear(x, **c_attn), n_head)        # [B, T, 3C] -> 3 x [B, H, T, D]
    if isinstance(kv, PackedLayer):                               # rows packed as one sequence: each group in its rows
        return ops.linear(merge_heads(kv.attend(q, k, v, ops.attention)), **c_proj)
    lengths = None
    if kv is not None:
        k, v, lengths = kv.append(k, v)                           # 2 x [B, H, longest past + T, D], [B] row lengths
    a = ops.attention(q, k, v, mask=drop.mask(drop.attn, q.shape[:3] + k.shape[2:3]), lengths=lengths)
    return ops.linear(merge_heads(a), **c_proj)


def feed_forward(x, c_fc, c_proj, *, ops):                 # [B, T, C] -> [B, T, C]  (HF: GPT2MLP)
    return ops.linear(ops.gelu(ops.linear(x, **c_fc)), **c_proj)   # [B, T, 4C] in between


def block(x, ln_1, attn, ln_2, mlp, *, n_head, eps, ops, kv=None, drop=NO_DROPOUT):   # [B, T, C] -> [B, T, C]
    a = self_attention(ops.layer_norm(x, **ln_1, eps=eps), **attn, n_head=n_head, ops=ops, kv=kv, drop=drop)
    x = x + dropout(a, drop.mask(drop.resid, x.shape))
    m = feed_forward(ops.layer_norm(x, **ln_2, eps=eps), **mlp, ops=ops)
    x = x + dropout(m, drop.mask(drop.resid, x.shape))
    return x


def transformer(params, ids, cfg, ops=REFERENCE, cache=None, drop=NO_DROPOUT):   # [T] or [B, T] ids -> ([B, T, C], one_sequence)
    """Embeddings and every block: the last block's output, before the final LayerNorm (HF: GPT2Model
    without ln_f). With a KVCache, `ids` continue the sequence the cache holds."""
    if cache is not None:
        cache.check(cfg)                                   # another model's cache: a clear error, not a NumPy one
    past = np.zeros(1, np.int64) if cache is None else cache.lengths                            # [B] (or [1]) per row
    ids, one_sequence = check_ids(ids, cfg, past=int(past.max()), batch=None if cache is None else cache.batch)   # [B, T]
    positions = past[:, None] + np.arange(ids.shape[1])                                        # [B, T]: each row goes on from its own length
    x = params["wte"]["weight"][ids] + params["wpe"]["weight"][positions]                      # [B, T, C]
    x = dropout(x, drop.mask(drop.embd, x.shape))
    for i, layer in enumerate(params["h"]):
        x = block(x, **layer, n_head=cfg.n_head, eps=cfg.eps, ops=ops, kv=None if cache is None else cache.layer(i), drop=drop)
    if cache is not None:
        cache.advance(ids.shape[1])
    return x, one_sequence


def forward(params, ids, cfg, ops=REFERENCE, cache=None, last=False, drop=NO_DROPOUT):   # [T] or [B, T] ids -> [T, V] or [B, T, V]
    """Logits for every position (only the last one if `last`, all generation needs).
    With a KVCache, `ids` continue the sequence the cache holds. `drop`: a Dropout, for training."""
    x, one_sequence = transformer(params, ids, cfg, ops=ops, cache=cache, drop=drop)
    if last:
        x = x[:, -1:]                                                                         # [B, 1, C]
    logits = ops.lm_head(ops.layer_norm(x, **params["ln_f"], eps=cfg.eps), **params["lm_head"])   # [B, T, V]
    return logits[0] if one_sequence else logits


def forward_packed(params, cache, groups, cfg, ops=REFERENCE):   # [(first row, [B, T] ids)] -> [rows, V]
    """Several groups of a cache's rows advanced in one pass: group (start, ids [B, T]) adds T tokens to
    each of rows start..start+B-1. Returns each row's last-position logits, group by group: what
    forward(ids, cache.rows(start, start + B), last=True) gives each group alone. Token-wise work runs
    once over all the groups' tokens (npgpt.cache.Packed), so a prompt's prefill and other rows' next
    tokens share the linear layers' passes over the weights."""
    cache.check(cfg)
    checked = [check_ids(ids, cfg)[0] for _, ids in groups]                              # each [B, T]
    packed = Packed(cache, [(start, *ids.shape) for (start, _), ids in zip(groups, checked)])   # rows of the cache, distinct
    for (start, _), ids in zip(groups, checked):                                          # each row's past + T fits the context
        check_ids(ids, cfg, past=int(cache.lengths[start : start + len(ids)].max()))
    ids = np.concatenate([ids.ravel() for ids in checked])                                # [N]: group by group, row by row
    x = (params["wte"]["weight"][ids] + params["wpe"]["weight"][packed.positions()])[None]   # [1, N, C]
    for i, layer in enumerate(params["h"]):
        x = block(x, **layer, n_head=cfg.n_head, eps=cfg.eps, ops=ops, kv=packed.layer(i))
    packed.advance()
    x = x[:, packed.last()]                                                               # [1, rows, C]
    return ops.lm_head(ops.layer_norm(x, **params["ln_f"], eps=cfg.eps), **params["lm_head"])[0]
