"""Threads: the BLAS limit under concurrent callers, numba's workqueue fallback, one place for jitted code."""

import ast
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import npgpt
from npgpt.kernels import jit
from conftest import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blas_threads():
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def a_band():                                              # a pass's first band holds BLAS at one thread for the rest of the pass
    jit.bands(lambda rows: None, 64, inline_upto=1)


def test_blas_limit_is_held_until_the_last_concurrent_forward_leaves():
    """A enters, B enters, A leaves while B still runs: B must keep BLAS at 1 thread; after B, the
    original limit is back. (A per-thread limit restored A's original while B was still inside.)"""
    steps = [threading.Event() for _ in range(3)]
    seen = {}

    def a():
        with jit.blas_per_band():
            a_band()
            steps[0].set()
            steps[1].wait()
        steps[2].set()

    def b():
        steps[0].wait()
        with jit.blas_per_band():
            a_band()
            steps[1].set()
            steps[2].wait()
            seen["while_b_inside"] = blas_threads()

    with threadpool_limits(limits=2, user_api="blas"):
        threads = [threading.Thread(target=f) for f in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen["while_b_inside"] == {1}
        assert blas_threads() == {2}


def test_concurrent_forwards_leave_blas_as_they_found_it(tiny_params):
    model = npgpt.Model(tiny_params, TINY, backend="numba")
    ids = np.arange(40).reshape(2, 20)
    expected = model.forward(ids)
    with threadpool_limits(limits=2, user_api="blas"):
        results = []
        workers = [threading.Thread(target=lambda: results.extend(model.forward(ids) for _ in range(5))) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert blas_threads() == {2}
    assert len(results) == 20 and all(np.array_equal(r, expected) for r in results)


@pytest.mark.parametrize("panels", [False, True])
def test_a_decode_step_leaves_blas_alone_and_a_prefill_holds_it_at_one_thread_until_it_ends(tiny_params, panels, monkeypatch):
    """BLAS is held at one thread from a pass's first band: a prefill's products run in bands, a decode
    step calls no BLAS and never switches it (nor restores it). With float32 panels (AVX-512, jit.PANEL_WIDE)
    a prefill calls no BLAS either, and leaves it alone too."""
    monkeypatch.setattr(jit, "PANEL_WIDE", panels)
    model = npgpt.Model(tiny_params, TINY, backend="numba")
    cache = model.new_cache(batch=1)
    model.forward(np.arange(20)[None], cache=cache)        # compiled before anything is counted
    sets, real = [], jit._BlasLimit._set
    monkeypatch.setattr(jit._BlasLimit, "_set", staticmethod(lambda lib, n: sets.append(n) or real(lib, n)))
    with threadpool_limits(limits=2, user_api="blas"):
        model.forward(np.array([[3]]), cache=cache)        # a decode step
        assert sets == [] and blas_threads() == {2}
        model.forward(np.arange(20)[None], cache=model.new_cache(batch=1))   # a prefill: to 1 (per BLAS library) once, then back
        half = len(sets) // 2
        assert (half == 0 if panels else half > 0) and sets == [1] * half + [2] * half and blas_threads() == {2}


WORKQUEUE_CHILD = """
import threading, numpy as np, npgpt
model = npgpt.random_model(npgpt.Config(n_vocab=100, n_ctx=32, n_embd=16, n_head=2, n_layer=2), backend="numba")
expected = model.generate([1, 2, 3], max_new_tokens=20, temperature=0)
out = []
def run():
    for _ in range(20):
        out.append(model.generate([1, 2, 3], max_new_tokens=20, temperature=0))
workers = [threading.Thread(target=run) for _ in range(3)]
[w.start() for w in workers]
[w.join() for w in workers]
import numba
print(numba.threading_layer(), len(out), all(o == expected for o in out))
"""


def test_workqueue_threading_layer_serializes_instead_of_aborting():
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    r = subprocess.run([sys.executable, "-c", WORKQUEUE_CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["workqueue", "60", "True"]
    assert r.stderr.count("'workqueue' threading layer") == 1


def test_all_jitted_code_goes_through_kernels_jit():
    """numba.njit/jit appear only in kernels/jit.py, which picks the cache dir (a read-only install with
    no writable HOME otherwise dies at import: "cannot cache function")."""
    offenders = []
    for folder in ("npgpt", "kernels", "weights"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                path = os.path.join(root, name)
                if not name.endswith(".py") or path == os.path.join(REPO, "kernels", "jit.py"):
                    continue
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "numba" \
                            and node.attr in ("njit", "jit", "generated_jit", "vectorize"):
                        offenders.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
                    if isinstance(node, ast.ImportFrom) and node.module == "numba" and \
                            {a.name for a in node.names} & {"njit", "jit", "vectorize"}:
                        offenders.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    assert offenders == []
