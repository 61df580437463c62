"""One exception family for everything npgpt rejects, so callers can catch `NpgptError`."""


class NpgptError(Exception):
    """Base class of every error npgpt raises on bad input."""


class CheckpointError(NpgptError):
    """A weights file is missing, unreadable, corrupt, or not a GPT-2 checkpoint."""


class ConfigError(NpgptError):
    """A model configuration is inconsistent or cannot be determined."""


class InputError(NpgptError, ValueError):
    """A prompt, token id, or generation argument is out of range."""


class TokenizerError(NpgptError):
    """The shipped GPT-2 vocabulary files are missing or fail their hash check."""


class TrainingError(NpgptError):
    """A training run cannot start or continue: no run to resume, another run in the way, a loss that diverged."""
