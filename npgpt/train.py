"""`npgpt train`: pretrain from scratch or fine-tune a checkpoint on a text; checkpoints that resume exactly.

A run directory holds an ordinary checkpoint (model.safetensors + config.json, loadable by npgpt.load
and transformers) and what resuming needs: run.json (the settings), trainer-<step>.npz (AdamW's
moments, the step, the data order's RNG state), tokens.bin (the tokenized text), metrics.jsonl and
loss.png. Saving writes trainer-<step>.npz first, then replaces model.safetensors (whose metadata
names the step), then deletes older trainer files: whatever moment a crash or Ctrl-C hits, the model
file on disk and the trainer file of its step are both there.
"""

import dataclasses
import glob
import json
import math
import os
import sys
import time

import numpy as np

from . import data, weights
from .api import Model, load
from .config import PRESETS
from .errors import InputError, TrainingError
from .optim import AdamW, check_hyperparameters, clip_grad_norm, cosine_lr
from .weights.checkpoint import SafetensorsFile, atomic_write


def check_counts(settings, names):                         # each named setting must be an integer >= 1 (a flag's value)
    for name in names:
        value = getattr(settings, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be an integer >= 1; got {value!r}")


@dataclasses.dataclass
class Settings:
    data: str = None
    config: str = "tiny"                                   # a preset, for training from scratch
    init: str = None                                       # a checkpoint to fine-tune instead
    out: str = None
    steps: int = 1000
    batch: int = 8
    seq: int = 256
    accum: int = 1
    lr: float = 6e-4
    min_lr: float = None                                   # default lr / 10, as nanoGPT
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple = (0.9, 0.95)
    dropout: float = 0.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    seed: int = 0
    backend: str = "numba"

    def check(self):
        check_counts(self, ("steps", "batch", "seq", "accum", "eval_every", "eval_batches", "save_every"))
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        check_hyperparameters(self.lr, self.betas, 1e-8, self.weight_decay)
        if not 0 <= self.min_lr <= self.lr:
            raise InputError(f"--min-lr must be between 0 and --lr ({self.lr}); got {self.min_lr}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise InputError(f"--warmup must be an integer >= 0; got {self.warmup!r}")
        if not self.grad_clip > 0:
            raise InputError(f"--grad-clip must be > 0; got {self.grad_clip}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise InputError(f"--dropout must be a probability in [0, 1); got {self.dropout!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"--seed must be an integer >= 0; got {self.seed!r}")
        if self.init is None and self.config not in PRESETS:
            raise InputError(f"--config {self.config!r}: choose one of {', '.join(PRESETS)}")


def trainer_path(out, step):
    return os.path.join(out, f"trainer-{step:08d}.npz")


def saved_step(out):                                       # the step model.safetensors in `out` was saved at, or None
    path = os.path.join(out, "model.safetensors")
    if not os.path.exists(path):
        return None
    step = SafetensorsFile(path).metadata.get("npgpt.train_step")
    return int(step) if step is not None else None


class Run:
    """One training run: its directory, model, optimizer, data and position."""

    def __init__(self, settings, resume=False, log=print):
        self.log = log
        if resume:
            settings = self._resume_settings(settings)
            settings.check()
        else:
            settings.check()                               # bad settings fail before anything is written
            self._claim(settings)
        self.s = s = settings
        self.tokens, self.data_sha = data.tokens(s.data, s.out)
        self.model = load(s.out, backend=s.backend) if resume else self._model()
        if s.seq > self.model.config.n_ctx:
            raise InputError(f"--seq {s.seq} is longer than the model's context n_ctx={self.model.config.n_ctx}")
        if int(self.tokens.max()) >= self.model.config.n_vocab:
            raise InputError(f"the text has token ids up to {int(self.tokens.max())}; the model's vocabulary is {self.model.config.n_vocab}")
        self.train_ids, self.val_ids = data.split(self.tokens, s.seq)
        self.opt = AdamW(self.model, lr=s.lr, betas=tuple(s.betas), eps=1e-8, weight_decay=s.weight_decay)
        self.rng = np.random.default_rng(s.seed)
        self.step = 0
        if resume:
            self._load_trainer()
        else:
            with open(os.path.join(s.out, "run.json"), "w") as f:
                json.dump({"settings": dataclasses.asdict(s), "data_sha256": self.data_sha}, f, indent=2)
            open(os.path.join(s.out, "metrics.jsonl"), "w").close()
            self.save()                                    # step 0: there is always a checkpoint to go back to

    def _claim(self, s):
        if not s.out:
            raise InputError("--out DIR is required: the run's checkpoint and logs go there")
        if s.data is None:
            raise InputError("--data is required: a UTF-8 text file or a directory of .txt files")
        if os.path.exists(os.path.join(s.out, "run.json")):
            raise TrainingError(f"{s.out}: holds another run; continue it with --resume {s.out}, or choose another --out")
        os.makedirs(s.out, exist_ok=True)

    def _resume_settings(self, s):
        run_json = os.path.join(s.out, "run.json")
        if not os.path.exists(run_json) or saved_step(s.out) is None:
            raise TrainingError(f"{s.out}: holds no npgpt training run to resume (no run.json and trained model.safetensors)")
        with open(run_json) as f:
            saved = json.load(f)["settings"]
        saved["betas"] = tuple(saved["betas"])
        merged = Settings(**saved)
        merged.steps = s.steps if s.steps is not None else merged.steps   # resuming may extend the run
        merged.out = s.out
        merged.backend = s.backend
        return merged

    def _model(self):
        s = self.s
        if s.init:
            model = load(s.init, backend=s.backend)
            model.trainable_params()                       # the fp32 check, before anything else happens
            return model
        cfg = PRESETS[s.config]
        return Model(weights.init_params(cfg, s.seed), cfg, backend=s.backend)

    def _load_trainer(self):
        step = saved_step(self.s.out)
        path = trainer_path(self.s.out, step)
        if not os.path.exists(path):
            raise TrainingError(f"{self.s.out}: model.safetensors is at step {step} but {os.path.basename(path)} is missing")
        with np.load(path) as z:
            state = json.loads(str(z["state"]))
            self.opt.load_state_dict({"t": state["t"], "m": {n: z["m/" + n] for n in self.opt.params},
                                      "v": {n: z["v/" + n] for n in self.opt.params}})
        self.rng.bit_generator.state = state["rng"]
        self.step = step
        metrics = os.path.join(self.s.out, "metrics.jsonl")   # drop lines past the checkpoint: they will be redone
        if os.path.exists(metrics):
            with open(metrics) as f:
                kept = [line for line in f if json.loads(line)["step"] <= step]
            atomic_write(metrics, lambda f: f.writelines(kept), mode="w")
        self.log(f"resumed {self.s.out} at step {step}")

    def save(self):
        out, step = self.s.out, self.step
        state = {"t": self.opt.t, "rng": self.rng.bit_generator.state, "step": step}
        arrays = {"state": np.array(json.dumps(state))}
        arrays.update({"m/" + n: a for n, a in self.opt.m.items()})
        arrays.update({"v/" + n: a for n, a in self.opt.v.items()})
        atomic_write(trainer_path(out, step), lambda f: np.savez(f, **arrays))
        self.model.save(out, metadata={"npgpt.train_step": step})
        for old in glob.glob(os.path.join(out, "trainer-*.npz")):
            if old != trainer_path(out, step):
                os.remove(old)

    def val_loss(self):
        s = self.s
        starts = data.val_starts(len(self.val_ids), s.seq, s.eval_batches * s.batch)
        total, n = 0.0, 0
        for i in range(0, len(starts), s.batch):
            x, y = data.batch(self.val_ids, starts[i : i + s.batch], s.seq)
            total += self.model.loss(x, y) * y.size
            n += y.size
        return total / n

    def train_step(self):
        s = self.s
        lr = cosine_lr(self.step, lr=s.lr, min_lr=s.min_lr, warmup=s.warmup, steps=s.steps)
        total, grads = 0.0, None
        for _ in range(s.accum):                           # gradient accumulation: the mean over accum micro-batches
            x, y = data.batch(self.train_ids, data.random_starts(self.rng, len(self.train_ids), s.batch, s.seq), s.seq)
            loss, g = self.model.value_and_grad(x, y, dropout=s.dropout, rng=self.rng)   # masks from the data-order RNG (saved)
            total += loss / s.accum
            if grads is None:
                grads = {n: a / np.float32(s.accum) for n, a in g.items()}
            else:
                for n, a in g.items():
                    grads[n] += a / np.float32(s.accum)
        if not math.isfinite(total):
            raise TrainingError(f"step {self.step + 1}: the loss is {total}; stopped. The last checkpoint "
                                f"(step {saved_step(s.out)}) is intact in {s.out}; try a lower --lr")
        norm = clip_grad_norm(grads, s.grad_clip, ops=self.opt.ops)
        self.opt.step(grads, lr=lr)
        self.step += 1
        return total, lr, norm

    def run(self, progress=None):
        s = self.s
        metrics = open(os.path.join(s.out, "metrics.jsonl"), "a")
        tokens_per_step = s.batch * s.seq * s.accum
        try:
            while self.step < s.steps:
                t = time.perf_counter()
                loss, lr, norm = self.train_step()
                row = {"step": self.step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(norm, 6),
                       "tokens_per_s": round(tokens_per_step / (time.perf_counter() - t), 1)}
                if self.step % s.eval_every == 0 or self.step == s.steps:
                    row["val_loss"] = round(self.val_loss(), 6)
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if "val_loss" in row:
                    plot(os.path.join(s.out, "metrics.jsonl"), os.path.join(s.out, "loss.png"))
                if progress:
                    progress(row)
                if self.step % s.save_every == 0 or self.step == s.steps:
                    self.save()
        except KeyboardInterrupt:
            self.save()
            self.log(f"interrupted: saved step {self.step} in {s.out}; continue with npgpt train --resume {s.out}")
            raise
        finally:
            metrics.close()


def plot(metrics_path, png_path):
    """The loss curve (train and val) as a PNG, if matplotlib (the 'train' extra) is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in open(metrics_path)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=0.8)
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return True


def progress_bar(total, start, postfix=None, line=None):   # -> (callback(row), close): tqdm if installed, else printed lines
    """postfix(row): the bar's text for a step's row; line(row): the line printed without tqdm (None: none)."""
    postfix = postfix or (lambda row: f"loss {row['loss']:.4f}, {row['tokens_per_s']:.0f} tok/s"
                          + (f", val {row['val_loss']:.4f}" if "val_loss" in row else ""))
    line = line or (lambda row: (f"step {row['step']}/{total} loss {row['loss']:.4f} {row['tokens_per_s']:.0f} tok/s "
                                 f"val {row['val_loss']:.4f}") if "val_loss" in row else None)   # a line per eval
    try:
        from tqdm import tqdm
    except ImportError:
        def plain(row):
            text = line(row)
            if text:
                print(text, file=sys.stderr, flush=True)
        return plain, lambda: None
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(row):
        bar.set_postfix_str(postfix(row))
        bar.update(1)
    return update, bar.close
