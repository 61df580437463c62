"""Checks on what users hand the model, so bad input fails here with a message, not deep in NumPy."""

import math
import numbers

import numpy as np

from .errors import InputError


def check_ids(ids, cfg, *, past=0, batch=None):            # [T] or [B, T] -> ([B, T] int64, was_1d)
    """Token ids as a [B, T] integer array, after checking dtype, range and context length."""
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as e:                   # ragged lists
        raise InputError(f"token ids must form a [T] or [B, T] array of integers: {e}") from None
    if arr.ndim not in (1, 2):
        raise InputError(f"token ids must be [T] or [B, T]; got an array of shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"token ids must be integers; got dtype {arr.dtype}")
    arr2 = arr.reshape(1, -1) if arr.ndim == 1 else arr
    B, T = arr2.shape
    if T == 0 or B == 0:
        raise InputError("empty input: at least one token id is needed")
    low, high = int(arr2.min()), int(arr2.max())
    if low < 0 or high >= cfg.n_vocab:
        bad = low if low < 0 else high
        where = tuple(int(i) for i in np.argwhere(arr2 == bad)[0])
        raise InputError(f"token id {bad} at position {where[1]} (row {where[0]}) is outside the vocabulary [0, {cfg.n_vocab})")
    if past + T > cfg.n_ctx:
        raise InputError(f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds the context of {cfg.n_ctx}")
    if batch is not None and B != batch:
        raise InputError(f"input has batch size {B} but the KV cache was made for batch size {batch}")
    return arr2.astype(np.int64, copy=False), arr.ndim == 1


def check_sampling(temperature, top_k, top_p):
    """Raise InputError unless temperature >= 0, integer top_k >= 0 (0 = off), 0 < top_p <= 1."""
    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy); got {temperature!r}")
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
        raise InputError(f"top_k must be an integer >= 0 (0 = no limit); got {top_k!r}")
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1]; got {top_p!r}")


def check_count(name, value):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise InputError(f"{name} must be an integer >= 0; got {value!r}")
    return int(value)


def check_seed(seed):
    """None (fresh entropy) or an integer >= 0, as np.random.default_rng takes it."""
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0):
        raise InputError(f"seed must be an integer >= 0 or None; got {seed!r}")
    return seed
