"""npgpt serve over HTTP, driven by the official openai client and by raw requests (the serve extra)."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn

import npgpt
from npgpt.serve.app import create_app
from npgpt.serve.engine import Engine

SMALL = npgpt.Config(n_vocab=50257, n_ctx=64, n_embd=16, n_head=2, n_layer=2)
NAME = "tiny-test"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread of this process, on a free port."""

    def __init__(self, model, max_batch=4, max_queue=16):
        self.engine = Engine(model, max_batch=max_batch, max_queue=max_queue)
        self.port = free_port()
        config = uvicorn.Config(create_app(self.engine, NAME), host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model():
    return npgpt.random_model(SMALL, seed=3, backend="numba")


@pytest.fixture(scope="module")
def server(model):
    s = Server(model)
    yield s
    s.close()


def alone(model, prompt, **kw):                            # what generate() returns for this prompt alone
    return model.generate(prompt, **kw)


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = server.client.models.list()
    assert [m.id for m in models.data] == [NAME]


def test_plain_completion_equals_generate(server, model):
    r = server.client.completions.create(model=NAME, prompt="Hello", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.text == alone(model, "Hello", max_new_tokens=12, temperature=0)
    assert choice.finish_reason in ("stop", "length") and choice.index == 0
    assert r.usage.prompt_tokens == 1 and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_completion_equals_the_plain_one(server, model):
    chunks = list(server.client.completions.create(model=NAME, prompt="Once upon", max_tokens=15, temperature=0.7, seed=4,
                                                   stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == alone(model, "Once upon", max_new_tokens=15, temperature=0.7, seed=4)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_usage_chunk(server):
    chunks = list(server.client.completions.create(model=NAME, prompt=[1, 2, 3], max_tokens=4, temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 3
    assert chunks[-1].usage.completion_tokens == 4 or chunks[-2].choices[0].finish_reason == "stop"


def test_token_id_prompts_lists_and_n(server, model):
    r = server.client.completions.create(model=NAME, prompt=[[10, 20, 30], [7]], max_tokens=5, temperature=0.9, n=2, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        prompt, j = [[10, 20, 30], [7]][c.index // 2], c.index % 2
        assert c.text == npgpt.get_encoding().decode(
            [t for t in alone(model, prompt, max_new_tokens=5, temperature=0.9, seed=11 + j) if t != 50256])
    assert r.choices[0].text != r.choices[1].text or r.choices[0].text == ""
    r = server.client.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 3


def test_stop_strings(server, model):
    r = server.client.completions.create(model=NAME, prompt="The", max_tokens=30, temperature=1.0, seed=2, stop=["e", "a"])
    assert r.choices[0].text == alone(model, "The", max_new_tokens=30, temperature=1.0, seed=2, stop=["e", "a"])
    assert "e" not in r.choices[0].text and "a" not in r.choices[0].text


def test_logprobs_and_echo(server, model):
    r = server.client.completions.create(model=NAME, prompt=[100, 200, 300], max_tokens=3, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    enc = npgpt.get_encoding()
    assert lp.token_logprobs[0] is None and len(lp.tokens) == 3 + 3
    logits = model.forward(np.array([100, 200, 300]))
    z = logits[0].astype(np.float64)
    want = z[200] - (z.max() + np.log(np.exp(z - z.max()).sum()))
    assert lp.token_logprobs[1] == pytest.approx(want, abs=1e-4)
    assert r.choices[0].text.startswith(enc.decode([100, 200, 300]))
    assert all(len(top) == 3 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_tokenize_detokenize_and_metrics(server):
    t = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert t["tokens"] == [15496, 995] and t["count"] == 2
    assert httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "Hello world"
    server.client.completions.create(model=NAME, prompt="x", max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    for name in ("npgpt_requests_total", "npgpt_prompt_tokens_total", "npgpt_generation_tokens_total", "npgpt_queue_depth",
                 "npgpt_busy_slots", "npgpt_time_to_first_token_seconds_bucket", "npgpt_inter_token_latency_seconds_bucket"):
        assert name in text
    assert 'npgpt_requests_total{outcome="length"}' in text


@pytest.mark.parametrize("body, status, param, message", [
    ({"model": "other", "prompt": "x"}, 404, "model", "does not exist"),
    ({"prompt": "x"}, 400, "model", "'model' is required"),
    ({"model": NAME}, 400, "prompt", "'prompt' is required"),
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "must be an integer >= 1"),
    ({"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "must be an integer"),
    ({"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature", "must be a number >= 0"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p", "> 0 and <= 1"),
    ({"model": NAME, "prompt": "x", "top_p": 1.5}, 400, "top_p", "> 0 and <= 1"),
    ({"model": NAME, "prompt": [1, 99999]}, 400, "prompt", "token id 99999 is outside the vocabulary"),
    ({"model": NAME, "prompt": list(range(65))}, 400, "prompt", "maximum context length is 64"),
    ({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
    ({"model": NAME, "prompt": "x", "n": 5}, 400, "n", "<= 4"),
    ({"model": NAME, "prompt": "x", "logprobs": 6}, 400, "logprobs", "<= 5"),
    ({"model": NAME, "prompt": "x", "seed": -1}, 400, "seed", "integer >= 0"),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream", "true or false"),
    ({"model": NAME, "prompt": "x", "best_of": 3}, 400, "best_of", "not supported"),
    ({"model": NAME, "prompt": []}, 400, "prompt", "'prompt' must be"),
    ({"model": NAME, "prompt": ""}, 400, "prompt", "empty"),
    ([1, 2], 400, None, "must be a JSON object"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, model, body, status, param, message):
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == param and set(error) == {"message", "type", "param", "code"}
    assert server.client.completions.create(model=NAME, prompt="ok", max_tokens=2).choices


def test_malformed_json_and_oversized_bodies(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="x")


def test_sixteen_concurrent_streams_each_get_what_they_get_alone(server, model):
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(0, 50257, n))) for n in rng.integers(1, 40, 16)]

    def stream(prompt):
        chunks = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:   # 16 clients, 4 slots: the rest queue and join as rows free up
        got = list(pool.map(stream, prompts))
    enc = npgpt.get_encoding()
    for prompt, text in zip(prompts, got):
        want = [t for t in alone(model, prompt, max_new_tokens=10, temperature=0)]
        assert text == enc.decode(want[: want.index(50256)] if 50256 in want else want)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": NAME, "prompt": "x", "max_tokens": 60, "stream": True, "temperature": 1.0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break                                      # one chunk, then hang up
    deadline = time.time() + 10
    while server.engine.busy:
        assert time.time() < deadline, "the disconnected stream kept its slot"
        time.sleep(0.01)
    text = httpx.get(server.url + "/metrics").text
    assert 'npgpt_requests_total{outcome="cancelled"} 1.0' in text


def test_a_full_queue_answers_429(model):
    engine_start = Engine.start
    Engine.start = lambda self: self                        # the app's startup leaves the engine stopped: nothing leaves the queue
    try:
        s = Server(model, max_batch=1, max_queue=1)
    finally:
        Engine.start = engine_start
    try:
        first = concurrent.futures.ThreadPoolExecutor(1).submit(s.client.completions.create, model=NAME, prompt="a", max_tokens=3)
        deadline = time.time() + 10
        while s.engine.queued < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        r = httpx.post(s.url + "/v1/completions", json={"model": NAME, "prompt": "b", "max_tokens": 3})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            s.client.completions.create(model=NAME, prompt="c", max_tokens=3)
        s.engine.start()                                   # the queued request is served
        assert first.result(30).choices[0].finish_reason in ("stop", "length")
        assert 'npgpt_requests_total{outcome="rejected"} 2.0' in httpx.get(s.url + "/metrics").text
    finally:
        s.close()


def test_sigterm_lets_in_flight_requests_finish_and_exits(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "npgpt", "serve", "--config", "tiny", "--port", str(port),
                             "--model-name", "m", "--max-batch", "2"], stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "no start"
            time.sleep(0.2)
        chunks = []
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"model": "m", "prompt": "Hello", "max_tokens": 40, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line)
                    if len(chunks) == 2:
                        proc.send_signal(signal.SIGTERM)   # mid-stream
        assert chunks[-1] == "data: [DONE]"                # the in-flight stream was allowed to finish
        finish = [json.loads(c[6:])["choices"][0]["finish_reason"] for c in chunks[:-1]]
        assert finish[-1] in ("stop", "length")
        # a clean exit: 0, or death by the re-raised SIGTERM (uvicorn >= 0.30 re-raises it after its graceful
        # shutdown, so a parent sees the conventional status); never a traceback, never a hang
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_on_a_port_in_use_fails_with_a_clear_error(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "npgpt", "serve", "--config", "tiny", "--port", str(port)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert f"could not listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_flags_are_checked(capsys):
    from npgpt import cli

    assert cli.main(["serve", "--config", "tiny", "--max-batch", "0"]) == 1
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    assert cli.main(["serve", "--config", "tiny", "--prefill-tokens", "0"]) == 1
    assert "--prefill-tokens must be >= 1" in capsys.readouterr().err


def test_bench_serve_machinery_reports_every_level_without_errors():
    """The load benchmark's plumbing (a real server process, streamed clients, its table); figures are not
    asserted: performance is measured by `npgpt bench --serve`, not by tests."""
    from npgpt import bench_serve

    report = bench_serve.run(config="tiny", levels=(1, 3), requests=4, max_tokens=4, prompt_lengths=(4, 40), rounds=2,
                             log=lambda m: None)
    assert [r["clients"] for r in report["levels"]] == [1, 3]
    for r in report["levels"]:
        assert r["errors"] == 0 and r["lost"] == 0 and r["tokens_per_s"] > 0 and r["ttft_p50_ms"] > 0
    assert [[r["clients"] for r in rnd] for rnd in report["rounds"]] == [[1, 3], [1, 3]]   # every level in every round
    ratios = report["one_client_vs_tg128"]["ratios"]           # 1 client, each round next to its own tg128 run
    assert len(ratios) == 2 and all(r > 0 for r in ratios) and report["levels"][0]["tg128_b1"] > 0
    local = report["one_client_vs_in_process"]["ratios"]       # and next to the same requests decoded in-process
    assert len(local) == 2 and all(r > 0 for r in local) and report["levels"][0]["in_process_decode"] > 0
    scaling = report["vs_one_client"][3]["ratios"]            # 3 clients against 1 client of the same round
    assert scaling == [round(rnd[1]["tokens_per_s"] / rnd[0]["tokens_per_s"], 3) for rnd in report["rounds"]]
    text = bench_serve.table(report)
    assert "| 3 | 4 |" in text and "3 clients" in text and "median of 2" in text


def test_bench_serve_flags(capsys):
    from npgpt import cli

    assert cli.main(["bench", "--serve", "--train"]) == 1
    assert "separate benchmarks" in capsys.readouterr().err
    assert cli.main(["bench", "--serve", "--backend", "numpy,numba"]) == 1
    assert "one --backend" in capsys.readouterr().err
