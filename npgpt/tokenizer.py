"""GPT-2's tokenizer: tiktoken's `gpt2` encoding, built from the vocabulary files shipped in `weights/`."""

import functools
import hashlib
import json

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str  # the pre-tokenizer regex; importing it fetches nothing

from .weights.vocab import ENCODER_JSON, VOCAB_BPE

from .errors import TokenizerError

EOT = 50256                                                # <|endoftext|>: GPT-2's only special token


def _read(path, sha256):                                   # the file's bytes, if they are the ones shipped
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read GPT-2 vocabulary file: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise TokenizerError(f"{path}: SHA-256 is {digest}, expected {sha256}; the package's vocabulary is damaged")
    return data


def _bytes_of_symbols():
    """GPT-2's vocabulary files spell each byte as one printable character: the printable bytes but space as
    themselves, the other 68 bytes as chr(256), chr(257), ... in byte order. Returns the bytes in that order
    (a byte's rank: printable ones first) and the map from character to byte."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    symbols = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    return printable + others, symbols


def mergeable_ranks(vocab_bpe, encoder_json):              # the two files' bytes -> {token bytes: rank}
    """The BPE ranks tiktoken's gpt2 encoding uses: the 256 bytes, then each merge of vocab.bpe (after its
    version line) in file order, and they must be encoder.json's ids (its one special token aside).
    Built here rather than by tiktoken's loader, which reads local files through blobfile before tiktoken
    0.9 and writes a copy of them to a cache directory."""
    order, symbols = _bytes_of_symbols()
    raw = lambda token: bytes(symbols[c] for c in token)
    ranks = {bytes([b]): rank for rank, b in enumerate(order)}
    try:
        for line in vocab_bpe.decode("utf-8").split("\n")[1:]:
            if line:
                first, second = line.split(" ")
                ranks[raw(first) + raw(second)] = len(ranks)
        ids = {raw(token): i for token, i in json.loads(encoder_json).items() if token != "<|endoftext|>"}
    except (KeyError, ValueError) as e:                    # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise TokenizerError(f"GPT-2's vocabulary files cannot be read as BPE merges and token ids: {e!r}") from None
    if ids != ranks:
        raise TokenizerError("vocab.bpe and encoder.json disagree on GPT-2's tokens")
    return ranks


@functools.lru_cache(maxsize=None)
def get_encoding():
    """tiktoken Encoding equal to tiktoken.get_encoding('gpt2'), with no network access."""
    ranks = mergeable_ranks(_read(*VOCAB_BPE), _read(*ENCODER_JSON))
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)


def encode(text):                                          # str -> GPT-2 token ids
    """As transformers' GPT-2 tokenizer: a literal "<|endoftext|>" in the text is the special token 50256
    (tiktoken's default would raise on it)."""
    return get_encoding().encode(text, allowed_special={"<|endoftext|>"})
