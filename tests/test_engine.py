"""The serving engine: continuous batching gives each request exactly what it gets alone."""

import threading
import time

import numpy as np
import pytest

import npgpt
from npgpt.serve.engine import Done, Engine, QueueFull, Sampling, Token, log_softmax

SMALL = npgpt.Config(n_vocab=50257, n_ctx=64, n_embd=16, n_head=2, n_layer=2)


@pytest.fixture(scope="module", params=["numpy", "numba"])
def model(request):
    return npgpt.random_model(SMALL, seed=5, backend=request.param)


class Collector:
    """A request's events, and a flag set when its last one arrives."""

    def __init__(self):
        self.events, self.finished = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, Done):
            self.finished.set()

    def wait(self):
        assert self.finished.wait(60), "the request never finished"
        return self

    @property
    def ids(self):
        return [e.id for e in self.events if isinstance(e, Token)]

    @property
    def text(self):
        return "".join(e.text for e in self.events)

    @property
    def done(self):
        return self.events[-1]


def run(engine, prompts, samplings):
    sinks = [Collector() for _ in prompts]
    for ids, s, sink in zip(prompts, samplings, sinks):
        engine.submit(ids, s, sink)
    return [sink.wait() for sink in sinks]


def test_concurrent_requests_get_what_each_gets_alone(model):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 50257, n)) for n in (3, 40, 1, 17, 9, 60)]   # 60 + 10 > n_ctx: ends at the context
    samplings = [Sampling(max_tokens=10, temperature=0)] * 3 + [Sampling(max_tokens=n, temperature=0.9, top_k=40, seed=s)
                                                                  for n, s in ((5, 1), (10, 2), (10, 3))]
    engine = Engine(model, max_batch=4, max_queue=8).start()  # 6 requests, 4 slots: two wait, then join mid-flight
    try:
        results = run(engine, prompts, samplings)
    finally:
        engine.stop(timeout=30)
    for ids, s, r in zip(prompts, samplings, results):
        alone = model.generate(ids, max_new_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k, seed=s.seed)
        assert r.ids == alone
        assert r.done.finish_reason == ("stop" if alone[-1] == 50256 else "length")
    assert len(results[-1].ids) == 64 - 60 + 1
    assert engine.finished.is_set() and engine.busy == 0


def test_stop_strings_and_text_equal_generate_alone(model):
    engine = Engine(model, max_batch=2).start()
    try:
        texts = ["Hello there", "Once upon a time in a land far away", "x"]
        samplings = [Sampling(max_tokens=12, temperature=0.8, seed=i, stop=("e", "\n")) for i in range(3)]
        results = run(engine, [npgpt.get_encoding().encode(t) for t in texts], samplings)
    finally:
        engine.stop(timeout=30)
    for t, s, r in zip(texts, samplings, results):
        assert r.text == model.generate(t, max_new_tokens=12, temperature=0.8, seed=s.seed, stop=list(s.stop))
        assert "e" not in r.text and "\n" not in r.text
        assert r.done.finish_reason in ("stop", "length")


def test_logprobs_are_the_models_own(model):
    engine = Engine(model, max_batch=2).start()
    try:
        (r,) = run(engine, [[10, 20, 30]], [Sampling(max_tokens=3, temperature=0, logprobs=4)])
    finally:
        engine.stop(timeout=30)
    first = r.events[0]
    want = log_softmax(model.forward(np.array([10, 20, 30]))[-1, :50257])
    assert first.logprob == pytest.approx(want[first.id], abs=1e-5)
    assert [i for i, _ in first.top] == list(np.argsort(-want, kind="stable")[:4]) and first.top[0][0] == first.id
    assert all(a[1] >= b[1] for a, b in zip(first.top, first.top[1:]))


def test_a_cancelled_request_frees_its_slot_and_the_others_go_on(model):
    engine = Engine(model, max_batch=2).start()
    try:
        slow = Collector()
        request = engine.submit([1, 2, 3], Sampling(max_tokens=50, temperature=0), slow)
        other = Collector()
        engine.submit([4, 5], Sampling(max_tokens=20, temperature=0), other)
        while len(slow.ids) < 3:
            time.sleep(0.001)
        request.cancel()
        slow.wait()
        assert slow.done.finish_reason == "cancelled" and len(slow.ids) < 50
        third = Collector()
        engine.submit([7, 8, 9], Sampling(max_tokens=5, temperature=0), third)   # takes the freed slot
        assert third.wait().ids == model.generate([7, 8, 9], max_new_tokens=5, temperature=0)
        assert other.wait().ids == model.generate([4, 5], max_new_tokens=20, temperature=0)
    finally:
        engine.stop(timeout=30)


def test_a_full_queue_refuses_at_once_and_stop_drains(model):
    engine = Engine(model, max_batch=1, max_queue=1)      # not started: nothing leaves the queue
    engine.submit([1], Sampling(max_tokens=2), Collector())
    with pytest.raises(QueueFull, match="--max-queue"):
        engine.submit([1], Sampling(max_tokens=2), Collector())
    engine.start()
    engine.stop(timeout=30)                                # the queued request is served before the thread ends
    assert engine.finished.is_set() and engine.queued == 0
    with pytest.raises(QueueFull, match="shutting down"):
        engine.submit([1], Sampling(max_tokens=2), Collector())


def test_a_failing_request_gets_an_error_and_the_engine_keeps_serving(model):
    engine = Engine(model, max_batch=2).start()
    try:
        bad = Collector()
        engine.submit(list(range(65)), Sampling(max_tokens=2), bad)   # longer than n_ctx 64
        assert bad.wait().done.finish_reason == "error" and "exceeds the context" in bad.done.error
        good = Collector()
        engine.submit([1, 2], Sampling(max_tokens=3, temperature=0), good)
        assert good.wait().ids == model.generate([1, 2], max_new_tokens=3, temperature=0)
    finally:
        engine.stop(timeout=30)


def test_a_request_cancelled_while_waiting_never_takes_a_row(model):
    engine = Engine(model, max_batch=1)                    # not started yet: both wait
    first, second = Collector(), Collector()
    engine.submit([1, 2], Sampling(max_tokens=3, temperature=0), first)
    engine.submit([3, 4], Sampling(max_tokens=3, temperature=0), second).cancel()
    engine.start()
    try:
        assert second.wait().events == [Done("cancelled")]
        assert first.wait().done.finish_reason == "length"
    finally:
        engine.stop(timeout=30)


class Steps:
    """An observer that records how many rows were busy after each engine step."""

    def __init__(self):
        self.busy = []

    def started(self, request):
        pass

    def finished(self, request, reason):
        pass

    def step(self, busy, waiting):
        self.busy.append(busy)


@pytest.mark.parametrize("budget, first_step", [(1, 1), (512, 3)])
def test_newcomers_join_together_within_the_prefill_budget(model, budget, first_step):
    """Requests waiting when the engine starts join in one step while their prompts fit --prefill-tokens
    (one always joins); either way each gets exactly what it gets alone."""
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 50257, n)) for n in (5, 12, 8)]
    steps = Steps()
    engine = Engine(model, max_batch=4, observer=steps, prefill_tokens=budget)
    sinks = [Collector() for _ in prompts]
    for ids, sink in zip(prompts, sinks):
        engine.submit(ids, Sampling(max_tokens=6, temperature=0), sink)
    engine.start()
    try:
        results = [sink.wait() for sink in sinks]
    finally:
        engine.stop(timeout=30)
    assert steps.busy[0] == first_step
    for ids, r in zip(prompts, results):
        assert r.ids == model.generate(ids, max_new_tokens=6, temperature=0)
