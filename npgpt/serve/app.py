"""The HTTP layer: OpenAI's /v1/completions (and vLLM's extras) over the engine, with FastAPI.

Handlers check the request, submit one engine request per prompt and choice, and stream or gather
their events; they never run the model. Every error has OpenAI's shape
{"error": {"message", "type", "param", "code"}}: 400 for a bad field, 404 for an unknown model,
413 for a body over the limit, 429 when the queue is full.
"""

import asyncio
import json
import math
import numbers
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..tokenizer import get_encoding
from .engine import Done, PromptScores, QueueFull, Sampling, Token
from .metrics import Metrics

MAX_BODY_BYTES = 1 << 20                                   # 1 MiB: far above any prompt that fits a GPT-2 context
MAX_STOPS = 4
MAX_LOGPROBS = 5
UNSUPPORTED = {"suffix": None, "best_of": 1, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0}


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self):
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}},
                            status_code=self.status)


def _number(body, name, default, low=None, high=None, low_open=False, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and (isinstance(value, numbers.Integral) or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        kind = "an integer" if integer else "a number"
        bounds = (f" {'>' if low_open else '>='} {low}" if low is not None else "") + (f" and <= {high}" if high is not None else "")
        raise ApiError(400, f"'{name}' must be {kind}{bounds}; got {json.dumps(value)}", param=name)
    return int(value) if integer else float(value)


def _bool(body, name):
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false; got {json.dumps(value)}", param=name)
    return value


class Completions:
    """The checks and shapes of /v1/completions, for one served model."""

    def __init__(self, engine, model_name):
        self.engine, self.name = engine, model_name
        self.cfg = engine.model.config
        self.enc = get_encoding()

    def prompts(self, prompt):                             # -> list of id lists
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists",
                           param="prompt")
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                ids = self.enc.encode(p, allowed_special={"<|endoftext|>"})
            elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                ids = p
                bad = [t for t in ids if not 0 <= t < self.cfg.n_vocab]
                if bad:
                    raise ApiError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {self.cfg.n_vocab})", param="prompt")
            else:
                raise ApiError(400, f"prompt {i} must be a string or a list of token ids", param="prompt")
            if not ids:
                raise ApiError(400, f"prompt {i} is empty: give at least one token", param="prompt")
            if len(ids) > self.cfg.n_ctx:
                raise ApiError(400, f"prompt {i} has {len(ids)} tokens; this model's maximum context length is "
                                    f"{self.cfg.n_ctx} tokens", param="prompt", code="context_length_exceeded")
            out.append(list(ids))
        return out

    def parse(self, body):                                 # -> (prompts, Sampling, n, stream, echo, include_usage)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required: a model id from GET /v1/models", param="model")
        if model != self.name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.name}`", param="model",
                           code="model_not_found")
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required", param="prompt")
        for name, default in UNSUPPORTED.items():
            if body.get(name, default) not in (default, None):
                raise ApiError(400, f"'{name}' is not supported by this server", param=name)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOPS:
            raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", param="stop")
        n = _number(body, "n", 1, low=1, high=self.engine.max_batch, integer=True)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ApiError(400, f"'seed' must be an integer >= 0; got {json.dumps(seed)}", param="seed")
        logprobs = body.get("logprobs")
        if logprobs is not None:
            logprobs = _number(body, "logprobs", 0, low=0, high=MAX_LOGPROBS, integer=True)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        echo = _bool(body, "echo")
        sampling = Sampling(max_tokens=_number(body, "max_tokens", 16, low=1, integer=True),
                            temperature=_number(body, "temperature", 1.0, low=0),
                            top_p=_number(body, "top_p", 1.0, low=0, high=1, low_open=True),
                            top_k=_number(body, "top_k", 0, low=0, integer=True),
                            seed=seed, stop=tuple(stop), logprobs=logprobs, echo=echo)
        return (self.prompts(body["prompt"]), sampling, n, _bool(body, "stream"), echo, bool(options.get("include_usage")))

    def submit(self, prompts, sampling, n, sink_for):      # -> [(choice index, prompt ids, engine request)]
        """One engine request per prompt and choice (choice j of prompt i has index i * n + j; seeds seed + j).
        If the queue fills up part way, what was submitted is cancelled and the whole call is refused."""
        submitted = []
        try:
            for i, ids in enumerate(prompts):
                for j in range(n):
                    s = sampling if sampling.seed is None else Sampling(**{**sampling.__dict__, "seed": sampling.seed + j})
                    index = i * n + j
                    submitted.append((index, ids, self.engine.submit(ids, s, sink_for(index))))
        except QueueFull as e:
            for _, _, request in submitted:
                request.cancel()
            raise ApiError(429, str(e), code="queue_full", kind="rate_limit_error") from None
        return submitted

    def logprobs(self, events, prompt_ids, echo, offset0):   # events of one choice -> OpenAI's logprobs object
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = offset0
        decode = lambda t: self.enc.decode_single_token_bytes(t).decode("utf-8", errors="replace")
        for e in events:
            if isinstance(e, PromptScores) and echo:
                for t, lp, top in zip(prompt_ids, e.logprobs, e.top):
                    tokens.append(decode(t))
                    token_logprobs.append(lp)
                    top_logprobs.append(None if top is None else {decode(i): v for i, v in top})
                    offsets.append(offset)
                    offset += len(tokens[-1])
            elif isinstance(e, Token):
                tokens.append(decode(e.id))
                token_logprobs.append(e.logprob)
                top_logprobs.append({decode(i): v for i, v in e.top})
                offsets.append(offset)
                offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def create_app(engine, model_name, metrics=None):
    """The FastAPI app over a started-or-not engine; the app's lifespan starts it and stops it."""
    from contextlib import asynccontextmanager

    metrics = metrics or Metrics()
    engine.observer = metrics
    api = Completions(engine, model_name)

    @asynccontextmanager
    async def lifespan(app):
        if not engine.running:
            engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop, 60)   # in-flight requests finish first

    app = FastAPI(title="npgpt", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        if e.status == 429:
            metrics.rejected()
        return e.response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "busy_slots": engine.busy, "queued": engine.queued}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(engine.created),
                                            "owned_by": "npgpt", "max_model_len": api.cfg.n_ctx}]}

    async def json_body(request):
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body of {size} bytes is over the limit of {MAX_BODY_BYTES}")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        prompts, sampling, n, stream, echo, include_usage = api.parse(await json_body(request))
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        sink_for = lambda index: (lambda event: loop.call_soon_threadsafe(queue.put_nowait, (index, event)))
        submitted = api.submit(prompts, sampling, n, sink_for)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model_name}
        prompt_tokens = sum(len(ids) for ids in prompts) * n
        if stream:
            return StreamingResponse(_stream(api, submitted, queue, head, echo, sampling, prompt_tokens, include_usage),
                                     media_type="text/event-stream")
        return await _gather(api, submitted, queue, head, echo, sampling, prompt_tokens, request)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise ApiError(400, "'prompt' must be a string", param="prompt")
        tokens = api.enc.encode(body["prompt"], allowed_special={"<|endoftext|>"})
        return {"tokens": tokens, "count": len(tokens), "max_model_len": api.cfg.n_ctx}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await json_body(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < api.enc.n_vocab
                                                   for t in tokens):
            raise ApiError(400, f"'tokens' must be a list of token ids in [0, {api.enc.n_vocab})", param="tokens")
        return {"prompt": api.enc.decode(tokens)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    return app


def _choice_text(events, prompt_ids, echo, enc):
    text = enc.decode(prompt_ids) if echo else ""
    return text + "".join(e.text for e in events if isinstance(e, (Token, Done)))


async def _gather(api, submitted, queue, head, echo, sampling, prompt_tokens, request):
    """Wait for every choice to finish; a client that goes away cancels its requests."""
    events = {index: [] for index, _, _ in submitted}
    left = len(submitted)
    try:
        while left:
            try:
                index, event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            events[index].append(event)
            left -= isinstance(event, Done)
    except asyncio.CancelledError:
        for _, _, r in submitted:
            r.cancel()
        raise
    choices = []
    for index, ids, _ in submitted:
        done = events[index][-1]
        if done.finish_reason == "error":
            raise ApiError(500, f"generation failed: {done.error}", kind="server_error")
        choices.append({"text": _choice_text(events[index], ids, echo, api.enc), "index": index,
                        "logprobs": None if sampling.logprobs is None else api.logprobs(events[index], ids, echo, 0),
                        "finish_reason": done.finish_reason})
    completion = sum(sum(isinstance(e, Token) for e in ev) for ev in events.values())
    return {**head, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}}


async def _stream(api, submitted, queue, head, echo, sampling, prompt_tokens, include_usage):
    """Server-sent events: a chunk per token that releases text (or carries logprobs), a last chunk per
    choice with its finish_reason, then `data: [DONE]`. Closing the connection cancels the requests."""
    chunk = lambda index, text, finish=None, logprobs=None: "data: " + json.dumps(
        {**head, "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]}) + "\n\n"
    prompts = {index: ids for index, ids, _ in submitted}
    offsets = {index: 0 for index in prompts}
    left, completion = len(submitted), 0
    try:
        if echo:
            for index, ids in prompts.items():
                text = api.enc.decode(ids)
                offsets[index] = len(text)
                if sampling.logprobs is None:
                    yield chunk(index, text)
        while left:
            index, event = await queue.get()
            if isinstance(event, PromptScores):
                lp = api.logprobs([event], prompts[index], True, 0)
                yield chunk(index, api.enc.decode(prompts[index]), logprobs=lp)
            elif isinstance(event, Token):
                completion += 1
                lp = None if sampling.logprobs is None else api.logprobs([event], prompts[index], False, offsets[index])
                offsets[index] += len(event.text)
                if event.text or lp:
                    yield chunk(index, event.text, logprobs=lp)
            elif isinstance(event, Done):
                left -= 1
                if event.finish_reason == "error":
                    yield "data: " + json.dumps({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                                           "param": None, "code": None}}) + "\n\n"
                    continue
                yield chunk(index, event.text, finish=event.finish_reason)
        if include_usage:
            yield "data: " + json.dumps({**head, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:                                               # normal end: all done already; a disconnect: free the slots
        for _, _, r in submitted:
            r.cancel()
