"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus)."""

import numpy as np

from .errors import InputError
from .inputs import check_sampling
from .model import softmax


def sample(logits, rng, temperature=1.0, top_k=0, top_p=1.0):   # [B, V] logits -> [B] token ids
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off. Filters apply in HF's order."""
    check_sampling(temperature, top_k, top_p)
    if not np.isfinite(logits).all():                      # NaN would make argmax and the draw pick token 0 silently
        row = int(np.argwhere(~np.isfinite(logits))[0][0])
        raise InputError(f"the model's logits are not finite (NaN or inf) in row {row}: broken weights or inputs")
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64)                          # float64: tiny probabilities survive the cumsum
    with np.errstate(over="ignore"):                       # max first: at a tiny temperature the argmax stays 0 and
        z = (z - z.max(axis=-1, keepdims=True)) / temperature   # the rest go to -inf, instead of inf - inf = NaN
    if 0 < top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k, None]
        z = np.where(z < kth, -np.inf, z)
    p = softmax(z)
    if top_p < 1:                                          # keep the most likely tokens until their mass reaches top_p
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        keep = np.empty_like(sorted_p, dtype=bool)
        np.put_along_axis(keep, order, np.cumsum(sorted_p, axis=-1) - sorted_p < top_p, axis=-1)
        p = np.where(keep, p, 0.0)
    cdf = np.cumsum(p, axis=-1)                            # inverse-CDF draw; zero-probability tokens are never hit
    u = rng.random(cdf.shape[0]) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(axis=-1), cdf.shape[-1] - 1)
