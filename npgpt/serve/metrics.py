"""GET /metrics: the engine's counters, gauges and latency histograms in Prometheus' text format."""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The engine's observer (started, finished, step); one registry per server, so tests can run several."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("npgpt_requests", "Completion requests (one per prompt and choice) by outcome",
                                ["outcome"], registry=r)
        self.prompt_tokens = Counter("npgpt_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("npgpt_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("npgpt_queue_depth", "Requests waiting for a slot", registry=r)
        self.busy_slots = Gauge("npgpt_busy_slots", "KV-cache slots generating", registry=r)
        self.ttft = Histogram("npgpt_time_to_first_token_seconds", "From submit to the first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("npgpt_inter_token_latency_seconds", "Between a request's consecutive tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        for outcome in ("stop", "length", "cancelled", "error", "rejected"):
            self.requests.labels(outcome)                  # every outcome listed from the start, at 0

    def started(self, request):
        self.prompt_tokens.inc(len(request.ids))

    def finished(self, request, reason):
        self.requests.labels(reason).inc()
        times = request.token_times
        self.generated_tokens.inc(len(times))
        if times:
            self.ttft.observe(times[0] - request.submitted)
        for a, b in zip(times, times[1:]):
            self.itl.observe(b - a)

    def step(self, busy, waiting):
        self.busy_slots.set(busy)
        self.queue_depth.set(waiting)

    def rejected(self):
        self.requests.labels("rejected").inc()

    def render(self):
        return generate_latest(self.registry)
