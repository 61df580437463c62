"""GPT-2's tokenizer: tiktoken's `gpt2` encoding, built from the vocabulary files shipped in `weights/`."""

import functools
import hashlib

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # the pre-tokenizer regex; importing it fetches nothing

from .weights.vocab import ENCODER_JSON, VOCAB_BPE

from .errors import TokenizerError

EOT = 50256                                                # <|endoftext|>: GPT-2's only special token


def _check(path, sha256):
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read GPT-2 vocabulary file: {e.strerror}") from None
    if digest != sha256:
        raise TokenizerError(f"{path}: SHA-256 is {digest}, expected {sha256}; the package's vocabulary is damaged")


@functools.lru_cache(maxsize=None)
def get_encoding():
    """tiktoken Encoding equal to tiktoken.get_encoding('gpt2'), with no network access."""
    for path, sha256 in (VOCAB_BPE, ENCODER_JSON):
        _check(path, sha256)
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=VOCAB_BPE[0], encoder_json_file=ENCODER_JSON[0],
                                            vocab_bpe_hash=VOCAB_BPE[1], encoder_json_hash=ENCODER_JSON[1])
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)


def encode(text):                                          # str -> GPT-2 token ids
    """As transformers' GPT-2 tokenizer: a literal "<|endoftext|>" in the text is the special token 50256
    (tiktoken's default would raise on it)."""
    return get_encoding().encode(text, allowed_special={"<|endoftext|>"})
