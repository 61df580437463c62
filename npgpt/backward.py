"""GPT-2's gradient, the specification: the backward of every op in npgpt.model, in its names and shapes.

How the backward gets the forward's values: recorded, not recomputed. The forward runs once, exactly as
written in npgpt.model, with an op table whose every op first writes its tensor inputs on a tape
(`recording`). The backward reads the tape: per block the inputs of its eight op calls, then those of
ln_f and the head. Recording costs memory (~16 x B*T*C floats per layer, as PyTorch keeps) but no
second forward; the forward's math is never written twice. One exception, for memory: attention
recomputes its probabilities [B, H, T, S] from the recorded q and k (via the forward's own
`attention_weights`) instead of keeping them for every layer. Dropout masks are not on the tape: the
forward's Dropout keeps every mask it draws, and the backward multiplies by the same masks.

Gradients come back flat, keyed by the checkpoint's tensor names (no prefix), in the checkpoint's
layout and float32. A head tied to wte adds its gradient into "wte.weight".
"""

import math
from typing import Callable, NamedTuple

import numpy as np

from .errors import InputError
from .model import Dropout, Ops, attention_weights, dropout, forward, softmax

BLOCK_CALLS = 8                                            # model.block calls, in order: ln_1, c_attn, attention,
                                                           # c_proj, ln_2, c_fc, gelu, c_proj


def layer_norm_backward(dout, x, weight, bias, eps):       # [..., C] x2, [C] x2 -> dx [..., C], dweight [C], dbias [C]
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd                                # the normalized input the gain multiplied
    dxhat = dout * weight                                  # back through the gain
    # back through the normalization: the mean and the variance depend on every element of the row
    dx = (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)) * rstd
    rows = dout.reshape(-1, x.shape[-1])
    return dx, (rows * xhat.reshape(rows.shape)).sum(axis=0), rows.sum(axis=0)


def linear_backward(dout, x, weight, bias):                # [..., out], [..., in], [in, out], [out] -> dx, dweight [in, out], dbias [out]
    d2, x2 = dout.reshape(-1, dout.shape[-1]), x.reshape(-1, x.shape[-1])
    return dout @ weight.T, x2.T @ d2, d2.sum(axis=0)


def gelu_backward(dout, x):                                # [...] x2 -> dx: d/dx of 0.5 x (1 + tanh(u)), u = sqrt(2/pi)(x + 0.044715 x^3)
    c = math.sqrt(2.0 / math.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x))


def attention_backward(dout, q, k, v, mask=None):          # [B, H, T, D] x2, [B, H, S, D] x2 (, mask [B, H, T, S]) -> dq, dk, dv
    p = attention_weights(q, k)                            # [B, H, T, S], recomputed (see the module docstring)
    dv = np.einsum("bhts,bhtd->bhsd", dropout(p, mask), dout, optimize=True)
    dp = dropout(np.einsum("bhtd,bhsd->bhts", dout, v, optimize=True), mask)   # back through dropout: the same mask
    # softmax backward: each row's probabilities move together; masked positions have p = 0 and stay 0
    dscores = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) / math.sqrt(q.shape[-1])
    return (np.einsum("bhts,bhsd->bhtd", dscores, k, optimize=True),
            np.einsum("bhts,bhtd->bhsd", dscores, q, optimize=True), dv)


def lm_head_backward(dout, x, weight):                     # [..., V], [..., C], [V, C] -> dx [..., C], dweight [V, C]
    d2, x2 = dout.reshape(-1, dout.shape[-1]), x.reshape(-1, x.shape[-1])
    return dout @ weight, d2.T @ x2


def cross_entropy_backward(logits, targets):               # [N, V], [N] ids (-1: not scored) -> (mean loss, dlogits [N, V])
    """The mean next-token cross-entropy over the scored rows and its gradient, softmax - one-hot, / rows."""
    scored = targets >= 0
    n = int(scored.sum())
    z = logits.astype(np.float64)[scored]                  # the loss in float64, as npgpt.model.cross_entropy
    peak = z.max(axis=-1)
    loss = float((np.log(np.exp(z - peak[:, None]).sum(axis=-1)) + peak - z[np.arange(n), targets[scored]]).mean())
    dlogits = softmax(logits)                              # [N, V] float32
    dlogits[np.flatnonzero(scored), targets[scored]] -= 1.0
    dlogits *= np.where(scored, np.float32(1.0 / n), np.float32(0.0))[:, None]
    return loss, dlogits


class BackwardOps(NamedTuple):
    """The backward of each op a backend supplies, with the argument names of its forward."""

    layer_norm: Callable
    linear: Callable
    gelu: Callable
    attention: Callable
    lm_head: Callable
    cross_entropy: Callable


SPEC = BackwardOps(layer_norm=layer_norm_backward, linear=linear_backward, gelu=gelu_backward,
                   attention=attention_backward, lm_head=lm_head_backward, cross_entropy=cross_entropy_backward)


def recording(ops, tape, skip=0):                         # Ops -> the same Ops, each first appending its tensor inputs to tape
    """skip: the first `skip` calls run unrecorded (frozen blocks a backward will not reach)."""
    calls = [0]

    def record(fn):
        def op(*tensors, **params):
            if calls[0] >= skip:
                tape.append(tensors)
            calls[0] += 1
            return fn(*tensors, **params)
        return op
    return Ops(*(record(fn) for fn in ops))


def heads(x, n_head):                                      # [B, T, C] -> [B, H, T, D]: the inverse of model.merge_heads
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def join_qkv(dq, dk, dv):                                  # 3 x [B, H, T, D] -> [B, T, 3C]: the inverse of model.split_heads
    B, H, T, D = dq.shape
    return np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * D)


def block_backward(dout, calls, masks, ln_1, attn, ln_2, mlp, *, n_head, eps, backward=SPEC):   # [B, T, C] -> dx [B, T, C], grads
    """model.block in reverse. calls: the tensors its 8 op calls recorded, in forward order; masks: its
    3 dropout masks (attention, then the two residual branches), None where off."""
    (x,), (h1,), (q, k, v), (a,), (x1,), (h2,), (f,), (g,) = calls
    attn_mask, attn_out_mask, mlp_out_mask = masks
    grads = {}
    dg, grads["mlp.c_proj.weight"], grads["mlp.c_proj.bias"] = backward.linear(dropout(dout, mlp_out_mask), g, **mlp["c_proj"])
    dh2, grads["mlp.c_fc.weight"], grads["mlp.c_fc.bias"] = backward.linear(backward.gelu(dg, f), h2, **mlp["c_fc"])
    dx1, grads["ln_2.weight"], grads["ln_2.bias"] = backward.layer_norm(dh2, x1, **ln_2, eps=eps)
    dx1 += dout                                            # the residual: x1 also reaches the block's output directly
    da, grads["attn.c_proj.weight"], grads["attn.c_proj.bias"] = backward.linear(dropout(dx1, attn_out_mask), a, **attn["c_proj"])
    dq, dk, dv = backward.attention(heads(da, n_head), q, k, v, mask=attn_mask)
    dh1, grads["attn.c_attn.weight"], grads["attn.c_attn.bias"] = backward.linear(join_qkv(dq, dk, dv), h1, **attn["c_attn"])
    dx, grads["ln_1.weight"], grads["ln_1.bias"] = backward.layer_norm(dh1, x, **ln_1, eps=eps)
    return dx + dx1, grads                                 # the residual again: x reaches x1 directly


def embedding_backward(dx, ids, n_vocab, n_ctx):           # [B, T, C], [B, T] -> dwte [V, C], dwpe [n_ctx, C]
    C = dx.shape[-1]
    dwte = np.zeros((n_vocab, C), np.float32)
    np.add.at(dwte, ids.ravel(), dx.reshape(-1, C))        # a token used twice gets both rows' gradients
    dwpe = np.zeros((n_ctx, C), np.float32)
    dwpe[: ids.shape[1]] = dx.sum(axis=0)                  # positions 0..T-1 of every row
    return dwte, dwpe


def value_and_grad(params, ids, targets, cfg, ops, backward=SPEC, drop=None):   # [B, T] ids and targets -> (loss, grads)
    """Mean cross-entropy of predicting targets[b, t] at position t (-1: not scored), and its gradient
    with respect to every parameter. ids and targets must already be checked [B, T] int64 arrays.
    drop: a fresh model.Dropout to train with dropout (its masks are drawn in this forward)."""
    tape = []
    drop = Dropout() if drop is None else drop             # probabilities 0: every mask None
    logits = forward(params, ids, cfg, ops=recording(ops, tape), drop=drop)    # [B, T, V]
    B, T, V = logits.shape
    loss, dlogits = backward.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T))
    del logits                                             # at most one [B*T, V] buffer at a time
    (xf,), (hf,) = tape.pop(-2), tape.pop()                # the inputs of ln_f and of the head
    grads = {}
    dx, grads["lm_head.weight"] = backward.lm_head(dlogits.reshape(B, T, V), hf, **params["lm_head"])
    del dlogits
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = backward.layer_norm(dx, xf, **params["ln_f"], eps=cfg.eps)
    grads.update(transformer_backward(dx, tape, drop.masks, params, ids, cfg, backward))
    if params["lm_head"]["weight"] is params["wte"]["weight"]:
        grads["wte.weight"] += grads.pop("lm_head.weight")   # tied: the head is wte, so its gradient is wte's too
    return loss, {name: np.ascontiguousarray(g, dtype=np.float32) for name, g in grads.items()}


def transformer_backward(dx, tape, masks, params, ids, cfg, backward=SPEC, first=0, embeddings=True):   # [B, T, C] -> grads
    """model.transformer in reverse, from dx (the gradient at the last block's output) down to block
    `first`, then into the embeddings (with `embeddings`; needs first == 0). tape: the op calls of blocks first.. in forward
    order (emptied as it goes); masks: the forward's Dropout.masks (embeddings, then 3 per block)."""
    embd_mask, *masks = masks
    blocks = [tape[i : i + BLOCK_CALLS] for i in range(0, (cfg.n_layer - first) * BLOCK_CALLS, BLOCK_CALLS)]
    tape.clear()                                           # blocks.pop() below then frees each record once used
    grads = {}
    for i in reversed(range(first, cfg.n_layer)):
        dx, block_grads = block_backward(dx, blocks.pop(), masks[3 * i : 3 * i + 3], **params["h"][i], n_head=cfg.n_head,
                                         eps=cfg.eps, backward=backward)
        grads.update({f"h.{i}.{name}": g for name, g in block_grads.items()})
    if embeddings:
        assert first == 0, "the embeddings' gradient needs every block's"
        grads["wte.weight"], grads["wpe.weight"] = embedding_backward(dropout(dx, embd_mask), ids, cfg.n_vocab, cfg.n_ctx)
    return grads


def check_targets(targets, ids, cfg):                      # [B, T] -> int64 [B, T]; -1 marks positions not scored
    t = np.asarray(targets)
    if t.shape != ids.shape or (t.size and not np.issubdtype(t.dtype, np.integer)):
        raise InputError(f"targets must be integer ids of the inputs' shape {ids.shape}; got {t.dtype} {t.shape}")
    if t.min() < -1 or t.max() >= cfg.n_vocab:
        raise InputError(f"targets must be ids in [0, {cfg.n_vocab}) or -1 (not scored); got {int(t.min())}..{int(t.max())}")
    if not (t >= 0).any():
        raise InputError("no position has a target: nothing to learn from")
    return t.astype(np.int64)
