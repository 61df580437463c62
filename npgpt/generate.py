"""Prompt -> stream of new tokens: one prefill over the prompt, then one cached decode step per token."""

import codecs

import numpy as np

from .inputs import check_count, check_ids, check_sampling
from .sampling import sample
from .tokenizer import EOT


def generate_ids(model, ids, *, max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0,
                 seed=None, stop_token=EOT):               # [B, T] prompt -> iterator of [B] new ids per step
    """`model`: an npgpt.Model (forward with a KV cache, new_cache, config). Iterate over the next token of every sequence until max_new_tokens, the stop token in every row, or the
    context end (n_ctx positions: the last token yielded is the prediction at position n_ctx - 1).
    A row that emitted the stop token keeps yielding it, so a batch stays rectangular."""
    check_sampling(temperature, top_k, top_p)              # checked now, not at the first next()
    max_new_tokens = check_count("max_new_tokens", max_new_tokens)
    ids, _ = check_ids(ids, model.config)
    return _decode(model, ids, max_new_tokens, (temperature, top_k, top_p), np.random.default_rng(seed), stop_token)


def _decode(model, ids, max_new_tokens, sampling, rng, stop_token):
    cache = model.new_cache(batch=ids.shape[0])
    done = np.zeros(ids.shape[0], dtype=bool)
    step = ids                                                                                  # [B, T], then [B, 1]
    for _ in range(max_new_tokens):
        logits = model.forward(step, cache=cache, last=True)[:, -1]                            # [B, V]
        token = np.where(done, stop_token, sample(logits, rng, *sampling))                     # [B]
        yield token
        done |= token == stop_token
        if done.all() or cache.pos == model.config.n_ctx:
            return
        step = token[:, None]


def detokenize(tokens, enc):                               # token ids -> text pieces
    """Yield text as soon as the tokens' bytes form complete UTF-8 characters (a character can span tokens)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in tokens:
        piece = decoder.decode(enc.decode_single_token_bytes(int(t)))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
