"""Perplexity over a long text with a sliding window, as Hugging Face documents it: windows of `ctx`
tokens advance by `stride`; each token is scored once, in the first window where it is among the
new tokens, so it sees up to ctx - stride tokens of left context (more at the text's start)."""

import math

import numpy as np

from .errors import InputError
from .model import cross_entropy


def perplexity(model, ids, ctx=1024, stride=512, progress=None):   # [N] ids -> {"nll", "ppl", "tokens"}
    ids = np.asarray(ids)
    N = ids.shape[0]
    if ids.ndim != 1 or N < 2:
        raise InputError(f"perplexity needs a 1-D sequence of at least 2 tokens; got shape {ids.shape}")
    if not 1 <= ctx <= model.config.n_ctx:
        raise InputError(f"--ctx {ctx} must be between 1 and the model's context {model.config.n_ctx}")
    if not 1 <= stride <= ctx:
        raise InputError(f"--stride {stride} must be between 1 and ctx={ctx}")
    total, scored, prev_end = 0.0, 0, 0
    for begin in range(0, N, stride):
        end = min(begin + ctx, N)
        window = ids[begin:end]
        first = max(prev_end - begin, 1)                   # window positions whose token is new (position 0 has no context)
        logits = model.forward(window[None], last=False)[0]                       # [end - begin, V]
        nll = cross_entropy(logits[first - 1 : -1], window[first:])              # predicts window[first:]
        total += float(nll.sum())
        scored += nll.shape[0]
        prev_end = end
        if progress:
            progress(end, N)
        if end == N:
            break
    mean = total / scored
    return {"nll": mean, "ppl": math.exp(mean), "tokens": scored}
