"""npgpt: GPT-2 as readable NumPy (npgpt.model is the spec), with numba kernels that make it fast."""

from .api import BACKENDS, Model, load, quantize_checkpoint, random_model
from .cache import KVCache
from .config import PRESETS, Config, preset
from .generate import Timings
from .optim import AdamW, clip_grad_norm, cosine_lr
from .errors import CheckpointError, ConfigError, InputError, NpgptError, TokenizerError, TrainingError
from .tokenizer import EOT, encode, get_encoding
from . import data  # noqa: E402  (npgpt.data: token files and windows)
from .classifier import Classifier, classifier, load_classifier  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BACKENDS", "Model", "load", "random_model", "KVCache", "PRESETS", "Config", "preset", "NpgptError",
           "CheckpointError", "ConfigError", "InputError", "TokenizerError", "TrainingError", "EOT", "encode", "get_encoding", "Timings",
           "AdamW", "clip_grad_norm", "cosine_lr", "quantize_checkpoint",
           "Classifier", "classifier", "load_classifier"]
