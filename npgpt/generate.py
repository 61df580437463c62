"""Prompt -> stream of new tokens: one prefill over the prompt, then one cached decode step per token."""

import codecs
import collections
import time
from dataclasses import dataclass

import numpy as np

from .inputs import check_count, check_ids, check_sampling, check_seed
from .sampling import sample
from .tokenizer import EOT


@dataclass
class Timings:
    """What a generation cost, as llama.cpp reports it: the prompt's prefill, then the decode steps."""

    prompt_tokens: int = 0                                 # prefill: the prompt, one forward; it also yields the first new token
    prompt_s: float = 0.0
    decode_steps: int = 0                                  # one cached forward per later token
    decode_s: float = 0.0

    def summary(self):
        rate = lambda n, s: f"{n / s:.2f}" if s > 0 else "-"
        return (f"prompt eval: {self.prompt_tokens} tokens in {self.prompt_s * 1e3:.1f} ms "
                f"({rate(self.prompt_tokens, self.prompt_s)} t/s); "
                f"eval: {self.decode_steps} tokens in {self.decode_s * 1e3:.1f} ms ({rate(self.decode_steps, self.decode_s)} t/s)")


def generate_ids(model, ids, *, max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0,
                 seed=None, stop_token=EOT, n_choices=None, timings=None):   # [B, T] prompt -> iterator of [B] new ids per step
    """`model`: an npgpt.Model (forward with a KV cache, new_cache, config). Iterate over the next token of every sequence until max_new_tokens, the stop token in every row, or the
    context end (n_ctx positions: the last token yielded is the prediction at position n_ctx - 1).
    A row that emitted the stop token keeps yielding it, so a batch stays rectangular.
    n_choices: sample only ids below it (text output: a padded vocabulary's extra ids decode to nothing).
    timings: a Timings to fill in (the first step is the prompt's prefill, the rest are decode steps)."""
    check_sampling(temperature, top_k, top_p)              # checked now, not at the first next()
    max_new_tokens = check_count("max_new_tokens", max_new_tokens)
    ids, _ = check_ids(ids, model.config)
    rng = np.random.default_rng(check_seed(seed))
    return _decode(model, ids, max_new_tokens, (temperature, top_k, top_p), rng, stop_token, n_choices, timings or Timings())


def _decode(model, ids, max_new_tokens, sampling, rng, stop_token, n_choices, timings):
    cache = model.new_cache(batch=ids.shape[0])
    done = np.zeros(ids.shape[0], dtype=bool)
    step = ids                                                                                  # [B, T], then [B, 1]
    for i in range(max_new_tokens):
        start = time.perf_counter()
        logits = model.forward(step, cache=cache, last=True)[:, -1, :n_choices]               # [B, V]
        token = np.where(done, stop_token, sample(logits, rng, *sampling))                     # [B]
        if i == 0:
            timings.prompt_tokens, timings.prompt_s = step.size, time.perf_counter() - start
        else:
            timings.decode_steps, timings.decode_s = i, timings.decode_s + time.perf_counter() - start
        yield token
        done |= token == stop_token
        if done.all() or cache.pos == model.config.n_ctx:
            return
        step = token[:, None]


class Continuation:
    """One prompt being continued in a ragged batch: its own sampling, generator, limits and output."""

    def __init__(self, ids, max_new_tokens, sampling, rng, stop_token, n_ctx):
        self.ids, self.max_new_tokens, self.sampling, self.rng = ids, max_new_tokens, sampling, rng
        self.stop_token, self.n_ctx = stop_token, n_ctx
        self.new = []

    def take(self, logits):                                # [V] logits of the next position -> the chosen id
        token = int(sample(logits[None], self.rng, *self.sampling)[0])
        self.new.append(token)
        return token

    @property
    def done(self):                                        # max_new_tokens reached, the stop token, or the context full
        return (len(self.new) >= self.max_new_tokens or bool(self.new and self.new[-1] == self.stop_token)
                or len(self.ids) + len(self.new) - 1 >= self.n_ctx)   # the cache holds prompt + new - 1 positions


class Slots:
    """max_batch rows of one KV cache and the continuations in rows 0..n-1 (continuous batching).
    `step` advances every busy row one token and prefills newcomers into the next free rows, in one
    forward, each row at its own position, attending only to its own keys (`add` prefills one alone).
    A finished row leaves at once and the last busy row moves into its place, so the busy rows stay
    0..n-1 and no step ever computes on a finished or padded row."""

    def __init__(self, model, max_batch, n_choices=None):
        self.model, self.max_batch, self.n_choices = model, max_batch, n_choices
        self.cache = model.new_cache(batch=max_batch)
        self.busy = []                                     # busy[i]: the continuation in cache row i

    def add(self, row):                                    # prefill row.ids into the next free row; row takes its first token
        i = len(self.busy)
        self.cache.reset(i)
        every = getattr(row, "score_prompt", False)        # every position's logits (scoring the prompt), or the last only
        logits = self.model.forward(row.ids[None], cache=self.cache.rows(i, i + 1), last=not every)[0, :, : self.n_choices]
        self.busy.append(row)
        if every:
            row.prompt_scores(logits[:-1])                 # [T - 1, V]: position t predicts prompt token t + 1
        row.take(logits[-1])

    def step(self, newcomers=()):                          # every busy row: one more token; newcomers join
        """One forward for every busy row's next token and the newcomers' prompts, prefilled into the next
        free rows (npgpt.model.forward_packed): the prompts' pass over the weights carries the busy rows'
        tokens too, and several prompts share one. Each newcomer takes its first token."""
        n = len(self.busy)
        groups = [(0, np.array([[row.new[-1]] for row in self.busy]))] if self.busy else []      # [n, 1]
        for i, row in enumerate(newcomers, start=n):
            self.cache.reset(i)
            groups.append((i, row.ids[None]))
        logits = self.model.forward_packed(self.cache, groups)                                   # [n + k, V]
        self.busy.extend(newcomers)
        for row, row_logits in zip(self.busy, logits[:, : self.n_choices]):
            row.take(row_logits)

    def drop_finished(self):                               # -> the continuations that left
        left = []
        for i in reversed(range(len(self.busy))):
            if self.busy[i].done:
                left.append(self.busy[i])
                last = len(self.busy) - 1
                if i != last:                              # the last busy row takes the free place
                    self.cache.move(last, i)
                    self.busy[i] = self.busy[last]
                self.busy.pop()
        return left


def generate_ragged(model, prompts, *, max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seeds=None,
                    stop_token=EOT, n_choices=None):       # list of [T_i] ids -> list of lists of new ids
    """Continue prompts of different lengths together (Slots); each gets exactly what it would get alone.
    seeds: one per prompt (None: fresh entropy)."""
    check_sampling(temperature, top_k, top_p)
    max_new_tokens = check_count("max_new_tokens", max_new_tokens)
    seeds = [None] * len(prompts) if seeds is None else seeds
    rows = [Continuation(ids, max_new_tokens, (temperature, top_k, top_p), np.random.default_rng(check_seed(seed)),
                         stop_token, model.config.n_ctx) for ids, seed in zip(prompts, seeds)]
    if max_new_tokens == 0:
        return [r.new for r in rows]
    slots, pending = Slots(model, len(rows), n_choices), collections.deque(rows)
    while pending or slots.busy:                           # prompts join within the budget; the rest decode meanwhile
        slots.step(take_prompts(pending, PREFILL_TOKENS, len(rows) - len(slots.busy)))
        slots.drop_finished()
    return [r.new for r in rows]


PREFILL_TOKENS = 2048                                      # prompt tokens prefilled per step (one prompt always)


def take_prompts(queue, budget, free):                     # deque of continuations -> those to prefill this step
    """From the front of `queue`, as many as there are free rows while their prompts total at most
    `budget` tokens, and always one (if a row is free): a step's prefill delays every busy row's next
    token, so the budget bounds that delay, and several short prompts share one pass over the weights."""
    taken, tokens = [], 0
    while queue and len(taken) < free and (not taken or tokens + len(queue[0].ids) <= budget):
        taken.append(queue.popleft())
        tokens += len(taken[-1].ids)
    return taken


class TextOut:
    """Token ids pushed one at a time -> text safe to show now: complete UTF-8 characters (a character
    can span tokens), holding back only what could still be the start of a stop string. `stopped`
    turns True at <|endoftext|> or a stop string; text from there on is never released."""

    def __init__(self, enc, stops=(), stop_token=EOT):
        self.enc, self.stops, self.stop_token = enc, list(stops), stop_token
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""
        self.stopped = False

    def push(self, token):                                 # -> text released by this token ("" while held back)
        if self.stopped:
            return ""
        if token == self.stop_token:
            return self.finish()
        return self.add_text(self.decoder.decode(self.enc.decode_single_token_bytes(int(token))))

    def finish(self):                                      # the end of the tokens: release what was held
        if self.stopped:
            return ""
        text = self.add_text(self.decoder.decode(b"", final=True))
        if self.stopped:                                   # the decoder's tail completed a stop string
            return text
        self.stopped, rest, self.held = True, self.held, ""
        return text + rest

    def add_text(self, piece):                             # text already decoded -> text released now
        if self.stopped:
            return ""
        self.held += piece
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, out, self.held = True, self.held[: min(hits)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out


def text_pieces(tokens, enc, stops=(), stop_token=EOT):   # token ids -> text pieces, ending at stop_token or a stop string
    out = TextOut(enc, stops, stop_token)
    for token in tokens:
        piece = out.push(token)
        if piece:
            yield piece
        if out.stopped:
            return
    tail = out.finish()
    if tail:
        yield tail
