"""The spec's own invariants: dtype, shapes, cache, batch."""

import math

import numpy as np
import pytest

import npgpt
from npgpt import model as spec
from conftest import TINY, max_rel_err

rng = np.random.default_rng(0)
IDS = rng.integers(0, TINY.n_vocab, size=(3, 21))


def test_forward_is_float32_end_to_end(tiny):
    assert tiny.forward(IDS).dtype == np.float32
    assert tiny.forward(IDS[0, :1]).dtype == np.float32


def test_shapes_for_1d_and_2d_ids(tiny):
    assert tiny.forward(IDS[0]).shape == (21, TINY.n_vocab)
    assert tiny.forward(IDS).shape == (3, 21, TINY.n_vocab)
    assert tiny.forward(IDS[:1]).shape == (1, 21, TINY.n_vocab)


def test_batch_equals_rows_one_at_a_time(tiny):
    batch = tiny.forward(IDS)
    for b in range(IDS.shape[0]):
        assert max_rel_err(batch[b], tiny.forward(IDS[b])) < 1e-5


@pytest.mark.parametrize("split", [[21], [1] * 21, [5, 1, 1, 14], [20, 1]])
def test_cached_logits_equal_uncached(tiny, split):
    full = tiny.forward(IDS)
    cache, start, parts = tiny.new_cache(batch=3), 0, []
    for n in split:
        parts.append(tiny.forward(IDS[:, start : start + n], cache=cache))
        start += n
    assert cache.pos == 21
    assert max_rel_err(np.concatenate(parts, axis=1), full) < 1e-5


def test_last_only_equals_last_position(tiny):
    assert max_rel_err(tiny.forward(IDS, last=True)[:, 0], tiny.forward(IDS)[:, -1]) < 1e-5


def test_layer_norm_normalizes_then_scales():
    x = rng.standard_normal((4, 60), dtype=np.float32) * 3 + 1
    y = spec.layer_norm(x, np.ones(60, np.float32), np.zeros(60, np.float32), 1e-5)
    assert np.allclose(y.mean(-1), 0, atol=1e-5) and np.allclose(y.std(-1), 1, atol=1e-3)


def test_gelu_is_the_tanh_form():
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    assert np.abs(spec.gelu(x) - exact).max() < 1e-3          # the tanh form is close to, not equal to, erf
    assert spec.gelu(x).dtype == np.float32


def test_attention_is_causal():
    q, k, v = (rng.standard_normal((1, 2, 7, 10), dtype=np.float32) for _ in range(3))
    out = spec.attention(q, k, v)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 4:] += 5.0
    v2[:, :, 4:] -= 5.0
    assert np.allclose(spec.attention(q, k2, v2)[:, :, :4], out[:, :, :4])   # the future does not leak


def test_random_model_is_seeded():
    a = npgpt.random_model(TINY, seed=3).forward(IDS[0])
    b = npgpt.random_model(TINY, seed=3).forward(IDS[0])
    c = npgpt.random_model(TINY, seed=4).forward(IDS[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)
