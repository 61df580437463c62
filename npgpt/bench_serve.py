"""`npgpt bench --serve`: a load test of `npgpt serve` with 1, 4, 8, 16 concurrent streaming clients.

The server runs in its own process (`npgpt serve`, the seeded random model at --config shapes or
--weights), so clients and server do not share a GIL. Each level sends the same fixed list of
requests (mixed prompt lengths, greedy, a fixed number of new tokens, streamed); each client takes
the next request when its last one ends. Reported per level: aggregate generated tokens/s and
requests/s over the level's wall time, time to first token and inter-token latency (p50, p99), and
errors and lost requests (a request that ended without its last chunk or `[DONE]`). Clients use only
the standard library (http.client). Levels repeat in rounds; ratios are taken within a round (see run).
"""

import http.client
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from .errors import InputError


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port, *, weights=None, config="gpt2", backend="numba", weights_dtype=None, max_batch=16, threads=None,
                 prefill_tokens=None, log=print):
    cmd = [sys.executable, "-m", "npgpt", "serve", "--port", str(port), "--max-batch", str(max_batch), "--max-queue", "256",
           "--backend", backend, "--model-name", "bench"]
    cmd += ["--prefill-tokens", str(prefill_tokens)] if prefill_tokens else []
    cmd += ["--weights", weights] if weights else ["--config", config]
    cmd += ["--weights-dtype", weights_dtype] if weights_dtype else []
    cmd += ["-t", str(threads)] if threads else []
    log_file = tempfile.TemporaryFile(mode="w+")          # not a pipe: nobody reads it while the server runs, and a full
    proc = subprocess.Popen(cmd, stderr=log_file, text=True)   # pipe would block the server
    deadline = time.time() + 300
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log_file.seek(0)
            raise RuntimeError(f"npgpt serve did not start: {log_file.read()[-2000:]}")
        time.sleep(0.2)


def stream_one(port, prompt, max_tokens):
    """One streamed completion -> (chunk times relative to the send, completion tokens, error or None).
    A chunk is sent for every token that releases text and a last one (finish_reason) for the end; a
    token whose text is held back (part of a UTF-8 character) shares the next token's chunk."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    times, tokens, done = [], 0, False
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return [], 0, f"HTTP {r.status}: {r.read()[:200]!r}"
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return times, tokens, chunk["error"]["message"]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and (chunk["choices"][0]["text"] or chunk["choices"][0]["finish_reason"]):
                times.append(time.perf_counter() - start)
        conn.close()
    except OSError as e:
        return times, tokens, f"{type(e).__name__}: {e}"
    return times, tokens, None if done else "lost: the stream ended without [DONE]"


def run_level(port, requests, clients, max_tokens):
    """`clients` threads work through `requests`; -> the level's figures."""
    results, lock, queue = [], threading.Lock(), list(enumerate(requests))

    def client():
        while True:
            with lock:
                if not queue:
                    return
                _, prompt = queue.pop(0)
            out = stream_one(port, prompt, max_tokens)
            with lock:
                results.append(out)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [times[0] for times, _, err in results if times and not err]
    itl = [b - a for times, _, err in results if not err for a, b in zip(times[:-1], times[1:-1])]   # the last chunk is the end
    # decode rate, prefill excluded: tokens after the first over the time from a stream's first chunk to its last
    spans = [(n - 1, times[-1] - times[0]) for times, n, err in results if not err and len(times) > 1]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")
    errors = [err for _, _, err in results if err]
    return {"clients": clients, "requests": len(requests), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(n for _, n, err in results if not err) / wall, 2),
            "decode_tokens_per_s": round(sum(n for n, _ in spans) / sum(t for _, t in spans), 2) if spans else float("nan"),
            "requests_per_s": round(sum(1 for *_, err in results if not err) / wall, 3),
            "ttft_p50_ms": round(1e3 * pct(ttft, 50), 1), "ttft_p99_ms": round(1e3 * pct(ttft, 99), 1),
            "itl_p50_ms": round(1e3 * pct(itl, 50), 1), "itl_p99_ms": round(1e3 * pct(itl, 99), 1),
            "errors": sum(1 for e in errors if not e.startswith("lost")), "lost": sum(1 for e in errors if e.startswith("lost")),
            "first_error": errors[0] if errors else None}


def run(*, weights=None, config="gpt2", backend="numba", weights_dtype=None, levels=(1, 4, 8, 16), requests=16,
        max_tokens=64, prompt_lengths=(16, 256), threads=None, seed=0, tg_reference=True, rounds=3, prefill_tokens=None,
        log=lambda msg: print(msg, file=sys.stderr, flush=True)):
    """Every level runs once per round, `rounds` rounds, in forward order then reversed (a drift within a
    round hits the levels alike); each ratio is taken within its round, then the median over rounds,
    because this machine's speed drifts between minutes by more than the effects being measured:
    - each level's aggregate tokens/s against the 1-client level's of the same round;
    - with tg_reference, the 1-client decode rate against two in-process references run just before it (the
      server idle meanwhile): `npgpt bench` tg128 b1 of the same model (from an empty context), and the
      same model decoding the level's first REFERENCE_REQUESTS requests itself, one at a time (the same
      prompts and contexts: what the server adds and nothing else)."""
    if requests < 1 or max_tokens < 1 or min(levels) < 1 or rounds < 1:
        raise InputError("--serve needs at least 1 request, 1 token, 1 client per level and 1 round")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_lengths[0], prompt_lengths[1] + 1, requests)
    prompts = [[int(t) for t in rng.integers(0, 50257, n)] for n in lengths]
    port = _free_port()
    log(f"starting npgpt serve ({weights or config + ' random'}, {backend}) on port {port} ...")
    proc = start_server(port, weights=weights, config=config, backend=backend, weights_dtype=weights_dtype,
                        max_batch=max(levels), threads=threads, prefill_tokens=prefill_tokens)
    report = {"server": {"weights": weights or f"{config} (random)", "backend": backend, "weights_dtype": weights_dtype or "fp32",
                         "max_batch": max(levels), "prefill_tokens": prefill_tokens},
              "load": {"requests": requests, "max_tokens": max_tokens, "prompt_lengths": [int(x) for x in lengths]},
              "rounds": [], "levels": []}
    local = _reference_model(weights, config, backend, weights_dtype) if tg_reference else None
    try:
        stream_one(port, prompts[0][:8], 4)                # warm-up: JIT cache, first allocations
        for r in range(rounds):
            runs = {}
            for clients in (levels if r % 2 == 0 else levels[::-1]):
                ref = {}
                if tg_reference and clients == 1:
                    ref = {"tg128_b1": _tg128(weights, config, backend, weights_dtype, threads, log),
                           "in_process_decode": _decode_in_process(local, prompts[:REFERENCE_REQUESTS], max_tokens, threads, log)}
                log(f"round {r + 1} of {rounds}: {clients} concurrent clients, {requests} requests of {max_tokens} tokens ...")
                runs[clients] = {**run_level(port, prompts, clients, max_tokens), **ref}
                log(f"  {runs[clients]['tokens_per_s']} tokens/s" + (f"; decode {runs[clients]['decode_tokens_per_s']} t/s vs tg128 "
                                                                     f"{ref['tg128_b1']}, in-process {ref['in_process_decode']} t/s" if ref else ""))
            report["rounds"].append([runs[c] for c in levels])
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    summarize(report, levels)
    return report


def summarize(report, levels):
    """Per level, the round of median tokens/s goes in the table; ratios are medians of per-round ratios."""
    median = lambda xs: {"ratios": [round(x, 3) for x in xs], "median": round(float(np.median(xs)), 3)}
    for i, clients in enumerate(levels):
        runs = [rnd[i] for rnd in report["rounds"]]
        report["levels"].append(sorted(runs, key=lambda x: x["tokens_per_s"])[len(runs) // 2])
    if 1 in levels:
        one = levels.index(1)
        report["vs_one_client"] = {c: median([rnd[i]["tokens_per_s"] / rnd[one]["tokens_per_s"] for rnd in report["rounds"]])
                                   for i, c in enumerate(levels) if c != 1}
        if "tg128_b1" in report["rounds"][0][one]:
            report["one_client_vs_tg128"] = median([rnd[one]["decode_tokens_per_s"] / rnd[one]["tg128_b1"]
                                                    for rnd in report["rounds"]])
            report["one_client_vs_in_process"] = median([rnd[one]["decode_tokens_per_s"] / rnd[one]["in_process_decode"]
                                                         for rnd in report["rounds"]])


REFERENCE_REQUESTS = 8                                     # requests the in-process reference decodes per round


def _reference_model(weights, config, backend, weights_dtype):   # the served model, in this process
    from . import api, quant

    base = api.load(weights) if weights else api.random_model(config, seed=0)
    return api.Model(quant.quantize(base.params, weights_dtype or "fp32"), base.config, backend=backend)


def _decode_in_process(model, prompts, max_tokens, threads, log):   # -> t/s of greedy decode after each prefill
    """What the server does for one client, minus the server: each prompt prefilled alone, then its tokens
    decoded one at a time; timed from the first token to the last, as the server's decode rate is."""
    from . import api

    log("reference: the same requests decoded in-process ...")
    tokens, span = 0, 0.0
    with api.threads(threads):
        for prompt in prompts:
            cache = model.new_cache(1)
            token = int(np.argmax(model.forward(np.array([prompt]), cache, last=True)[0, -1]))
            start = time.perf_counter()
            for _ in range(max_tokens - 1):
                token = int(np.argmax(model.forward(np.array([[token]]), cache, last=True)[0, -1]))
            span += time.perf_counter() - start
            tokens += max_tokens - 1
    return round(tokens / span, 2) if span else float("nan")


def _tg128(weights, config, backend, weights_dtype, threads, log):   # in-process `npgpt bench` tg128 b1 -> tokens/s
    from . import bench

    log("reference: npgpt bench tg128 b1 (in-process, same model) ...")
    tg = bench.run(weights_path=weights, config=config, backends=(backend,), prompts=(), gens=(128,), batches=(1,),
                   threads=threads, reps=1, formats=(weights_dtype or "fp32",), log=lambda m: None)
    return tg["results"][0]["tokens_per_s"]


def table(report):
    rows = ["| clients | requests | tokens/s | requests/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | errors | lost |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["levels"]:
        rows.append(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                    f"{r['ttft_p50_ms']:.0f} ms | {r['ttft_p99_ms']:.0f} ms | {r['itl_p50_ms']:.0f} ms | {r['itl_p99_ms']:.0f} ms | "
                    f"{r['errors']} | {r['lost']} |")
    s, load = report["server"], report["load"]
    rows += ["", f"server: {s['weights']}, {s['backend']}, {s['weights_dtype']}, --max-batch {s['max_batch']}; each level: "
             f"{load['requests']} streamed greedy requests of {load['max_tokens']} tokens, prompts of "
             f"{min(load['prompt_lengths'])}-{max(load['prompt_lengths'])} tokens"]
    n = len(report["rounds"])
    if report.get("vs_one_client"):
        rows.append(f"aggregate tokens/s vs 1 client, per round, median of {n}: " + "; ".join(
            f"{c} clients {v['median']:.2f}x ({', '.join(f'{x:.2f}' for x in v['ratios'])})" for c, v in report["vs_one_client"].items()))
    if report.get("one_client_vs_tg128"):
        v, w = report["one_client_vs_tg128"], report["one_client_vs_in_process"]
        rows.append(f"1 client's decode rate (tokens after the first / time from first to last chunk), per round, median of {n}: "
                    f"vs npgpt bench tg128 b1 (same model, in-process, from an empty context) {v['median']:.2f}x "
                    f"({', '.join(f'{x:.2f}' for x in v['ratios'])}); vs the same model decoding the same requests in-process "
                    f"{w['median']:.2f}x ({', '.join(f'{x:.2f}' for x in w['ratios'])})")
    rows.append(f"table: per level, the round of median tokens/s (of {n})")
    errors = [r["first_error"] for r in report["levels"] if r["first_error"]]
    if errors:
        rows.append(f"first error: {errors[0]}")
    return "\n".join(rows)

