"""The public object: a GPT-2 model = params + Config + a backend's op table."""

import contextlib
import ctypes
import os
import sys
import warnings

import numpy as np

from . import weights as weight_io

from . import backward, optim, quant
from .cache import KVCache
from .config import Config, preset
from .errors import CheckpointError, InputError
from .generate import Timings, generate_ids, generate_ragged, text_pieces
from .inputs import check_ids, check_seed
from .model import REFERENCE, Dropout, cross_entropy, forward, forward_packed
from .tokenizer import encode, get_encoding

BACKENDS = ("numpy", "numba")


@contextlib.contextmanager
def threads(n=None):
    """Run the body on n threads: NumPy's BLAS and numba's parallel kernels (None: leave all cores)."""
    if n is None:
        yield
        return
    import numba                                           # numba's thread count is only read, or set, here
    from threadpoolctl import threadpool_limits

    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise InputError(f"threads must be an integer from 1 to {numba.config.NUMBA_NUM_THREADS} on this machine; got {n!r}")
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(before)


def resolve_backend(name):
    """(op table, params preparation, context a forward pass runs in, forward, forward_packed) of a backend:
    'numpy' is the spec in npgpt.model, 'numba' the kernels package (whose forwards fuse a decode step)."""
    if name == "numpy":
        return REFERENCE, lambda params, training=False: params, contextlib.nullcontext, forward, forward_packed
    if name == "numba":
        from . import kernels                              # imported on demand: numba start-up is not free
        return kernels.KERNELS, kernels.prepare, kernels.runtime, kernels.forward, kernels.forward_packed
    raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


class Model:
    """`params` are the arrays the backend runs on (the numba backend keeps linear weights as [out, in])."""

    def __init__(self, params, config, *, backend="numpy", info=None):
        self.ops, self._prepare, self._runtime, self._forward, self._forward_packed = resolve_backend(backend)
        self.params, self.config, self.info, self.backend = self._prepare(params), config, info, backend
        self.weights = quant.params_format(params)
        # checkpoint layout: what state_dict, save and training see. Where the backend re-laid the weights out,
        # it is derived again on demand rather than kept (inference would hold every weight twice)
        self._checkpoint = params if self.params is params else None

    def _checkpoint_params(self):
        if self._checkpoint is not None:
            return self._checkpoint
        from . import kernels
        return kernels.unprepare(self.params)

    def state_dict(self):
        """Flat {HF tensor name: float32 array} in checkpoint layout, as model.save writes it (a head tied to
        wte is not listed). The model's own arrays, not copies: copy them to keep a snapshot."""
        flat = weight_io.flatten(self._checkpoint_params())
        if flat["lm_head.weight"] is flat["wte.weight"]:
            del flat["lm_head.weight"]
        return flat

    def save(self, path, metadata=None):
        """Write model.safetensors + config.json into the directory `path` (created): an ordinary checkpoint
        that npgpt.load and transformers' from_pretrained read. Files are replaced atomically."""
        path = os.fspath(path)
        try:
            os.makedirs(path, exist_ok=True)
            weight_io.save(self._checkpoint_params(), os.path.join(path, "model.safetensors"), self.config, metadata=metadata)
        except OSError as e:
            raise CheckpointError(f"{e.filename or path}: cannot write: {e.strerror}") from None

    def trainable_params(self):
        """The weights as writable float32 arrays in checkpoint layout (memory-mapped ones are copied once),
        shared with the model: update them in place, then call refresh()."""
        if self.weights != "fp32":
            raise InputError(f"training needs fp32 weights; this model's matmul weights are {self.weights} "
                             "(load it with weights='fp32')")
        flat = weight_io.flatten(self._checkpoint_params())
        tied = flat["lm_head.weight"] is flat["wte.weight"]
        for name, a in flat.items():
            if not a.flags.writeable or a.dtype != np.float32 or not a.flags.c_contiguous:
                flat[name] = np.array(a, dtype=np.float32)
        if tied:
            flat["lm_head.weight"] = flat["wte.weight"]
        self._checkpoint = weight_io.unflatten(flat)       # kept from now on: training updates it in place
        self.params = self._prepare(self._checkpoint, training=True)   # the backend's arrays over the writable copies, as training reads them
        return self.state_dict()

    def refresh(self, layers=None):
        """Re-derive the backend's arrays after the checkpoint-layout weights changed in place (on numba:
        the transposed linear weights are rewritten in place; the rest are the same arrays). layers: only
        these blocks changed (default: all)."""
        if self._checkpoint is None or self.params is self._checkpoint:
            return                                         # no checkpoint-layout copy, or the backend runs on it
        from . import kernels
        kernels.prepare_again(self.params, self._checkpoint, layers)

    def optim_ops(self):
        """The optimizer arithmetic of this backend (npgpt.optim.OptimOps)."""
        if self.backend == "numba":
            from . import kernels
            return kernels.OPTIM
        return optim.SPEC

    def value_and_grad(self, ids, targets=None, dropout=0.0, rng=None):   # [B, T] (or [T]) -> (mean loss, {HF name: float32 gradient})
        """Without targets: the next-token loss of model.loss(ids) (transformers' labels=ids). With targets
        [B, T]: position t predicts targets[b, t] (-1: not scored). Gradients in checkpoint layout; a tied
        head's gradient is folded into "wte.weight". dropout: one probability for GPT-2's three dropouts
        (embd, attn, resid) or a tuple of the three; rng: the np.random.Generator (or int seed) drawing
        the masks, required when any is > 0."""
        drop = dropout_masks(dropout, rng)
        if self.weights != "fp32":
            raise InputError(f"training needs fp32 weights; this model's matmul weights are {self.weights}")
        ids, _ = check_ids(ids, self.config)
        targets = self._targets(ids, targets, "value_and_grad")
        with self._runtime():
            return backward.value_and_grad(self.params, ids, targets, self.config, self.ops, self._backward(), drop=drop)

    def _targets(self, ids, targets, what):                # checked [B, T] ids, targets or None -> [B, T] targets
        if targets is not None:
            return backward.check_targets(targets, ids, self.config)
        if ids.shape[1] < 2:
            raise InputError(f"{what} needs at least 2 tokens: each position predicts the next one")
        return np.concatenate([ids[:, 1:], np.full((ids.shape[0], 1), -1)], axis=1)   # the last position: nothing to predict

    def _backward(self):
        if self.backend == "numba":
            from . import kernels
            return kernels.BACKWARD
        return backward.SPEC

    def forward(self, ids, cache=None, last=False):        # [T] or [B, T] -> float32 [T, V] or [B, T, V]
        with self._runtime():
            return self._forward(self.params, ids, self.config, ops=self.ops, cache=cache, last=last)

    def forward_packed(self, cache, groups):               # [(first row, [B, T] ids)] -> float32 [rows, V]
        with self._runtime():
            return self._forward_packed(self.params, cache, groups, self.config, ops=self.ops)

    def loss(self, ids, targets=None):                     # [T] or [B, T] -> mean next-token cross-entropy (nats)
        """As transformers' `labels=ids` loss: every position predicts the next token, averaged. With
        targets [B, T]: position t predicts targets[b, t] (-1: not scored), as value_and_grad."""
        ids, _ = check_ids(ids, self.config)
        targets = self._targets(ids, targets, "loss")
        logits = self.forward(ids)                         # [B, T, V]
        if self.backend == "numba":                        # the fused kernel, in place on the logits: no float64 copy
            return self._backward().cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))[0]
        scored = targets >= 0
        return float(cross_entropy(logits[scored], targets[scored]).mean())

    def new_cache(self, batch=1):
        return KVCache(self.config, batch=batch)

    def _prompt_ids(self, prompt):                         # str | ids -> ([B, T] ids, kind)
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("empty prompt: give at least one character or token id")
            return np.array([encode(prompt)]), "text"
        ids, one_sequence = check_ids(prompt, self.config)
        return ids, "ids" if one_sequence else "batch"

    def _tokens(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, timings, text_output):
        ids, kind = self._prompt_ids(prompt)
        steps = generate_ids(self, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, timings=timings,   # text: only ids the tokenizer can decode
                             n_choices=get_encoding().n_vocab if text_output else None)
        return ids, steps, kind

    def generate(self, prompt, max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop=None, timings=None):
        """Text in -> continuation text (stops before <|endoftext|> or the first of the `stop` strings);
        ids [T] -> list of new ids; ids [B, T] -> int array [B, n]; a list of prompts (strings, or id lists of
        any lengths) -> a list, per prompt what it returns alone (seed: one for all, or one per prompt).
        Id outputs end with 50256 when the model emitted it. `timings`: an npgpt.Timings to fill in (one prompt)."""
        if isinstance(prompt, str):
            return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, timings))
        if is_prompt_list(prompt):
            if timings is not None:
                raise InputError("timings are measured for one prompt (or a [B, T] batch), not a list of prompts")
            return self._generate_list(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop)
        if stop is not None:
            raise InputError("stop strings apply to text output; with token ids, stop at the ids you want")
        ids, steps, kind = self._tokens(prompt, max_new_tokens, temperature, top_k, top_p, seed, timings, False)
        steps = list(steps)
        new = np.stack(steps, axis=1) if steps else np.zeros((ids.shape[0], 0), np.int64)   # [B, n]
        return new if kind == "batch" else [int(t) for t in new[0]]

    def _generate_list(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop):
        """A list of prompts of any lengths: per prompt, what generate(prompt) alone returns (ragged batch)."""
        texts = [isinstance(p, str) for p in prompts]
        if any(texts) and not all(texts):
            raise InputError("a list of prompts must be all strings or all token-id lists, not a mix")
        text = all(texts)
        if stop is not None and not text:
            raise InputError("stop strings apply to text output; with token ids, stop at the ids you want")
        stops = check_stops(stop)
        ids = [self._one_sequence(p, i) for i, p in enumerate(prompts)]
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise InputError(f"seed: one per prompt ({len(prompts)}) or one for all; got {len(seeds)}")
        new = generate_ragged(self, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seeds=[check_seed(s) for s in seeds], n_choices=get_encoding().n_vocab if text else None)
        if not text:
            return new
        return ["".join(text_pieces(tokens, get_encoding(), stops)) for tokens in new]

    def _one_sequence(self, prompt, i):                    # prompt i of a list: text or ids [T] -> checked int64 [T]
        try:
            ids, kind = self._prompt_ids(prompt)
            ids, _ = check_ids(ids, self.config)           # text too: a prompt longer than the context fails here
        except InputError as e:
            raise InputError(f"prompt {i}: {e}") from None
        if kind == "batch":
            raise InputError(f"prompt {i}: each prompt of a list is one sequence of ids [T]; got shape {ids.shape}")
        return ids[0]

    def stream(self, prompt, max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop=None, timings=None):
        """Yield the continuation of a text prompt (or one sequence of ids) piece by piece, as soon as each
        piece is valid UTF-8; it ends before <|endoftext|> or the first of the `stop` strings."""
        stops = check_stops(stop)
        _, steps, kind = self._tokens(prompt, max_new_tokens, temperature, top_k, top_p, seed, timings, True)
        if kind == "batch":
            raise InputError("stream() takes one sequence; use generate() for a batch")
        return text_pieces((int(t[0]) for t in steps), get_encoding(), stops)


def dropout_masks(dropout, rng):                           # probability or (embd, attn, resid), Generator or seed -> Dropout
    probs = tuple(dropout) if isinstance(dropout, (tuple, list)) else (dropout,) * 3
    if len(probs) != 3 or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1 for p in probs):
        raise InputError(f"dropout must be a probability in [0, 1) or three of them (embd, attn, resid); got {dropout!r}")
    if any(probs):
        if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0:
            rng = np.random.default_rng(int(rng))
        if not isinstance(rng, np.random.Generator):
            raise InputError(f"dropout {dropout!r} needs rng: an np.random.Generator or a seed (int >= 0); got {rng!r}")
    return Dropout(*map(float, probs), rng=rng)


def is_prompt_list(prompt):                                 # ["text", ...] or [[ids], [ids], ...]: a list of prompts
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(p, (str, list, tuple)) or (isinstance(p, np.ndarray) and p.ndim == 1) for p in prompt))


def check_stops(stop):                                     # None | str | list of str -> list of non-empty str
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise InputError(f"stop must be a non-empty string or a list of them; got {stop!r}")
    return list(stops)


def load(path, backend="numpy", weights=None):
    """A Model from a HF GPT-2 .safetensors file or a directory holding model.safetensors (+ config.json).
    weights: "fp32", "bf16", "int8" or "int4" for the matmul weights; default fp32, or the checkpoint's own
    int8/int4. A checkpoint already in the asked format (bf16 on disk, int8/int4 from `npgpt quantize`) is used as stored.
    A sequence-classification checkpoint loads as its transformer; its score head is left out, with a warning
    (npgpt.load_classifier reads both)."""
    model = load_model(path, backend, weights)
    if "score.weight" in model.info.source.tensors:
        warnings.warn(f"{model.info.path}: a sequence-classification checkpoint; loaded its transformer only and "
                      "ignored score.weight (npgpt.load_classifier loads the classifier)", stacklevel=2)
    return model


def load_model(path, backend="numpy", weights=None):      # load() without the warning about a classifier's head
    if weights is not None:
        quant.check_format(weights)
    params, config, info = weight_io.load_params(path)
    fmt = weights or (info.format if info.format in ("int8", "int4") else "fp32")
    params = quant.quantize(params, fmt)
    model = Model(params, config, backend=backend, info=info)
    converted = fmt != info.format or model.params is not params
    del params                                             # the model keeps what it needs; the rest is freed now
    if converted:                                          # converted or re-laid-out: the mapped originals are dead weight
        info.source.release_pages()
        return_freed_heap()
    return model


def return_freed_heap():
    """Give the heap the loader freed back to the system. glibc keeps freed memory for reuse, and converting
    or re-laying out weights frees several times their size in temporaries (measured: loading gpt2 as int4
    left 104 MiB of such heap resident next to 77 MiB of weights). A no-op off glibc."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):                  # not glibc (musl has no malloc_trim)
            pass


def quantize_checkpoint(source, dest, fmt):
    """Write a bf16, int8 or int4 copy of a checkpoint -> the path written. `dest`: a .safetensors path (its
    folder is created) or a directory (gets model.safetensors). config.json is written beside it, keeping
    the source's and any existing config.json's other keys."""
    if fmt not in ("bf16", "int8", "int4"):
        raise InputError(f"quantize writes bf16, int8 or int4; got {fmt!r}")
    source_weights, source_config = weight_io.gpt2.resolve(source)
    dest = os.fspath(dest)
    if os.path.isdir(dest) or not dest.endswith(".safetensors"):
        dest = os.path.join(dest, "model.safetensors")
    if os.path.exists(dest) and os.path.samefile(source_weights, dest):
        raise InputError(f"{dest}: is the input checkpoint; write the quantized copy elsewhere")
    model = load(source, weights=fmt)
    base = weight_io.gpt2.read_config_json(source_config) if source_config else None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        weight_io.save(model.params, dest, model.config, config_base=base)
    except OSError as e:
        raise CheckpointError(f"{e.filename or dest}: cannot write: {e.strerror}") from None
    return dest


def random_model(config="gpt2", seed=0, backend="numpy", weights="fp32"):
    """A seeded random GPT-2 (noise, for tests and benchmarks): a preset name or a Config."""
    quant.check_format(weights)
    check_seed(seed)
    cfg = config if isinstance(config, Config) else preset(config)
    return Model(quant.quantize(weight_io.random_params(cfg, seed), weights), cfg, backend=backend)
