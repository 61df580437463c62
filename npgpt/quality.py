"""How much a weight format changes the model: bf16/int8/int4 against fp32 on the same weights and inputs."""

import os

import numpy as np

from . import quant
from .api import Model
from .bench import decode_bytes_per_step
from .perplexity import perplexity
from .errors import InputError
from .tokenizer import encode

SAMPLE_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample.txt")   # 2.6 KB, written for npgpt


def text_ids(path=SAMPLE_TEXT):
    try:
        with open(path, encoding="utf-8") as f:
            return np.array(encode(f.read()), dtype=np.int64)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read UTF-8 text: {e}") from None


def compare(params, cfg, ids, formats=("bf16", "int8", "int4"), steps=64, backend="numba", prompt=16):
    """Rows for fp32 and each format: logit errors and cosine over the text's first window, greedy-token
    agreement over `steps` steps (teacher-forced on fp32's greedy continuation), perplexity and its delta."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"--steps must be an integer >= 1; got {steps!r}")
    if len(ids) < prompt + 1:
        raise InputError(f"the text has {len(ids)} tokens; quality needs at least {prompt + 1} "
                         f"(a {prompt}-token prompt and one token to score)")
    window = ids[: cfg.n_ctx]
    ctx = min(1024, cfg.n_ctx)
    ref = Model(params, cfg, backend=backend)
    ref_logits = ref.forward(window).astype(np.float64)                            # [T, V]
    steps = min(steps, cfg.n_ctx - prompt)
    continuation = np.array(ref.generate(window[:prompt], max_new_tokens=steps, temperature=0))
    seq = np.concatenate([window[:prompt], continuation])
    base_ppl = None
    rows = []
    for fmt in ("fp32", *formats):
        model = ref if fmt == "fp32" else Model(quant.quantize(params, fmt), cfg, backend=backend)
        logits = ref_logits if fmt == "fp32" else model.forward(window).astype(np.float64)
        err = np.abs(logits - ref_logits).max()
        cosine = float((logits * ref_logits).sum() / np.linalg.norm(logits) / np.linalg.norm(ref_logits))
        picks = model.forward(seq[:-1])[prompt - 1 :].argmax(axis=-1)                 # next token at each step
        ppl = perplexity(model, ids, ctx=ctx, stride=ctx // 2)["ppl"]
        base_ppl = base_ppl or ppl
        rows.append({"weights": fmt, "bytes_per_token": decode_bytes_per_step(model.params), "max_abs_err": float(err),
                     "rel_err": float(err / np.abs(ref_logits).max()), "cosine": cosine,
                     "greedy_agreement": float((picks == continuation).mean()), "steps": int(continuation.size),
                     "ppl": ppl, "ppl_delta": ppl - base_ppl})
    return rows


def table(rows):
    out = ["| weights | MB read per token | max-abs logit err | rel err | cosine | greedy agreement | ppl | Δppl |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['weights']} | {r['bytes_per_token'] / 1e6:.1f} | {r['max_abs_err']:.2e} | {r['rel_err']:.2e} | "
                   f"{r['cosine']:.7f} | {r['greedy_agreement'] * r['steps']:.0f}/{r['steps']} | {r['ppl']:.3f} | {r['ppl_delta']:+.3f} |")
    return "\n".join(out)
