"""KV cache: keys and values of every past position, so decoding a token costs one position's work."""

import numpy as np


class KVCache:
    """Preallocated [B, H, n_ctx, D] key and value buffers per layer, and how many positions are filled."""

    def __init__(self, cfg, batch=1):
        shape = (batch, cfg.n_head, cfg.n_ctx, cfg.head_dim)
        self.batch = batch
        self.pos = 0
        self._layers = [LayerCache(self, np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(cfg.n_layer)]

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
