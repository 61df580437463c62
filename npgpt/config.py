"""GPT-2 hyperparameters, named as in the paper and the Hugging Face config."""

from dataclasses import asdict, dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Config:
    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    eps: float = 1e-5

    def __post_init__(self):
        for name in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not self.eps > 0:
            raise ConfigError(f"config: eps must be positive, got {self.eps!r}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def n_params(self):
        """Parameters with the LM head tied to wte (as in every released GPT-2)."""
        C = self.n_embd
        per_layer = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
        return self.n_vocab * C + self.n_ctx * C + self.n_layer * per_layer + 2 * C

    def to_dict(self):
        return asdict(self)


PRESETS = {
    "gpt2": Config(),
    "gpt2-medium": Config(n_embd=1024, n_head=16, n_layer=24),
    "gpt2-large": Config(n_embd=1280, n_head=20, n_layer=36),
    "gpt2-xl": Config(n_embd=1600, n_head=25, n_layer=48),
    "tiny": Config(n_ctx=256, n_embd=256, n_head=4, n_layer=4),     # for pretraining on a laptop CPU
}


def preset(name):
    """The Config of a released GPT-2 size: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown config {name!r}; choose one of {', '.join(PRESETS)}") from None
