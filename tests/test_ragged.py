"""Ragged batches: cache rows of their own lengths, in the spec and the kernels, and generate() on a list of prompts."""

import os

import numpy as np
import pytest

import npgpt
from conftest import TINY, max_rel_err
from npgpt import model as spec
from npgpt.kernels import KERNELS

rng = np.random.default_rng(21)


def f32(*shape):
    return rng.standard_normal(shape, dtype=np.float32)


def test_causal_mask_with_lengths_is_each_rows_own_causal_mask():
    mask = spec.causal_mask(3, 7, lengths=[7, 4])          # [2, 1, 3, 7]
    assert np.array_equal(mask[0, 0], spec.causal_mask(3, 7))
    assert np.array_equal(mask[1, 0, :, :4], spec.causal_mask(3, 4)) and np.isneginf(mask[1, 0, :, 4:]).all()


@pytest.mark.parametrize("T", [1, 3, 6])                   # the fused decode path (T <= 4) and the banded one
def test_attention_with_row_lengths_kernel_and_spec_equal_each_row_alone(T):
    B, H, S, D = 3, 2, 11, 10
    q, k, v = f32(B, H, T, D), f32(B, H, S, D), f32(B, H, S, D)
    lengths = np.array([S, T, 8])
    want = spec.attention(q, k, v, lengths=lengths)
    for b, n in enumerate(lengths):                        # keys past a row's length are someone else's: never seen
        alone = spec.attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n])
        assert max_rel_err(want[b : b + 1], alone) < 1e-6
    assert max_rel_err(KERNELS.attention(q, k, v, lengths=lengths), want) < 1e-5


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_decode_step_over_rows_of_different_lengths_equals_each_sequence_alone(tiny_params, backend):
    model = npgpt.Model(tiny_params, TINY, backend=backend)
    seqs = [rng.integers(0, TINY.n_vocab, n) for n in (9, 2, 30)]
    cache = model.new_cache(batch=3)
    for i, s in enumerate(seqs):
        model.forward(s[None, :-1], cache=cache.rows(i, i + 1))          # each prefilled alone into its row
    assert cache.lengths.tolist() == [8, 1, 29]
    logits = model.forward(np.array([[s[-1]] for s in seqs]), cache=cache)   # one step, each row at its own position
    for i, s in enumerate(seqs):
        assert max_rel_err(logits[i, -1], model.forward(s)[-1]) < 1e-5
    with pytest.raises(npgpt.NpgptError, match="different lengths"):
        cache.pos


def test_cache_move_keeps_a_row_going_in_its_new_place(tiny):
    a, b = rng.integers(0, TINY.n_vocab, 7), rng.integers(0, TINY.n_vocab, 4)
    cache = tiny.new_cache(batch=2)
    tiny.forward(a[None], cache=cache.rows(0, 1))
    tiny.forward(b[None], cache=cache.rows(1, 2))
    cache.move(1, 0)                                       # row 0 finished; row 1's sequence moves up
    step = tiny.forward(np.array([[5]]), cache=cache.rows(0, 1))
    assert max_rel_err(step[0, -1], tiny.forward(np.append(b, 5))[-1]) < 1e-5


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_generate_on_a_list_of_prompts_returns_what_each_returns_alone(tiny_params, backend):
    model = npgpt.Model(tiny_params, TINY, backend=backend)
    prompts = [list(rng.integers(0, TINY.n_vocab, n)) for n in (3, 17, 1, 58)]   # 58 + 7 > n_ctx 64: that row ends early
    batch = model.generate(prompts, max_new_tokens=7, temperature=0)
    assert [len(x) for x in batch] == [7, 7, 7, 64 - 58 + 1]
    assert batch == [model.generate(p, max_new_tokens=7, temperature=0) for p in prompts]
    sampled = model.generate(prompts, max_new_tokens=6, temperature=1.0, top_k=50, seed=[1, 2, 3, 4])
    assert sampled == [model.generate(p, max_new_tokens=6, temperature=1.0, top_k=50, seed=s) for p, s in zip(prompts, [1, 2, 3, 4])]
    assert sampled != batch


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_generate_on_a_list_of_texts(backend):
    model = npgpt.random_model(npgpt.Config(n_vocab=50257, n_ctx=64, n_embd=16, n_head=2, n_layer=1), seed=1, backend=backend)
    texts = ["Hello", "A much longer prompt about trains and stations", "x"]
    out = model.generate(texts, max_new_tokens=8, temperature=0.8, seed=3, stop=["e"])
    assert out == [model.generate(t, max_new_tokens=8, temperature=0.8, seed=3, stop=["e"]) for t in texts]
    assert all(isinstance(t, str) for t in out) and any(out)


@pytest.mark.parametrize("prompts, kwargs, message", [
    (["text", [1, 2]], {}, "all strings or all token-id lists"),
    ([[1, 2], [3]], {"seed": [1]}, "one per prompt \\(2\\) or one for all"),
    ([[1, 2], list(range(65))], {}, "prompt 1: sequence of 65 tokens"),
    ([[1, 2], [5000]], {}, "prompt 1: token id 5000"),
    (["ok", ""], {}, "prompt 1: empty prompt"),
    ([[1, 2], [3]], {"stop": "x"}, "stop strings apply to text output"),
    ([[1, 2], [3]], {"timings": npgpt.Timings()}, "timings are measured for one prompt"),
])
def test_bad_prompt_lists(tiny, prompts, kwargs, message):
    with pytest.raises(npgpt.NpgptError, match=message):
        tiny.generate(prompts, max_new_tokens=2, temperature=0, **kwargs)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_packed_groups_equal_each_group_alone(tiny_params, backend):
    """forward_packed: busy rows' next tokens (one group, T=1) and two prompts (a group each, rows of
    their own) in one pass give each row the logits it gets alone, and fill each row of the cache."""
    model = npgpt.Model(tiny_params, TINY, backend=backend)
    history = [rng.integers(0, TINY.n_vocab, n) for n in (9, 2, 30)]
    prompts = [rng.integers(0, TINY.n_vocab, n) for n in (7, 20)]
    cache = model.new_cache(batch=6)
    for i, s in enumerate(history):
        model.forward(s[None, :-1], cache=cache.rows(i, i + 1))
    groups = [(0, np.array([[s[-1]] for s in history])), (3, prompts[0][None]), (5, prompts[1][None])]
    logits = model.forward_packed(cache, groups)
    assert logits.shape == (5, TINY.n_vocab) and cache.lengths.tolist() == [9, 2, 30, 7, 0, 20]
    for got, seq in zip(logits, history + prompts):
        assert max_rel_err(got, model.forward(seq)[-1]) < 1e-5      # float32 sums in another order: 1e-5 as elsewhere
    step = model.forward_packed(cache, [(3, np.array([[4]])), (0, np.array([[6], [7], [8]]))])   # the cache goes on from there
    for got, seq in zip(step, [np.append(prompts[0], 4)] + [np.append(s, t) for s, t in zip(history, (6, 7, 8))]):
        assert max_rel_err(got, model.forward(seq)[-1]) < 1e-5


def test_packed_groups_refuse_shared_rows_and_overflows(tiny):
    cache = tiny.new_cache(batch=3)
    with pytest.raises(npgpt.InputError, match="distinct rows"):
        tiny.forward_packed(cache, [(0, np.array([[1], [2]])), (1, np.array([[3]]))])
    with pytest.raises(npgpt.InputError, match="distinct rows"):
        tiny.forward_packed(cache, [(2, np.array([[1], [2]]))])
    with pytest.raises(npgpt.InputError, match="distinct rows"):
        tiny.forward_packed(cache, [(7, np.array([[1]]))])                 # no such row
    with pytest.raises(npgpt.InputError, match="outside the vocabulary"):
        tiny.forward_packed(cache, [(0, np.array([[TINY.n_vocab]]))])
    with pytest.raises(npgpt.InputError, match="exceeds the context"):
        tiny.forward_packed(cache, [(1, np.zeros((1, TINY.n_ctx + 1), np.int64))])
    assert cache.lengths.tolist() == [0, 0, 0]                  # nothing was written


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc (Linux)")
def test_a_new_cache_is_resident_only_where_it_is_written(tmp_path):
    """After loading an int4 checkpoint, whose unpacking frees heap memory, np.zeros reused that memory
    and calloc cleared it page by page: the whole n_ctx cache became resident (this failed that way)."""
    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    cfg = npgpt.Config(n_vocab=4096, n_ctx=1024, n_embd=768, n_head=12, n_layer=6)
    npgpt.random_model(cfg, seed=0, weights="int4").save(tmp_path)
    model = npgpt.load(tmp_path)
    ids = np.arange(8)[None].repeat(4, 0)
    model.forward(ids)                                     # code and scratch of a forward pass: not the cache's
    before = rss_mb()
    cache = model.new_cache(batch=4)                       # 4 x 6 layers x 2 x 3 MiB = 144 MiB
    model.forward(ids, cache=cache)
    assert cache.layer(0).k[:, :, :8].any() and not cache.layer(0).k[:, :, 8:].any()
    assert rss_mb() - before < 36                          # 8 positions written: a page per row, head and layer (measured 14; with np.zeros: 124)
