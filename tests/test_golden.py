"""npgpt against Hugging Face transformers' own outputs on a checkpoint transformers saved."""

import numpy as np

import npgpt
from conftest import max_rel_err

TOL = 1e-4   # fp32: max-abs logit error relative to max(1, max|logit|); measured ~1e-6


def test_logits_match_transformers(golden):
    logits = npgpt.load(golden.checkpoint).forward(golden.ids)
    assert logits.dtype == np.float32
    assert logits.shape == golden.logits.shape
    assert max_rel_err(logits, golden.logits) < TOL


def test_single_sequence_matches_transformers_batch_row(golden):
    logits = npgpt.load(golden.checkpoint).forward(golden.ids[1])
    assert logits.shape == golden.logits.shape[1:]
    assert max_rel_err(logits, golden.logits[1]) < TOL


def test_greedy_generation_matches_transformers(golden):
    new = npgpt.load(golden.checkpoint).generate(golden.ids[0], max_new_tokens=len(golden.greedy), temperature=0)
    assert new == golden.greedy.tolist()


def test_golden_checkpoint_uses_prefixed_names(golden):
    info = npgpt.load(golden.checkpoint).info
    assert info.prefix == "transformer." and info.tied and "config.json" in info.config_source
