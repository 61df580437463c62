"""Every kernel against the spec function it replaces, on odd shapes (T=1, T not a multiple of any
block, head_dim 10, n_embd 60/180, batch 3). Tolerance: fp32 max-abs relative to max(1, max|ref|);
the kernels sum in a different order (vectorized partial sums), so results differ in the last bits."""

import os
import numba
import numpy as np
import pytest

from npgpt import api, kernels
import npgpt
from npgpt.kernels import activation, attention, jit, matmul, norm, softmax
from npgpt import model as spec
from npgpt.cache import KVCache
from conftest import TINY, max_rel_err

TOL = 1e-5
rng = np.random.default_rng(42)


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))


@pytest.mark.parametrize("shape", [(1, 1, 60), (3, 97, 180), (2, 5, 768), (1, 13001, 64)])   # the last past norm.inline_rows: in bands
def test_layer_norm(shape):
    x, w, b = randn(*shape, scale=3.0) + np.float32(2.0), randn(shape[-1]), randn(shape[-1])
    got = norm.layer_norm(x, w, b, 1e-5)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert max_rel_err(got, spec.layer_norm(x, w, b, 1e-5)) < TOL


@pytest.mark.parametrize("shape", [(1, 1, 240), (3, 97, 720)])
def test_gelu(shape):
    x = randn(*shape, scale=4.0)
    assert max_rel_err(activation.gelu(x), spec.gelu(x)) < TOL


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 97), (2, 1000), (40, 33)])
def test_softmax(shape):
    x = randn(*shape, scale=5.0)
    assert max_rel_err(softmax.softmax(x), spec.softmax(x)) < TOL


def test_softmax_exp_is_accurate_over_float32_range():
    x = np.concatenate([np.linspace(-100, 0, 20001, dtype=np.float32), [np.float32(0.0)]])
    p = softmax.softmax(x[None])[0]                        # peak 0: p is exp(x) / sum(exp(x))
    ref = np.exp(x.astype(np.float64)) / np.exp(x.astype(np.float64)).sum()
    big = ref > 1e-30
    assert np.abs(p[big] / ref[big] - 1).max() < 2e-6     # relative, even for tiny probabilities
    assert np.abs(p - ref).max() < 1e-7


def test_softmax_row_scales_and_stays_in_float32():
    """softmax(scale * row[:n]) in place, zeros after n, its log-sum-exp returned. A float64 that once
    slipped into the row's arithmetic (a -np.inf peak) made its max scalar and its exponentials float64
    (1.5x slower) and showed as a float64 result; numba's inferred signature says whether it happens."""
    row, scale = randn(37, scale=4.0), np.float32(1 / np.sqrt(10))
    want = spec.softmax(scale * row[:30])
    lse = softmax.softmax_row(got := row.copy(), 30, scale)
    assert max_rel_err(got[:30], want) < TOL and (got[30:] == 0).all()
    assert abs(lse - np.log(np.exp(scale * row[:30].astype(np.float64)).sum())) < 1e-5
    assert all(sig.return_type == numba.float32 for sig in softmax.softmax_row.nopython_signatures)


@pytest.mark.parametrize("row", [[-3.0, -1.5, -7.0, -1.25] * 9, [-0.0, -1.0, 0.0, -np.inf, -2.0], [-np.inf, -5.0],
                                 [300.0, -300.0, 299.5] * 11, [float(np.finfo(np.float32).max), 1.0], [-2.0]])
def test_softmax_row_finds_the_peak_of_any_signs(row):
    """The peak pass compares floats as integers (softmax._order_key): all-negative rows (whose bit
    patterns run backwards), both zeros, -inf, a lone element, peaks far from zero (a peak found wrong
    by 300 would overflow exp or lose every probability). Against float64 NumPy."""
    x = np.array(row, np.float32)
    lse = softmax.softmax_row(got := x.copy(), x.size, np.float32(1.0))
    ref = np.exp(x.astype(np.float64) - x.max())
    assert np.abs(got - ref / ref.sum()).max() < 1e-6 and np.isfinite(got).all()
    assert lse == pytest.approx(x.max() + np.log(ref.sum()), rel=1e-6)


@pytest.mark.parametrize("T, S", [(1, 1), (1, 40), (7, 7), (97, 97), (5, 33)])
def test_causal_softmax(T, S):
    scores = randn(3, 2, T, S, scale=4.0)
    want = spec.softmax(scores / np.float32(np.sqrt(10.0)) + spec.causal_mask(T, S))
    assert max_rel_err(softmax.causal_softmax(scores.copy(), 10), want) < TOL


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 13, 16, 17, 97])   # GEMV below 17 rows (4x4 tiles from 4, then the rest), BLAS above
@pytest.mark.parametrize("n_in, n_out", [(60, 180), (180, 60), (768, 50), (61, 37)])   # an odd number of weight rows too
def test_linear(rows, n_in, n_out):
    x, w, b = randn(rows, n_in), randn(n_in, n_out, scale=0.1), randn(n_out)
    got = kernels.matmul.linear(x, **kernels.transpose_linear({"weight": w, "bias": b}))
    assert got.shape == (rows, n_out)
    assert max_rel_err(got, spec.linear(x, w, b)) < TOL


@pytest.mark.parametrize("span", [(0, 2), (3, 6), (5, 9), (10, 17), (0, 97), (40, 301)])   # q = 0 (rows one at a time), 0, 1, 1 + 3 left over, ...
@pytest.mark.parametrize("n", [1, 2, 4, 5, 9])             # inputs: 4 at a time (16 dots), the last n % 4 one at a time
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gemv_rows_read_four_rows_a_quarter_apart(span, n, dtype):
    """matmul.float_rows (the float32 decode step's chunks, gemv's tasks): rows m0 .. m1 as 4 runs a quarter
    of the span apart, side by side, against 4 inputs at a time and the rest one at a time, the last
    (m1 - m0) % 4 rows a dot each; nothing outside m0 .. m1 written. Against float64 products (bf16: of the
    widened rows), within TOL of the largest."""
    from npgpt import quant

    x, w = randn(n, 77), randn(301, 77)
    bits = quant.to_bf16(w).bits if dtype == "bf16" else w
    wide = quant.dequantize(quant.to_bf16(w)) if dtype == "bf16" else w
    out = np.full((n, 301), 5.0, np.float32)
    numba.njit(lambda x, w, out, m0, m1: matmul.float_rows(x, w, out, m0, m1))(x, bits, out, *span)
    m0, m1 = span
    want = x.astype(np.float64) @ wide[m0:m1].astype(np.float64).T
    assert max_rel_err(out[:, m0:m1], want) < TOL
    assert (out[:, :m0] == 5.0).all() and (out[:, m1:] == 5.0).all()


@pytest.mark.parametrize("n", [1, 3, 4, 9])
@pytest.mark.parametrize("n_in, n_out", [(77, 3), (77, 301), (3072, 37), (2048, 130)])   # fewer rows than a task; partial last tasks
def test_gemv_in_tasks_of_many_rows(n, n_in, n_out):
    """matmul.gemv (the LM head of generation's prefill, the spec's small products) cuts the rows into tasks
    of ~GEMV_TASK_BYTES, each streamed as 4 runs (float_rows). Below 4 inputs every output is still its row's
    dot (_dot, k in order), so the result equals the same GEMV one row at a time bit for bit; from 4, 4x4
    tiles (vectorized in their own order): the float64 product within TOL, as at every n. (Tasks of 4+ rows
    here: the last one partial at every shape but the first.)"""
    x, w, b = randn(n, n_in), randn(n_out, n_in), randn(n_out)
    got = matmul.gemv(x, w, b, False)
    if n < 4:
        rowwise = np.concatenate([matmul.gemv(x, w[m : m + 1], b[m : m + 1], False) for m in range(n_out)], axis=1)
        assert np.array_equal(got, rowwise)
    assert max_rel_err(got, x.astype(np.float64) @ w.astype(np.float64).T + b) < TOL
    assert max(4, matmul.GEMV_TASK_BYTES // (n_in * 4)) < n_out or n_out == 3   # the shapes do cut into several tasks


def test_read_streams_sums_every_row_as_read_all():
    """memory.read_streams (npgpt bench's second read of the bandwidth ceiling: 4 runs a quarter of a task
    apart) against memory.read_all's row sums, tasks of 7 rows over 1001 (partial quarters and task)."""
    from npgpt.kernels import memory

    a = randn(1001, 96)
    assert max_rel_err(memory.read_streams(a, 7), memory.read_all(a)) < TOL


@pytest.mark.parametrize("shape", [(1, 60), (3, 1, 60), (8, 60), (2, 6, 60), (2, 19, 60)])
def test_lm_head(shape):
    x, wte = randn(*shape), randn(1000, 60)
    assert max_rel_err(matmul.lm_head(x, wte), spec.lm_head(x, wte)) < TOL


def test_transpose_matches_numpy():
    a = randn(97, 45)
    assert np.array_equal(matmul.transpose(a), a.T)


@pytest.mark.parametrize("B, T, S", [(1, 1, 1), (3, 1, 50), (2, 4, 9), (1, 5, 5), (3, 97, 97), (2, 17, 40),
                                     (1, 300, 300), (2, 150, 170)])   # past one query block (128) and a cached prefix
def test_attention_on_strided_views(B, T, S):                # q, k, v as the spec makes them: views of a qkv array
    H, D = 6, 10
    qkv = randn(B, S, 3 * H * D)
    q, k, v = spec.split_heads(qkv, H)
    q = q[:, :, S - T:]
    assert max_rel_err(attention.attention(q, k, v), spec.attention(q, k, v)) < TOL


@pytest.mark.parametrize("n", [1, 7, 64, 513])
def test_f32_tile_multiplies_6_rows_by_16_columns_of_strided_arrays(n):
    """jit.f32_tile against float64 products, on views with row strides of their own (a and b slices of
    wider arrays, c of a wider buffer whose other columns must stay untouched), starting at b's row 3 and
    column 5. Tolerance: a float32 sum of n products is within n * 2**-24 * sum |a_ik b_kj| of the exact
    sum (the standard bound for recursive summation, with FMAs rounding once per step)."""
    from npgpt.kernels import jit

    a, b = randn(6, n + 9)[:, 2 : n + 2], randn(n + 10, 40)
    c = np.full((9, 30), 7.0, np.float32)
    numba.njit(lambda a, b, c, n: jit.f32_tile(a, b, 3, 5, n, c))(a, b, c[1:8, 4:20], n)
    a64, b64 = a.astype(np.float64), b[3 : n + 3, 5:21].astype(np.float64)
    bound = n * 2.0**-24 * (np.abs(a64) @ np.abs(b64))
    assert (np.abs(c[1:7, 4:20] - a64 @ b64) <= bound).all()
    untouched = np.ones_like(c, bool)
    untouched[1:7, 4:20] = False
    assert (c[untouched] == 7.0).all()


@pytest.mark.parametrize("T, S, D", [(1, 1, 64), (5, 5, 16), (6, 6, 64), (7, 19, 64), (97, 97, 10), (50, 83, 70),
                                     (300, 300, 64), (13, 40, 33)])
def test_causal_head_equals_the_spec_on_strided_views(T, S, D):
    """attention.causal_head (prefill: blocks of 6 queries, 16 keys or dims a tile) and causal_head_wide
    (AVX-512's: blocks of 12 queries, 32 keys or dims a product) against the spec's attention, on q, k, v
    and out as prefill hands them over: column slices of wider rows. T not a multiple of 6 or 12, S past T
    (a cached prefix), head dims below 16, 16, 64 and with a tail (70, 33) of dims. The two run the same
    FMAs in the same order: equal bit for bit (on a host without AVX-512 LLVM splits the wide vectors)."""
    qkv = randn(S, 3 * D + 11)
    q, k, v = qkv[S - T :, 1 : D + 1], qkv[:, D + 1 : 2 * D + 1], qkv[:, 2 * D + 1 : 3 * D + 1]
    want = spec.attention(q[None, None], k[None, None], v[None, None])[0, 0]
    outs = []
    for head in (attention.causal_head, attention.causal_head_wide):
        out = np.full((T, D + 4), 9.0, np.float32)
        head(q, k, v, np.float32(1 / np.sqrt(D)), out[:, 2 : D + 2])
        assert max_rel_err(out[:, 2 : D + 2], want) < TOL, head
        assert (out[:, :2] == 9.0).all() and (out[:, D + 2 :] == 9.0).all()
        outs.append(out)
    np.testing.assert_array_equal(outs[1], outs[0])


def test_decode_attention_reads_the_kv_cache_in_place():
    cache = KVCache(TINY, batch=2)
    layer = cache.layer(0)
    layer.append(randn(2, 6, 30, 10), randn(2, 6, 30, 10))
    cache.advance(30)
    q = randn(2, 6, 1, 10)
    k, v, lengths = layer.append(randn(2, 6, 1, 10), randn(2, 6, 1, 10))
    held = attention.contiguous_keys(k)
    assert held.base is layer.k and held.shape == layer.k.shape   # no copy of the cache
    assert lengths.tolist() == [31, 31]
    assert max_rel_err(attention.attention(q, k, v, lengths=lengths), spec.attention(q, k, v)) < TOL


def test_decode_attention_reads_a_rows_view_of_the_cache_in_place():
    """Serving decodes rows 0..n-1 of a bigger cache (and prefills row i alone): still no copy."""
    cache = KVCache(TINY, batch=5)
    for first, last in ((1, 2), (0, 3)):
        layer = cache.rows(first, last).layer(0)
        k, v, lengths = layer.append(randn(last - first, 6, 1, 10), randn(last - first, 6, 1, 10))
        held = attention.contiguous_keys(k)
        assert np.shares_memory(held, cache.layer(0).k) and held.shape == (last - first, 6, TINY.n_ctx, 10)
        assert held.__array_interface__["data"][0] == k.__array_interface__["data"][0]
        q = randn(last - first, 6, 1, 10)
        assert max_rel_err(attention.attention(q, k, v, lengths=lengths), spec.attention(q, k, v, lengths=lengths)) < TOL


def test_kernel_table_replaces_every_op():
    assert all(getattr(kernels.KERNELS, op) is not getattr(spec.REFERENCE, op) for op in spec.Ops._fields)


def test_prepared_params_refuse_the_numpy_linear(tiny_params):
    layer = kernels.prepare(tiny_params)["h"][0]["attn"]["c_attn"]
    with pytest.raises(TypeError):
        spec.linear(np.zeros((1, 60), np.float32), **layer)


def test_numba_cache_dir_falls_back_when_package_is_read_only(tmp_path, monkeypatch):
    from npgpt.kernels.jit import choose_cache_dir
    readonly = tmp_path / "pkg"
    readonly.mkdir()
    monkeypatch.setattr("os.access", lambda path, mode: str(path) != str(readonly) and not str(path).startswith(str(readonly)))
    chosen = choose_cache_dir(str(readonly), env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert chosen == str(tmp_path / "xdg" / "npgpt" / "numba")
    assert choose_cache_dir(str(readonly), env={"NUMBA_CACHE_DIR": "/somewhere"}) is None
    assert choose_cache_dir(str(tmp_path), env={}) is None


def test_kernel_caches_are_dropped_when_any_kernel_source_changes(tmp_path):
    """numba checks a cached kernel against its own file only; jit.drop_stale_caches drops every numba
    cache file beside the kernels when any kernels/*.py changes (a kernel inlined from another file),
    and only then; other files stay."""
    from npgpt.kernels.jit import drop_stale_caches

    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    cache = tmp_path / "__pycache__"
    assert drop_stale_caches(str(tmp_path)) and [p.name for p in cache.iterdir()] == ["npgpt-kernels.sha256"]   # a fresh checkout
    (cache / "npgpt-kernels.sha256").unlink()
    fill = lambda: [(cache / n).write_text("") for n in ("a.f-3.py311.nbi", "a.f-3.py311.1.nbc", "a.cpython-311.pyc")]
    fill()
    assert drop_stale_caches(str(tmp_path))               # no record of the sources: dropped
    assert sorted(p.name for p in cache.iterdir()) == ["a.cpython-311.pyc", "npgpt-kernels.sha256"]
    fill()
    assert not drop_stale_caches(str(tmp_path)) and len(list(cache.glob("*.nb?"))) == 2   # the same sources: kept
    (tmp_path / "b.py").write_text("y = 3\n")             # another file than the cached function's
    assert drop_stale_caches(str(tmp_path)) and not list(cache.glob("*.nb?"))


def test_stale_kernel_caches_are_dropped_in_a_user_chosen_numba_cache_dir_too(tmp_path, monkeypatch):
    """With NUMBA_CACHE_DIR set, numba keeps the kernels' caches under it, in a subdirectory named for the
    kernels' directory: jit.kernel_cache_dir names the same one numba's locator uses for a kernel (checked
    by compiling one there), and a changed kernel source drops what is cached there too."""
    from numba.core import caching
    from npgpt.kernels import jit

    locator = getattr(caching, "UserProvidedCacheLocator", None) or caching._UserProvidedCacheLocator   # (numba < 0.61's name)

    src = tmp_path / "kernels"
    src.mkdir()
    (src / "jit.py").write_text("def f():\n    return 1\n")
    namespace = {}
    exec(compile((src / "jit.py").read_text(), str(src / "jit.py"), "exec"), namespace)
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "numba-cache"))
    where = locator.from_function(namespace["f"], str(src / "jit.py")).get_cache_path()
    assert where == jit.kernel_cache_dir(str(src), str(tmp_path / "numba-cache"))
    assert jit.kernel_cache_dir(str(src)) == str(src / "__pycache__")
    assert jit.drop_stale_caches(str(src), where)          # the first stamp (creates the directory)
    for name in ("jit.f-1.py311.nbi", "jit.f-1.py311.1.nbc"):
        open(os.path.join(where, name), "w").close()
    assert not jit.drop_stale_caches(str(src), where) and len(os.listdir(where)) == 3
    (src / "jit.py").write_text("def f():\n    return 2\n")
    assert jit.drop_stale_caches(str(src), where) and os.listdir(where) == ["npgpt-kernels.sha256"]


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("B", [1, 3, 5])
def test_fused_decode_step_equals_the_spec_on_rows_of_different_lengths(tiny_params, fmt, B, monkeypatch):
    """kernels.decode.step against npgpt.model.forward: logits and the keys and values it writes, two
    steps running, rows holding 3, 5, 7, ... positions (each attends to its own). 1e-4: twelve kernels
    in a row, each within TOL of its spec function (int4 GEMV sums x * (q + 8), then subtracts 8 * sum x).
    int8/int4: 1e-2, as in test_quant: an input rounded to the other int8 level moves by 1/127 of its block's peak;
    bf16 too: an input within float32 rounding of a bf16 tie rounds either way, a step of 2**-8 of it."""
    from npgpt import quant
    from npgpt.kernels import decode

    params = quant.quantize(tiny_params, fmt)
    tol = 1e-2 if fmt in ("bf16", "int8", "int4") else 1e-4
    ref, fused = npgpt.Model(params, TINY), npgpt.Model(params, TINY, backend="numba")
    prompts = [rng.integers(0, TINY.n_vocab, size=(1, 3 + 2 * b)) for b in range(B)]
    caches = [ref.new_cache(batch=B), fused.new_cache(batch=B)]
    for m, cache in zip((ref, fused), caches):
        for b, ids in enumerate(prompts):
            m.forward(ids, cache=cache.rows(b, b + 1))
    monkeypatch.setattr(kernels, "spec_forward", None)     # the numba model must take the fused path
    for _ in range(2):
        ids = rng.integers(0, TINY.n_vocab, size=(B, 1))
        got, want = fused.forward(ids, cache=caches[1], last=True), ref.forward(ids, cache=caches[0], last=True)
        assert got.shape == want.shape == (B, 1, TINY.n_vocab)
        assert max_rel_err(got, want) < tol
    assert np.array_equal(caches[0].lengths, caches[1].lengths)
    for i in range(TINY.n_layer):
        for a, b in ((caches[0].layer(i).k, caches[1].layer(i).k), (caches[0].layer(i).v, caches[1].layer(i).v)):
            assert max_rel_err(b[:, :, : 3 + 2 * B + 2], a[:, :, : 3 + 2 * B + 2]) < tol


WIDE = npgpt.Config(n_vocab=97, n_ctx=16, n_embd=1032, n_head=8, n_layer=3)   # 4 inputs of 1032 floats pass L1: 4x4 tiles (3 layers: TINY's compiled region)


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
@pytest.mark.parametrize("cfg, B, chunk_bytes, threads", [(TINY, 1, 256, 2), (TINY, 5, 256, 1), (TINY, 3, 1 << 20, 2),
                                                          (WIDE, 5, 128 << 10, 2), (WIDE, 1, 4096, 1)])
def test_one_region_decode_step_equals_kernel_calls_in_any_chunks_on_any_threads(fmt, cfg, B, chunk_bytes, threads, monkeypatch):
    """kernels.decode.fused_step against the same step as a kernel call each (tested against the spec in
    every format above, and run here by taking the region away): GEMVs cut into 8-row chunks (last ones
    partial) or whole, 4 rows a quarter of a chunk apart against 4 inputs at a time and the rest one at a time, on one thread (every chunk on
    the calling thread) or two; bf16 rows and inputs as uint32 pairs (matmul.bf16_rows, with vdpbf16ps), from
    4 inputs with hints 2 lines ahead (matmul.STREAM_AHEAD, shortened so they land inside these small chunks;
    none for float32), or bf16 panels (without: chunks of 16 rows, partial panels at the end, hints from 2
    inputs, none at 1). Logits and the cache written. 1e-5: the same kernels, summed in the same order."""
    from npgpt import quant, weights
    from npgpt.kernels import decode

    model = npgpt.Model(quant.quantize(weights.random_params(cfg, seed=3), fmt), cfg, backend="numba")
    calls, one_region, fused_step = [], decode.one_region, decode.fused_step
    monkeypatch.setattr(decode, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(decode, "STREAM_AHEAD", 128)
    monkeypatch.setattr(decode, "fused_step", lambda *a: calls.append(a[-2:]) or fused_step(*a))
    caches = [model.new_cache(batch=B), model.new_cache(batch=B)]
    for cache in caches:
        for b in range(B):
            model.forward(np.arange(2 + b)[None] % cfg.n_vocab, cache=cache.rows(b, b + 1))
    with api.threads(threads):
        for _ in range(2):
            ids = rng.integers(0, cfg.n_vocab, size=(B, 1))
            monkeypatch.setattr(decode, "one_region", lambda *a: None)
            want = model.forward(ids, cache=caches[0])
            monkeypatch.setattr(decode, "one_region", one_region)
            assert max_rel_err(model.forward(ids, cache=caches[1]), want) < 1e-5
    ahead = 128 if fmt == "bf16" else 0                    # (bf16's hint distance, rows or panels; float32 none)
    assert calls == [(chunk_bytes, ahead)] * 2             # the region ran both steps, the calls none
    for i in range(cfg.n_layer):
        assert max_rel_err(caches[1].layer(i).k, caches[0].layer(i).k) < 1e-5
        assert max_rel_err(caches[1].layer(i).v, caches[0].layer(i).v) < 1e-5


def test_one_region_takes_float_weights_and_leaves_int8_int4_and_mixed_formats_to_kernel_calls(tiny_params):
    """A region is compiled for float32 or bf16 rows; int8 and int4 run a kernel call each (measured
    faster), and so does a model whose linear weights mix formats (not what `quantize` makes, but a
    hand-built dict can), still equal to the spec."""
    from npgpt import quant
    from npgpt.kernels import decode

    for fmt, region in (("fp32", True), ("bf16", True), ("int8", False), ("int4", False)):
        model = npgpt.Model(quant.quantize(tiny_params, fmt), TINY, backend="numba")
        assert (decode.one_region(model.params, model.new_cache(2)) is not None) == region
    for other in ("int8", "bf16"):                         # a layer's MLP in another format
        mixed = {**tiny_params, "h": [{**tiny_params["h"][0], "mlp": quant.quantize(tiny_params, other)["h"][0]["mlp"]},
                                      *tiny_params["h"][1:]]}
        ref, model = npgpt.Model(mixed, TINY), npgpt.Model(mixed, TINY, backend="numba")
        caches = [ref.new_cache(2), model.new_cache(2)]
        assert decode.one_region(model.params, caches[1]) is None
        for m, cache in zip((ref, model), caches):
            m.forward(np.array([[1, 2, 3], [4, 5, 6]]), cache=cache)
        ids = np.array([[7], [8]])
        assert max_rel_err(model.forward(ids, cache=caches[1]), ref.forward(ids, cache=caches[0])) < 1e-2


def test_team_runs_every_chunk_once_and_finishes_while_the_pool_is_busy():
    """jit.team's contract: workers claim chunks (jit.atomic_add), so each chunk runs once however the
    threads interleave, and a pool that cannot start the other workers (busy elsewhere) costs no wait:
    the calling thread does every chunk."""
    import threading
    from npgpt.kernels import jit

    @numba.njit(nogil=True)
    def worker(counter, hits):
        while True:
            c = jit.atomic_add(counter, 0, 1)
            if c >= hits.shape[0]:
                return
            hits[c] += 1

    for busy in (False, True):
        release = threading.Event()
        blockers = [jit._POOL.submit(release.wait) for _ in range(jit._POOL._max_workers)] if busy else []
        hits, counter = np.zeros(200_000, np.int64), np.zeros(8, np.int64)
        with api.threads(2):
            jit.team(worker, counter, hits)
        release.set()
        for f in blockers:
            f.result()
        assert (hits == 1).all() and counter[0] >= hits.shape[0]


def test_fused_decode_step_serves_a_packed_step_of_busy_rows(tiny_params):
    from npgpt.kernels import decode

    fused = npgpt.Model(tiny_params, TINY, backend="numba")
    caches = [fused.new_cache(batch=4), fused.new_cache(batch=4)]
    for cache in caches:
        for b in range(3):
            fused.forward(np.arange(2 + b)[None], cache=cache.rows(b, b + 1))
    ids = np.array([[5], [6]])
    got = fused.forward_packed(caches[0], [(1, ids)])      # rows 1 and 2: the fused step
    want = spec.forward_packed(fused.params, caches[1], [(1, ids)], TINY, ops=kernels.KERNELS)
    assert decode.is_step(ids, caches[0]) and max_rel_err(got, want) < 1e-4
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist() == [2, 4, 5, 0]


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("B, past, T", [(1, 0, 17), (1, 9, 37), (3, 5, 23), (2, 0, 64)])
def test_fused_prefill_equals_the_spec(tiny_params, fmt, B, past, T, monkeypatch):
    """kernels.prefill against npgpt.model.forward: T new tokens (more than decode-sized; attention's
    blocks of 6 queries, so several run and the last is partial) on B rows that already hold `past` positions
    (or none, and then also with no cache at all). Logits of every position and of the last, and the keys
    and values written. Tolerances as the fused decode step's: 1e-4 fp32 (a dozen kernels in a row, each
    within TOL of its spec function), 1e-2 bf16/int8/int4 (an input rounded to the neighbouring level)."""
    from npgpt import quant
    from npgpt.kernels import prefill

    params = quant.quantize(tiny_params, fmt)
    tol = 1e-2 if fmt in ("bf16", "int8", "int4") else 1e-4
    ref, fused = npgpt.Model(params, TINY), npgpt.Model(params, TINY, backend="numba")
    ids = rng.integers(0, TINY.n_vocab, size=(B, past + T))
    monkeypatch.setattr(kernels, "spec_forward", None)     # the numba model must take the fused path
    if past == 0:                                          # no cache: every position's logits, and the last one's
        got, want = fused.forward(ids), ref.forward(ids)
        assert got.shape == want.shape == (B, T, TINY.n_vocab) and max_rel_err(got, want) < tol
        got, want = fused.forward(ids, last=True), ref.forward(ids, last=True)
        assert got.shape == want.shape == (B, 1, TINY.n_vocab) and max_rel_err(got, want) < tol
    caches = [ref.new_cache(batch=B), fused.new_cache(batch=B)]
    if past:
        for m, cache in zip((ref, fused), caches):
            spec.forward(m.params, ids[:, :past], TINY, ops=m.ops, cache=cache)   # the same past in both caches
    assert prefill.fits(ids[:, past:], caches[1])
    got, want = fused.forward(ids[:, past:], caches[1], last=True), ref.forward(ids[:, past:], caches[0], last=True)
    assert got.shape == want.shape == (B, 1, TINY.n_vocab) and max_rel_err(got, want) < tol
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist() == [past + T] * B
    for i in range(TINY.n_layer):
        for a, b in ((caches[0].layer(i).k, caches[1].layer(i).k), (caches[0].layer(i).v, caches[1].layer(i).v)):
            assert max_rel_err(b[:, :, : past + T], a[:, :, : past + T]) < tol


@pytest.mark.parametrize("with_cache", [False, True])
def test_fused_prefill_of_the_last_logits_runs_the_last_blocks_projection_and_mlp_on_each_rows_last_position(tiny_params, with_cache, monkeypatch):
    """last=True: the last block's c_proj, c_fc and MLP c_proj see B rows, every other product B*T; its
    c_attn still sees every position (their keys and values go into the cache). Values: the test above."""
    from npgpt.kernels import decode, prefill

    fused = npgpt.Model(tiny_params, TINY, backend="numba")
    seen = []
    for module, name in ((prefill, "matmul_into"), (prefill, "lm_head"), (decode, "matmul_rows")):   # (decode.layer_tail: the last block's)
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda x, w, *a, real=real, **k: seen.append((id(w), x.shape[0])) or real(x, w, *a, **k))
    B, T = 3, 20
    ids = rng.integers(0, TINY.n_vocab, size=(B, T))
    fused.forward(ids, cache=fused.new_cache(batch=B) if with_cache else None, last=True)
    last = fused.params["h"][-1]
    small = {id(last["attn"]["c_proj"]["weight_t"]), id(last["mlp"]["c_fc"]["weight_t"]), id(last["mlp"]["c_proj"]["weight_t"]),
             id(fused.params["lm_head"]["weight"])}
    assert len(seen) == 4 * TINY.n_layer + 1
    assert sorted(n for w, n in seen if w in small) == [B] * 4
    assert all(n == B * T for w, n in seen if w not in small)


def test_fused_prefill_takes_one_sequence_and_leaves_ragged_rows_to_the_spec(tiny_params):
    from npgpt.kernels import prefill

    ref, fused = npgpt.Model(tiny_params, TINY), npgpt.Model(tiny_params, TINY, backend="numba")
    ids = rng.integers(0, TINY.n_vocab, size=40)           # [T]: logits [T, V], as the spec
    assert prefill.fits(ids, None)
    got, want = fused.forward(ids), ref.forward(ids)
    assert got.shape == want.shape == (40, TINY.n_vocab) and max_rel_err(got, want) < 1e-4
    cache = fused.new_cache(batch=2)
    fused.forward(ids[None, :3], cache=cache.rows(0, 1))
    assert not prefill.fits(np.zeros((2, 20), np.int64), cache)   # rows of lengths 3 and 0: the spec's path
    assert not prefill.fits(np.zeros((1, 16), np.int64), None)   # decode-sized


def _numpy_openblas64():                                   # is NumPy's BLAS the 64-bit-integer OpenBLAS its wheels ship?
    return any(lib.get("internal_api") == "openblas" and "openblas64" in os.path.basename(lib["filepath"])
               for lib in jit._BLAS.info())


@pytest.mark.parametrize("rows", [17, 130, 600])       # below TRANSPOSED_BELOW (transposed product, read back) and above
@pytest.mark.parametrize("then", ["bias", "gelu", "residual"])
@pytest.mark.parametrize("threads", ["numba", "python"])   # jit.sgemm_nt from numba's threads, or `bands` (no SGEMM found)
def test_prefill_product_on_bands_equals_the_spec(rows, then, threads, monkeypatch):
    """matmul_into's bands of columns: each a product x . w_band^T (transposed below 512 input rows,
    w_band . x^T, read back 16 columns at a time with a tail), finished on its thread: + bias, GELU of
    that, or added into out (the residual stream). Tolerance: the product's float32 sums in another
    order (1e-5 relative); the finish itself is exact against NumPy on the same product below. Both ways
    of running the bands call the same single-threaded sgemm on the same bands: equal to the last bit."""
    x, w, b = randn(rows, 61), randn(75, 61), randn(75)
    start = randn(rows, 75)
    monkeypatch.setattr(jit, "PANEL_WIDE", False)          # (float32 panels: the tests below)
    if threads == "python":
        monkeypatch.setattr(jit, "SGEMM", 0)
    elif _numpy_openblas64():
        assert jit.SGEMM != 0, "NumPy's own OpenBLAS, but its cblas_sgemm was not found"
    outs = []
    for sgemm in (jit.SGEMM, 0):
        monkeypatch.setattr(jit, "SGEMM", sgemm)
        out = start.copy()
        matmul.matmul_into(x, w, out, b, getattr(matmul, then.upper()))
        outs.append(out)
    want = {"bias": x @ w.T + b, "gelu": spec.gelu(x @ w.T + b), "residual": start + (x @ w.T + b)}[then]
    assert max_rel_err(outs[0], want) < 1e-5
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("N, K, M", [(17, 1, 1), (17, 7, 33), (25, 45, 70), (131, 200, 95), (512, 61, 75), (23, 16, 64)])
@pytest.mark.parametrize("then", ["bias", "gelu", "residual"])
@pytest.mark.parametrize("threads", [1, 2])
def test_float32_panel_product_equals_the_spec(N, K, M, then, threads, monkeypatch):
    """matmul._f32_panel_product (float32 prompts on AVX-512; on any host here, where LLVM splits the 512-bit
    vectors): inputs in an even count of groups of 6 (an odd count padded with zeros; a partial last group),
    weights packed 32 rows at a time (whole runs of 8 columns in vectors, K % 8 and a partial last panel one
    value at a time), bands of panels on 1 or 2 threads, each finished on its thread. Tolerance: float32
    sums of K products in another order than NumPy's, 1e-5 relative (as the sgemm bands above)."""
    x, w, b, start = randn(N, K), randn(M, K), randn(M), randn(N, M)
    out = start.copy()
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        matmul._f32_panel_product(x, w, out, b, getattr(matmul, then.upper()), np.empty(matmul.scratch_size(N, M), np.float32))
    finally:
        numba.set_num_threads(before)
    want = {"bias": x @ w.T + b, "gelu": spec.gelu(x @ w.T + b), "residual": start + (x @ w.T + b)}[then]
    assert max_rel_err(out, want) < 1e-5


@pytest.mark.parametrize("K", [1, 8, 45, 200])
def test_float32_panel_kernel_sums_each_input_and_row_and_ignores_its_hints(K):
    """jit.pack_f32_panel lays 32 rows k-major (checked exactly), and jit.f32_panel_wide sums each of 12
    inputs against each of 32 rows within 1e-6 of the sum of |products| (float32 sums of at most 200 terms,
    against float64); the hints of `ahead` (none, some, more lines than k's) leave the sums bit for bit;
    f32_panel_wide_at writes the same sums at a column of a wider array, and nothing beside them."""
    pack = numba.njit(lambda w, m, panel: jit.pack_f32_panel(w, m, panel))
    wide = numba.njit(lambda pw, xa, xb, c, ahead: jit.f32_panel_wide(pw, xa, xb, c, ahead))
    w = randn(40, K)
    panel = np.full((K, 32), np.nan, np.float32)
    pack(w, 5, panel)
    np.testing.assert_array_equal(panel[: K // 8 * 8], w[5:37, : K // 8 * 8].T)   # (the last K % 8 columns: the caller's)
    panel[K // 8 * 8 :] = w[5:37, K // 8 * 8 :].T
    x = randn(12, K)
    xg = np.full((2, K, 6), np.nan, np.float32)
    matmul.groups_into(x, xg, 0, 2, False)
    np.testing.assert_array_equal(xg.transpose(0, 2, 1).reshape(12, K), x)
    sums = []
    for ahead in (np.empty(0, np.float32), w.ravel()[:100], w.ravel()):
        c = np.full((12, 32), np.nan, np.float32)
        wide(panel, xg[0], xg[1], c, ahead)
        sums.append(c)
    terms = x.astype(np.float64)[:, None, :] * w[5:37].astype(np.float64)[None]
    assert np.all(np.abs(sums[0] - terms.sum(-1)) <= 1e-6 * np.abs(terms).sum(-1))
    for c in sums[1:]:
        np.testing.assert_array_equal(c, sums[0])
    at = numba.njit(lambda pw, xa, xb, c, col, ahead: jit.f32_panel_wide_at(pw, xa, xb, c, col, ahead))
    for col in (0, 7, 40):                                 # into a wider array at a column: the same sums, nothing else written
        c = np.full((12, 75), 5.0, np.float32)
        at(panel, xg[0], xg[1], c, col, w.ravel()[:100])
        np.testing.assert_array_equal(c[:, col : col + 32], sums[0])
        assert (np.delete(c, np.s_[col : col + 32], axis=1) == 5.0).all()


@pytest.mark.parametrize("wide, N, panels", [(True, 17, True), (True, 512, True), (True, 513, False), (False, 128, False)])
def test_float32_prompts_take_the_panels_on_avx512_up_to_their_limit(wide, N, panels, monkeypatch):
    """matmul_into on float32 rows: the panels where jit.PANEL_WIDE (AVX-512) and N <= F32_PANEL_UPTO, else the
    sgemm bands (or `bands`, without SGEMM). Either way the product is the spec's (1e-5, as above)."""
    monkeypatch.setattr(jit, "PANEL_WIDE", wide)
    taken = []
    real = matmul._f32_panel_product
    monkeypatch.setattr(matmul, "_f32_panel_product", lambda *a: taken.append(1) or real(*a))
    x, w, b = randn(N, 40), randn(50, 40), randn(50)
    out = np.empty((N, 50), np.float32)
    matmul.matmul_into(x, w, out, b)
    assert bool(taken) is panels
    assert max_rel_err(out, x @ w.T + b) < 1e-5


@pytest.mark.parametrize("K", [1, 3, 4, 7, 45, 200])
def test_float32_panel_runs_sum_each_run_of_k_for_each_input_and_row(K):
    """jit.f32_panel_runs1 / runs2 (decode's float32 panels): panel p's k range from k0 in F32_RUNS runs of kn
    steps, each run's 32 sums a block of c per input; run1 / run2 one run. Each sum against float64 within
    1e-6 of the sum of |products|; an input's sums the same bit for bit alone (runs1) or beside another (runs2)."""
    runs1 = numba.njit(lambda *a: jit.f32_panel_runs1(*a))
    runs2 = numba.njit(lambda *a: jit.f32_panel_runs2(*a))
    run1 = numba.njit(lambda *a: jit.f32_panel_run1(*a))
    R = jit.F32_RUNS
    panels, x = randn(3, K, 32), randn(4, K)
    kn = K // R
    c1, c2 = np.full((1, 32 * R), np.nan, np.float32), np.full((2, 32 * R), np.nan, np.float32)
    runs1(panels, 2, 0, kn, x, 3, c1)
    runs2(panels, 2, 0, kn, x, 2, c2)
    np.testing.assert_array_equal(c1[0], c2[1])
    for s in range(R):
        terms = x[2:4, s * kn : (s + 1) * kn, None].astype(np.float64) * panels[2, s * kn : (s + 1) * kn].astype(np.float64)
        assert np.all(np.abs(c2[:, 32 * s : 32 * s + 32] - terms.sum(1)) <= 1e-6 * np.abs(terms).sum(1))
    t = np.full((1, 32), np.nan, np.float32)
    run1(panels, 1, R * kn, K - R * kn, x, 0, t)           # the steps past the runs
    terms = x[0, R * kn :, None].astype(np.float64) * panels[1, R * kn :].astype(np.float64)
    assert np.all(np.abs(t[0] - terms.sum(0)) <= 1e-6 * np.abs(terms).sum(0))


@pytest.mark.parametrize("span", [(0, 1), (0, 32), (32, 77), (64, 130)])   # a partial panel, whole ones, a partial last one
@pytest.mark.parametrize("K", [5, 77, 200])
def test_float32_panel_rows_equal_float64_and_each_input_alone_bit_for_bit(span, K):
    """matmul.f32_panel_rows (the decode step's chunks and GEMVs on quant.F32Panels): rows m0 .. m1 against 2
    inputs at a time, then an odd last one; nothing outside m0 .. m1 written. Against float64 within TOL, and
    each input's outputs equal to the same GEMV on that input alone, bit for bit (the same sums whatever N)."""
    m0, m1 = span
    w = randn(130, K)
    panels = matmul.f32_panels(np.ascontiguousarray(w.T)).panels
    rows = numba.njit(lambda x, p, out, m0, m1: matmul.f32_panel_rows(x, p, out, m0, m1))
    x = randn(5, K)
    out = np.full((5, 130), 5.0, np.float32)
    rows(x, panels, out, m0, m1)
    assert max_rel_err(out[:, m0:m1], x.astype(np.float64) @ w[m0:m1].astype(np.float64).T) < TOL
    assert (out[:, :m0] == 5.0).all() and (out[:, m1:] == 5.0).all()
    for n in range(5):
        alone = np.full((1, 130), 5.0, np.float32)
        rows(x[n : n + 1], panels, alone, m0, m1)
        np.testing.assert_array_equal(alone[0], out[n])


@pytest.mark.parametrize("n_in, n_out", [(7, 1), (77, 64), (45, 97)])
def test_float32_panels_lay_out_rows_32_at_a_time_and_give_them_back(n_in, n_out):
    """matmul.f32_panels of a Conv1D weight [in, out]: panels[p, k, j] = w[k, 32p + j], zeros past n_out;
    f32_unpanel / f32_unpanel_conv1d give the rows and the Conv1D weight back exactly; f32_panels_into
    rewrites the same array in place (kernels.prepare_again)."""
    from npgpt import quant

    w = randn(n_in, n_out)
    got = matmul.f32_panels(w)
    P = -(-n_out // 32)
    assert isinstance(got, quant.F32Panels) and got.panels.shape == (P, n_in, 32) and got.shape == (n_out, n_in)
    padded = np.zeros((n_in, 32 * P), np.float32)
    padded[:, :n_out] = w
    np.testing.assert_array_equal(got.panels, padded.reshape(n_in, P, 32).transpose(1, 0, 2))
    np.testing.assert_array_equal(matmul.f32_unpanel(got), w.T)
    np.testing.assert_array_equal(matmul.f32_unpanel_conv1d(got), w)
    before = got.panels
    matmul.f32_panels_into(2 * w, got.panels)
    assert got.panels is before
    np.testing.assert_array_equal(matmul.f32_unpanel_conv1d(got), 2 * w)


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 130, 513])   # GEMV to 16 rows, the panels' product to 512, OpenBLAS on rows past it
@pytest.mark.parametrize("n_in, n_out", [(60, 180), (768, 50), (61, 37)])
@pytest.mark.parametrize("gelu", [False, True])
def test_linear_on_float32_panels_equals_the_spec(rows, n_in, n_out, gelu):
    """matmul_rows on quant.F32Panels (kernels.prepare's float32 layout on AVX-512; run on any host): the
    GEMV (gemv_f32_panels), the prompts' product on the panels as they are, and past F32_PANEL_UPTO inputs
    OpenBLAS on the rows unpacked. Within TOL of the spec (float32 sums in another order)."""
    x, w, b = randn(rows, n_in), randn(n_in, n_out, scale=0.1), randn(n_out)
    got = matmul.matmul_rows(x, kernels.rows(w, f32_panels=True), b, gelu=gelu)
    want = spec.linear(x, w, b)
    assert got.shape == (rows, n_out) and max_rel_err(got, spec.gelu(want) if gelu else want) < TOL


@pytest.mark.parametrize("N", [17, 600, 1100])            # one block, two (300 each), three (372, 372, 356)
@pytest.mark.parametrize("then", ["bias", "gelu", "residual"])
def test_prompt_products_on_float32_panels_run_in_blocks_of_inputs_and_equal_the_spec(N, then, monkeypatch):
    """matmul_into on quant.F32Panels: blocks of near-equal input counts up to F32_PANEL_UPTO (whole pairs of
    groups), each the panels' product with its epilogue on its own rows of out. 1e-5 as the panel product above."""
    calls = []
    real = matmul._f32_panel_product
    monkeypatch.setattr(matmul, "_f32_panel_product", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    x, w, b, start = randn(N, 40), randn(40, 70), randn(70), randn(N, 70)
    out = start.copy()
    matmul.matmul_into(x, matmul.f32_panels(w), out, b, getattr(matmul, then.upper()))
    assert sum(calls) == N and max(calls) <= matmul.F32_PANEL_UPTO and len(calls) == -(-N // matmul.F32_PANEL_UPTO)
    y = x @ w + b
    want = {"bias": y, "gelu": spec.gelu(y), "residual": start + y}[then]
    assert max_rel_err(out, want) < 1e-5


@pytest.mark.parametrize("wide", [False, True])
def test_prepare_lays_float32_out_as_panels_on_avx512_except_for_training(tiny_params, wide, monkeypatch):
    """kernels.prepare: float32 linear weights as quant.F32Panels where jit.PANEL_WIDE, else rows; training=True
    rows always (the backward reads rows); the tied head stays wte. unprepare gives the checkpoint back
    exactly, and prepare_again rewrites the panels in place after the weights change."""
    from npgpt import quant

    monkeypatch.setattr(jit, "PANEL_WIDE", wide)
    for training in (False, True):
        prepared = kernels.prepare(tiny_params, training=training)
        w = prepared["h"][1]["mlp"]["c_fc"]["weight_t"]
        assert isinstance(w, quant.F32Panels) is (wide and not training)
        assert prepared["lm_head"]["weight"] is tiny_params["lm_head"]["weight"]
        back = kernels.unprepare(prepared)
        for i, block in enumerate(tiny_params["h"]):
            for group, name in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
                np.testing.assert_array_equal(back["h"][i][group][name]["weight"], block[group][name]["weight"])
    params = {**tiny_params, "h": [{**b, "mlp": {**b["mlp"], "c_fc": {**b["mlp"]["c_fc"]}}} for b in tiny_params["h"]]}
    prepared = kernels.prepare(params)
    before = prepared["h"][0]["mlp"]["c_fc"]["weight_t"]
    params["h"][0]["mlp"]["c_fc"]["weight"] = changed = params["h"][0]["mlp"]["c_fc"]["weight"] * 3
    kernels.prepare_again(prepared, params, layers=[0])
    assert prepared["h"][0]["mlp"]["c_fc"]["weight_t"] is before
    np.testing.assert_array_equal(kernels.unprepare(prepared)["h"][0]["mlp"]["c_fc"]["weight"], changed)


def test_a_model_made_trainable_keeps_float32_rows_and_its_gradients_do_not_change(tiny_params, monkeypatch):
    """Model.trainable_params re-prepares with training=True: the panels an inference model had (jit.PANEL_WIDE
    forced) become rows, and value_and_grad gives the same loss and gradients on either layout (the panels'
    are unpacked per call) within 1e-5 (the forward's products in another order)."""
    from npgpt import quant

    monkeypatch.setattr(jit, "PANEL_WIDE", True)
    model = npgpt.Model({**tiny_params}, TINY, backend="numba")
    assert isinstance(model.params["h"][0]["mlp"]["c_proj"]["weight_t"], quant.F32Panels)
    ids = rng.integers(0, TINY.n_vocab, size=(2, 19))
    loss, grads = model.value_and_grad(ids)
    model.trainable_params()
    assert isinstance(model.params["h"][0]["mlp"]["c_proj"]["weight_t"], np.ndarray)
    loss_rows, grads_rows = model.value_and_grad(ids)
    assert abs(loss - loss_rows) <= 1e-5 * abs(loss) and sorted(grads) == sorted(grads_rows)
    for name in grads:
        assert max_rel_err(grads_rows[name], grads[name]) < 1e-5, name


@pytest.mark.parametrize("wide", [False, True])
def test_fused_decode_and_prefill_on_float32_rows_and_panels_equal_the_spec(tiny_params, wide, monkeypatch):
    """The fused decode step and prefill with float32 weights prepared as rows and as panels (jit.PANEL_WIDE
    forced either way, so both run on any host): logits within 1e-4 of the spec's (as the fused tests above)."""
    monkeypatch.setattr(jit, "PANEL_WIDE", wide)
    ref, fused = npgpt.Model(tiny_params, TINY), npgpt.Model(tiny_params, TINY, backend="numba")
    assert isinstance(fused.params["h"][0]["attn"]["c_attn"]["weight_t"], np.ndarray) is not wide
    monkeypatch.setattr(kernels, "spec_forward", None)     # the fused paths only
    ids = rng.integers(0, TINY.n_vocab, size=(3, 21))
    caches = [ref.new_cache(batch=3), fused.new_cache(batch=3)]
    got, want = fused.forward(ids, caches[1], last=True), ref.forward(ids, caches[0], last=True)
    assert max_rel_err(got, want) < 1e-4
    for _ in range(2):
        step = rng.integers(0, TINY.n_vocab, size=(3, 1))
        got, want = fused.forward(step, caches[1], last=True), ref.forward(step, caches[0], last=True)
        assert max_rel_err(got, want) < 1e-4


def test_sgemm_is_looked_for_only_in_openblas_and_its_absence_is_zero():
    class Libraries:
        def __init__(self, libs):
            self.libs = libs

        def info(self):
            return self.libs

    assert jit.blas_sgemm(Libraries([{"internal_api": "mkl", "filepath": "/nonexistent/libmkl_rt.so"}])) == 0
    assert jit.blas_sgemm(Libraries([{"internal_api": "openblas", "filepath": "/nonexistent/libopenblas.so"}])) == 0
    if _numpy_openblas64():
        assert jit.blas_sgemm(jit._BLAS) == jit.SGEMM != 0


def test_sgemm_nt_multiplies_strided_rows():                 # c = a . b^T on views whose rows are strided, as the bands' are
    if not jit.SGEMM:
        pytest.skip("no cblas_sgemm found in NumPy's BLAS (another BLAS than its wheels' OpenBLAS)")
    a, b = randn(9, 40)[2:7, 3:36], randn(13, 50)[:, 5:38]            # [5, 33] and [13, 33]: row strides 40 and 50
    c = np.zeros((7, 20), np.float32)
    _sgemm_nt_into(a, b, c[1:6, 4:17], jit.SGEMM)
    want = np.zeros_like(c)
    want[1:6, 4:17] = a.astype(np.float64) @ b.T.astype(np.float64)
    assert max_rel_err(c, want) < 1e-5                     # the rest of c untouched (zeros)


@numba.njit(nogil=True)
def _sgemm_nt_into(a, b, c, fn):
    jit.sgemm_nt(fn, a, b, c)


@pytest.mark.parametrize("wide", [False, True])         # causal_head_wide (AVX-512's) or causal_head
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("B, T, past, first", [(1, 1, 0, 0), (2, 7, 0, 0), (3, 5, 4, 0), (2, 9, 3, 8), (1, 140, 0, 0)])
def test_prefill_attention_over_numba_threads_equals_the_spec(cached, B, T, past, first, wide):
    """attention.attend_heads on prefill's qkv [B*T, 3C]: with a cache, the new keys and values land at
    positions past .. past + T of each row (the rows' earlier positions are read from there); queries from
    position `first` on attend, and only their rows of out are written. Tolerance as the module's."""
    H, D = 3, 10
    C = H * D
    qkv = randn(B * T, 3 * C)
    k_cache, v_cache = randn(B, H, past + T + 2, D), randn(B, H, past + T + 2, D)   # positions >= past + T stay as they were
    before = (k_cache.copy(), v_cache.copy())
    out = np.full((B * T, C), 7.0, np.float32)
    if cached:
        attention.attend_heads(qkv, k_cache, v_cache, True, past, T, H, np.float32(D ** -0.5), out, first, wide)
    else:
        none = np.empty((0, 0, 0, 0), np.float32)
        attention.attend_heads(qkv, none, none, False, 0, T, H, np.float32(D ** -0.5), out, first, wide)
        past = 0
    q, k, v = spec.split_heads(qkv.reshape(B, T, 3 * C), H)    # [B, H, T, D]
    if cached:
        k = np.concatenate([before[0][:, :, :past], k], axis=2)
        v = np.concatenate([before[1][:, :, :past], v], axis=2)
        np.testing.assert_array_equal(k_cache[:, :, : past + T], k)
        np.testing.assert_array_equal(v_cache[:, :, : past + T], v)
        np.testing.assert_array_equal(k_cache[:, :, past + T :], before[0][:, :, past + T :])
    want = spec.merge_heads(spec.attention(q[:, :, first:], k, v)).reshape(B, T - first, C)
    got = out.reshape(B, T, C)
    assert max_rel_err(got[:, first:], want) < TOL
    assert (got[:, :first] == 7.0).all()


def test_layer_norm_bands_equal_layer_norm_rows():         # prefill's LayerNorm above norm.inline_rows, numba's threads
    x, w, b = randn(1031, 60, scale=3.0), randn(60), randn(60)
    want, got = np.empty_like(x), np.empty_like(x)
    norm.layer_norm_rows(x, w, b, 1e-5, want)
    for P in (1, 2, 3):
        norm.layer_norm_bands(x, w, b, np.float32(1e-5), got, P)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("m, n", [(37, 45), (16, 3), (5, 130)])   # a 16-column block and a tail, only blocks, only a tail
@pytest.mark.parametrize("transposed", [False, True])
def test_prefill_finish_writes_only_its_band_and_equals_numpy(m, n, transposed):
    """finish_band on a band of columns c0 .. c0 + m of out: bias and residual exactly as NumPy adds
    them (same operands, same order: out + (y + b)); GELU within the kernel GELU's tolerance. Columns
    outside the band are untouched. Straight BIAS and GELU work in place: the product is already in
    out's band (y is not read, so it is passed as garbage here)."""
    y, b, c0 = randn(n, m, scale=3.0), randn(m), 20
    band = slice(c0, c0 + m)
    for then, want in [(matmul.BIAS, lambda o: y + b), (matmul.GELU, lambda o: spec.gelu(y + b)), (matmul.RESIDUAL, lambda o: o + (y + b))]:
        out = randn(n, m + 40)
        arg = np.ascontiguousarray(y.T) if transposed else y
        if not transposed and then != matmul.RESIDUAL:
            out[:, band], arg = y, np.full_like(y, np.nan)
        before = out.copy()
        matmul.finish_band(arg, b, then, out, c0, transposed)
        if then == matmul.GELU:
            assert max_rel_err(out[:, band], want(before[:, band])) < TOL
        else:
            assert np.array_equal(out[:, band], want(before[:, band]))
        assert np.array_equal(np.delete(out, band, 1), np.delete(before, band, 1))


def _mapped(a):                                            # does a's memory come from an mmap region (memory.HugePages)?
    import mmap
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a, memoryview) and isinstance(a.obj, mmap.mmap)


needs_huge_pages = pytest.mark.skipif(not kernels.memory.HUGE_PAGES, reason="no MADV_HUGEPAGE here (Linux only): ordinary arrays")


@needs_huge_pages
def test_huge_pages_copy_values_into_separate_pages():
    from npgpt.kernels import memory
    pages = memory.HugePages(segment_bytes=1 << 20)
    a = np.arange(30, dtype=np.float32).reshape(5, 6)
    b = np.arange(7, dtype=np.uint16)
    big = np.ones((3, 1 << 18), np.float32)                 # 3 MiB: past the segment, so a segment of its own
    ca, cb, cbig = pages.copy(a), pages.copy(b), pages.copy(big)
    for src, dst in ((a, ca), (b, cb), (big, cbig)):
        assert dst.dtype == src.dtype and dst.shape == src.shape and np.array_equal(dst, src)
        assert dst.flags.c_contiguous and dst.flags.writeable and dst.ctypes.data % memory.ALIGN == 0
        assert dst.ctypes.data != src.ctypes.data and _mapped(dst)
    ca[...] = -1                                           # separate pages: writing one leaves the others
    assert np.array_equal(cb, b) and np.array_equal(cbig, big)
    assert cbig.ctypes.data % memory.HUGE_PAGE == 0         # a fresh segment starts on a huge page


@pytest.mark.skipif(not kernels.memory.SMALL_PAGES, reason="no MADV_NOHUGEPAGE here (Linux only): NumPy's arrays")
def test_ordinary_pages_make_separate_writable_arrays_from_their_threshold(monkeypatch):
    """memory.ordinary_pages: from ORDINARY_FROM bytes on an array of its own mapping, C-contiguous and
    writable, of the shape and dtype asked (an int or a tuple); below it, and for no bytes at all, NumPy's."""
    from npgpt.kernels import memory
    monkeypatch.setattr(memory, "ORDINARY_FROM", 4096)
    a, b = memory.ordinary_pages((37, 1000)), memory.ordinary_pages(5000, np.uint16)
    small, empty = memory.ordinary_pages((3, 4)), memory.ordinary_pages((0, 7))
    assert a.shape == (37, 1000) and a.dtype == np.float32 and b.shape == (5000,) and b.dtype == np.uint16
    assert _mapped(a) and _mapped(b) and not _mapped(small) and not _mapped(empty) and empty.shape == (0, 7)
    for x in (a, b):
        assert x.flags.c_contiguous and x.flags.writeable
    a[...] = 3.5
    b[...] = 7
    assert (a == 3.5).all() and (b == 7).all()


@pytest.mark.parametrize("N", [17, 40])
def test_lm_head_logits_in_ordinary_pages_equal_the_rows_product(N, monkeypatch):
    """matmul.lm_head past decode's rows: the logits (memory.ordinary_pages, here from any size) equal
    matmul_rows' product bit for bit (the same product into another array), [..., V] shaped as x."""
    from npgpt.kernels import memory
    monkeypatch.setattr(memory, "ORDINARY_FROM", 1)
    x, w = randn(2, N, 24), randn(300, 24)
    got = matmul.lm_head(x, w)
    assert got.shape == (2, N, 300) and (_mapped(got) or not memory.SMALL_PAGES)
    np.testing.assert_array_equal(got, matmul.matmul_rows(x, w))


@needs_huge_pages
@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4", "bf16"])
def test_prepare_puts_the_weights_it_made_in_huge_pages(tiny_params, fmt):
    from npgpt import quant
    params = quant.quantize(tiny_params, fmt) if fmt != "fp32" else tiny_params
    prepared = kernels.prepare(params)
    for i, block in enumerate(params["h"]):
        for group, name in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
            got, want = prepared["h"][i][group][name]["weight_t"], kernels.rows(block[group][name]["weight"], jit.PANEL_WIDE)
            assert type(got) is type(want)
            for g, w in zip(*((got,), (want,)) if isinstance(want, np.ndarray) else (got, want)):
                if isinstance(w, np.ndarray):
                    assert _mapped(g) and g.dtype == w.dtype and np.array_equal(g, w)
                else:
                    assert g == w
    head, wte = prepared["lm_head"]["weight"], params["lm_head"]["weight"]
    if fmt == "fp32":                                       # the caller's own array (tied to wte): left where it is
        assert head is wte and not _mapped(head)
    elif isinstance(head, quant.BF16) and head.bits is wte.bits:   # bf16 rows on vdpbf16ps: wte's bits, also left
        assert not _mapped(head.bits)
    else:
        assert all(_mapped(a) for a in head if isinstance(a, np.ndarray))
