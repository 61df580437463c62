"""The optimizer's kernel twins against the spec (npgpt.optim), and AdamW on both backends together."""

import numpy as np
import pytest

import npgpt
from npgpt import optim, weights
from npgpt.kernels import OPTIM

rng = np.random.default_rng(5)
TINY = npgpt.Config(n_vocab=61, n_ctx=16, n_embd=12, n_head=3, n_layer=2)


@pytest.mark.parametrize("shape", [(1,), (7, 5), (97, 61), (3, 1001)])
@pytest.mark.parametrize("weight_decay, t", [(0.0, 1), (0.1, 1), (0.1, 7)])
def test_adamw_kernel_is_bit_identical_to_the_spec(shape, weight_decay, t):
    """Same float32 operations in the same order, no FMA contraction: every bit equal (tolerance 0)."""
    p, g = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    m, v = rng.standard_normal(shape).astype(np.float32) * 0.1, rng.random(shape).astype(np.float32) * 0.01
    g[..., 0] = 0.0                                        # a zero gradient on a zero moment: 0 / (0 + eps)
    v[..., 0] = 0.0
    m[..., 0] = 0.0
    hyper = dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay, t=t)
    expected = [a.copy() for a in (p, m, v)]
    optim.adamw_update(*expected[:1], g, *expected[1:], **hyper)
    got = [a.copy() for a in (p, m, v)]
    OPTIM.adamw_update(got[0], g, got[1], got[2], **hyper)
    for e, a in zip(expected, got):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("n", [1, 17, 100003])
def test_sum_of_squares_kernel(n):
    """float64 sums in another order: equal to 1e-12 relative (float64 rounding over 1e5 terms is ~1e-11 worst
    case, ~1e-14 typical)."""
    g = rng.standard_normal(n).astype(np.float32)
    assert OPTIM.sum_of_squares(g) == pytest.approx(optim.sum_of_squares(g), rel=1e-12)


def test_clip_grad_norm_uses_the_backend_sum_and_scales_in_place():
    grads = {"a": rng.standard_normal((30, 7)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    expected = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    before = {k: g.copy() for k, g in grads.items()}
    norm = npgpt.clip_grad_norm(grads, 1.0, ops=OPTIM)
    assert norm == pytest.approx(expected, rel=1e-12)
    for k in grads:
        np.testing.assert_allclose(grads[k], before[k] * (1.0 / (expected + 1e-6)), rtol=1e-6)


def test_adamw_steps_on_both_backends_give_the_same_weights_and_refresh_the_kernel_layout():
    """Three steps on each backend from the same weights and data. Gradients differ by float32 rounding between
    backends (kernel GEMMs sum in another order), so weights agree to 1e-5 x max(1, |p|), not bit for bit.
    The numba model's transposed weights must follow the update (refresh in place): its forward after the
    steps equals a freshly prepared copy of its own checkpoint-layout weights."""
    ids = rng.integers(0, TINY.n_vocab, size=(2, 9))
    models = {b: npgpt.Model(weights.init_params(TINY, 3), TINY, backend=b) for b in ("numpy", "numba")}
    for model in models.values():
        opt = npgpt.AdamW(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        prepared = [layer["mlp"]["c_fc"] for layer in model.params["h"]]
        for _ in range(3):
            _, grads = model.value_and_grad(ids)
            npgpt.clip_grad_norm(grads, 1.0, ops=opt.ops)
            opt.step(grads)
        assert all(a is b for a, b in zip(prepared, [layer["mlp"]["c_fc"] for layer in model.params["h"]]))
    a, b = models["numpy"].state_dict(), models["numba"].state_dict()
    C = TINY.n_embd
    for name in a:
        diff = np.abs(a[name] - b[name])
        if name.endswith("c_attn.bias"):                   # the key third's true gradient is 0: AdamW turns rounding
            assert diff[C : 2 * C].max() <= 3 * 1e-2       # noise into steps of up to lr (see test_training_golden)
            diff[C : 2 * C] = 0
        assert diff.max() <= 1e-5 * max(1.0, np.abs(a[name]).max()), name
    assert not np.array_equal(a["h.0.mlp.c_fc.weight"], weights.flatten(weights.init_params(TINY, 3))["h.0.mlp.c_fc.weight"])
    fresh = weights.unflatten({k: x.copy() for k, x in b.items()})
    fresh["lm_head"] = {"weight": fresh["wte"]["weight"]}
    fresh = npgpt.Model(fresh, TINY, backend="numba")
    np.testing.assert_array_equal(models["numba"].forward(ids), fresh.forward(ids))


def test_adamw_refuses_gradients_of_the_wrong_shape():
    model = npgpt.Model(weights.init_params(TINY, 0), TINY, backend="numba")
    opt = npgpt.AdamW(model)
    _, grads = model.value_and_grad(rng.integers(0, TINY.n_vocab, size=(1, 5)))
    grads["ln_f.bias"] = grads["ln_f.bias"][:-1]
    with pytest.raises(npgpt.NpgptError, match="ln_f.bias"):
        opt.step(grads)
