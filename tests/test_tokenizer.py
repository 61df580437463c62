"""GPT-2's tokenizer, built offline from the vocabulary shipped in the package."""

import pytest

import npgpt
from npgpt import tokenizer


def test_known_encodings():
    enc = npgpt.get_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [npgpt.EOT] == [50256]
    assert enc.n_vocab == 50257


def test_round_trip_unicode():
    enc = npgpt.get_encoding()
    text = "Ünïcödé 🙂 naïve café — 東京\n\ttabs"
    assert enc.decode(enc.encode(text)) == text


def test_damaged_vocabulary_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "vocab.bpe"
    bad.write_text("#version: 0.2\n")
    monkeypatch.setattr(tokenizer, "VOCAB_BPE", (str(bad), tokenizer.VOCAB_BPE[1]))
    tokenizer.get_encoding.cache_clear()
    try:
        with pytest.raises(npgpt.TokenizerError, match="vocab.bpe: SHA-256 is"):
            tokenizer.get_encoding()
    finally:
        tokenizer.get_encoding.cache_clear()
