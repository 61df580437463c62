"""`npgpt` command line: generate, inspect, bench. Logic lives in the API; this file only parses and prints."""

import argparse
import sys

from . import api
from .config import PRESETS
from .errors import NpgptError


def _model(args):
    if args.weights:
        return api.load(args.weights, backend=args.backend)
    print(f"npgpt: no --weights given: using a seeded random model at {args.config} shapes; "
          "its text is noise (see README for real GPT-2 weights)", file=sys.stderr)
    return api.random_model(args.config, seed=0, backend=args.backend)


def cmd_generate(args):
    model = _model(args)
    pieces = model.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed)   # checks its arguments first
    print(args.prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


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


def _backends(text):
    names = [v for v in text.split(",") if v]
    unknown = [n for n in names if n not in api.BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backend {unknown[0] if unknown else text!r}; choose from {', '.join(api.BACKENDS)}")
    return names


def cmd_bench(args):
    from . import bench                                   # numba and threadpoolctl load only for the bench

    if args.compare == "torch":
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise NpgptError(f"--compare torch needs torch and transformers ({e}); pip install '.[compare]'") from None
    report = bench.run(weights_path=args.weights, config=args.config, backends=args.backend, prompts=args.p,
                       gens=args.n, batches=args.b, threads=args.t, reps=args.reps, compare=args.compare)
    print(bench.table(report))
    if args.json:
        bench.dump_json(report, args.json)


def build_parser():
    parser = argparse.ArgumentParser(prog="npgpt", description="GPT-2 in NumPy, with numba kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--weights", help="model.safetensors file or a directory holding it (+ config.json)")
        p.add_argument("--config", default="gpt2", choices=list(PRESETS), help="shapes of the random model used without --weights")
        p.add_argument("--backend", default="numpy", choices=api.BACKENDS)

    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="prefill and decode tokens/s per backend, against the machine's limits")
    b.add_argument("--weights", help="model.safetensors (default: seeded random model at --config shapes)")
    b.add_argument("--config", default="gpt2", choices=list(PRESETS))
    b.add_argument("--backend", type=_backends, default=["numpy", "numba"], help="comma-separated (default numpy,numba)")
    b.add_argument("-p", type=_ints, default=[128, 512], help="prompt lengths for pp tests (default 128,512)")
    b.add_argument("-n", type=_ints, default=[128], help="tokens to decode for tg tests (default 128)")
    b.add_argument("-b", type=_ints, default=[1], help="batch sizes (default 1)")
    b.add_argument("-t", type=int, default=None, help="threads for numba and BLAS (default: all cores)")
    b.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (default 3)")
    b.add_argument("--json", help="also write the report as JSON to this file")
    b.add_argument("--compare", choices=["torch"], help="also run transformers' GPT-2 in PyTorch on the same weights")
    b.set_defaults(func=cmd_bench)

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
