"""The backward spec against finite differences (float64, tiny shapes), and its kernel twins against it."""

import numpy as np
import pytest

import npgpt
from npgpt import backward as bw
from npgpt import model as spec
from npgpt import weights
from npgpt.kernels import BACKWARD, KERNELS, transpose_linear

rng = np.random.default_rng(11)
SMALL = npgpt.Config(n_vocab=50, n_ctx=16, n_embd=12, n_head=3, n_layer=2)


def numeric_grad(f, x, h=1e-6):                            # d f / d x by central differences, float64
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        up = f()
        x[i] = old - h
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * h)
    return g


def close(a, b, tol=1e-6):
    return np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


def r(*shape):
    return rng.standard_normal(shape)


def test_layer_norm_backward_matches_finite_differences():
    x, w, b, dout = r(2, 3, 7), r(7), r(7), r(2, 3, 7)
    dx, dw, db = bw.layer_norm_backward(dout, x, w, b, 1e-5)
    loss = lambda: (dout * spec.layer_norm(x, w, b, 1e-5)).sum()
    assert close(dx, numeric_grad(loss, x)) and close(dw, numeric_grad(loss, w)) and close(db, numeric_grad(loss, b))


def test_linear_backward_matches_finite_differences():
    x, w, b, dout = r(2, 3, 5), r(5, 4), r(4), r(2, 3, 4)
    dx, dw, db = bw.linear_backward(dout, x, w, b)
    loss = lambda: (dout * spec.linear(x, w, b)).sum()
    assert close(dx, numeric_grad(loss, x)) and close(dw, numeric_grad(loss, w)) and close(db, numeric_grad(loss, b))


def test_gelu_backward_matches_finite_differences():
    x, dout = 3 * r(4, 6), r(4, 6)
    assert close(bw.gelu_backward(dout, x), numeric_grad(lambda: (dout * spec.gelu(x)).sum(), x))


@pytest.mark.parametrize("T, S", [(5, 5), (2, 6), (1, 4)])   # a prefill, queries after cached keys, one decode step
def test_attention_backward_matches_finite_differences(T, S):
    q, k, v, dout = r(2, 3, T, 4), r(2, 3, S, 4), r(2, 3, S, 4), r(2, 3, T, 4)
    dq, dk, dv = bw.attention_backward(dout, q, k, v)
    loss = lambda: (dout * spec.attention(q, k, v)).sum()
    assert close(dq, numeric_grad(loss, q)) and close(dk, numeric_grad(loss, k)) and close(dv, numeric_grad(loss, v))


def test_lm_head_backward_matches_finite_differences():
    x, w, dout = r(2, 3, 5), r(9, 5), r(2, 3, 9)
    dx, dw = bw.lm_head_backward(dout, x, w)
    loss = lambda: (dout * spec.lm_head(x, w)).sum()
    assert close(dx, numeric_grad(loss, x)) and close(dw, numeric_grad(loss, w))


def test_cross_entropy_backward_matches_finite_differences_and_skips_unscored_rows():
    logits, targets = r(6, 9), np.array([3, -1, 0, 8, -1, 2])
    loss, dlogits = bw.cross_entropy_backward(logits.copy(), targets)
    scored = targets >= 0
    mean = lambda: spec.cross_entropy(logits[scored], targets[scored]).mean()
    assert abs(loss - mean()) < 1e-12
    assert close(dlogits, numeric_grad(mean, logits)) and not dlogits[~scored].any()


def float64_params(seed=0):
    flat = {n: a.astype(np.float64) for n, a in weights.flatten(weights.random_params(SMALL, seed)).items() if n != "lm_head.weight"}
    for n in flat:                                         # larger than GPT-2's init, so every path carries gradient
        if n.endswith("weight") and flat[n].ndim == 2:
            flat[n] *= 5
    params = weights.unflatten(flat)
    params["lm_head"] = {"weight": params["wte"]["weight"]}
    return params


def test_every_parameter_gradient_matches_a_directional_finite_difference():
    """For each tensor, a random direction u: (L(p + hu) - L(p - hu)) / 2h must equal <grad, u>."""
    params = float64_params()
    ids = rng.integers(0, SMALL.n_vocab, size=(2, 7))
    targets = np.concatenate([ids[:, 1:], np.full((2, 1), -1)], axis=1)
    loss, grads = bw.value_and_grad(params, ids, targets, SMALL, spec.REFERENCE)
    assert abs(loss - spec.cross_entropy(spec.forward(params, ids, SMALL)[:, :-1], ids[:, 1:]).mean()) < 1e-12
    flat = weights.flatten(params)
    assert sorted(grads) == sorted(n for n in flat if n != "lm_head.weight")   # tied head folded into wte
    for name, grad in grads.items():
        p, u, h = flat[name], rng.standard_normal(flat[name].shape), 1e-5
        p += h * u
        up = bw.value_and_grad(params, ids, targets, SMALL, spec.REFERENCE)[0]
        p -= 2 * h * u
        down = bw.value_and_grad(params, ids, targets, SMALL, spec.REFERENCE)[0]
        p += h * u
        numeric, analytic = (up - down) / (2 * h), float((grad.astype(np.float64) * u).sum())
        assert abs(numeric - analytic) <= 1e-4 * max(1e-2, abs(numeric)), name   # grads are returned as float32


def with_dropout(seed=3, p=(0.2, 0.3, 0.25)):               # the same seed draws the same masks on every call
    return spec.Dropout(*p, rng=np.random.default_rng(seed))


def test_dropout_gradient_matches_a_directional_finite_difference():
    """With the masks fixed (same seed per call), the loss is a smooth function of the weights: the
    gradient through all three dropouts must match central differences, as without dropout."""
    params = float64_params(1)
    ids = rng.integers(0, SMALL.n_vocab, size=(2, 7))
    targets = np.concatenate([ids[:, 1:], np.full((2, 1), -1)], axis=1)
    loss, grads = bw.value_and_grad(params, ids, targets, SMALL, spec.REFERENCE, drop=with_dropout())
    plain, _ = bw.value_and_grad(params, ids, targets, SMALL, spec.REFERENCE)
    assert abs(loss - plain) > 1e-3                        # the masks did change the loss
    flat = weights.flatten(params)
    for name, grad in grads.items():
        p, u, h = flat[name], rng.standard_normal(flat[name].shape), 1e-5
        p += h * u
        up = bw.value_and_grad(params, ids, targets, SMALL, spec.REFERENCE, drop=with_dropout())[0]
        p -= 2 * h * u
        down = bw.value_and_grad(params, ids, targets, SMALL, spec.REFERENCE, drop=with_dropout())[0]
        p += h * u
        numeric, analytic = (up - down) / (2 * h), float((grad.astype(np.float64) * u).sum())
        assert abs(numeric - analytic) <= 1e-4 * max(1e-2, abs(numeric)), name


def test_dropout_masks_drop_with_probability_p_and_keep_the_expectation():
    drop = with_dropout(p=(0.1, 0.0, 0.3))
    m = drop.mask(drop.resid, (400, 500))
    assert drop.mask(drop.attn, (3, 3)) is None and len(drop.masks) == 2
    kept = m != 0
    assert abs(1 - kept.mean() - 0.3) < 0.005              # 200,000 draws: the standard error is 0.001
    assert np.all(m[kept] == np.float32(1 / 0.7)) and m.dtype == np.float32
    params = float64_params()
    ids = rng.integers(0, SMALL.n_vocab, size=(2, 7))
    drop = with_dropout()
    bw.value_and_grad(params, ids, np.where(ids > 0, ids, -1), SMALL, spec.REFERENCE, drop=drop)
    assert len(drop.masks) == 1 + 3 * SMALL.n_layer        # embd, then per block: attention, two residual branches
    assert drop.masks[1].shape == (2, SMALL.n_head, 7, 7) and drop.masks[2].shape == (2, 7, SMALL.n_embd)


def test_zero_dropout_is_no_dropout():
    model = npgpt.Model(float64_params(), SMALL)
    ids = rng.integers(0, SMALL.n_vocab, size=(2, 7))
    la, ga = model.value_and_grad(ids)
    lb, gb = model.value_and_grad(ids, dropout=0.0)
    assert la == lb and all(np.array_equal(ga[n], gb[n]) for n in ga)
    with pytest.raises(npgpt.NpgptError, match="needs rng"):
        model.value_and_grad(ids, dropout=0.1)
    with pytest.raises(npgpt.NpgptError, match="dropout must be a probability"):
        model.value_and_grad(ids, dropout=(0.1, 1.0, 0.0), rng=0)


def test_untied_head_gets_its_own_gradient():
    params = float64_params()
    params["lm_head"] = {"weight": params["wte"]["weight"].copy()}
    ids = rng.integers(0, SMALL.n_vocab, size=(1, 6))
    targets = np.concatenate([ids[:, 1:], [[-1]]], axis=1)
    _, untied = bw.value_and_grad(params, ids, targets, SMALL, spec.REFERENCE)
    params["lm_head"]["weight"] = params["wte"]["weight"]
    _, tied = bw.value_and_grad(params, ids, targets, SMALL, spec.REFERENCE)
    assert np.allclose(untied["wte.weight"] + untied["lm_head.weight"], tied["wte.weight"], atol=1e-6)


# ---- kernel twins against the spec, on odd shapes, float32 ----

def f32(*shape):
    return rng.standard_normal(shape, dtype=np.float32)


def rel(a, b):
    return float(np.abs(a - b).max() / max(1e-3, float(np.abs(b).max())))


@pytest.mark.parametrize("rows, C", [(1, 7), (97, 60), (300, 180)])
def test_layer_norm_backward_kernel(rows, C):
    x, w, b, d = f32(rows, C), f32(C), f32(C), f32(rows, C)
    for got, want in zip(BACKWARD.layer_norm(d, x, w, b, 1e-5), bw.layer_norm_backward(d, x, w, b, 1e-5)):
        assert rel(got, want) < 1e-5


@pytest.mark.parametrize("rows, n_in, n_out", [(1, 7, 5), (97, 60, 180), (300, 61, 33)])
def test_linear_backward_kernel(rows, n_in, n_out):
    x, w, b, d = f32(3, rows, n_in), f32(n_in, n_out), f32(n_out), f32(3, rows, n_out)
    got = BACKWARD.linear(d, x, **transpose_linear({"weight": w, "bias": b}))
    for g, want in zip(got, bw.linear_backward(d, x, w, b)):
        assert g.shape == want.shape and rel(g, want) < 1e-5


@pytest.mark.parametrize("shape", [(1, 3), (97, 240), (5, 1001)])
def test_gelu_backward_kernel(shape):
    x, d = 4 * f32(*shape), f32(*shape)
    # the kernel's vectorized tanh is within 4e-7 of tanh; d/dx scales that error by up to ~30 (|x| near 5)
    assert rel(BACKWARD.gelu(d, x), bw.gelu_backward(d, x)) < 1e-4


@pytest.mark.parametrize("B, H, T, S, D", [(1, 1, 1, 1, 4), (3, 6, 97, 97, 10), (2, 2, 5, 130, 8)])
def test_attention_backward_kernel(B, H, T, S, D):
    q, k, v, d = f32(B, H, T, D), f32(B, H, S, D), f32(B, H, S, D), f32(B, H, T, D)
    for got, want in zip(BACKWARD.attention(d, q, k, v), bw.attention_backward(d, q, k, v)):
        assert rel(got, want) < 1e-5


@pytest.mark.parametrize("B, H, T, S, D", [(1, 1, 2, 2, 4), (3, 6, 97, 97, 10), (2, 2, 5, 130, 8)])
def test_attention_kernels_with_a_dropout_mask(B, H, T, S, D):
    q, k, v, d = f32(B, H, T, D), f32(B, H, S, D), f32(B, H, S, D), f32(B, H, T, D)
    mask = with_dropout().mask(0.3, (B, H, T, S))
    assert rel(KERNELS.attention(q, k, v, mask=mask), spec.attention(q, k, v, mask=mask)) < 1e-5
    assert rel(KERNELS.attention(q, k, v, mask=mask), spec.attention(q, k, v)) > 1e-2
    for got, want in zip(BACKWARD.attention(d, q, k, v, mask=mask), bw.attention_backward(d, q, k, v, mask=mask)):
        assert rel(got, want) < 1e-5


def test_lm_head_backward_kernel():
    x, w, d = f32(2, 97, 60), f32(1000, 60), f32(2, 97, 1000)
    for got, want in zip(BACKWARD.lm_head(d, x, w), bw.lm_head_backward(d, x, w)):
        assert rel(got, want) < 1e-5


@pytest.mark.parametrize("N, V", [(1, 5), (97, 1000), (7, 50257)])
def test_fused_cross_entropy_kernel_works_in_place(N, V):
    logits, targets = 3 * f32(N, V), rng.integers(-1, V, size=N)
    targets[0] = 1
    want_loss, want = bw.cross_entropy_backward(logits.copy(), targets)
    buffer = logits.copy()
    loss, got = BACKWARD.cross_entropy(buffer, targets)
    assert got is buffer                                   # the logits buffer became the gradient: one [N, V] buffer
    assert abs(loss - want_loss) <= 1e-6 * abs(want_loss) and rel(got, want) < 1e-5


def test_numba_value_and_grad_matches_the_spec(tiny_params):
    from conftest import TINY
    ids = rng.integers(0, TINY.n_vocab, size=(3, 21))
    a, b = npgpt.Model(tiny_params, TINY), npgpt.Model(tiny_params, TINY, backend="numba")
    (la, ga), (lb, gb) = a.value_and_grad(ids), b.value_and_grad(ids)
    assert abs(la - lb) <= 1e-6 * la and abs(la - a.loss(ids)) <= 1e-6 * la
    assert sorted(ga) == sorted(gb)
    for name in ga:
        assert gb[name].dtype == np.float32 and gb[name].shape == ga[name].shape
        assert rel(gb[name], ga[name]) < 1e-4, name


def test_numba_value_and_grad_with_dropout_matches_the_spec(tiny_params):
    """The same seed draws the same masks on both backends; tolerances as without dropout."""
    from conftest import TINY
    ids = rng.integers(0, TINY.n_vocab, size=(2, 21))
    a, b = npgpt.Model(tiny_params, TINY), npgpt.Model(tiny_params, TINY, backend="numba")
    (la, ga), (lb, gb) = a.value_and_grad(ids, dropout=0.1, rng=7), b.value_and_grad(ids, dropout=0.1, rng=7)
    assert abs(la - lb) <= 1e-6 * la and abs(la - a.loss(ids)) > 1e-4 * la
    for name in ga:
        assert rel(gb[name], ga[name]) < 1e-4, name


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_state_dict_is_the_checkpoint_layout_on_both_backends(tiny_params, fmt):
    """The numba backend keeps linear weights transposed and does not keep a second copy for inference; its
    state_dict derives the checkpoint layout again, equal to the numpy backend's."""
    from conftest import TINY
    from npgpt import quant
    params = quant.quantize(tiny_params, fmt)
    a, b = npgpt.Model(params, TINY), npgpt.Model(params, TINY, backend="numba")
    assert b._checkpoint is None
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        for x, y in zip(sa[name] if isinstance(sa[name], tuple) else [sa[name]], sb[name] if isinstance(sb[name], tuple) else [sb[name]]):
            assert np.array_equal(x, y), name
