"""`npgpt bench --train`: training tokens/s (forward + backward + clipping + AdamW step) per backend.

One step on B sequences of T tokens, every position scored (labels = the inputs, as `npgpt train`
does), gradients clipped at 1.0, then AdamW (betas 0.9, 0.95, decay 0.1 on ndim >= 2 tensors).
Runners take turns within each round (see bench._interleaved); each figure is the median of --reps
steps after one warm-up step. Bound: forward + backward cost ~3x the forward's FLOP (bench.flops_per_token)
at the measured sgemm rate. Peak resident memory is measured per runner in a fresh process that
builds the same model and runs two steps: the whole process's peak, as `top` would show it.
"""

import json
import sys
import time

import numpy as np

from . import weights
from .config import PRESETS
from .errors import InputError

HYPER = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "clip": 1.0}


class NpgptTrainer:
    """npgpt's own training step on one backend: value_and_grad, clip_grad_norm, AdamW."""

    def __init__(self, cfg, backend, seed=0):
        from . import api, optim

        self.model = api.Model(weights.init_params(cfg, seed), cfg, backend=backend)
        self.opt = optim.AdamW(self.model, lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"],
                               weight_decay=HYPER["weight_decay"])
        self.clip = optim.clip_grad_norm

    def step(self, ids):
        loss, grads = self.model.value_and_grad(ids)
        self.clip(grads, HYPER["clip"], ops=self.opt.ops)
        self.opt.step(grads)
        return loss


class TorchTrainer:
    """The same model in transformers' GPT2LMHeadModel (train mode, dropout 0) with torch.optim.AdamW."""

    def __init__(self, cfg, threads, seed=0):
        import torch
        import transformers

        torch.set_num_threads(threads)
        hf = transformers.GPT2Config(vocab_size=cfg.n_vocab, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                                     n_head=cfg.n_head, layer_norm_epsilon=cfg.eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.torch, self.model = torch, transformers.GPT2LMHeadModel(hf).train()
        state = {"transformer." + n: torch.from_numpy(np.array(a)) for n, a in weights.flatten(weights.init_params(cfg, seed)).items()
                 if n != "lm_head.weight"}
        self.model.load_state_dict(state, strict=False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": HYPER["weight_decay"]},
                                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                     lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"])
        self.version = f"torch {torch.__version__}, transformers {transformers.__version__}"

    def step(self, ids):
        ids = self.torch.from_numpy(ids)
        loss = self.model(ids, labels=ids).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), HYPER["clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def trainer(backend, cfg, threads):
    return TorchTrainer(cfg, threads) if backend == "torch" else NpgptTrainer(cfg, backend)


def peak_child(backend, config, batch, seq, threads):
    """In a fresh process: two training steps; print the process's peak resident memory (MiB) as JSON."""
    if backend == "torch":
        import torch  # noqa: F401  (before numba starts its OpenMP pool: torch after it runs ~2x slower)
    from . import api

    with api.threads(threads):
        t = trainer(backend, PRESETS[config], threads)
        ids = np.random.default_rng(0).integers(0, PRESETS[config].n_vocab, size=(batch, seq))
        for _ in range(2):
            t.step(ids)
    with open("/proc/self/status") as f:                # VmHWM: this process's peak RSS (ru_maxrss would
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))   # include the parent's at fork)
    print(json.dumps({"peak_rss_mb": round(peak_kb / 1024, 1)}))


def peak_memory(backend, config, batch, seq, threads):
    from .bench import python_child

    out = python_child(f"from npgpt.bench_train import peak_child; peak_child({backend!r}, {config!r}, {batch}, {seq}, {threads})")
    if out.returncode != 0:
        raise RuntimeError(f"peak memory of {backend} {config}: the child process failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def run(*, configs=("gpt2", "tiny"), backends=("numpy", "numba"), batches=(4,), seqs=(256,), threads=None, reps=3,
        compare=None, memory=True, log=lambda msg: print(msg, file=sys.stderr, flush=True)):
    """Every (config, batch, seq) with every backend (+ torch): a report dict like bench.run's."""
    if compare == "torch":
        import torch  # noqa: F401  (first: see peak_child)
    import numba

    from . import api, bench

    threads = threads or numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise InputError(f"-t {threads}: this machine runs 1 to {numba.config.NUMBA_NUM_THREADS} threads")
    if reps < 1:
        raise InputError(f"--reps {reps}: need at least 1")
    names = list(backends) + (["torch"] if compare == "torch" else [])
    report = {"machine": {"threads": threads}, "results": [], "train": HYPER}
    with api.threads(threads):
        log(f"measuring machine ceilings ({threads} threads) ...")
        before = bench.measure_ceilings()
        rng = np.random.default_rng(0)
        for config in configs:
            cfg = PRESETS[config]
            t = time.perf_counter()
            runners = [trainer(name, cfg, threads) for name in names]
            log(f"{config}: {cfg.n_params / 1e6:.1f} M params, {len(runners)} trainers ready in {time.perf_counter() - t:.1f} s")
            if compare == "torch":
                report["torch"] = runners[-1].version
            for B in batches:
                for T in seqs:
                    if T > cfg.n_ctx:
                        log(f"skip {config} T={T}: longer than the context ({cfg.n_ctx})")
                        continue
                    ids = rng.integers(0, cfg.n_vocab, size=(B, T))
                    log(f"{config} train b{B} T{T}: " + ", ".join(names))
                    timed, _ = bench._interleaved([lambda r=r: r.step(ids) for r in runners], B * T, reps, log)
                    for name, (median, std, samples) in zip(names, timed):
                        report["results"].append({"model": config, "params": cfg.n_params, "backend": name, "threads": threads,
                                                  "batch": B, "seq": T, "tokens_per_s": round(median, 2), "std": round(std, 2),
                                                  "flop_per_token": 3 * bench.flops_per_token(cfg, T),
                                                  "samples": [round(s, 2) for s in samples]})
            del runners
        after = bench.measure_ceilings()
    report["ceilings"] = {k: max(v, after[k]) for k, v in before.items()}
    report["ceilings_measured"] = [before, after]
    for r in report["results"]:
        r["bound"] = round(report["ceilings"]["sgemm_gflops"] * 1e9 / r["flop_per_token"], 2)
        if memory:
            log(f"peak memory: {r['model']} {r['backend']} b{r['batch']} T{r['seq']} ...")
            r["peak_rss_mb"] = peak_memory(r["backend"], r["model"], r["batch"], r["seq"], threads)
    return report


def table(report):
    rows = ["| model | params | backend | threads | batch | seq | train t/s | % of bound | peak RSS |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        rss = f"{r['peak_rss_mb'] / 1024:.2f} GiB" if "peak_rss_mb" in r else "-"
        rows.append(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['backend']} | {r['threads']} | {r['batch']} | {r['seq']} | "
                    f"{r['tokens_per_s']:.1f} ± {r['std']:.1f} | {100 * r['tokens_per_s'] / r['bound']:.0f}% | {rss} |")
    c = report["ceilings"]
    rows += ["", f"one step = forward + backward + clip_grad_norm + AdamW over batch x seq tokens; bound: 3x the forward's "
             f"FLOP per token at sgemm {c['sgemm_gflops']:.0f} GFLOP/s (1024x768x3072), {report['machine']['threads']} threads"]
    by_key = {(r["model"], r["backend"], r["batch"], r["seq"]): r["tokens_per_s"] for r in report["results"]}
    ratios = [f"{m} b{b} T{t}: {by_key[(m, 'numba', b, t)] / v:.2f}x" for (m, be, b, t), v in by_key.items()
              if be == "torch" and (m, "numba", b, t) in by_key]
    if ratios:
        rows.append(f"numba / torch ({report['torch']}, torch.optim.AdamW): " + ", ".join(ratios))
    return "\n".join(rows)
