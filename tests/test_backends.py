"""Whole model on the numba backend: against the numpy backend, transformers, and itself with a cache."""

import numpy as np

import npgpt
from conftest import TINY, max_rel_err

TOL = 1e-4   # the golden tolerance; numba vs numpy is measured at ~1e-6
IDS = np.random.default_rng(5).integers(0, TINY.n_vocab, size=(3, 23))


def test_numba_logits_match_numpy_backend(tiny_params):
    ref = npgpt.Model(tiny_params, TINY).forward(IDS)
    got = npgpt.Model(tiny_params, TINY, backend="numba").forward(IDS)
    assert got.dtype == np.float32
    assert max_rel_err(got, ref) < TOL


def test_numba_logits_match_transformers(golden):
    got = npgpt.load(golden.checkpoint, backend="numba").forward(golden.ids)
    assert max_rel_err(got, golden.logits) < TOL


def test_numba_greedy_generation_equals_numpy_and_transformers(golden):
    tokens = {b: npgpt.load(golden.checkpoint, backend=b).generate(golden.ids[0], max_new_tokens=len(golden.greedy), temperature=0)
              for b in ("numpy", "numba")}
    assert tokens["numba"] == tokens["numpy"] == golden.greedy.tolist()


def test_numba_cached_decode_equals_uncached(tiny_params):
    model = npgpt.Model(tiny_params, TINY, backend="numba")
    full = model.forward(IDS)
    cache = model.new_cache(batch=3)
    steps = [model.forward(IDS[:, :15], cache=cache)] + [model.forward(IDS[:, t : t + 1], cache=cache) for t in range(15, 23)]
    assert max_rel_err(np.concatenate(steps, axis=1), full) < TOL


def test_numba_batch_generation_equals_rows(tiny_params):
    model = npgpt.Model(tiny_params, TINY, backend="numba")
    ids = np.array([[5, 6, 7], [700, 3, 9], [1, 1, 1], [99, 98, 97]])
    both = model.generate(ids, max_new_tokens=6, temperature=0)
    assert both.shape == (4, 6)
    for b in range(4):
        assert both[b].tolist() == model.generate(ids[b], max_new_tokens=6, temperature=0)
