"""How kernels are compiled, where their compiled code is cached, and how work is spread over cores.

Two ways to use the cores, never mixed within a phase:
- decode (a few rows): numba `prange` kernels on numba's OpenMP threads; no BLAS at all.
- prefill (many rows): `bands` splits the rows over a pool of Python threads, each running a
  single-threaded sgemm or a `nogil` numba kernel on its band.
OpenBLAS's and OpenMP's worker threads both spin for a while after their work; interleaving them
on a machine with as many threads as cores halved the speed of whatever ran next (measured: a
LayerNorm kernel 30x slower right after a multi-threaded sgemm).
"""

import contextlib
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
from numba import types
from numba.extending import intrinsic
from threadpoolctl import ThreadpoolController

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
serial = numba.njit(nogil=True, fastmath=FASTMATH, cache=True)   # nogil: bands of it run on Python threads at once

@intrinsic
def f32_from_bits(typingctx, bits):                        # uint32 -> float32 with the same bits (no conversion)
    """A bit cast inside a loop, which LLVM still vectorizes: bf16 widening and building 2**k for exp."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return sig, codegen


_BLAS = ThreadpoolController()
_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="npgpt")


DECODE_ROWS = 16                                           # up to this many rows (B*T) is decode-sized work


_state = threading.local()


@contextlib.contextmanager
def blas_per_band():
    """Hold numpy's BLAS at one thread for a whole forward pass (npgpt.Model enters this). Switching
    it per call instead cost ~1.5x on prefill GEMMs; outside this context `bands` still switches."""
    if getattr(_state, "inside", False):
        yield
        return
    with _BLAS.limit(limits=1, user_api="blas"):
        _state.inside = True
        try:
            yield
        finally:
            _state.inside = False


def bands(fn, n, inline_upto=DECODE_ROWS):                 # fn(slice) over range(n), one contiguous band per thread
    """Run fn on numba.get_num_threads() bands of n rows at once, BLAS single-threaded inside each.
    Decode-sized work (n <= inline_upto) runs inline: waking threads would cost more than it saves."""
    P = 1 if n <= inline_upto else min(numba.get_num_threads(), n)
    if P == 1:
        fn(slice(0, n))
        return
    with blas_per_band():
        for f in [_POOL.submit(fn, slice(p * n // P, (p + 1) * n // P)) for p in range(P)]:
            f.result()
