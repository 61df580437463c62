"""`npgpt` command line: generate, inspect, bench. Logic lives in the API; this file only parses and prints."""

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from . import weights as weight_io

from . import __version__, api, quant
from .config import PRESETS
from .errors import InputError, NpgptError
from .generate import PREFILL_TOKENS
from .tokenizer import encode


def _model(args):
    if args.weights:
        return api.load(args.weights, backend=args.backend, weights=args.weights_dtype)
    print(f"npgpt: no --weights given: using a seeded random model at {args.config} shapes; "
          "its text is noise (see README for real GPT-2 weights)", file=sys.stderr)
    return api.random_model(args.config, seed=0, backend=args.backend, weights=args.weights_dtype or "fp32")


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise NpgptError(f"{path}: cannot read text: {e}") from None


def cmd_perplexity(args):
    from .perplexity import perplexity

    model = _model(args)
    ids = encode(_read_text(args.text))
    progress = lambda done, total: print(f"  {done}/{total} tokens", file=sys.stderr, flush=True)
    r = perplexity(model, ids, ctx=args.ctx, stride=args.stride, progress=progress)
    print(f"{args.text}: {r['tokens']} tokens scored, cross-entropy {r['nll']:.4f} nats/token, perplexity {r['ppl']:.3f} "
          f"(weights {model.weights}, ctx {args.ctx}, stride {args.stride})")


def cmd_quantize(args):
    written = api.quantize_checkpoint(args.input, args.output, args.dtype)
    print(f"wrote {written} ({args.dtype}) and config.json beside it")


def cmd_quality(args):
    from . import quality

    if args.weights:
        params, cfg, _ = weight_io.load_params(args.weights)
    else:
        cfg = PRESETS[args.config]
        params = weight_io.random_params(cfg, seed=0)
        print(f"npgpt: no --weights given: seeded random model at {args.config} shapes", file=sys.stderr)
    ids = quality.text_ids(args.text) if args.text else quality.text_ids()
    print(quality.table(quality.compare(params, cfg, ids, steps=args.steps, backend=args.backend)))


def _prompt(args):
    if args.prompt_file is None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    return _read_text(args.prompt_file)


def cmd_generate(args):
    prompt = _prompt(args)
    with api.threads(args.threads):
        model = _model(args)
        room = model.config.n_ctx - len(encode(prompt)) + 1
        if 0 < room < args.max_new_tokens:
            print(f"npgpt: warning: the prompt leaves room for {room} new tokens in the {model.config.n_ctx}-token "
                  f"context; generation stops there, not at --max-new-tokens {args.max_new_tokens}", file=sys.stderr)
        timings = api.Timings()
        pieces = model.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=args.stop, timings=timings)   # checks its arguments first
        print(prompt, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    print(f"npgpt: {timings.summary()}", file=sys.stderr)


SERVE_SWITCH_INTERVAL_S = 0.0005


def cmd_serve(args):
    try:
        import uvicorn

        from .serve.app import create_app
    except ImportError as e:
        raise NpgptError(f"npgpt serve needs the serve extra ({e.name} is missing): pip install 'npgpt[serve]'") from None
    from .serve.engine import Engine

    for name in ("max_batch", "max_queue", "prefill_tokens", "port"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise InputError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    # The engine and the event loop share the GIL; a short switch interval lets the event loop send each
    # token soon after the engine made it, instead of waiting up to Python's default 5 ms
    sys.setswitchinterval(SERVE_SWITCH_INTERVAL_S)
    with api.threads(args.threads):
        model = _model(args)
        name = args.model_name or (os.path.basename(os.path.normpath(args.weights)).removesuffix(".safetensors")
                                   if args.weights else f"{args.config}-random")
        engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue, prefill_tokens=args.prefill_tokens)
        server = uvicorn.Server(uvicorn.Config(create_app(engine, name), host=args.host, port=args.port, log_level=args.log_level,
                                               timeout_graceful_shutdown=args.shutdown_timeout))
        print(f"npgpt: serving {name!r} ({model.backend}, {model.weights}) on http://{args.host}:{args.port}/v1 "
              f"with {args.max_batch} slots, queue {args.max_queue}", file=sys.stderr)
        _serve(engine, server)
    if not server.started:
        raise NpgptError(f"npgpt serve could not listen on {args.host}:{args.port} (see the error above)")
    return 0


def _serve(engine, server):
    """The engine runs in this thread, the one that loaded the model (see Engine.run); uvicorn runs in
    another. SIGTERM or Ctrl-C: stop taking connections, let in-flight requests finish, then return
    (a second Ctrl-C stops at once)."""
    import signal
    import threading

    def http():
        try:
            server.run()
        except SystemExit:                                 # uvicorn exits this way when it cannot bind; it logged why
            pass
        finally:
            engine.stop(timeout=0)                         # the engine's loop ends once its requests are done

    def on_signal(signum, frame):
        server.force_exit = server.should_exit
        server.should_exit = True

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    engine.running = True                                  # run() below: the app's lifespan must not start a thread too
    thread = threading.Thread(target=http, name="npgpt-http", daemon=True)
    thread.start()
    try:
        engine.run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    thread.join()


def _run_settings(cls, args, **extend):                   # a run's Settings from the flags given; resuming: only out, backend, `extend`
    if args.resume:
        return cls(out=args.resume, backend=args.backend, **extend)
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


def _drive(module, settings, args, describe, total, done):   # a train or classify Run: start, describe, run under a progress bar
    with api.threads(args.threads):
        run = module.Run(settings, resume=bool(args.resume), log=lambda m: print(f"npgpt: {m}", file=sys.stderr))
        print(f"npgpt: {describe(run)}", file=sys.stderr)
        update, close = module.progress_bar(total(run), done(run))
        try:
            return run, run.run(progress=update)
        finally:
            close()


def cmd_train(args):
    from . import train

    run, _ = _drive(train, _run_settings(train.Settings, args, steps=args.steps), args, lambda r: (
        f"training {'from ' + r.s.init if r.s.init else r.s.config + ' from scratch'} on {r.s.data} "
        f"({len(r.train_ids):,} train / {len(r.val_ids):,} val tokens), {r.s.steps} steps of "
        f"{r.s.batch}x{r.s.seq}x{r.s.accum} tokens, backend {r.s.backend}, into {r.s.out}"),
        total=lambda r: r.s.steps, done=lambda r: r.step)
    print(f"npgpt: done: step {run.step}, checkpoint in {run.s.out} (npgpt generate --weights {run.s.out} ...)", file=sys.stderr)


def cmd_classify_train(args):
    from . import classify

    run, best = _drive(classify, _run_settings(classify.Settings, args, epochs=args.epochs), args, lambda r: (
        f"fine-tuning {r.s.init} ({r.s.trainable}) on {r.s.data}: {r.s.epochs} epochs of {r.steps_per_epoch} batches "
        f"of {r.s.batch}, backend {r.s.backend}, into {r.s.out}"),
        total=lambda r: r.total_steps, done=lambda r: r.epoch * r.steps_per_epoch + r.pos)
    s = run.s
    print(f"npgpt: done: best epoch {best['epoch']} (val accuracy {best['val_accuracy']:.4f}) in {s.out} "
          f"(npgpt classify eval --weights {s.out} --data ...)", file=sys.stderr)


def _classifier(args):
    from .classifier import load_classifier

    return load_classifier(args.weights, backend=args.backend)


def cmd_classify_eval(args):
    from . import classify

    with api.threads(args.threads):
        clf = _classifier(args)
        texts, labels = classify.read_examples(args.data, args.text_column, args.label_column)
        classify.label_order(labels, clf.labels, args.data, training=False)
        pred = clf.logits(texts).argmax(axis=1)
    m = classify.metrics(clf.label_ids(labels), pred, len(clf.labels))
    if args.json:
        atomic_write_json(args.json, {"weights": args.weights, "data": args.data, "labels": clf.labels, **m})
    print(classify.report(m, clf.labels))


def cmd_classify_baseline(args):
    from . import classify

    texts, labels = classify.read_examples(args.data, args.text_column, args.label_column)
    test_texts, test_labels = classify.read_examples(args.test, args.text_column, args.label_column)
    order = classify.label_order(labels, args.labels, args.data)
    classify.label_order(test_labels, order, args.test, training=False)
    y, test_y = ([order.index(x) for x in ys] for ys in (labels, test_labels))
    results = {"majority class": classify.majority_baseline(np.array(y), len(test_y)),
               "bag-of-words logistic regression": classify.bag_of_words_baseline(texts, np.array(y), test_texts, len(order))}
    out = {}
    for name, pred in results.items():
        m = out[name] = classify.metrics(test_y, pred, len(order))
        print(f"== {name} (trained on {args.data}, measured on {args.test})\n{classify.report(m, order)}\n")
    if args.json:
        atomic_write_json(args.json, {"data": args.data, "test": args.test, "labels": order, **out})


def atomic_write_json(path, obj):
    from .weights.checkpoint import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def cmd_classify_predict(args):
    from . import classify

    if bool(args.text) == bool(args.data):
        raise InputError("give --text (one or more) or --data FILE (a CSV or JSONL with a text column)")
    texts = args.text or classify.read_examples(args.data, args.text_column, None)[0]
    with api.threads(args.threads):
        clf = _classifier(args)
        probs = clf.probabilities(texts)
    for text, p in zip(texts, probs):
        if args.json:
            print(json.dumps({"label": clf.labels[int(p.argmax())], "probs": dict(zip(clf.labels, map(float, p))), "text": text}))
        else:
            short = text if len(text) <= 60 else text[:57] + "..."
            print(f"{clf.labels[int(p.argmax())]}\t{p.max():.3f}\t{json.dumps(short)}")


def cmd_inspect(args):
    model = api.load(args.path)
    cfg, info = model.config, model.info
    print(f"file       {info.path} ({info.file_bytes / 2**20:.1f} MiB)")
    print(f"config     n_vocab={cfg.n_vocab} n_ctx={cfg.n_ctx} n_embd={cfg.n_embd} n_head={cfg.n_head} "
          f"n_layer={cfg.n_layer} eps={cfg.eps:g}")
    print(f"           {info.config_source}")
    print(f"params     {cfg.n_params:,}" + ("" if info.tied else f" + {cfg.n_vocab * cfg.n_embd:,} (untied lm_head)"))
    print(f"dtypes     " + ", ".join(f"{d} x{n}" for d, n in sorted(info.dtypes.items())))
    print(f"lm_head    {'tied to wte' if info.tied else 'explicit lm_head.weight'}; "
          f"names {'with' if info.prefix else 'without'} 'transformer.' prefix")
    if info.ignored:
        print(f"ignored    {len(info.ignored)} attention-mask buffers ({info.ignored[0]}, ...)")


def _ints(text):
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _lengths(text):                                        # -p / -n: positive integers, or 0 for none (as llama-bench)
    return [] if text.strip() == "0" else _ints(text)


def _backends(text):
    names = [v for v in text.split(",") if v]
    unknown = [n for n in names if n not in api.BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backend {unknown[0] if unknown else text!r}; choose from {', '.join(api.BACKENDS)}")
    return names


def _formats(text):
    names = [v for v in text.split(",") if v]
    if not names or any(n not in quant.FORMATS for n in names):
        raise argparse.ArgumentTypeError(f"weights formats are {', '.join(quant.FORMATS)}; got {text!r}")
    return names


def _configs(text):
    names = [v for v in text.split(",") if v]
    if not names or any(n not in PRESETS for n in names):
        raise argparse.ArgumentTypeError(f"configs are {', '.join(PRESETS)}; got {text!r}")
    return names


def cmd_bench(args):
    if args.compare == "torch":
        try:
            import torch  # noqa: F401  (torch first: started after numba's OpenMP pool, it runs ~2x slower)
            import transformers  # noqa: F401
        except ImportError as e:
            raise NpgptError(f"--compare torch needs torch and transformers ({e}); pip install '.[compare]'") from None
    if args.train and args.serve:
        raise InputError("--train and --serve are separate benchmarks: choose one")
    if args.p == [] and (args.train or args.serve or args.n == []):
        raise InputError("-p 0 -n 0: nothing to measure" if args.n == [] else "-p 0 skips prefill tests; --train and --serve need lengths")
    if args.n == [] and args.serve:
        raise InputError("-n 0: --serve needs a number of tokens per request")
    if args.train:
        return bench_train(args)
    if args.serve:
        return bench_serve(args)
    from . import bench                                   # numba and threadpoolctl load only for the bench

    if args.config and len(args.config) > 1:
        raise InputError("--config: the inference bench takes one config (several are for --train)")
    report = bench.run(weights_path=args.weights, config=(args.config or ["gpt2"])[0], backends=args.backend or ["numpy", "numba"],
                       prompts=[128, 512] if args.p is None else args.p,
                       gens=[128] if args.n is None else args.n, batches=args.b or [1], threads=args.t, reps=args.reps, compare=args.compare,
                       formats=args.weights_dtype)
    print(bench.table(report))
    if args.json:
        bench.dump_json(report, args.json)


def bench_serve(args):
    from . import bench, bench_serve

    if args.config and len(args.config) > 1:
        raise InputError("--serve: one --config")
    backend = args.backend or ["numba"]
    if len(backend) != 1:
        raise InputError("--serve: one --backend (the server's)")
    report = bench_serve.run(weights=args.weights, config=(args.config or ["gpt2"])[0], backend=backend[0],
                             weights_dtype=args.weights_dtype[0] if args.weights_dtype != ["fp32"] else None,
                             levels=args.clients, requests=args.requests, max_tokens=(args.n or [64])[0], threads=args.t,
                             rounds=args.reps)
    print(bench_serve.table(report))
    if args.json:
        bench.dump_json(report, args.json)


def bench_train(args):
    from . import bench, bench_train

    if args.weights or args.weights_dtype != ["fp32"]:
        raise InputError("--train measures seeded random fp32 models at --config shapes; --weights and --weights-dtype do not apply")
    report = bench_train.run(configs=args.config or ["gpt2", "tiny"], backends=args.backend or ["numpy", "numba"], batches=args.b or [4],
                             seqs=args.p or [256], threads=args.t, reps=args.reps, compare=args.compare,
                             memory=not args.no_memory)
    print(bench_train.table(report))
    if args.json:
        bench.dump_json(report, args.json)


def build_parser():
    parser = argparse.ArgumentParser(prog="npgpt", description="GPT-2 in NumPy, with numba kernels.")
    parser.add_argument("--version", action="version", version=f"npgpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p, backend="numpy"):
        p.add_argument("--weights", help="model.safetensors file or a directory holding it (+ config.json)")
        p.add_argument("--config", default="gpt2", choices=list(PRESETS), help="shapes of the random model used without --weights")
        p.add_argument("--backend", default=backend, choices=api.BACKENDS)
        p.add_argument("--weights-dtype", choices=quant.FORMATS, help="matmul weights: fp32 (default), bf16, int8, int4")

    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    model_args(g, backend="numba")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text (a literal <|endoftext|> is the special token)")
    source.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a UTF-8 file ('-': standard input)")
    g.add_argument("--stop", action="append", metavar="STR", help="stop before this text (repeatable)")
    g.add_argument("-t", "--threads", type=int, default=None, help="threads for the kernels and BLAS (default: all cores)")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    pp = sub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    model_args(pp, backend="numba")
    pp.add_argument("--text", required=True, help="UTF-8 text file")
    pp.add_argument("--ctx", type=int, default=1024, help="window length in tokens (default 1024)")
    pp.add_argument("--stride", type=int, default=512, help="window step; each window scores its new tokens (default 512)")
    pp.set_defaults(func=cmd_perplexity)

    q = sub.add_parser("quantize", help="write a bf16, int8 or int4 copy of a checkpoint")
    q.add_argument("input", help="model.safetensors or its directory")
    q.add_argument("output", help="output .safetensors path or directory (created if missing; config.json is written beside it)")
    q.add_argument("--dtype", required=True, choices=["bf16", "int8", "int4"])
    q.set_defaults(func=cmd_quantize)

    ql = sub.add_parser("quality", help="bf16, int8 and int4 against fp32: logit error, cosine, greedy agreement, perplexity")
    ql.add_argument("--weights", help="model.safetensors (default: seeded random model at --config shapes)")
    ql.add_argument("--config", default="gpt2", choices=list(PRESETS))
    ql.add_argument("--backend", default="numba", choices=api.BACKENDS)
    ql.add_argument("--text", help="UTF-8 text (default: the 2.6 KB sample shipped with npgpt)")
    ql.add_argument("--steps", type=int, default=64, help="greedy steps compared (default 64)")
    ql.set_defaults(func=cmd_quality)

    b = sub.add_parser("bench", help="prefill and decode tokens/s per backend, against the machine's limits")
    b.add_argument("--weights", help="model.safetensors (default: seeded random model at --config shapes)")
    b.add_argument("--config", type=_configs, help="random model shapes (default gpt2; with --train: gpt2,tiny)")
    b.add_argument("--train", action="store_true",
                   help="training tokens/s instead (forward + backward + AdamW): -b batches (default 4), -p sequence lengths (default 256)")
    b.add_argument("--no-memory", action="store_true", help="with --train: skip the peak-memory runs (a fresh process each)")
    b.add_argument("--serve", action="store_true",
                   help="load-test npgpt serve instead: --clients levels, --requests per level, -n tokens each (default 64)")
    b.add_argument("--clients", type=_ints, default=[1, 4, 8, 16], help="with --serve: concurrent clients per level (default 1,4,8,16)")
    b.add_argument("--requests", type=int, default=16, help="with --serve: requests per level (default 16)")
    b.add_argument("--backend", type=_backends, help="comma-separated (default numpy,numba; --serve: numba)")
    b.add_argument("--weights-dtype", type=_formats, default=["fp32"],
                   help="comma-separated matmul weight formats for the numba backend: fp32,bf16,int8,int4 (default fp32); "
                        "more than one also measures each one's resident memory")
    b.add_argument("-p", type=_lengths, help="prompt lengths for pp tests (default 128,512; 0: none)")
    b.add_argument("-n", type=_lengths, help="tokens to decode for tg tests (default 128; 0: none)")
    b.add_argument("-b", type=_ints, help="batch sizes (default 1)")
    b.add_argument("-t", type=int, default=None, help="threads for numba and BLAS (default: all cores)")
    b.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (default 3); --serve: rounds of every level")
    b.add_argument("--json", help="also write the report as JSON to this file")
    b.add_argument("--compare", choices=["torch"], help="also run transformers' GPT-2 in PyTorch on the same weights")
    b.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="an OpenAI-compatible completions server with continuous batching")
    model_args(sv, backend="numba")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=8, help="KV-cache slots: requests decoded together (default 8)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    sv.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS, help="prompt tokens admitted per step, prefilled "
                    f"with the busy rows' next tokens (default {PREFILL_TOKENS}; one prompt always)")
    sv.add_argument("--model-name", help="the model id clients send (default: the checkpoint directory's name)")
    sv.add_argument("-t", "--threads", type=int, help="threads (default: all cores)")
    sv.add_argument("--shutdown-timeout", type=float, default=30, help="seconds in-flight requests get on SIGTERM (default 30)")
    sv.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(func=cmd_serve)

    t = sub.add_parser("train", help="pretrain a GPT-2 on a text, or fine-tune a checkpoint; resumable")
    t.add_argument("--data", help="UTF-8 text file, or a directory of .txt files")
    t.add_argument("--config", choices=list(PRESETS), help="model shapes to train from scratch (default tiny)")
    t.add_argument("--init", metavar="PATH", help="fine-tune this checkpoint instead of training from scratch")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR where it stopped (--steps may extend it)")
    t.add_argument("--out", help="run directory: checkpoint, metrics.jsonl, loss.png")
    t.add_argument("--steps", type=int, help="total optimizer steps (default 1000)")
    t.add_argument("--batch", type=int, help="sequences per micro-batch (default 8)")
    t.add_argument("--seq", type=int, help="tokens per sequence (default 256)")
    t.add_argument("--accum", type=int, help="micro-batches per step (default 1)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 6e-4)")
    t.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default lr/10)")
    t.add_argument("--warmup", type=int, help="linear warmup steps (default 100)")
    t.add_argument("--weight-decay", type=float, help="AdamW decay on ndim >= 2 tensors (default 0.1)")
    t.add_argument("--grad-clip", type=float, help="global gradient-norm clip (default 1.0)")
    t.add_argument("--dropout", type=float, help="probability of GPT-2's embd, attn and resid dropout (default 0)")
    t.add_argument("--eval-every", type=int, help="val loss every N steps (default 100)")
    t.add_argument("--save-every", type=int, help="checkpoint every N steps (default 500)")
    t.add_argument("--seed", type=int, help="init and data-order seed (default 0)")
    t.add_argument("--backend", default="numba", choices=api.BACKENDS)
    t.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("classify", help="sequence classification: fine-tune (train), measure (eval), use (predict)")
    csub = c.add_subparsers(dest="classify_command", required=True)

    def data_args(p, run=True):                            # the data's columns; with run: the backend and threads too
        p.add_argument("--text-column", default="text", help="CSV column / JSONL key of the text (default text)")
        p.add_argument("--label-column", default="label", help="CSV column / JSONL key of the label (default label)")
        if run:
            p.add_argument("--backend", default="numba", choices=api.BACKENDS)
            p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")

    ct = csub.add_parser("train", help="fine-tune a checkpoint with a score head on labelled texts; resumable")
    ct.add_argument("--data", help="labelled examples: CSV with a header, or JSONL")
    ct.add_argument("--val", help="validation examples (default: a seeded --val-fraction of --data)")
    ct.add_argument("--val-fraction", type=float, help="held out of --data when no --val (default 0.1)")
    ct.add_argument("--labels", type=lambda t: [x.strip() for x in t.split(",")], help="label names in order, comma-separated "
                    "(default: the data's, sorted)")
    ct.add_argument("--init", metavar="PATH", help="the checkpoint to fine-tune (a language model, or a classifier again)")
    ct.add_argument("--resume", metavar="DIR", help="continue the run in DIR where it stopped (--epochs may extend it)")
    ct.add_argument("--out", help="run directory: the best epoch's classifier, last/, metrics.jsonl")
    ct.add_argument("--trainable", help="head | last-k (the last k blocks, ln_f and the head) | all (default last-1)")
    ct.add_argument("--epochs", type=int, help="passes over the training examples (default 3)")
    ct.add_argument("--batch", type=int, help="examples per step (default 8)")
    ct.add_argument("--max-len", type=int, help="tokens kept of each text (default 256, at most the context)")
    ct.add_argument("--keep", choices=["start", "end"], help="which part of a longer text to keep (default start)")
    ct.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    ct.add_argument("--warmup", type=float, help="warmup, a fraction of all steps (default 0.06); then cosine to 0")
    ct.add_argument("--weight-decay", type=float, help="AdamW decay on ndim >= 2 tensors (default 0.01)")
    ct.add_argument("--grad-clip", type=float, help="global gradient-norm clip (default 1.0)")
    ct.add_argument("--dropout", type=float, help="probability of GPT-2's embd, attn and resid dropout (default 0)")
    ct.add_argument("--seed", type=int, help="head init, split and data-order seed (default 0)")
    data_args(ct)
    ct.set_defaults(func=cmd_classify_train)

    ce = csub.add_parser("eval", help="accuracy, per-class precision/recall/F1 and the confusion matrix on labelled texts")
    ce.add_argument("--weights", required=True, help="a classifier checkpoint (directory or .safetensors)")
    ce.add_argument("--data", required=True, help="labelled examples: CSV with a header, or JSONL")
    ce.add_argument("--json", help="also write the figures as JSON to this file")
    data_args(ce)
    ce.set_defaults(func=cmd_classify_eval)

    cp = csub.add_parser("predict", help="label texts: prints label, probability and the text's start (or JSON lines)")
    cp.add_argument("--weights", required=True, help="a classifier checkpoint (directory or .safetensors)")
    cp.add_argument("--text", action="append", help="a text to label (repeat for more)")
    cp.add_argument("--data", help="a CSV or JSONL file whose --text-column texts to label")
    cp.add_argument("--json", action="store_true", help="one JSON object per text: label, probabilities, text")
    data_args(cp)
    cp.set_defaults(func=cmd_classify_predict)

    cb = csub.add_parser("baseline", help="the majority class and a bag-of-words logistic regression, trained on --data, "
                         "measured on --test")
    cb.add_argument("--data", required=True, help="training examples: CSV with a header, or JSONL")
    cb.add_argument("--test", required=True, help="test examples, the same format")
    cb.add_argument("--labels", type=lambda t: [x.strip() for x in t.split(",")], help="label names in order")
    cb.add_argument("--json", help="also write the figures as JSON to this file")
    data_args(cb, run=False)
    cb.set_defaults(func=cmd_classify_baseline)

    i = sub.add_parser("inspect", help="print a checkpoint's config, parameter count, dtypes and size")
    i.add_argument("path")
    i.set_defaults(func=cmd_inspect)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except NpgptError as e:
        print(f"npgpt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0
