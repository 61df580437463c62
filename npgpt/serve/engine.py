"""The continuous-batching engine: one thread owns the model and --max-batch KV-cache rows.

HTTP handlers only `submit` requests and read their events. The engine thread loops: admit waiting
requests into free rows (up to --prefill-tokens prompt tokens a step), run one forward that carries
every busy row's next token and the newcomers' prompts (npgpt.model.forward_packed), hand each request
its token, and let finished or cancelled rows leave at once (npgpt.generate.Slots).
Each request keeps its own sampling parameters, generator (seed), stop strings and max_tokens, so
its text is exactly what it would get alone. Waiting requests queue up to --max-queue; beyond that
`submit` raises QueueFull at once (HTTP 429).
"""

import collections
import dataclasses
import math
import threading
import time

import numpy as np

from ..errors import NpgptError
from ..generate import PREFILL_TOKENS, Continuation, Slots, TextOut, take_prompts
from ..inputs import check_ids
from ..tokenizer import EOT, get_encoding


class QueueFull(NpgptError):
    """Every slot is busy and the waiting queue is at its limit."""


@dataclasses.dataclass
class Sampling:
    """One request's generation settings (checked by the HTTP layer before they get here)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = None
    stop: tuple = ()
    logprobs: int = None                                   # None: none; k: the chosen token's logprob and the top k
    echo: bool = False                                     # with logprobs: score the prompt's tokens too


@dataclasses.dataclass
class Token:                                               # an event: one generated token
    id: int
    text: str                                              # the text this token releases ("" while held back)
    logprob: float = None
    top: list = None                                       # [(id, logprob)] best first, when logprobs were asked for


@dataclasses.dataclass
class PromptScores:                                        # an event before the first token (echo with logprobs)
    logprobs: list                                         # per prompt token: None for the first, then its logprob
    top: list                                              # per prompt token: None, then [(id, logprob)] best first


@dataclasses.dataclass
class Done:                                                # the last event of a request
    finish_reason: str                                     # "stop" | "length" | "cancelled" | "error"
    text: str = ""                                         # text released at the end (held back until then)
    error: str = None


def log_softmax(logits):                                   # [V] -> [V] float64
    z = logits.astype(np.float64)
    z -= z.max()
    return z - math.log(np.exp(z).sum())


class Request(Continuation):
    """A submitted prompt: what it needs to continue, and a sink its events go to, in order."""

    def __init__(self, ids, sampling, sink, n_ctx):
        super().__init__(np.asarray(ids, dtype=np.int64), sampling.max_tokens,
                         (sampling.temperature, sampling.top_k, sampling.top_p), np.random.default_rng(sampling.seed), EOT, n_ctx)
        self.params, self.sink = sampling, sink
        self.text = TextOut(get_encoding(), sampling.stop)
        self.cancelled = self.failed = False
        self.submitted = time.perf_counter()
        self.token_times = []                              # perf_counter at each token: TTFT and inter-token latency

    @property
    def score_prompt(self):                                # Slots.add computes every prompt position's logits
        return self.params.echo and self.params.logprobs is not None

    def prompt_scores(self, logits):                       # [T - 1, V]
        scored = [self._scores(row, int(token)) for row, token in zip(logits, self.ids[1:])]
        self.sink(PromptScores([None] + [lp for lp, _ in scored], [None] + [top for _, top in scored]))

    def _scores(self, logits, token):                      # -> (logprob of token, top alternatives)
        lp = log_softmax(logits)
        best = np.argsort(-lp, kind="stable")[: self.params.logprobs]
        return float(lp[token]), [(int(i), float(lp[i])) for i in best]

    def take(self, logits):
        token = super().take(logits)
        self.token_times.append(time.perf_counter())
        event = Token(token, self.text.push(token))
        if self.params.logprobs is not None:
            event.logprob, event.top = self._scores(logits, token)
        self.sink(event)
        return token

    @property
    def done(self):
        return self.cancelled or self.text.stopped or super().done

    def finish_reason(self):                               # "stop": <|endoftext|> or a stop string; "length": max_tokens or the context
        if self.cancelled:
            return "cancelled"
        return "stop" if self.text.stopped else "length"

    def cancel(self):                                      # any thread: the engine drops the row at its next step
        self.cancelled = True


class Engine:
    """Owns the model; serves submitted requests in a thread of its own. `observer` (optional) gets
    observer.started(request), .finished(request, reason) and .step(busy, waiting) calls."""

    def __init__(self, model, max_batch=8, max_queue=64, observer=None, prefill_tokens=PREFILL_TOKENS):
        self.model, self.max_batch, self.max_queue, self.prefill_tokens = model, max_batch, max_queue, prefill_tokens
        self.slots = Slots(model, max_batch, n_choices=get_encoding().n_vocab)
        self.waiting = collections.deque()
        self.wake = threading.Condition()
        self.observer = observer
        self.stopping = False
        self.created = time.time()
        self.running = False                               # start() or run() was called
        self.finished = threading.Event()                  # the loop has ended

    def start(self):
        """Serve in a new thread. A process that has already run the numba kernels in another thread
        should call run() in that thread instead (see run)."""
        self.running = True
        threading.Thread(target=self.run, name="npgpt-engine", daemon=True).start()
        return self

    def run(self):
        """Serve in the calling thread until stop(). `npgpt serve` runs this in the thread that loaded
        the model: GNU OpenMP gives every thread that starts a parallel region a worker team of its own,
        and once the teams outnumber the cores their workers sleep between regions instead of spinning
        (measured: a decode step 30 % slower when the model was prepared in one thread and run in another)."""
        self.running = True
        try:
            self._run()
        finally:
            self.finished.set()

    def submit(self, ids, sampling, sink):                 # -> Request; its events go to sink(event) from the engine thread
        request = Request(ids, sampling, sink, self.model.config.n_ctx)
        with self.wake:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"all {self.max_batch} slots are busy and {len(self.waiting)} requests are waiting (--max-queue)")
            self.waiting.append(request)
            self.wake.notify()
        return request

    def stop(self, timeout=None):
        """Stop taking requests; requests in flight or waiting finish, then the thread ends."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        return self.finished.wait(timeout) if self.running else True

    @property
    def busy(self):
        return len(self.slots.busy)

    @property
    def queued(self):
        return len(self.waiting)

    def _run(self):
        while True:
            with self.wake:
                while not self.waiting and not self.slots.busy and not self.stopping:
                    self.wake.wait()
                if self.stopping and not self.waiting and not self.slots.busy:
                    return
                admitted = take_prompts(self.waiting, self.prefill_tokens, self.max_batch - len(self.slots.busy))
            newcomers = []
            for request in admitted:                       # prompt scoring (echo + logprobs) needs every position: alone
                if request.score_prompt:
                    self._guarded(request, lambda r=request: self.slots.add(r))
                # checked here too (forward_packed checks again): a bad prompt fails its own request, not the whole step
                elif self._guarded(request, lambda r=request: check_ids(r.ids, self.model.config)):
                    newcomers.append(request)
            self._leave()
            if self.slots.busy or newcomers:
                try:
                    self.slots.step(newcomers)
                except Exception as e:                     # noqa: BLE001 (a failed step ends its requests, not the server)
                    for request in {id(r): r for r in self.slots.busy + newcomers}.values():
                        self._fail(request, e)
                self._leave()
            if self.observer:
                self.observer.step(len(self.slots.busy), len(self.waiting))

    def _guarded(self, request, fn):                       # -> whether fn ran without error
        if request.cancelled:                              # cancelled while it waited: it never takes a row
            request.sink(Done("cancelled"))
            if self.observer:
                self.observer.finished(request, "cancelled")
            return False
        if self.observer:
            self.observer.started(request)
        try:
            fn()
        except Exception as e:                             # noqa: BLE001
            self._fail(request, e)
            return False
        return True

    def _fail(self, request, error):                       # the request ends with an error event; its row leaves
        request.cancelled = request.failed = True
        request.sink(Done("error", error=str(error) if isinstance(error, NpgptError) else f"{type(error).__name__}: {error}"))
        if self.observer:
            self.observer.finished(request, "error")

    def _leave(self):
        for request in self.slots.drop_finished():
            if request.failed:                             # its error event is already out
                continue
            reason = request.finish_reason()
            request.sink(Done(reason, text="" if request.cancelled else request.text.finish()))
            if self.observer:
                self.observer.finished(request, reason)
