import os
import types

import numpy as np
import pytest

import npgpt
from npgpt import weights

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden")
# A small model with awkward sizes: head_dim 10, vocab not a power of two.
TINY = npgpt.Config(n_vocab=1000, n_ctx=64, n_embd=60, n_head=6, n_layer=3)


def max_rel_err(a, b):
    """max |a - b| relative to the scale of b (at least 1): the fp32 parity measure used throughout."""
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


@pytest.fixture(scope="session")
def golden():
    """Tiny GPT-2 written by transformers' save_pretrained, and transformers' own outputs (tests/make_golden.py)."""
    return types.SimpleNamespace(
        checkpoint=GOLDEN,
        ids=np.load(os.path.join(GOLDEN, "ids.npy")),
        logits=np.load(os.path.join(GOLDEN, "logits.npy")),
        greedy=np.load(os.path.join(GOLDEN, "greedy.npy")),
    )


@pytest.fixture(scope="session")
def tiny_params():
    return weights.random_params(TINY, seed=7)


@pytest.fixture(scope="session")
def tiny(tiny_params):
    return npgpt.Model(tiny_params, TINY)


@pytest.fixture
def tiny_file(tmp_path, tiny_params):
    path = tmp_path / "model.safetensors"
    weights.save(tiny_params, path, TINY)
    return path
