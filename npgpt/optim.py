"""Training arithmetic: AdamW (torch.optim.AdamW's update), global-norm clipping, nanoGPT's learning-rate schedule.

The per-tensor arithmetic (`adamw_update`, `sum_of_squares`) is the spec; the numba backend supplies
twins with the same call shapes (npgpt.kernels.OPTIM), which AdamW and clip_grad_norm take as `ops`.
"""

import math
import numbers
from typing import Callable, NamedTuple

import numpy as np

from .errors import InputError


def adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, t):   # p, g, m, v [...] float32; p, m, v in place
    """torch.optim.AdamW's step t (1, 2, ...) on one tensor: decoupled decay, then bias-corrected moments."""
    if weight_decay:
        p *= np.float32(1.0 - lr * weight_decay)          # decoupled: shrinks the weight, not the gradient
    m *= np.float32(beta1)
    m += np.float32(1.0 - beta1) * g                       # first moment: a running mean of g
    v *= np.float32(beta2)
    v += np.float32(1.0 - beta2) * (g * g)                 # second moment: a running mean of g^2
    step_size = np.float32(lr / (1.0 - beta1**t))          # bias corrections: both moments start at 0
    root_c2 = np.float32(math.sqrt(1.0 - beta2**t))
    p -= step_size * m / (np.sqrt(v) / root_c2 + np.float32(eps))


def sum_of_squares(g):                                     # [...] float32 -> float, summed in float64
    return float(np.dot(g.ravel().astype(np.float64), g.ravel()))


class OptimOps(NamedTuple):
    adamw_update: Callable
    sum_of_squares: Callable


SPEC = OptimOps(adamw_update=adamw_update, sum_of_squares=sum_of_squares)


def clip_grad_norm(grads, max_norm, ops=SPEC):             # {name: g} -> total norm before clipping; scales grads in place
    """As torch.nn.utils.clip_grad_norm_: the L2 norm over every gradient together; if it exceeds
    max_norm, every gradient is scaled by max_norm / (norm + 1e-6)."""
    if not isinstance(max_norm, numbers.Real) or not max_norm > 0:
        raise InputError(f"max_norm must be a positive number; got {max_norm!r}")
    norm = math.sqrt(sum(ops.sum_of_squares(g) for g in grads.values()))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= np.float32(coef)
    return norm


def cosine_lr(step, *, lr, min_lr, warmup, steps):         # step 0, 1, ... -> learning rate
    """nanoGPT's schedule: linear warmup to lr over `warmup` steps, then a cosine down to min_lr at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= steps:
        return min_lr
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def check_hyperparameters(lr, betas, eps, weight_decay):
    if not isinstance(lr, numbers.Real) or not lr > 0 or not math.isfinite(lr):
        raise InputError(f"learning rate must be a finite number > 0; got {lr!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, numbers.Real) and 0 <= b < 1 for b in betas)):
        raise InputError(f"betas must be two numbers in [0, 1); got {betas!r}")
    if not isinstance(eps, numbers.Real) or not eps > 0:
        raise InputError(f"eps must be a number > 0; got {eps!r}")
    if not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0 or not math.isfinite(weight_decay):
        raise InputError(f"weight decay must be a finite number >= 0; got {weight_decay!r}")


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments), on a Model's weights in
    place. Decay applies to tensors with ndim >= 2 (matmul weights and embeddings), as nanoGPT groups them."""

    def __init__(self, model, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, params=None, refresh=None):
        """params: the {name: writable float32 array} to train (default: all of model.trainable_params());
        frozen weights get no moments. refresh: called after each update (default model.refresh)."""
        check_hyperparameters(lr, betas, eps, weight_decay)
        self.model, self.ops = model, model.optim_ops()
        self.params = model.trainable_params() if params is None else params   # checkpoint layout
        self.refresh = model.refresh if refresh is None else refresh
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(map(float, betas)), float(eps), float(weight_decay)
        self.t = 0
        self.m = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.v = {name: np.zeros_like(p) for name, p in self.params.items()}

    def step(self, grads, lr=None):
        """One update with `grads` ({name: array} as value_and_grad returns); lr overrides self.lr for this step."""
        missing = set(self.params) - set(grads)
        if missing:
            raise InputError(f"no gradient for {sorted(missing)[0]!r} ({len(missing)} missing)")
        for name, p in self.params.items():
            if np.shape(grads[name]) != p.shape:
                raise InputError(f"gradient {name!r} has shape {np.shape(grads[name])}; the weight is {p.shape}")
        lr = self.lr if lr is None else float(lr)
        self.t += 1
        for name, p in self.params.items():
            self.ops.adamw_update(p, grads[name], self.m[name], self.v[name], lr=lr, beta1=self.betas[0], beta2=self.betas[1],
                                  eps=self.eps, weight_decay=self.weight_decay if p.ndim >= 2 else 0.0, t=self.t)
        self.refresh()

    def state_dict(self):
        return {"t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
                "m": self.m, "v": self.v}

    def load_state_dict(self, state):
        for name in self.params:
            if name not in state["m"] or state["m"][name].shape != self.params[name].shape:
                raise InputError(f"optimizer state has no moments of the right shape for {name!r}")
            self.m[name][...] = state["m"][name]
            self.v[name][...] = state["v"][name]
        self.t = int(state["t"])
