"""Sequence classification: GPT-2 with a score head, as transformers' GPT2ForSequenceClassification.

The spec: the final LayerNorm's output at each sequence's last real token, times `score.weight`
[n_labels, n_embd] (no bias). Sequences of different lengths share a batch right-padded: attention is
causal, so tokens after a sequence's last one change nothing at or before it; they are computed on and
never read. (LayerNorm works per position, so it is applied to the last positions only.) The loss is
the mean cross-entropy over the labels; its gradient trains the head and, through npgpt.backward, the
trainable blocks.

A checkpoint is transformers' layout: `transformer.*`, `score.weight`, and a config.json with
`architectures: ["GPT2ForSequenceClassification"]`, `id2label`/`label2id` and `pad_token_id`.
"""

import os
import re

import numpy as np

from . import backward, quant
from . import weights as weight_io
from .api import dropout_masks, load_model
from .errors import CheckpointError, InputError
from .model import NO_DROPOUT, REFERENCE, Dropout, transformer
from .tokenizer import EOT, encode

PAD = EOT                                                  # GPT-2 has no pad token; <|endoftext|> is the usual choice
ARCHITECTURE = "GPT2ForSequenceClassification"


def pad_batch(seqs, pad=PAD):                              # list of [T_i] ids -> right-padded [B, T] ids, lengths [B]
    lengths = np.array([len(s) for s in seqs], np.int64)
    ids = np.full((len(seqs), int(lengths.max())), pad, np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    return ids, lengths


def last_hidden(params, ids, lengths, cfg, ops=REFERENCE, drop=NO_DROPOUT):   # [B, T] right-padded, [B] -> ([B, C] before ln_f, [B, T, C])
    x, _ = transformer(params, ids, cfg, ops=ops, drop=drop)
    return x[np.arange(len(lengths)), lengths - 1], x


def scores(h, weight):                                     # [B, C] final-LayerNorm outputs, [L, C] -> [B, L] logits
    return h @ weight.T


def scores_backward(dlogits, h, weight):                   # [B, L], [B, C], [L, C] -> dh [B, C], dweight [L, C]
    return dlogits @ weight, dlogits.T @ h


def sequence_logits(params, weight, ids, lengths, cfg, ops=REFERENCE):   # [B, T] right-padded ids, [B] lengths -> [B, L]
    last, _ = last_hidden(params, ids, lengths, cfg, ops)
    return scores(ops.layer_norm(last, **params["ln_f"], eps=cfg.eps), weight)


def value_and_grad(params, weight, ids, lengths, labels, cfg, ops, backward_ops=backward.SPEC, drop=None, first=None,
                   embeddings=False):                      # -> (mean cross-entropy over labels, grads)
    """Gradients of score.weight, and with `first` < n_layer of the final LayerNorm and blocks first..n_layer-1
    (and of wte and wpe with `embeddings`). Blocks below `first` run unrecorded: no tape, no gradients."""
    first = cfg.n_layer if first is None else first
    drop = Dropout() if drop is None else drop
    body = first < cfg.n_layer
    tape = []
    run_ops = backward.recording(ops, tape, skip=first * backward.BLOCK_CALLS) if body else ops
    last, x = last_hidden(params, ids, lengths, cfg, run_ops, drop)
    h = ops.layer_norm(last, **params["ln_f"], eps=cfg.eps)   # plain ops, not recorded: `last` is its input
    loss, dlogits = backward.cross_entropy_backward(scores(h, weight), labels)   # [B, L]: small, the spec for every backend
    dh, dweight = scores_backward(dlogits, h, weight)
    grads = {"score.weight": dweight}
    if body:
        dlast, grads["ln_f.weight"], grads["ln_f.bias"] = backward_ops.layer_norm(dh, last, **params["ln_f"], eps=cfg.eps)
        dx = np.zeros_like(x)
        dx[np.arange(len(lengths)), lengths - 1] = dlast   # only the last real positions reach the loss
        del x
        grads.update(backward.transformer_backward(dx, tape, drop.masks, params, ids, cfg, backward_ops, first=first,
                                                   embeddings=embeddings))
    return loss, {name: np.ascontiguousarray(g, dtype=np.float32) for name, g in grads.items()}


def parse_trainable(trainable, n_layer):                   # "head" | "last-k" | "all" -> (first block trained, embeddings?)
    if trainable == "head":
        return n_layer, False
    if trainable == "all":
        return 0, True
    m = re.fullmatch(r"last-(\d+)", str(trainable))
    if m and 1 <= int(m.group(1)) <= n_layer:
        return n_layer - int(m.group(1)), False
    raise InputError(f"trainable must be 'head', 'last-k' with 1 <= k <= {n_layer}, or 'all'; got {trainable!r}")


def trained_names(trainable, cfg):                         # -> the checkpoint names `trainable` updates, score.weight first
    first, embeddings = parse_trainable(trainable, cfg.n_layer)
    names = ["score.weight"]
    if first < cfg.n_layer:
        names += ["ln_f.weight", "ln_f.bias"]
        names += [n for n in weight_io.gpt2.tensor_shapes(cfg) if re.match(r"h\.(\d+)\.", n) and int(n.split(".")[1]) >= first]
    if embeddings:
        names += ["wte.weight", "wpe.weight"]
    return names


class Classifier:
    """A Model with a score head [n_labels, n_embd] and the names of its labels."""

    def __init__(self, model, labels, weight, max_len=None, keep="start", pad=None):
        labels = list(labels)
        if len(labels) < 2 or len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
            raise InputError(f"labels must be 2 or more distinct non-empty names; got {labels!r}")
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        if weight.shape != (len(labels), model.config.n_embd):
            raise InputError(f"score.weight must be [{len(labels)}, {model.config.n_embd}] for {len(labels)} labels; got {weight.shape}")
        if keep not in ("start", "end"):
            raise InputError(f"keep must be 'start' or 'end'; got {keep!r}")
        self.model, self.labels, self.weight, self.keep = model, labels, weight, keep
        # the id written as pad_token_id (transformers finds each text's last token by it; npgpt pads with it and
        # knows the lengths). <|endoftext|>, or the last id of a smaller vocabulary
        self.pad = pad if pad is not None else PAD if PAD < model.config.n_vocab else model.config.n_vocab - 1
        self.max_len = model.config.n_ctx if max_len is None else int(max_len)
        if not 1 <= self.max_len <= model.config.n_ctx:
            raise InputError(f"max_len must be in [1, {model.config.n_ctx}] (the model's context); got {max_len!r}")

    @property
    def config(self):
        return self.model.config

    def encode(self, texts):                               # list of str (or id lists) -> list of int64 [T_i], truncated to max_len
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for i, t in enumerate(texts):
            ids = np.asarray(encode(t) if isinstance(t, str) else t, dtype=np.int64)
            if ids.ndim != 1 or ids.size == 0:
                raise InputError(f"text {i}: tokenizes to nothing (an empty text cannot be classified)" if isinstance(t, str)
                                 else f"text {i}: token ids must be a non-empty [T] list")
            if ids.min() < 0 or ids.max() >= self.config.n_vocab:
                raise InputError(f"text {i}: token ids must be in [0, {self.config.n_vocab})")
            out.append(ids[: self.max_len] if self.keep == "start" else ids[-self.max_len :])
        return out

    def logits(self, texts, batch_size=16):               # texts (or id lists) -> [N, n_labels] float32
        """Each text scored at its own last token, as if alone; batches group texts of similar length."""
        seqs = self.encode(texts)
        order = np.argsort([len(s) for s in seqs], kind="stable")
        out = np.empty((len(seqs), len(self.labels)), np.float32)
        with self.model._runtime():
            for i in range(0, len(seqs), batch_size):
                idx = order[i : i + batch_size]
                ids, lengths = pad_batch([seqs[j] for j in idx], self.pad)
                out[idx] = sequence_logits(self.model.params, self.weight, ids, lengths, self.config, self.model.ops)
        return out

    def probabilities(self, texts, batch_size=16):        # -> [N, n_labels] float64, softmax of the logits
        z = self.logits(texts, batch_size).astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, texts, batch_size=16):              # -> list of label names
        return [self.labels[i] for i in self.logits(texts, batch_size).argmax(axis=1)]

    def label_ids(self, labels):                           # names (or ids) -> int64 [B]
        index = {name: i for i, name in enumerate(self.labels)}
        out = []
        for y in labels:
            if isinstance(y, str):
                if y not in index:
                    raise InputError(f"label {y!r} is not one of {', '.join(self.labels)}")
                out.append(index[y])
            elif isinstance(y, (int, np.integer)) and not isinstance(y, bool) and 0 <= y < len(self.labels):
                out.append(int(y))
            else:
                raise InputError(f"a label must be a name in {self.labels} or an id in [0, {len(self.labels)}); got {y!r}")
        return np.array(out, np.int64)

    def value_and_grad(self, texts, labels, trainable="last-1", dropout=0.0, rng=None):   # -> (mean loss, {name: gradient})
        """texts: strings or id lists (of any lengths); labels: names or ids. Gradients of what `trainable`
        trains ('head', 'last-k' = the last k blocks + final LayerNorm + head, 'all'), checkpoint layout."""
        if self.model.weights != "fp32":
            raise InputError(f"training needs fp32 weights; this model's matmul weights are {self.model.weights}")
        first, embeddings = parse_trainable(trainable, self.config.n_layer)
        seqs = self.encode(texts)
        y = self.label_ids(labels)
        if len(y) != len(seqs):
            raise InputError(f"{len(seqs)} texts but {len(y)} labels")
        ids, lengths = pad_batch(seqs, self.pad)
        drop = dropout_masks(dropout, rng)
        with self.model._runtime():
            return value_and_grad(self.model.params, self.weight, ids, lengths, y, self.config, self.model.ops,
                                  self.model._backward(), drop=drop, first=first, embeddings=embeddings)

    def trainable_params(self, trainable="last-1"):        # -> {name: writable float32 array}, shared: update in place, then refresh
        names = trained_names(trainable, self.config)
        params = {"score.weight": self.weight}
        if len(names) > 1:
            flat = self.model.trainable_params()
            params.update({n: flat[n] for n in names[1:]})
        return params

    def refresh(self, trainable="last-1"):
        first, _ = parse_trainable(trainable, self.config.n_layer)
        if first < self.config.n_layer:
            self.model.refresh(layers=range(first, self.config.n_layer))

    def save(self, path, metadata=None):
        """model.safetensors + config.json in transformers' GPT2ForSequenceClassification layout (atomic)."""
        path = os.fspath(path)
        base = {"id2label": {str(i): name for i, name in enumerate(self.labels)},
                "label2id": {name: i for i, name in enumerate(self.labels)}, "pad_token_id": self.pad,
                "npgpt_max_len": self.max_len, "npgpt_keep": self.keep}
        try:
            os.makedirs(path, exist_ok=True)
            weight_io.save(self.model._checkpoint_params(), os.path.join(path, "model.safetensors"), self.config,
                           prefix="transformer.", extra={"score.weight": self.weight}, metadata=metadata, config_base=base,
                           architecture=ARCHITECTURE)
        except OSError as e:
            raise CheckpointError(f"{e.filename or path}: cannot write: {e.strerror}") from None


def classifier(model, labels, seed=0, max_len=None, keep="start"):
    """A Classifier over `model` with a new score head drawn N(0, 0.02) (transformers' initializer_range)."""
    labels = list(labels)
    weight = np.random.default_rng(seed).standard_normal((len(labels), model.config.n_embd), dtype=np.float32) * np.float32(0.02)
    return Classifier(model, labels, weight, max_len=max_len, keep=keep)


def load_classifier(path, backend="numpy"):
    """A Classifier from a GPT2ForSequenceClassification checkpoint (transformers' or npgpt's)."""
    weights_path, config_path = weight_io.gpt2.resolve(path)
    hf = weight_io.gpt2.read_config_json(config_path) if config_path else {}
    model = load_model(path, backend=backend)
    head = model.info.source.tensors.get("score.weight") if model.info else None
    if head is None:
        raise CheckpointError(f"{weights_path}: no score.weight: a language model, not a classifier "
                              "(train one with npgpt classify train)")
    id2label = hf.get("id2label")
    if not isinstance(id2label, dict) or sorted(id2label, key=int) != [str(i) for i in range(len(id2label))]:
        raise CheckpointError(f"{config_path or weights_path}: config.json needs id2label {{'0': name, '1': name, ...}} "
                              "naming the classifier's labels")
    labels = [id2label[str(i)] for i in range(len(id2label))]
    weight = weight_io.checkpoint.widen(model.info.source.array("score.weight"), head.dtype)
    if weight.shape != (len(labels), model.config.n_embd):
        raise CheckpointError(f"{weights_path}: score.weight is {weight.shape}; {len(labels)} labels and n_embd "
                              f"{model.config.n_embd} need {(len(labels), model.config.n_embd)}")
    if quant.format_of(weight) != "fp32" or not np.isfinite(weight).all():
        raise CheckpointError(f"{weights_path}: score.weight must be finite floats")
    pad = hf.get("pad_token_id")
    pad = pad if isinstance(pad, int) and 0 <= pad < model.config.n_vocab else None
    return Classifier(model, labels, np.array(weight, np.float32), max_len=hf.get("npgpt_max_len"), keep=hf.get("npgpt_keep", "start"),
                      pad=pad)

