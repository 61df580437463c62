"""`npgpt classify train | eval | predict`: fine-tune a classifier on labelled texts, measure it, use it.

Data: CSV with a header (columns --text-column, --label-column; default text, label) or JSONL (one
object per line with those keys). Labels are names; --labels fixes their order (the score head's rows).

A run directory holds the best epoch's classifier (model.safetensors + config.json, transformers'
GPT2ForSequenceClassification layout) and run.json, metrics.jsonl, and last/: the newest checkpoint and
trainer-<epoch>-<batch>.npz (AdamW's moments, the data order, the RNG, the position), which --resume
continues from. Saving writes the trainer file first, then replaces last/model.safetensors (whose
metadata names the position), then deletes older trainer files: whenever a crash or Ctrl-C hits, the
model on disk and the trainer file of its position are both there. The best checkpoint is replaced
only by a better epoch.
"""

import collections
import csv
import dataclasses
import glob
import io
import json
import math
import os
import re
import time

import numpy as np

from . import train
from .api import load_model
from .classifier import classifier, load_classifier, parse_trainable
from .errors import InputError, TrainingError
from .optim import AdamW, check_hyperparameters, clip_grad_norm, cosine_lr
from .weights.checkpoint import SafetensorsFile, atomic_write


def trainer_path(last, epoch, pos):
    return os.path.join(last, f"trainer-{epoch:04d}-{pos:06d}.npz")


def read_examples(path, text_column="text", label_column="label"):   # -> (texts, labels as strings)
    """A CSV file with a header row, or JSONL (.jsonl / .json lines). Every row needs both columns
    (label_column None: texts only; the labels come back as None)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it as UTF-8 text: {e}") from None
    if not raw.strip():
        raise InputError(f"{path}: the file is empty")
    jsonl = path.endswith((".jsonl", ".ndjson")) or (not path.endswith((".csv", ".tsv")) and raw.lstrip().startswith("{"))
    rows = _jsonl_rows(path, raw) if jsonl else _csv_rows(path, raw, delimiter="\t" if path.endswith(".tsv") else ",")
    texts, labels = [], []
    for line, row in rows:
        for column in (text_column, label_column):
            if column is not None and column not in row:
                raise InputError(f"{path}: line {line} has no {column!r} "
                                 f"({'key' if jsonl else 'column'}; it has {', '.join(map(repr, row)) or 'none'})")
        text = row[text_column]
        if not isinstance(text, str):
            raise InputError(f"{path}: line {line}: {text_column!r} must be a string; got {json.dumps(text)}")
        if not text.strip():
            raise InputError(f"{path}: line {line}: the text is empty")
        texts.append(text)
        if label_column is not None:
            label = row[label_column]
            if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
                raise InputError(f"{path}: line {line}: {label_column!r} must be a label name; got {json.dumps(label)}")
            labels.append(str(label).strip())
    if not texts:
        raise InputError(f"{path}: no examples (a header and no rows)")
    return texts, labels if label_column is not None else None


def _csv_rows(path, raw, delimiter):
    reader = csv.reader(io.StringIO(raw), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
        if len(set(header)) != len(header):
            raise InputError(f"{path}: line 1: the header repeats a column name: {header}")
        for row in reader:
            if not row:
                continue                                   # a blank line
            if len(row) != len(header):
                raise InputError(f"{path}: line {reader.line_num}: {len(row)} fields; the header has {len(header)}")
            yield reader.line_num, dict(zip(header, row))
    except csv.Error as e:
        raise InputError(f"{path}: line {reader.line_num}: malformed CSV: {e}") from None


def _jsonl_rows(path, raw):
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise InputError(f"{path}: line {n}: not a JSON object: {e}") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}: line {n}: not a JSON object")
        yield n, row


def label_order(labels, given=None, what="the data", training=True):   # -> the label names in head order
    """training: the data must hold two classes or more (an evaluation set may hold one)."""
    found = sorted(set(labels))
    if given:
        unknown = sorted(set(labels) - set(given))
        if unknown:
            raise InputError(f"{what} has label {unknown[0]!r}, which is not one of the labels ({', '.join(given)})")
        order = list(given)
    else:
        order = found
    if training and len(set(labels)) < 2:
        raise InputError(f"{what} has one class only ({found[0]!r}): a classifier needs examples of at least two")
    return order


def counts(labels, order):
    return {name: labels.count(name) for name in order}


def split(n, val_fraction, seed):                          # -> (train indices, val indices), a seeded shuffle
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise InputError(f"{n} examples are too few to hold out {val_fraction:.0%} for validation; give --val")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def metrics(true, pred, n_labels):                         # label ids -> accuracy, per-class precision/recall/F1, confusion
    confusion = np.zeros((n_labels, n_labels), np.int64)   # [true, predicted]
    np.add.at(confusion, (np.asarray(true), np.asarray(pred)), 1)
    tp = np.diag(confusion).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(confusion.sum(0) > 0, tp / confusion.sum(0), 0.0)
        recall = np.where(confusion.sum(1) > 0, tp / confusion.sum(1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"accuracy": float(tp.sum() / confusion.sum()), "precision": precision.tolist(), "recall": recall.tolist(),
            "f1": f1.tolist(), "support": confusion.sum(1).tolist(), "confusion": confusion.tolist()}


def report(m, labels):                                     # metrics -> text table
    width = max(9, *map(len, labels))
    lines = [f"accuracy {m['accuracy']:.4f} ({sum(m['support'])} examples)", "",
             f"{'label':<{width}}  precision  recall     f1  support"]
    for i, name in enumerate(labels):
        lines.append(f"{name:<{width}}  {m['precision'][i]:9.4f}  {m['recall'][i]:6.4f}  {m['f1'][i]:.4f}  {m['support'][i]:7d}")
    lines += ["", "confusion (rows: true, columns: predicted)", " " * width + "  " + "  ".join(f"{n:>{width}}" for n in labels)]
    for i, name in enumerate(labels):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>{width}d}" for c in m["confusion"][i]))
    return "\n".join(lines)


WORD = re.compile(r"[a-z0-9']+")


def majority_baseline(train_y, n_test):                   # -> predictions: the most common training label for all
    return np.full(n_test, np.bincount(train_y).argmax())


def bag_of_words_baseline(train_texts, train_y, test_texts, n_labels, vocab_size=5000, steps=300, lr=0.5, l2=1e-4):
    """Logistic regression on which words a text has (its 5000 most common words in >= 2 training
    texts), trained by full-batch gradient descent on the softmax cross-entropy -> test predictions."""
    docs = [set(WORD.findall(t.lower())) for t in train_texts]
    df = collections.Counter(w for d in docs for w in d)
    vocab = {w: j for j, (w, c) in enumerate(df.most_common(vocab_size)) if c >= 2}

    def features(word_sets):                               # -> [N, |vocab|] 0/1
        x = np.zeros((len(word_sets), len(vocab)), np.float32)
        for i, words in enumerate(word_sets):
            x[i, [vocab[w] for w in words if w in vocab]] = 1.0
        return x
    x, onehot = features(docs), np.eye(n_labels, dtype=np.float32)[train_y]
    w, b = np.zeros((x.shape[1], n_labels), np.float32), np.zeros(n_labels, np.float32)
    for _ in range(steps):
        z = x @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        g = (p / p.sum(axis=1, keepdims=True) - onehot) / len(x)   # d(mean cross-entropy)/dz
        w -= lr * (x.T @ g + l2 * w)
        b -= lr * g.sum(axis=0)
    return (features([set(WORD.findall(t.lower())) for t in test_texts]) @ w + b).argmax(axis=1)


@dataclasses.dataclass
class Settings:
    data: str = None
    val: str = None                                        # a validation file; default: --val-fraction of --data
    val_fraction: float = 0.1
    labels: list = None                                    # names in head order; default: sorted names in the data
    init: str = None                                       # the checkpoint to fine-tune (a language model)
    out: str = None
    text_column: str = "text"
    label_column: str = "label"
    trainable: str = "last-1"
    epochs: int = 3
    batch: int = 8
    max_len: int = 256
    keep: str = "start"                                    # truncation keeps the start of a long text, or its end
    lr: float = 1e-4
    warmup: float = 0.06                                   # fraction of all steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    dropout: float = 0.0
    seed: int = 0
    backend: str = "numba"

    def check(self):
        train.check_counts(self, ("epochs", "batch", "max_len"))
        check_hyperparameters(self.lr, (0.9, 0.999), 1e-8, self.weight_decay)
        if not 0 < self.val_fraction < 1:
            raise InputError(f"--val-fraction must be in (0, 1); got {self.val_fraction}")
        if not 0 <= self.warmup < 1:
            raise InputError(f"--warmup must be a fraction of the steps in [0, 1); got {self.warmup}")
        if not self.grad_clip > 0:
            raise InputError(f"--grad-clip must be > 0; got {self.grad_clip}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"--dropout must be a probability in [0, 1); got {self.dropout}")
        if self.keep not in ("start", "end"):
            raise InputError(f"--keep must be 'start' or 'end'; got {self.keep!r}")
        if self.labels is not None and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) or not all(self.labels)):
            raise InputError(f"--labels must name 2 or more distinct labels; got {','.join(self.labels)!r}")


class Run:
    """One fine-tuning run: its directory, classifier, optimizer, data and position."""

    def __init__(self, settings, resume=False, log=print):
        self.log = log
        if resume:
            settings = self._resume_settings(settings)
        if not settings.out:
            raise InputError("--out DIR is required: the run's checkpoints and logs go there")
        if not settings.data:
            raise InputError("--data is required: a CSV or JSONL file of labelled texts")
        settings.check()
        self.s = s = settings
        texts, labels = read_examples(s.data, s.text_column, s.label_column)
        order = label_order(labels, s.labels, s.data)
        if s.val:
            val_texts, val_labels = read_examples(s.val, s.text_column, s.label_column)
            label_order(val_labels + labels, order, s.val)
            train = (texts, labels)
        else:
            tr, va = split(len(texts), s.val_fraction, s.seed)
            train = ([texts[i] for i in tr], [labels[i] for i in tr])
            val_texts, val_labels = [texts[i] for i in va], [labels[i] for i in va]
        if not resume:
            if os.path.exists(os.path.join(s.out, "run.json")):
                raise TrainingError(f"{s.out}: holds another run; continue it with --resume {s.out}, or choose another --out")
            if not s.init:
                raise InputError("--init is required: the pretrained checkpoint (a directory or .safetensors) to fine-tune")
        self.clf = load_classifier(os.path.join(s.out, "last"), backend=s.backend) if resume else self._new(order)
        if sorted(self.clf.labels) != sorted(order):
            raise InputError(f"{s.init if not resume else s.out}: the classifier's labels are {', '.join(self.clf.labels)}; "
                             f"the data's are {', '.join(order)}")
        order = self.clf.labels                            # a classifier fine-tuned again keeps its head's order
        self.train_ids = self.clf.encode(train[0])
        self.train_y = self.clf.label_ids(train[1])
        self.val_ids, self.val_y = self.clf.encode(val_texts), self.clf.label_ids(val_labels)
        self.log(f"labels: {', '.join(order)}; train {len(train[1])} examples {counts(train[1], order)}, "
                 f"val {len(val_labels)} {counts(val_labels, order)}"
                 + ("" if s.val else f" (a seeded {s.val_fraction:.0%} of {s.data})")
                 + f"; texts over {s.max_len} tokens keep their {s.keep}")
        self.params = self.clf.trainable_params(s.trainable)
        self.opt = AdamW(self.clf.model, lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=s.weight_decay,
                         params=self.params, refresh=lambda: self.clf.refresh(s.trainable))
        self.steps_per_epoch = math.ceil(len(self.train_ids) / s.batch)
        self.rng = np.random.default_rng(s.seed + 1)
        self.epoch, self.pos, self.order = 0, 0, None      # position: epoch, batches done in it, its example order
        self.best = {"epoch": 0, "val_accuracy": -1.0}
        if resume:
            self._load_trainer()
        else:
            os.makedirs(s.out, exist_ok=True)
            with open(os.path.join(s.out, "run.json"), "w") as f:
                json.dump({"settings": dataclasses.asdict(s), "labels": order}, f, indent=2)
            open(os.path.join(s.out, "metrics.jsonl"), "w").close()
            self.save_last()                               # there is always a checkpoint to go back to

    def _new(self, order):
        s = self.s
        model = load_model(s.init, backend=s.backend)
        if "score.weight" in model.info.source.tensors:   # fine-tuning a classifier again: its head must fit
            head = model.info.source.tensors["score.weight"]
            if head.shape[0] != len(order):
                raise InputError(f"--init {s.init}: its score head has {head.shape[0]} labels; --labels has {len(order)}")
            clf = load_classifier(s.init, backend=s.backend)
        else:
            clf = classifier(model, order, seed=s.seed)
        clf.max_len, clf.keep = min(s.max_len, model.config.n_ctx), s.keep
        if s.trainable != "head":
            model.trainable_params()                       # the fp32 check before anything is written
        parse_trainable(s.trainable, model.config.n_layer)
        return clf

    def _resume_settings(self, s):
        run_json = os.path.join(s.out or "", "run.json")
        if not os.path.exists(run_json) or not os.path.exists(os.path.join(s.out, "last", "model.safetensors")):
            raise TrainingError(f"{s.out}: holds no npgpt classify run to resume (no run.json and last/model.safetensors)")
        with open(run_json) as f:
            saved = Settings(**json.load(f)["settings"])
        saved.epochs = s.epochs or saved.epochs            # resuming may extend the run
        saved.backend = s.backend
        return saved

    @property
    def total_steps(self):
        return self.s.epochs * self.steps_per_epoch

    def save_last(self):
        last = os.path.join(self.s.out, "last")
        os.makedirs(last, exist_ok=True)
        state = {"t": self.opt.t, "rng": self.rng.bit_generator.state, "epoch": self.epoch, "pos": self.pos, "best": self.best}
        arrays = {"state": np.array(json.dumps(state)), "order": np.asarray(self.order if self.order is not None else [], np.int64)}
        arrays.update({"m/" + n: a for n, a in self.opt.m.items()})
        arrays.update({"v/" + n: a for n, a in self.opt.v.items()})
        path = trainer_path(last, self.epoch, self.pos)
        atomic_write(path, lambda f: np.savez(f, **arrays))
        self.clf.save(last, metadata={"npgpt.classify_epoch": self.epoch, "npgpt.classify_pos": self.pos})
        for old in glob.glob(os.path.join(last, "trainer-*.npz")):
            if old != path:
                os.remove(old)

    def _load_trainer(self):
        last = os.path.join(self.s.out, "last")
        meta = SafetensorsFile(os.path.join(last, "model.safetensors")).metadata
        path = trainer_path(last, int(meta.get("npgpt.classify_epoch", -1)), int(meta.get("npgpt.classify_pos", -1)))
        if not os.path.exists(path):
            raise TrainingError(f"{last}: model.safetensors has no trainer file of its position ({os.path.basename(path)})")
        with np.load(path) as z:
            state = json.loads(str(z["state"]))
            self.opt.load_state_dict({"t": state["t"], "m": {n: z["m/" + n] for n in self.opt.params},
                                      "v": {n: z["v/" + n] for n in self.opt.params}})
            self.order = z["order"] if z["order"].size else None
        self.rng.bit_generator.state = state["rng"]
        self.epoch, self.pos, self.best = state["epoch"], state["pos"], state["best"]
        step = self.epoch * self.steps_per_epoch + self.pos
        metrics_path = os.path.join(self.s.out, "metrics.jsonl")   # drop lines past the checkpoint: they will be redone
        with open(metrics_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
        atomic_write(metrics_path, lambda f: f.writelines(kept), mode="w")
        self.log(f"resumed {self.s.out} at epoch {self.epoch + 1}, batch {self.pos}")

    def evaluate(self, ids, y):                            # -> (mean loss, accuracy)
        logits = self.clf.logits(ids, batch_size=max(16, self.s.batch))
        z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean())

    def train_step(self, idx):
        s = self.s
        step = self.epoch * self.steps_per_epoch + self.pos
        lr = cosine_lr(step, lr=s.lr, min_lr=0.0, warmup=int(s.warmup * self.total_steps), steps=self.total_steps)
        loss, grads = self.clf.value_and_grad([self.train_ids[i] for i in idx], self.train_y[idx], trainable=s.trainable,
                                              dropout=s.dropout, rng=self.rng)
        if not math.isfinite(loss):
            raise TrainingError(f"step {step + 1}: the loss is {loss}; stopped. The last checkpoint is intact in "
                                f"{os.path.join(s.out, 'last')}; try a lower --lr")
        norm = clip_grad_norm(grads, s.grad_clip, ops=self.opt.ops)
        self.opt.step(grads, lr=lr)
        return loss, lr, norm

    def run(self, progress=None):
        s = self.s
        metrics_file = open(os.path.join(s.out, "metrics.jsonl"), "a")
        try:
            while self.epoch < s.epochs:
                if self.order is None:
                    self.order = self.rng.permutation(len(self.train_ids))
                while self.pos < self.steps_per_epoch:
                    idx = self.order[self.pos * s.batch : (self.pos + 1) * s.batch]
                    t = time.perf_counter()
                    loss, lr, norm = self.train_step(idx)
                    self.pos += 1
                    row = {"step": self.epoch * self.steps_per_epoch + self.pos, "epoch": self.epoch + 1, "loss": round(loss, 6),
                           "lr": lr, "grad_norm": round(norm, 6), "examples_per_s": round(len(idx) / (time.perf_counter() - t), 2)}
                    if self.pos == self.steps_per_epoch:
                        row["val_loss"], row["val_accuracy"] = (round(x, 6) for x in self.evaluate(self.val_ids, self.val_y))
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    if progress:
                        progress(row)
                self.epoch, self.pos, self.order = self.epoch + 1, 0, None
                if row["val_accuracy"] > self.best["val_accuracy"]:
                    self.best = {"epoch": self.epoch, "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"]}
                    self.clf.save(s.out, metadata={"npgpt.classify_epoch": self.epoch})
                    self.log(f"epoch {self.epoch}: val accuracy {row['val_accuracy']:.4f} (best so far; saved to {s.out})")
                else:
                    self.log(f"epoch {self.epoch}: val accuracy {row['val_accuracy']:.4f} (best: epoch {self.best['epoch']}, "
                             f"{self.best['val_accuracy']:.4f})")
                self.save_last()
        except KeyboardInterrupt:
            self.save_last()
            self.log(f"interrupted: saved epoch {self.epoch + 1}, batch {self.pos} in {os.path.join(s.out, 'last')}; "
                     f"continue with npgpt classify train --resume {s.out}")
            raise
        finally:
            metrics_file.close()
        return self.best


def progress_bar(total, start):                            # -> (callback(row), close), as npgpt train's
    return train.progress_bar(
        total, start,
        postfix=lambda row: (f"epoch {row['epoch']}, loss {row['loss']:.4f}, {row['examples_per_s']:.1f} ex/s"
                             + (f", val acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else "")),
        line=lambda row: (f"epoch {row['epoch']} step {row['step']}/{total} loss {row['loss']:.4f} val loss {row['val_loss']:.4f} "
                          f"val accuracy {row['val_accuracy']:.4f}" if "val_accuracy" in row else None))
