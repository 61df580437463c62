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


def _shipped():
    return tuple(open(path, "rb").read() for path, _ in (tokenizer.VOCAB_BPE, tokenizer.ENCODER_JSON))


def test_ranks_equal_tiktokens_own_loader_on_the_same_files(monkeypatch):
    import tiktoken.load
    # tiktoken's reader replaced by a plain one: before 0.9 it opens local paths only through blobfile
    monkeypatch.setattr(tiktoken.load, "read_file_cached", lambda path, expected_hash=None: open(path, "rb").read())
    theirs = tiktoken.load.data_gym_to_mergeable_bpe_ranks(tokenizer.VOCAB_BPE[0], tokenizer.ENCODER_JSON[0])
    ours = tokenizer.mergeable_ranks(*_shipped())
    assert len(ours) == 50256 and ours == theirs


def test_the_encoding_is_built_without_tiktokens_file_loader(monkeypatch):
    import tiktoken.load

    def refuse(*args, **kwargs):
        raise AssertionError("tiktoken's file loader was called")
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", refuse)
    tokenizer.get_encoding.cache_clear()
    try:
        assert tokenizer.get_encoding().encode("Hello world") == [15496, 995]
    finally:
        tokenizer.get_encoding.cache_clear()


def test_vocabulary_files_that_disagree_are_refused():
    vocab_bpe, encoder_json = _shipped()
    changed = encoder_json.replace(b'"Hello": 15496', b'"Hello": 15497')
    assert changed != encoder_json
    with pytest.raises(npgpt.TokenizerError, match="vocab.bpe and encoder.json disagree"):
        tokenizer.mergeable_ranks(vocab_bpe, changed)


@pytest.mark.parametrize("vocab_extra, encoder_json", [(b"a b c\n", None), (b"\xff\xfe b\n", None), (b"", b"{not json")])
def test_vocabulary_files_that_do_not_parse_are_refused(vocab_extra, encoder_json):
    vocab_bpe, shipped_json = _shipped()
    with pytest.raises(npgpt.TokenizerError, match="cannot be read as BPE merges"):
        tokenizer.mergeable_ranks(vocab_bpe + vocab_extra, encoder_json or shipped_json)
