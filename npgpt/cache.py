"""KV cache: keys and values of every past position, so decoding a token costs one position's work.

Each row (sequence) has its own length, so a batch can hold prompts of different lengths, and serving
slots can join and leave: nothing is padded, and no row ever attends to positions it does not hold.
"""

import mmap

import numpy as np

from .errors import InputError


def untouched_zeros(shape):                                # float32 zeros on fresh pages: only pages written become resident
    """np.zeros may reuse heap memory freed earlier (by a loader's temporaries), which calloc must clear,
    so a cache for all n_ctx positions becomes resident at once (measured: +72 MiB for gpt2 at batch 1,
    after loading an int4 checkpoint). Anonymous pages are zero until written."""
    nbytes = int(np.prod(shape)) * 4
    if nbytes == 0:
        return np.zeros(shape, np.float32)
    return np.ndarray(shape, np.float32, buffer=mmap.mmap(-1, nbytes))   # views' .base is this array (attention relies on it)


def cache_shape(cfg):                                      # what a cache depends on: another model with these fits it
    return {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "head_dim": cfg.head_dim, "n_ctx": cfg.n_ctx}


class KVCache:
    """Preallocated [B, H, n_ctx, D] key and value buffers per layer, and how many positions each row holds."""

    def __init__(self, cfg, batch=1):
        shape = (batch, cfg.n_head, cfg.n_ctx, cfg.head_dim)
        self.config, self.shape, self.batch = cfg, cache_shape(cfg), batch
        self.lengths = np.zeros(batch, np.int64)           # [B] positions filled per row
        self._layers = [LayerCache(self, untouched_zeros(shape), untouched_zeros(shape)) for _ in range(cfg.n_layer)]

    @property
    def pos(self):                                         # the length every row shares (a rectangular batch)
        if self.batch and (self.lengths != self.lengths[0]).any():
            raise InputError(f"the rows of this cache have different lengths {self.lengths.tolist()}; read cache.lengths")
        return int(self.lengths[0]) if self.batch else 0

    def check(self, cfg):
        """A cache belongs to models of one shape; another model's cache would fail deep in NumPy."""
        want = cache_shape(cfg)
        if want != self.shape:
            diff = ", ".join(f"{k} {self.shape[k]} (model: {want[k]})" for k in want if want[k] != self.shape[k])
            raise InputError(f"this KV cache was made for another model: {diff}; make one with model.new_cache()")

    def layer(self, i):
        return self._layers[i]

    def rows(self, start, stop):
        """Rows start..stop-1 as a cache of their own: the same buffers and lengths (views, no copies), so
        a forward on the view fills those rows of this cache."""
        if not 0 <= start < stop <= self.batch:
            raise InputError(f"rows {start}..{stop - 1} are outside this cache's {self.batch} rows")
        view = object.__new__(KVCache)
        view.config, view.shape, view.batch = self.config, self.shape, stop - start
        view.lengths = self.lengths[start:stop]
        view._layers = [LayerCache(view, layer.k[start:stop], layer.v[start:stop]) for layer in self._layers]
        return view

    def move(self, src, dst):
        """Copy row src (its keys, values and length) into row dst: serving keeps its busy rows first."""
        n = int(self.lengths[src])
        for layer in self._layers:
            layer.k[dst, :, :n] = layer.k[src, :, :n]
            layer.v[dst, :, :n] = layer.v[src, :, :n]
        self.lengths[dst] = n

    def reset(self, row):                                  # forget row's positions; its buffers are overwritten as it refills
        self.lengths[row] = 0

    def advance(self, n):
        """Called by forward once every layer has appended its n new positions to every row."""
        self.lengths += n


class LayerCache:
    def __init__(self, owner, k, v):
        self.owner, self.k, self.v = owner, k, v

    def append(self, k, v):                                # [B, H, T, D] x2 -> keys, values [B, H, S, D] (views), lengths [B]
        """Write each row's T new positions after its own; S is the longest row's new length. Positions a
        row does not hold (beyond its length) are stale: attention masks them by the returned lengths."""
        starts = self.owner.lengths
        T = k.shape[2]
        if (starts == starts[0]).all():                    # a rectangular batch: one slice assignment
            self.k[:, :, starts[0] : starts[0] + T] = k
            self.v[:, :, starts[0] : starts[0] + T] = v
        else:
            for b, start in enumerate(starts):
                self.k[b, :, start : start + T] = k[b]
                self.v[b, :, start : start + T] = v[b]
        ends = starts + T
        S = int(ends.max())
        return self.k[:, :, :S], self.v[:, :, :S], ends


class Packed:
    """Groups of rows of one cache advanced in a single forward pass (npgpt.model.forward_packed): group
    (start, T) is rows start..start+B-1, each adding T new tokens. Their tokens travel as one sequence
    [1, N], group by group and row by row, so the per-token work (embeddings, LayerNorm, the linear
    layers, GELU) runs once over all N tokens; attention runs per group, each row on its own keys.
    Serving packs the busy rows' next tokens (one group, T = 1) with newcomers' prompts (a group each)."""

    def __init__(self, cache, groups):                     # groups: [(first row, rows, T)]
        rows = sorted(r for start, B, _ in groups for r in range(start, start + B))
        if len(set(rows)) != len(rows) or not groups or rows[0] < 0 or rows[-1] >= cache.batch:
            raise InputError(f"packed groups {[(s, B) for s, B, _ in groups]} must be distinct rows of this cache's {cache.batch}")
        self.cache, self.groups = cache, groups
        self._views = [cache.rows(start, start + B) for start, B, _ in groups]

    def positions(self):                                   # [N]: each row goes on from its own length
        return np.concatenate([(view.lengths[:, None] + np.arange(T)).ravel() for view, (_, _, T) in zip(self._views, self.groups)])

    def last(self):                                        # [rows]: where each row's last new token sits in the N
        ends = np.cumsum([B * T for _, B, T in self.groups])
        return np.concatenate([end - B * T + np.arange(1, B + 1) * T - 1 for end, (_, B, T) in zip(ends, self.groups)])

    def layer(self, i):
        return PackedLayer(self, i)

    def advance(self):
        for view, (_, _, T) in zip(self._views, self.groups):
            view.lengths += T


class PackedLayer:
    def __init__(self, packed, i):
        self.packed, self.i = packed, i

    def attend(self, q, k, v, attention):                  # [1, H, N, D] x3, the op -> [1, H, N, D]
        """Each group's queries, keys and values back in [B, H, T, D]; its keys written into its rows and
        attended to as a plain cache forward would (causal within the new T, all of each row's past)."""
        H, D = q.shape[1], q.shape[3]
        out, offset = [], 0
        for view, (_, B, T) in zip(self.packed._views, self.packed.groups):
            qg, kg, vg = (a[0, :, offset : offset + B * T].reshape(H, B, T, D).transpose(1, 0, 2, 3) for a in (q, k, v))
            keys, values, lengths = view.layer(self.i).append(kg, vg)
            out.append(attention(qg, keys, values, lengths=lengths).transpose(1, 0, 2, 3).reshape(H, B * T, D))
            offset += B * T
        return np.concatenate(out, axis=1)[None]
