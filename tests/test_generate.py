"""Generation: sampling rules, stopping rules, streaming text."""

import numpy as np
import pytest

import npgpt
from npgpt.generate import generate_ids, text_pieces
from npgpt.sampling import sample
from conftest import TINY

PROMPT = [11, 22, 33, 44]


def test_greedy_is_argmax_of_uncached_logits(tiny):
    new = tiny.generate(PROMPT, max_new_tokens=8, temperature=0)
    seq = list(PROMPT)
    for t in new:                                          # recompute each step from scratch, no cache
        assert t == int(tiny.forward(seq)[-1].argmax())
        seq.append(t)


def test_seed_makes_sampling_reproducible(tiny):
    a = tiny.generate(PROMPT, max_new_tokens=10, seed=5)
    assert a == tiny.generate(PROMPT, max_new_tokens=10, seed=5)
    assert a != tiny.generate(PROMPT, max_new_tokens=10, seed=6)


def test_top_k_1_and_tiny_top_p_are_greedy(tiny):
    greedy = tiny.generate(PROMPT, max_new_tokens=6, temperature=0)
    assert tiny.generate(PROMPT, max_new_tokens=6, temperature=1.5, top_k=1, seed=0) == greedy
    assert tiny.generate(PROMPT, max_new_tokens=6, temperature=1.5, top_p=1e-9, seed=0) == greedy


def test_sample_frequencies_follow_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    rng = np.random.default_rng(0)
    draws = np.array([sample(logits, rng)[0] for _ in range(20000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert np.abs(freq - [0.5, 0.3, 0.15, 0.05]).max() < 0.015   # ~4 standard errors at n=20000


def test_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([[0.1, 0.4, 0.05, 0.3, 0.15]], np.float32))
    rng = np.random.default_rng(0)
    assert {int(sample(logits, rng, top_k=2)[0]) for _ in range(500)} == {1, 3}
    assert {int(sample(logits, rng, top_p=0.8)[0]) for _ in range(500)} == {1, 3, 4}   # 0.4+0.3 < 0.8 <= +0.15


def test_batch_generation_equals_rows_alone(tiny):
    ids = np.array([[5, 6, 7], [700, 3, 9]])
    both = tiny.generate(ids, max_new_tokens=7, temperature=0)
    assert both.shape == (2, 7)
    for b in range(2):
        assert both[b].tolist() == tiny.generate(ids[b], max_new_tokens=7, temperature=0)


def test_stops_at_stop_token_and_pads_finished_rows(tiny_params):
    first = int(next(generate_ids(npgpt.Model(tiny_params, TINY), [PROMPT], temperature=0))[0])
    steps = list(generate_ids(npgpt.Model(tiny_params, TINY), [PROMPT], temperature=0, max_new_tokens=10, stop_token=first))
    assert [int(s[0]) for s in steps] == [first]           # the stop token is the last one yielded
    ids = np.array([PROMPT, [1, 2, 3, 4]])
    steps = np.stack(list(generate_ids(npgpt.Model(tiny_params, TINY), ids, temperature=0, max_new_tokens=5, stop_token=first)), 1)
    assert steps[0].tolist() == [first] * len(steps[0])    # finished row keeps the stop token


def test_stops_at_context_end(tiny):
    prompt = list(range(TINY.n_ctx - 3))
    assert len(tiny.generate(prompt, max_new_tokens=50, temperature=0)) == 4   # predictions at positions 60..63
    assert len(tiny.generate(list(range(TINY.n_ctx)), max_new_tokens=5, temperature=0)) == 1


def test_zero_new_tokens(tiny):
    assert tiny.generate(PROMPT, max_new_tokens=0) == []


def test_stream_yields_only_complete_characters():
    enc = npgpt.get_encoding()
    text = "🙂 naïve 東京 ok"
    tokens = enc.encode(text)
    assert any(len(enc.decode_single_token_bytes(t).decode("utf-8", "ignore")) == 0 for t in tokens)  # split chars
    pieces = list(text_pieces(tokens, enc))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_text_generation_and_stream_agree():
    model = npgpt.random_model(npgpt.Config(n_layer=1, n_embd=48, n_head=4, n_ctx=32), seed=1)
    text = model.generate("Hello", max_new_tokens=8, seed=3)
    assert isinstance(text, str) and text
    assert "".join(model.stream("Hello", max_new_tokens=8, seed=3)) == text
