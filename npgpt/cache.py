"""KV cache: keys and values of every past position, so decoding a token costs one position's work."""

import numpy as np

from .errors import InputError


def cache_shape(cfg):                                      # what a cache depends on: another model with these fits it
    return {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "head_dim": cfg.head_dim, "n_ctx": cfg.n_ctx}


class KVCache:
    """Preallocated [B, H, n_ctx, D] key and value buffers per layer, and how many positions are filled."""

    def __init__(self, cfg, batch=1):
        shape = (batch, cfg.n_head, cfg.n_ctx, cfg.head_dim)
        self.batch = batch
        self.pos = 0
        self.shape = cache_shape(cfg)
        self._layers = [LayerCache(self, np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(cfg.n_layer)]

    def check(self, cfg):
        """A cache belongs to models of one shape; another model's cache would fail deep in NumPy."""
        want = cache_shape(cfg)
        if want != self.shape:
            diff = ", ".join(f"{k} {self.shape[k]} (model: {want[k]})" for k in want if want[k] != self.shape[k])
            raise InputError(f"this KV cache was made for another model: {diff}; make one with model.new_cache()")

    def layer(self, i):
        return self._layers[i]

    def advance(self, n):
        """Called by forward once every layer has appended its n new positions."""
        self.pos += n


class LayerCache:
    def __init__(self, owner, k, v):
        self.owner, self.k, self.v = owner, k, v

    def append(self, k, v):                                # [B, H, T, D] x2 -> [B, H, pos + T, D] x2 (views)
        start, end = self.owner.pos, self.owner.pos + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]
