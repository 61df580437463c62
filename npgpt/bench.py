"""`npgpt bench`: prefill (pp) and decode (tg) tokens/s per backend, next to the machine's own limits.

pp<T>: generation's prefill: T tokens per sequence into an empty KV cache, logits of the last position
only (as llama-bench's pp). pp<T>-all: one forward over T tokens with every position's logits (what
perplexity and training compute; at GPT-2 124M the LM head makes it ~1.45x the matmul work at T=512).
tg<N>: N tokens fed one at a time through the KV cache, from an empty context (as llama-bench does).
Each figure is the median over --reps runs after one warm-up run, with the standard deviation; the
backends take turns within each round, so a noisy neighbour slows them alike.
Bounds: decode reads every weight once per step, so t/s <= read bandwidth / weight bytes x batch;
prefill does ~2 FLOP per weight per token, so t/s <= sgemm FLOP/s / FLOP per token.
"""

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from . import weights

from . import api, quant
from .errors import InputError

_BANDWIDTH_BYTES = 2**29                                   # 512 MiB: far past any last-level cache


class Probes:
    """The machine's two ceilings, each quick enough to time again beside every round of runs. Memory read
    bandwidth (GB/s): a 512 MiB read on every thread, timed both ways the kernels stream weights, one run per
    core and 4 runs side by side per core (memory.read_streams); the faster sets the bound. sgemm GFLOP/s at
    1024x768x3072, timed each way the machine can run it, BLAS on its own threads, a band of rows per core
    on single-threaded BLAS on Python threads (matmul.gemm, as training's gradients run), and a band of
    columns per numba thread (matmul.matmul_into, as the kernels' prefill runs it, its zero bias added);
    the fastest sets the bound."""

    def __init__(self):
        from .kernels.memory import read_all, read_streams  # jitted code lives in kernels/ (one cache-dir policy)
        from .kernels.matmul import BIAS, gemm, matmul_into, scratch_size

        self.big = np.ones((_BANDWIDTH_BYTES // 4096, 1024), dtype=np.float32)
        self.reads = (read_all, lambda a: read_streams(a, 64))   # 256 KiB tasks, as the decode step's chunks
        self.a, self.b = np.ones((1024, 768), np.float32), np.ones((768, 3072), np.float32)
        rows, out = np.ascontiguousarray(self.b.T), np.empty((1024, 3072), np.float32)
        zero, scratch = np.zeros(3072, np.float32), np.empty(scratch_size(1024, 3072), np.float32)
        self.products = (np.matmul, gemm, lambda a, b: matmul_into(a, rows, out, zero, BIAS, scratch))
        for read in self.reads:                            # compiled (or loaded) and warm before any timing
            read(self.big)
        for product in self.products:
            product(self.a, self.b)

    def read_gbs(self, reps):                              # best of reps, each way
        return max(self.big.nbytes / _timed(read, self.big) for read in self.reads for _ in range(reps)) / 1e9

    def sgemm_gflops(self, reps):
        return max(2 * 1024 * 768 * 3072 / _timed(p, self.a, self.b) for p in self.products for _ in range(reps)) / 1e9


def measure_ceilings(reps=5, probes=None):
    """Both ceilings (Probes), best of `reps` repetitions each way."""
    probes = probes or Probes()
    return {"read_bandwidth_gbs": round(probes.read_gbs(reps), 2), "sgemm_gflops": round(probes.sgemm_gflops(reps), 1)}


ROUND_PROBE_REPS = 2                                       # a round's own ceiling: best of 2 each way (~0.1-0.3 s)


def _timed(f, *args):
    t = time.perf_counter()
    f(*args)
    return time.perf_counter() - t


def decode_bytes_per_step(params):
    """Bytes a decode step reads: every weight once (the LM head whole, even when tied to wte), but only
    one row of each embedding table."""
    return sum(a.nbytes for name, a in weights.flatten(params).items() if name not in ("wte.weight", "wpe.weight"))


def flops_per_token(cfg, T, all_logits=True):
    """2 FLOP per matmul weight (blocks + LM head) plus causal attention's q.k and p.v at average length T/2.
    Without all_logits (generation's prefill) only the last position's logits are wanted, and the work
    that serves nothing else counts once per sequence of T tokens: the LM head, and the last block's
    attention of its last query, projection and MLP (9 of its 12 C^2 weights; its c_attn still makes every
    position's key and value). kernels.prefill runs just that; the numpy spec and torch run the last block
    on every position, so their % of this bound is of the work the task needs."""
    C, L = cfg.n_embd, cfg.n_layer
    attend = 2 * 2 * C * (T + 1) / 2                       # one block's q.k and p.v per token
    if all_logits:
        return 2 * (L * 12 * C**2 + cfg.n_vocab * C) + L * attend
    once = 9 * C**2 + cfg.n_vocab * C                      # weights the last position alone meets
    return 2 * ((L - 1) * 12 * C**2 + 3 * C**2 + once / T) + (L - 1) * attend + 2 * 2 * C


@dataclass
class Result:
    model: str
    params: int
    backend: str
    weights: str
    threads: int
    batch: int
    test: str
    tokens_per_s: float
    std: float
    bound: float
    samples: list
    round_bounds: list                                     # each round's bound, from the ceiling timed beside its run

    @property
    def pct(self):
        return 100 * self.tokens_per_s / self.bound


def _prefill(model, ids, all_logits, cache=None):         # pp (into an emptied KV cache, last logits) or pp-all (every position's)
    if isinstance(model, TorchBaseline):
        model.prefill(ids, all_logits)
    elif all_logits:
        model.forward(ids)
    else:                                                  # the cache is allocated once, as llama-bench's, and emptied per run
        for row in range(cache.batch):
            cache.reset(row)
        model.forward(ids, cache, last=True)


def _decode(forward, new_cache, ids):
    cache = new_cache(ids.shape[0])
    for t in range(ids.shape[1]):
        forward(ids[:, t : t + 1], cache)


SETTLE_S = 0.2                                             # > OpenBLAS's ~0.1 s of spinning after its last call


def _interleaved(fns, tokens, reps, log, probe=None):
    """Time every runner once per round, round after round: drift on a shared machine hits all alike.
    Before each run the machine idles briefly, so the worker threads one backend leaves spinning do
    not slow the next one down. probe: (a function timing the test's ceiling, Probes, and its unit), timed
    again after the runners in each round, so each run has a bound measured beside it -> (per runner:
    median, std, samples), and the probe's readings (one a round, or none)."""
    for fn in fns:
        fn()                                               # warm-up: caches, page faults, thread pools
    samples, probed = [[] for _ in fns], []
    for i in range(reps):
        for fn, out in zip(fns, samples):
            time.sleep(SETTLE_S)
            out.append(tokens / _timed(fn))
        if probe is not None:
            time.sleep(SETTLE_S)
            probed.append(probe[0]())
        log(f"  round {i + 1}/{reps}: " + ", ".join(f"{s[-1]:.1f}" for s in samples) + " t/s"
            + (f" (ceiling {probed[-1]:.1f} {probe[1]})" if probed else ""))
    return [(statistics.median(s), statistics.stdev(s) if reps > 1 else 0.0, s) for s in samples], probed


class TorchBaseline:
    """The same weights in Hugging Face transformers' GPT2LMHeadModel, PyTorch eager fp32."""

    def __init__(self, params, cfg, threads):
        import torch
        import transformers

        torch.set_num_threads(threads)
        hf = transformers.GPT2Config(vocab_size=cfg.n_vocab, n_positions=cfg.n_ctx, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head, layer_norm_epsilon=cfg.eps)
        self.torch, self.model = torch, transformers.GPT2LMHeadModel(hf).eval()
        state = {"transformer." + n: torch.from_numpy(np.array(a)) for n, a in weights.flatten(params).items()
                 if n != "lm_head.weight"}
        missing, _ = self.model.load_state_dict(state, strict=False)
        if set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"torch baseline: weights not set: {missing}")
        self.version = f"torch {torch.__version__}, transformers {transformers.__version__}"

    def forward(self, ids, cache=None):
        with self.torch.no_grad():
            out = self.model(self.torch.from_numpy(ids), past_key_values=cache.get("past"), use_cache=True)
        cache["past"] = out.past_key_values
        return out.logits

    def prefill(self, ids, all_logits=True):
        with self.torch.no_grad():
            if all_logits:
                self.model(self.torch.from_numpy(ids), use_cache=False)
            else:                                          # generation's prefill: the cache filled, the last logits only
                self.model(self.torch.from_numpy(ids), use_cache=True, logits_to_keep=1)


def jit_cache_stats():
    """(hits, misses) of numba's on-disk cache over every kernel dispatcher loaded so far."""
    from . import kernels

    hits = misses = 0
    for module in (kernels.activation, kernels.attention, kernels.matmul, kernels.norm, kernels.optim, kernels.softmax,
                   kernels.memory, kernels.jit):
        for f in vars(module).values():
            if isinstance(f, numba.core.registry.CPUDispatcher):
                hits += sum(f.stats.cache_hits.values())
                misses += sum(f.stats.cache_misses.values())
    return hits, misses


def run(*, weights_path=None, config="gpt2", backends=("numpy", "numba"), prompts=(128, 512), gens=(128,),
        batches=(1,), threads=None, reps=3, compare=None, formats=("fp32",),
        log=lambda msg: print(msg, file=sys.stderr, flush=True)):
    """Run every (backend, weights format, batch, test) and return a report dict (results, ceilings,
    JIT timings, resident memory per format). The numpy backend runs fp32 only: it is the spec."""
    if compare == "torch":
        try:                                               # before numba's OpenMP pool starts: torch started after it
            import torch  # noqa: F401                     # runs ~2x slower in the same process
            import transformers  # noqa: F401
        except ImportError as e:
            raise InputError(f"compare='torch' needs torch and transformers ({e}); pip install '.[compare]'") from None
    threads = threads or numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise InputError(f"-t {threads}: this machine runs 1 to {numba.config.NUMBA_NUM_THREADS} threads")
    if reps < 1:
        raise InputError(f"--reps {reps}: need at least 1")
    numba.set_num_threads(threads)
    from .kernels import jit
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                          "numba_threading_layer": None, "bf16_pairs": jit.BF16_PAIRS}, "jit": {}, "results": []}
    with threadpool_limits(limits=threads):
        log(f"measuring machine ceilings ({threads} threads) ...")
        probes = Probes()
        report["ceilings"] = ceilings = before = measure_ceilings(probes=probes)
        t = time.perf_counter()
        if weights_path:
            base = api.load(weights_path)
            name = f"{weights_path}"
        else:
            base = api.random_model(config, seed=0)
            name = f"{config} (random)"
        cfg = base.config
        log(f"model {name}: {cfg.n_params / 1e6:.1f} M params, ready in {time.perf_counter() - t:.1f} s")
        rng = np.random.default_rng(0)
        runners = []                                       # (backend, weights format, model or torch baseline)
        for backend in backends:
            for fmt in (["fp32"] if backend == "numpy" else formats):
                t = time.perf_counter()
                model = base if backend == "numpy" else api.Model(quant.quantize(base.params, fmt), cfg, backend=backend)
                prepared = time.perf_counter() - t
                if backend == "numba" and not report["jit"]:
                    t = time.perf_counter()
                    model.forward(np.zeros(1, np.int64))                # first call: compiles or loads the JIT cache
                    hits, misses = jit_cache_stats()
                    report["jit"] = {"prepare_s": round(prepared, 3), "first_token_s": round(time.perf_counter() - t, 3),
                                     "cache_hits": hits, "cache_misses": misses,
                                     "state": "compiled (cold)" if misses else "loaded from cache (warm)"}
                    report["machine"]["numba_threading_layer"] = numba.threading_layer()
                    log(f"numba: prepare {prepared:.2f} s, first token {report['jit']['first_token_s']:.2f} s, "
                        f"{report['jit']['state']}")
                runners.append((backend, fmt, model))
        if compare == "torch":
            baseline = TorchBaseline(base.params, cfg, threads)
            report["torch"] = baseline.version
            runners.append(("torch", "fp32", baseline))
        for B in batches:
            tests = [(f"pp{T}", T) for T in prompts] + [(f"pp{T}-all", T) for T in prompts] + [(f"tg{N}", N) for N in gens]
            for test, n in tests:
                if n > cfg.n_ctx:
                    log(f"skip {test}: longer than the context ({cfg.n_ctx})")
                    continue
                ids = rng.integers(0, cfg.n_vocab, size=(B, n))
                prefill, all_logits = test.startswith("pp"), test.endswith("-all")
                if prefill:
                    fns = [lambda m=m, c=(None if isinstance(m, TorchBaseline) or all_logits else m.new_cache(B)): _prefill(m, ids, all_logits, c)
                           for _, _, m in runners]
                else:
                    fns = [lambda m=m: _decode(m.forward, (lambda b: {}) if isinstance(m, TorchBaseline) else m.new_cache, ids)
                           for _, _, m in runners]
                log(f"b{B} {test}: " + ", ".join(f"{b}/{f}" for b, f, _ in runners))
                probe = ((lambda: probes.sgemm_gflops(ROUND_PROBE_REPS)), "GFLOP/s") if prefill else \
                        ((lambda: probes.read_gbs(ROUND_PROBE_REPS)), "GB/s")
                timed, probed = _interleaved(fns, B * n, reps, log, probe)
                for (backend, fmt, m), (median, std, samples) in zip(runners, timed):
                    per_unit = (1 / flops_per_token(cfg, n, all_logits) if prefill   # t/s per FLOP/s, or per byte/s read
                                else B / decode_bytes_per_step(base.params if backend == "torch" else m.params))
                    report["results"].append(asdict(Result(name, cfg.n_params, backend, fmt, threads, B, test,
                                                            round(median, 2), round(std, 2), per_unit,
                                                            [round(s, 2) for s in samples],
                                                            [round(c * 1e9 * per_unit, 2) for c in probed])))
        log("measuring machine ceilings again (the best of both measurements sets the bounds) ...")
        after = measure_ceilings(probes=probes)
        report["ceilings"] = ceilings = {k: max(v, after[k]) for k, v in ceilings.items()}
        report["ceilings_measured"] = [before, after]
        for r in report["results"]:
            ceiling = ceilings["sgemm_gflops"] if r["test"].startswith("pp") else ceilings["read_bandwidth_gbs"]
            r["bound"] = round(r["bound"] * ceiling * 1e9, 2)
    if len(formats) > 1 and "numba" in backends:
        report["rss"] = resident_memory(base, formats, log)
    return report


def _rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def rss_child(path, fmt, tokens=16, n_layer=1):
    """In a fresh process: load `path` as `fmt` on numba, decode `tokens` tokens, print resident MiB. The kernels
    are loaded (or compiled) first, on a tiny checkpoint of the same format and layer count loaded the same way:
    decode's region is compiled per layer count, and arrays loaded from a file are typed read-only. Compiling
    them after the baseline counted 70-150 MiB of compilation as the model's (fp32 and bf16, a cold cache)."""
    import tempfile

    from . import kernels  # noqa: F401  (imports and JIT cache out of the way before the baseline)

    cfg = api.Config(n_vocab=64, n_ctx=32, n_embd=16, n_head=2, n_layer=n_layer)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = os.path.join(tmp, "tiny.safetensors")
        weights.save(quant.quantize(weights.random_params(cfg, seed=0), fmt), tiny, cfg)
        api.load(tiny, backend="numba", weights=fmt).generate([1, 2], max_new_tokens=2, temperature=0)
    before = _rss_mb()
    model = api.load(path, backend="numba", weights=fmt)
    model.generate(list(range(8)), max_new_tokens=tokens, temperature=0)
    after = _rss_mb()                                      # read once: the two figures must agree
    print(json.dumps({"weights": fmt, "rss_before_mb": before, "rss_decoding_mb": after, "model_mb": after - before}))


def python_child(code, **kwargs):
    """Run `code` in a fresh interpreter of this environment. Without the current directory on sys.path
    (which `python -c` puts first): a checkout's kernels/ or weights/ folder must not shadow another
    package of that top-level name (transformers imports HF's `kernels` when present)."""
    import subprocess

    return subprocess.run([sys.executable, "-c", "import sys; sys.path.remove(''); " + code], capture_output=True, text=True, **kwargs)


def resident_memory(base, formats, log):
    """Each format's resident memory while decoding, each in a fresh process loading a checkpoint of
    that format from disk (as deployed: quantize once, load the small file)."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            path = os.path.join(tmp, f"{fmt}.safetensors")
            weights.save(quant.quantize(base.params, fmt), path, base.config)
            log(f"resident memory: {fmt} ...")
            out = python_child(f"from npgpt.bench import rss_child; rss_child({path!r}, {fmt!r}, n_layer={base.config.n_layer})",
                               check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def round_pct(result):
    """Median over the rounds of each run's t/s as a % of the bound from the ceiling timed right after it, in
    the same round (None without those): on a shared machine a ceiling timed minutes away from a run can be
    a busier or a quieter moment's."""
    pairs = list(zip(result["samples"], result.get("round_bounds") or ()))
    return statistics.median(100 * t / b for t, b in pairs) if pairs else None


def table(report):
    """The results as a llama-bench style markdown table, then the ceilings, JIT timings and torch ratios."""
    rows = ["| model | params | backend | weights | threads | batch | test | t/s | % of bound | % of round's bound |",
            "| --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    above, own = False, set()
    for r in report["results"]:
        kind = r["weights"] if r["test"].startswith("pp") and r["weights"] in ("bf16", "int8", "int4") else None
        kind = {"bf16": "bf16", "int8": "int", "int4": "int"}.get(kind)   # npgpt's own dots, not sgemm: sgemm is no bound
        if kind == "bf16" and not report["machine"].get("bf16_pairs"):
            kind = None                                    # (without vdpbf16ps bf16 prompts run float32 FMAs: sgemm's bound)
        own |= {kind} - {None}
        cells = []
        for pct in (100 * r["tokens_per_s"] / r["bound"], round_pct(r)):
            if pct is None:
                cells.append("–")
                continue
            above |= pct > 100 and not kind
            cells.append(f"{pct:.0f}%" + (f" ({kind})" if kind else " (!)" if pct > 100 else ""))
        rows.append(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['backend']} | {r['weights']} | {r['threads']} | "
                    f"{r['batch']} | {r['test']} | {r['tokens_per_s']:.2f} ± {r['std']:.2f} | {cells[0]} | {cells[1]} |")
    c = report["ceilings"]
    rows.append("")
    if "bf16" in own:
        rows.append("(bf16) bf16 prompts multiply bf16 pairs in npgpt's own tiles (vdpbf16ps, AVX512-BF16 on this CPU: "
                    "twice a float32 FMA's products an instruction), which the float32 sgemm ceiling does not bound: "
                    "their % is of that ceiling, and may pass 100")
    if "int" in own:
        rows.append("(int) int8/int4 prompts multiply int8 levels in integer dot instructions (VNNI, or AVX2), which "
                    "the float32 sgemm ceiling does not bound: their % is of that ceiling, and may pass 100")
    if above:
        rows.append("(!) above 100 %: the bound was measured low (the machine was busy while the ceilings were "
                    "measured); read that row's % as a lower bound on the true ceiling, not as beating it")
    rows.append("% of bound: against the best ceilings of the run (timed before and after it); % of round's bound: "
                "the median over the rounds of each run against the ceiling timed beside it, in the same round")
    rows.append(f"ceilings: memory read {c['read_bandwidth_gbs']:.1f} GB/s, sgemm {c['sgemm_gflops']:.0f} GFLOP/s "
                f"(1024x768x3072), {report['machine']['threads']} threads")
    if report.get("jit"):
        j = report["jit"]
        rows.append(f"numba: first token {j['first_token_s']:.2f} s after load ({j['state']}; "
                    f"{j['cache_hits']} cache hits, {j['cache_misses']} misses), weight layout prepared in {j['prepare_s']:.2f} s")
    by_key = {(r["backend"], r["weights"], r["batch"], r["test"]): r["tokens_per_s"] for r in report["results"]}
    ratios = [f"{test} b{b}: {by_key[('numba', 'fp32', b, test)] / t:.2f}x" for (be, _, b, test), t in by_key.items()
              if be == "torch" and ("numba", "fp32", b, test) in by_key]
    if ratios:
        rows.append(f"numba / torch ({report['torch']}): " + ", ".join(ratios))
    for fmt in quant.FORMATS[1:]:
        ratios = [f"{test} b{b}: {t / by_key[('numba', 'fp32', b, test)]:.2f}x" for (be, f, b, test), t in by_key.items()
                  if be == "numba" and f == fmt and ("numba", "fp32", b, test) in by_key]
        if ratios:
            rows.append(f"numba {fmt} / numba fp32: " + ", ".join(ratios))
    if report.get("rss"):
        fp32 = next((r["model_mb"] for r in report["rss"] if r["weights"] == "fp32"), None)
        rows.append("resident memory while decoding (model's share, fresh process per format): " + ", ".join(
            f"{r['weights']} {r['model_mb']:.0f} MiB" + (f" ({r['model_mb'] / fp32:.2f}x fp32)" if fp32 and r["weights"] != "fp32" else "")
            for r in report["rss"]))
    return "\n".join(rows)


def dump_json(report, path):
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
