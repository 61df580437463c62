"""The one place that says how kernels are compiled, and where their compiled code is cached."""

import os
import tempfile

import numba

# reassoc + contract let LLVM vectorize float32 reductions and use FMA. Not fastmath=True: that also
# assumes no inf/nan, and the causal mask and softmax rely on -inf.
FASTMATH = {"reassoc", "contract"}


def _writable(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def choose_cache_dir(package_dir, env=os.environ):
    """None when numba can cache beside the package (or the user chose NUMBA_CACHE_DIR); else a user dir."""
    if env.get("NUMBA_CACHE_DIR") or os.access(package_dir, os.W_OK):
        return None
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for candidate in (os.path.join(base, "npgpt", "numba"), os.path.join(tempfile.gettempdir(), f"npgpt-numba-{os.getuid()}")):
        if _writable(candidate):
            return candidate
    return None


_cache_dir = choose_cache_dir(os.path.dirname(os.path.abspath(__file__)))
if _cache_dir:                                            # an installed, read-only package: cache=True would fail at import
    numba.config.CACHE_DIR = _cache_dir

parallel = numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
serial = numba.njit(fastmath=FASTMATH, cache=True)
