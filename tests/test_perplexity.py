"""Loss and sliding-window perplexity; the quality report across weight formats."""

import json
import math
import os

import numpy as np
import pytest

import npgpt
from npgpt import weights
from npgpt import quality
from npgpt.cli import main
from npgpt.model import cross_entropy
from npgpt.perplexity import perplexity
from conftest import GOLDEN, TINY


def test_loss_matches_transformers_labels_loss(golden):
    with open(os.path.join(GOLDEN, "outputs.json")) as f:
        want = json.load(f)["loss_row0"]
    for backend in ("numpy", "numba"):
        got = npgpt.load(golden.checkpoint, backend=backend).loss(golden.ids[0])
        assert abs(got - want) / want < 1e-5, backend         # fp32 logits, float64 log-sum-exp


def test_batch_loss_is_the_mean_over_rows(tiny):
    ids = np.random.default_rng(2).integers(0, TINY.n_vocab, size=(3, 20))
    assert tiny.loss(ids) == pytest.approx(np.mean([tiny.loss(row) for row in ids]), rel=1e-6)


def test_one_window_perplexity_is_exp_of_loss(tiny):
    ids = np.random.default_rng(3).integers(0, TINY.n_vocab, size=40)
    r = perplexity(tiny, ids, ctx=64, stride=32)
    assert r["tokens"] == 39 and r["ppl"] == pytest.approx(math.exp(tiny.loss(ids)), rel=1e-9)


def test_sliding_window_scores_each_token_once_with_its_window_context(tiny):
    ids = np.random.default_rng(4).integers(0, TINY.n_vocab, size=150)
    ctx, stride = 64, 24
    r = perplexity(tiny, ids, ctx=ctx, stride=stride)
    assert r["tokens"] == 149
    total, prev_end = 0.0, 0                               # the same, written out token by token
    for begin in range(0, 150, stride):
        end = min(begin + ctx, 150)
        logits = tiny.forward(ids[begin:end])
        for j in range(max(prev_end, begin + 1), end):     # token j predicted from ids[begin:j]
            total += float(cross_entropy(logits[j - begin - 1], np.array(ids[j])))
        prev_end = end
        if end == 150:
            break
    assert r["nll"] == pytest.approx(total / 149, rel=1e-9)


@pytest.mark.parametrize("ctx, stride, message", [(65, 32, "--ctx 65"), (32, 40, "--stride 40"), (32, 0, "--stride 0")])
def test_bad_window_arguments(tiny, ctx, stride, message):
    with pytest.raises(npgpt.InputError, match=message):
        perplexity(tiny, np.arange(50), ctx=ctx, stride=stride)


@pytest.fixture(scope="module")
def gpt2_vocab_file(tmp_path_factory):
    """A small model with GPT-2's full vocabulary, so real text tokenizes into it."""
    cfg = npgpt.Config(n_embd=48, n_head=4, n_layer=2, n_ctx=256)
    path = tmp_path_factory.mktemp("vocab") / "model.safetensors"
    weights.save(weights.random_params(cfg, seed=5), path, cfg)
    return path


def test_perplexity_command_on_the_shipped_text(gpt2_vocab_file, capsys):
    assert main(["perplexity", "--weights", str(gpt2_vocab_file), "--text", quality.SAMPLE_TEXT,
                 "--ctx", "256", "--stride", "128"]) == 0
    out = capsys.readouterr().out
    n = len(quality.text_ids())
    assert f"{n - 1} tokens scored" in out and "perplexity" in out


def test_quality_report_meets_the_format_targets(gpt2_vocab_file):
    params, cfg, _ = weights.load_params(gpt2_vocab_file)
    rows = {r["weights"]: r for r in quality.compare(params, cfg, quality.text_ids(), steps=32)}
    assert rows["fp32"]["cosine"] == pytest.approx(1.0) and rows["fp32"]["max_abs_err"] == 0
    assert rows["bf16"]["cosine"] >= 0.9999 and rows["int8"]["cosine"] >= 0.999
    assert rows["int8"]["bytes_per_token"] < rows["bf16"]["bytes_per_token"] < rows["fp32"]["bytes_per_token"]
    assert all(0 <= r["greedy_agreement"] <= 1 and r["steps"] == 32 for r in rows.values())
