"""bf16, int8 and int4 weights: the formats, the kernels that read them, checkpoints that store them."""

import functools
import os

import numba
import numpy as np
import pytest

from npgpt import kernels
import npgpt
from npgpt import weights
from npgpt.weights import checkpoint
from npgpt.kernels import matmul
from npgpt import model as spec
from npgpt import quant
from npgpt.cli import main
from conftest import TINY, max_rel_err

rng = np.random.default_rng(11)
IDS = rng.integers(0, TINY.n_vocab, size=(2, 29))


def test_bf16_inputs_round_to_nearest_even_in_the_spec_and_the_kernels():
    """A bf16 matmul's inputs (quant.round_to_bf16, matmul.bf16_bits): ties to even,
    inf stays inf, a NaN stays a NaN, the largest finite float rounds up to inf (as to_bf16)."""
    big = np.float32(np.finfo(np.float32).max)
    x = np.array([[1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-9), np.inf, -np.inf, np.nan, big, 0.0, -0.0]], np.float32)
    want = [1.0, 1.0, 1.0 + 2**-6, -1.0, np.inf, -np.inf, np.nan, np.inf, 0.0, -0.0]
    spec_x = quant.round_to_bf16(x)
    np.testing.assert_array_equal(spec_x, np.array([want], np.float32))
    bits = matmul.bf16_bits(x)
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal((bits.astype(np.uint32) << 16).view(np.float32), spec_x)
    r = rng.standard_normal((5, 333), dtype=np.float32)
    np.testing.assert_array_equal(matmul.bf16_bits(r), quant.to_bf16(r).bits)


@functools.cache
def _caller(dot):                                          # a compiled function calling the intrinsic `dot` (once per dot)
    return numba.njit(lambda wp, m, xp, n, ahead: dot(wp, m, xp, n, ahead))


@pytest.mark.parametrize("isa", ["native", "generic"])
@pytest.mark.parametrize("runs", [1, 3, 8, 13])              # runs of 8 pairs: fewer and more than the 2 or 4 accumulators
def test_bf16_dot_on_every_instruction_path(isa, runs):
    """jit.dot_bf16 (one input), dot_bf16x4 (four) and dot_bf16_4x4 (four rows by four inputs) on each
    path this CPU has (native: vdpbf16ps with AVX512-BF16, else the plain IR; generic: always the plain
    IR) against float64 sums of the same bf16 values, rows and inputs at offsets: 1e-6 relative to the
    sum of |products| (float32 sums)."""
    from npgpt.kernels import jit
    one, four, tile = jit.dot_bf16_isa[isa]
    K = 16 * runs
    w, x = quant.to_bf16(rng.standard_normal((6, K), dtype=np.float32)).bits, quant.to_bf16(rng.standard_normal((6, K), dtype=np.float32)).bits
    wide = lambda b: (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    products = wide(x)[:, None, :] * wide(w)[None, :, :]   # [6 inputs, 6 rows, K]
    want, scale = products.sum(-1), np.abs(products).sum(-1)
    wp, xp = w.view(np.uint32), x.view(np.uint32)
    close = lambda got, n, m: abs(got - want[n, m]) <= 1e-6 * scale[n, m]
    for m in range(3):
        for ahead in (0, 256):
            assert close(_caller(one)(wp, m, xp, 5, ahead)[0], 5, m)
            got = _caller(four)(wp, m, xp, 1, ahead)
            assert all(close(got[i], 1 + i, m) for i in range(4))
        got = _caller(tile)(wp, m, xp, 2, 0)               # row by row: rows m .. m + 3, inputs 2 .. 5
        assert all(close(got[4 * r + i], 2 + i, m + r) for r in range(4) for i in range(4))


@functools.cache
def _panel_callers():                                      # compiled functions calling matmul._pack_panel and jit's panel products
    from npgpt.kernels import jit
    products = {w: numba.njit(lambda panel, xg, c, ahead, f=f: f(panel, xg, c, ahead)) for w, f in ((6, jit.bf16_panel), (4, jit.bf16_panel4),
                                                                                   (1, jit.bf16_panel1))}
    return numba.njit(lambda w, m, rows, panel: matmul._pack_panel(w, m, rows, panel)), products


@pytest.mark.parametrize("K", [5, 8, 45, 200])
def test_bf16_panels_hold_16_rows_and_multiply_6_4_or_1_inputs_as_float64_sums(K):
    """bf16 without vdpbf16ps. matmul._pack_panel (jit.pack_panel's 8x8 transposes, then the last K % 8
    columns and partial panels in numba): panel[k, j] holds row m + j's weight at k in its low half, row
    m + 8 + j's in its high half, a partial panel's missing rows 0; matmul.bf16_panels packs every row so
    and bf16_unpanel gives them back. matmul.bf16_groups_into: W inputs rounded to bf16 as the spec,
    k-major, zeros past the last input. jit.bf16_panel (6 inputs), bf16_panel4 and bf16_panel1 (4 sets of
    sums over every 4th k) against float64 sums of the same values: 1e-6 relative to the sum of |products|
    (exact products, float32 sums of at most 200 terms); with L2 hints 64 bytes on (decode's, which may
    name lines past the panel: a hint never faults), the same sums bit for bit."""
    pack, products = _panel_callers()
    wb = quant.to_bf16(rng.standard_normal((37, K), dtype=np.float32))
    w, wide = wb.bits, quant.dequantize(wb).astype(np.float64)
    panel = np.empty((K, 8), np.uint32)
    for m, rows in ((3, 16), (21, 16), (30, 7)):
        panel[:] = 0xDEADBEEF
        pack(w, m, rows, panel)
        block = np.zeros((16, K), np.uint32)
        block[:rows] = w[m:m + rows]
        np.testing.assert_array_equal(panel, (block[:8] | (block[8:] << 16)).T, err_msg=f"m={m} rows={rows}")
    packed = matmul.bf16_panels(w)
    assert packed.panels.shape == (3, K, 8) and packed.shape == (37, K)
    np.testing.assert_array_equal(packed.panels[1], (w[16:24] | (w[24:32].astype(np.uint32) << 16)).T)
    np.testing.assert_array_equal(matmul.bf16_unpanel(packed), w)
    pack(w, 5, 16, panel)
    for W, product in products.items():
        x = rng.standard_normal((W + 2, K), dtype=np.float32)
        xg, xr = np.full((2, K, W), np.nan, np.float32), quant.round_to_bf16(x)
        matmul.bf16_groups_into(x, xg, 0, 2)
        np.testing.assert_array_equal(xg[0], xr[:W].T)
        np.testing.assert_array_equal(xg[1], np.concatenate([xr[W:].T, np.zeros((K, max(0, W - 2)), np.float32)], axis=1)[:, :W])
        for g in range(2):
            c, hinted = np.full((W, 16), np.nan, np.float32), np.full((W, 16), np.nan, np.float32)
            product(panel, xg[g], c, 0)
            terms = xg[g].T.astype(np.float64)[:, None, :] * wide[5:21][None, :, :]   # [W inputs, 16 rows, K]
            assert np.all(np.abs(c - terms.sum(-1)) <= 1e-6 * np.abs(terms).sum(-1)), (W, g)
            product(panel, xg[g], hinted, 64)
            np.testing.assert_array_equal(hinted, c)


@pytest.mark.parametrize("K", [1, 7, 45, 200])
def test_widened_panels_against_two_groups_equal_each_panel_and_group_bit_for_bit(K):
    """AVX-512's form of prefill's bf16 panel product (matmul.wide_panel_rows): jit.widen_panels_against stores
    panels p and p + 1 as one float32 panel of their 32 rows, exactly the weights' float32 values
    (quant.dequantize, bit for bit, also past a NaN's or an infinity's bits), and its sums against groups g
    and g + 1 (12 inputs), hinting or not, equal jit.f32_panel_wide's on the stored panel and jit.bf16_panel's
    on each panel and group bit for bit (the same float32 FMAs, k in order, per lane); the float64 sums within
    1e-6 of the sum of |products| (at most 200 float32 terms). On a host without AVX-512 LLVM splits its
    vectors; the values are the same."""
    from npgpt.kernels import jit
    _, products = _panel_callers()
    fused = numba.njit(lambda pa, pb, panel, xa, xb, c, ahead: jit.widen_panels_against(pa, pb, panel, xa, xb, c, ahead))
    wide_product = numba.njit(lambda pw, xa, xb, c, ahead: jit.f32_panel_wide(pw, xa, xb, c, ahead))
    none = np.empty(0, np.float32)
    x = rng.standard_normal((12, K), dtype=np.float32)
    xg = np.empty((2, K, 6), np.float32)
    matmul.bf16_groups_into(x, xg, 0, 2)
    wb = quant.to_bf16(rng.standard_normal((32, K), dtype=np.float32))
    wb.bits[3, 0], wb.bits[30, K - 1] = 0x7FC1, 0xFF80    # a NaN and -inf among the weights (widened as bits)
    panels = matmul.bf16_panels(wb.bits).panels
    widened = np.full((K, 32), np.nan, np.float32)
    fused(panels[0], panels[1], widened, xg[0], xg[1], np.empty((12, 32), np.float32), none)
    np.testing.assert_array_equal(widened.view(np.uint32), quant.dequantize(wb).T.view(np.uint32))
    wb = quant.to_bf16(rng.standard_normal((32, K), dtype=np.float32))   # finite weights for the sums
    panels = matmul.bf16_panels(wb.bits).panels
    c = np.full((12, 32), np.nan, np.float32)
    fused(panels[0], panels[1], widened, xg[0], xg[1], c, none)
    np.testing.assert_array_equal(widened, quant.dequantize(wb).T)
    one = np.full((6, 16), np.nan, np.float32)
    for g in range(2):
        for p in range(2):
            products[6](panels[p], xg[g], one, 0)
            np.testing.assert_array_equal(c[6 * g : 6 * g + 6, 16 * p : 16 * p + 16], one, err_msg=f"g={g} p={p}")
    terms = quant.round_to_bf16(x).astype(np.float64)[:, None, :] * quant.dequantize(wb).astype(np.float64)[None]
    assert np.all(np.abs(c - terms.sum(-1)) <= 1e-6 * np.abs(terms).sum(-1))
    for ahead in (none, x.ravel()):                        # the stored panel against the groups, hinting or not; hints in the fused call
        again = np.full((12, 32), np.nan, np.float32)
        wide_product(widened, xg[0], xg[1], again, ahead)
        np.testing.assert_array_equal(again, c)
        fused(panels[0], panels[1], np.full((K, 32), np.nan, np.float32), xg[0], xg[1], again, ahead)
        np.testing.assert_array_equal(again, c)


@pytest.mark.parametrize("K", [1, 7, 45, 200])
def test_panel_pairs_against_four_inputs_equal_each_panel_bit_for_bit(K):
    """jit.bf16_panel4_pair (bf16 decode from 2 inputs with AVX-512: two panels' 32 rows in 512-bit FMAs)
    equals jit.bf16_panel4 on each panel bit for bit (the same float32 FMAs, k in order, per lane), with
    and without L2 hints; the float64 sums within 1e-6 of the sum of |products| (at most 200 terms). On a
    host without AVX-512 LLVM splits its vectors; the values are the same."""
    from npgpt.kernels import jit
    _, products = _panel_callers()
    pair = numba.njit(lambda pa, pb, xg, c, ahead: jit.bf16_panel4_pair(pa, pb, xg, c, ahead))
    wb = quant.to_bf16(rng.standard_normal((32, K), dtype=np.float32))
    panels = matmul.bf16_panels(wb.bits).panels
    x = rng.standard_normal((4, K), dtype=np.float32)
    xg = np.empty((1, K, 4), np.float32)
    matmul.bf16_groups_into(x, xg, 0, 1)
    c, hinted, one = np.full((4, 32), np.nan, np.float32), np.full((4, 32), np.nan, np.float32), np.full((4, 16), np.nan, np.float32)
    pair(panels[0], panels[1], xg[0], c, 0)
    pair(panels[0], panels[1], xg[0], hinted, 64)
    np.testing.assert_array_equal(hinted, c)
    for p in range(2):
        products[4](panels[p], xg[0], one, 0)
        np.testing.assert_array_equal(c[:, 16 * p : 16 * p + 16], one, err_msg=f"p={p}")
    terms = quant.round_to_bf16(x).astype(np.float64)[:, None, :] * quant.dequantize(wb).astype(np.float64)[None]
    assert np.all(np.abs(c - terms.sum(-1)) <= 1e-6 * np.abs(terms).sum(-1))


@pytest.mark.parametrize("span", [(0, 16), (0, 37), (16, 80), (32, 96), (0, 130), (48, 200)])   # 1, 3 (last partial), 4, 4, 9 (partial), 10 panels
@pytest.mark.parametrize("n", [2, 4, 5])
def test_decode_panels_in_pairs_equal_one_panel_at_a_time(span, n):
    """matmul.panel_rows on groups of 4 inputs (bf16 decode from 2 inputs), as this host runs it (with AVX-512:
    panel p with p + half of the range, jit.bf16_panel4_pair, an odd last panel alone), against each panel
    and group through jit.bf16_panel4 alone: bit for bit; nothing outside m0 .. m1 written."""
    _, products = _panel_callers()
    one = products[4]
    rows = numba.njit(lambda xq, panels, out, m0, m1, ahead: matmul.panel_rows(xq, panels, out, m0, m1, ahead))
    K, M = 45, 200
    panels = matmul.bf16_panels(quant.to_bf16(rng.standard_normal((M, K), dtype=np.float32)).bits).panels
    x = rng.standard_normal((n, K), dtype=np.float32)
    G = -(-n // 4)
    xq = np.zeros((G, K, 4), np.float32)
    matmul.bf16_groups_into(x, xq, 0, G)
    m0, m1 = span
    out, want = np.full((n, M), 5.0, np.float32), np.full((n, M), 5.0, np.float32)
    rows(xq, panels, out, m0, m1, 64)
    c = np.empty((4, 16), np.float32)
    for p in range(m0 // 16, -(-m1 // 16)):
        for g in range(G):
            one(panels[p], xq[g], c, 0)
            for i in range(min(4, n - 4 * g)):
                top = min(m1, 16 * p + 16)
                want[4 * g + i, 16 * p : top] = c[i, : top - 16 * p]
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("N, K, M", [(7, 33, 10), (13, 48, 40), (37, 100, 29), (130, 256, 64), (25, 40, 70)])
def test_bf16_prompts_on_wide_panels_equal_the_narrow_ones_bit_for_bit(N, K, M, monkeypatch):
    """The bf16 panel product (matmul_into on quant.BF16Panels) wide (jit.PANEL_WIDE: two panels widened once,
    against two groups at a time; odd last groups and panels one at a time) and narrow (each panel against
    each group, jit.bf16_panel): the same outputs bit for bit, in blocks of inputs or not (narrow: of about
    PANEL_INPUT_BYTES; wide: of up to F32_PANEL_UPTO inputs, whole pairs of groups, as float32's panels)."""
    from npgpt.kernels import jit
    x = rng.standard_normal((N, K), dtype=np.float32)
    rows = matmul.bf16_panels(quant.to_bf16(rng.standard_normal((M, K), dtype=np.float32)).bits)
    b = rng.standard_normal(M, dtype=np.float32)
    outs = []
    for wide, block_bytes, upto in ((False, 1 << 20, 512), (False, 6000, 512), (True, 1 << 20, 512), (True, 1 << 20, 24)):
        monkeypatch.setattr(jit, "PANEL_WIDE", wide)
        monkeypatch.setattr(matmul, "PANEL_INPUT_BYTES", block_bytes)
        monkeypatch.setattr(matmul, "F32_PANEL_UPTO", upto)
        out = np.full((N, M), np.nan, np.float32)
        matmul.matmul_into(x, rows, out, b, matmul.GELU, np.empty(matmul.scratch_size(N, M), np.float32))
        outs.append(out)
    assert np.isfinite(outs[0]).all()
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


@pytest.mark.parametrize("features, cpu, pairs", [
    ("+avx2,+avx512f,+avx512vl,+avx512bf16", "znver4", True),            # Zen 4: vdpbf16ps at an FMA's rate
    ("+avx2,+avx512f,+avx512vl,+avx512bf16", "emeraldrapids", False),    # Intel: a quarter of an FMA's rate
    ("+avx2,+avx512f,+avx512vl,+avx512bf16", "sapphirerapids", False),
    ("+avx2,+avx512f,+avx512vl,-avx512bf16", "znver4", False),           # no AVX512-BF16 at all
    ("+avx2,+fma", "znver3", False),
])
def test_bf16_pairs_only_where_vdpbf16ps_pays(features, cpu, pairs):
    """jit.pairs_pay: bf16 rows of pairs (vdpbf16ps) on AMD's AVX512-BF16 cores, panels everywhere else."""
    from npgpt.kernels import jit
    assert jit.pairs_pay(features.split(","), cpu) is pairs


@pytest.mark.parametrize("pairs, wide", [(True, False), (False, False), (False, True)])   # wide: panels two by two (AVX-512)
@pytest.mark.parametrize("N, K, M", [(7, 33, 10), (13, 48, 11), (37, 100, 29), (130, 256, 64), (2, 1, 5), (5, 2, 3), (25, 40, 40)])
@pytest.mark.parametrize("block_bytes, upto", [(1 << 20, 512), (6000, 12)])   # the panels' input blocks (narrow: matmul.PANEL_INPUT_BYTES, wide: F32_PANEL_UPTO inputs): one, or many of a few groups and a partial last
def test_bf16_products_on_either_path_equal_the_spec(pairs, wide, N, K, M, block_bytes, upto, monkeypatch):
    """bf16 rows as kernels.head_rows keeps them: quant.BF16 rows where vdpbf16ps pays (jit.BF16_PAIRS), else
    quant.BF16Panels. Prefill's product (matmul_into: 4x4 tiles of bf16 pairs, or panels against groups of 6
    inputs, one at a time or, wide (jit.PANEL_WIDE), two panels against two groups) and the GEMV (matmul_rows: one input, 2 and 5 inputs (groups of 4 on panels, a partial one)) on
    odd shapes (partial tiles, panels and groups, K odd, K % 16 left over) against the spec's product of the
    rounded inputs and the widened weights, with a bias and then GELU: 1e-6 relative to the sum of |terms|
    (exact products, float32 sums; GELU: + 1e-5 of the value, the kernels' GELU against the spec's in
    float32). Whichever path this CPU takes natively, all three run (the pairs in plain IR without AVX512-BF16)."""
    from npgpt.kernels import jit
    monkeypatch.setattr(jit, "BF16_PAIRS", pairs)
    monkeypatch.setattr(jit, "PANEL_WIDE", wide)
    monkeypatch.setattr(matmul, "PANEL_INPUT_BYTES", block_bytes)
    monkeypatch.setattr(matmul, "F32_PANEL_UPTO", upto)
    x = rng.standard_normal((N, K), dtype=np.float32)
    w, b = quant.to_bf16(rng.standard_normal((M, K), dtype=np.float32)), rng.standard_normal(M, dtype=np.float32)
    rows = kernels.head_rows(w)
    assert isinstance(rows, quant.BF16 if pairs else quant.BF16Panels) and rows.shape == (M, K)
    xr, wide = quant.activations(x, w).astype(np.float64), quant.dequantize(w).astype(np.float64)
    want, scale = xr @ wide.T + b, np.abs(xr) @ np.abs(wide).T + np.abs(b)
    for then in (matmul.BIAS, matmul.GELU):
        out = np.full((N, M), np.nan, np.float32)
        matmul.matmul_into(x, rows, out, b, then, np.empty(matmul.scratch_size(N, M), np.float32))
        ref = want if then == matmul.BIAS else spec.gelu(want.astype(np.float32)).astype(np.float64)
        assert np.all(np.abs(out - ref) <= 1e-6 * scale + (0 if then == matmul.BIAS else 1e-5 * np.abs(ref))), then
    for n in (1, 2, 5):                                    # decode-sized: the GEMV
        got = matmul.matmul_rows(x[:n], rows, b)
        assert got.shape == (min(N, n), M) and np.all(np.abs(got - want[:n]) <= 1e-6 * scale[:n]), n


@pytest.mark.parametrize("N, K", [(6, 8), (13, 771), (5, 20), (12, 3), (18, 16)])
def test_bf16_groups_hold_the_inputs_rounded_as_the_spec_k_major(N, K):
    """matmul.bf16_groups_into (whole groups of 6: 8 columns at a time in vectors, jit.bf16_group8; the last
    K % 8 columns and a partial group one value at a time) against quant.round_to_bf16, bit for bit, on
    ties to even both ways, -0, infinities, the largest float (rounds to inf), NaNs (stay NaNs, one whose
    payload is all in the low half too) and subnormals; zeros past the last input; from C-contiguous inputs
    and from a strided view of them (matmul.group8: values one at a time). Groups are written one call
    each, last first (as bands on other threads may be): a group's writes must stay in its own columns."""
    x = rng.standard_normal((N, K), dtype=np.float32)
    special = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, np.inf, -np.inf, np.finfo(np.float32).max, np.nan,
                        np.array(0x7F800001, np.uint32).view(np.float32), 1e-40, -3e-39, 2.0**-126 + 2.0**-140], np.float32)
    n = min(len(special), x.size)
    x.flat[np.arange(n) * (x.size // n)] = special[:n]    # spread over the groups (and columns)
    want = quant.round_to_bf16(x)
    wide = np.zeros((N, K + 5), np.float32)
    for inputs in (x, wide[:, 2 : K + 2]):                 # C-contiguous rows (the vectors), and a strided view of them
        inputs[...] = x
        out = np.full((-(-N // 6), K, 6), 7.0, np.float32)
        for g in reversed(range(out.shape[0])):
            matmul.bf16_groups_into(inputs, out, g, g + 1)
        got = out.transpose(0, 2, 1).reshape(-1, K)
        assert np.array_equal(np.isnan(got[:N]), np.isnan(want))
        assert np.array_equal(got[:N].view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
        assert (got[N:] == 0).all()


def test_bf16_keeps_upper_half_rounded_to_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, 3.0e38], dtype=np.float32)   # 3e38 = 0x7F61B1E6
    up = np.array([0x7F620000], np.uint32).view(np.float32)[0]                           # its low half > 0x8000
    assert quant.dequantize(quant.to_bf16(x)).tolist() == [1.0, 1.0, 1.0 + 2**-6, -2.5, up]


@pytest.mark.parametrize("axis, shape", [(1, (60, 180)), (0, (1000, 60))])
def test_int8_is_symmetric_per_output_channel(axis, shape):
    w = rng.standard_normal(shape, dtype=np.float32) * rng.uniform(0.01, 3, size=shape[axis]).astype(np.float32).reshape(
        (1, -1) if axis == 1 else (-1, 1))
    q = quant.to_int8(w, axis)
    assert q.q.dtype == np.int8 and np.abs(q.q.astype(int)).max() == 127
    assert q.scale.shape == ((1, shape[1]) if axis == 1 else (shape[0], 1))
    assert np.all(np.abs(quant.dequantize(q) - w) <= q.scale / 2 * (1 + 1e-6))   # rounding error only


@pytest.mark.parametrize("n_out, n_in", [(37, 60), (130, 96), (1, 1), (16, 128)])   # partial groups and blocks, whole ones
def test_int8_rows_keep_every_weight_and_scale(n_out, n_in):
    w = quant.to_int8(rng.standard_normal((n_out, n_in), dtype=np.float32), 0)
    rows = kernels.head_rows(w)
    groups, blocks = -(-n_out // 8), -(-n_in // 32)
    assert isinstance(rows, quant.Int8Rows) and rows.shape == (n_out, n_in)
    assert rows.packed.shape == (groups, 256 * blocks) and rows.packed.dtype == np.uint8 and rows.scale.shape == (groups, 8)
    r, j, i, c = min(n_out - 1, 6), blocks - 1, 5, 3       # byte 4r + c of run i of block j: input 32j + 4i + c, as q + 128
    k = 32 * j + 4 * i + c
    assert rows.packed[0, 256 * j + 32 * i + 4 * r + c] == (int(w.q[r, k]) + 128 if k < n_in else 128)
    assert rows.scale.ravel()[r] == w.scale[r, 0] and np.all(rows.scale.ravel()[n_out:] == 0)   # padding rows: scale 0
    back = kernels.unprepare({"h": [], "lm_head": {"weight": rows}})["lm_head"]["weight"]
    assert np.array_equal(back.q, w.q) and np.array_equal(back.scale, w.scale)


@pytest.mark.parametrize("n_out, n_in", [(37, 60), (130, 96), (1, 1), (16, 128)])   # partial groups and blocks, whole ones
def test_int4_rows_keep_every_weight_and_scale(n_out, n_in):
    w = quant.to_int4(rng.standard_normal((n_out, n_in), dtype=np.float32), 1)
    rows = kernels.head_rows(w)
    groups, blocks = -(-n_out // 8), -(-n_in // 32)
    assert isinstance(rows, quant.Int4Rows) and rows.shape == (n_out, n_in)
    assert rows.packed.shape == (groups, 128 * blocks) and rows.packed.dtype == np.uint8 and rows.scale.shape == (groups, 8 * blocks)
    u = lambda r, k: int(w.q[r, k]) + 8 if r < n_out and k < n_in else 8   # stored nibble; padding is q = 0
    r, j, i, c = min(n_out - 1, 6), blocks - 1, 2, 1       # byte 4r + c of run i of block j: inputs 32j + 8i + c and + 4
    assert rows.packed[0, 128 * j + 32 * i + 4 * r + c] == u(r, 32 * j + 8 * i + c) | (u(r, 32 * j + 8 * i + 4 + c) << 4)
    assert w.scale.dtype == np.float16 and rows.scale.dtype == np.uint16   # float16, kept as its bits for numba
    assert rows.scale.view(np.float16)[0, 8 * j + r] == w.scale[r, j]
    assert np.all(rows.scale.reshape(groups, blocks, 8).transpose(0, 2, 1).reshape(-1, blocks)[n_out:] == 0)   # padding rows
    back = kernels.unprepare({"h": [], "lm_head": {"weight": rows}})["lm_head"]["weight"]
    assert np.array_equal(back.q, w.q) and np.array_equal(back.scale, w.scale)


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 60), (1, 33), (4, 7)])   # whole blocks, partial last blocks, one short block
def test_int8_matmul_inputs_round_to_int8_levels_per_block_of_32(shape):
    x = rng.standard_normal(shape, dtype=np.float32) * rng.uniform(0.01, 30, size=shape[:-1] + (1,)).astype(np.float32)
    if shape[-1] >= 64:
        x[0, 32:64] = 0.0                                  # a whole block of zeros stays zero
    got = quant.round_to_q8(x)
    K = shape[-1]
    for j in range(-(-K // 32)):
        block, out = x[..., 32 * j : 32 * j + 32], got[..., 32 * j : 32 * j + 32]
        peak = np.abs(block).max(axis=-1, keepdims=True)
        d = peak / np.float32(127.0)
        q = np.divide(out, d, out=np.zeros_like(out), where=d > 0)
        assert np.allclose(q, np.rint(q), atol=1e-3) and np.abs(q).max() <= 127 + 1e-3   # int8 levels of the block's scale
        assert np.all(np.abs(out - block) <= d / 2 * (1 + 1e-5))                         # half a level at most
        assert np.all(np.abs(np.take_along_axis(q, np.abs(block).argmax(-1)[..., None], -1)[peak > 0]) > 126.99)
        assert np.all(out[(peak == 0)[..., 0]] == 0)
    w = quant.to_int8(rng.standard_normal((K, 5), dtype=np.float32), 1)
    assert np.array_equal(spec.linear(x, w, np.zeros(5, np.float32)), got @ quant.dequantize(w))   # what int8's matmul multiplies
    assert np.array_equal(spec.linear(x, quant.to_bf16(w.q.astype(np.float32)), np.zeros(5, np.float32)),
                          quant.round_to_bf16(x) @ w.q.astype(np.float32))                   # bf16 rounds to bf16
    assert np.array_equal(spec.linear(x, w.q.astype(np.float32), np.zeros(5, np.float32)), x @ w.q.astype(np.float32))   # fp32: as is


@pytest.mark.parametrize("shape", [(1, 768), (17, 60), (300, 61), (5, 3072), (2, 7)])
@pytest.mark.parametrize("offset", [8, 128])
def test_prefill_rounds_int8_inputs_bit_for_bit_as_the_spec(shape, offset):
    """rounded_rows (bands of rows, 2 from 17 rows): levels times block scales are quant.round_to_q8's
    values exactly; blocks past K (one extra here) are zeros; xoff is offset times each block's sum."""
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(3.0)
    x[0, : min(5, shape[1])] = 0.0                       # a block that starts with zeros
    blocks = -(-shape[1] // 32) + 1
    xq, sx, xoff = matmul.rounded_rows(x, offset, blocks)
    values = (xq.reshape(shape[0], blocks, 32) * sx[..., None]).reshape(shape[0], -1)
    assert np.array_equal(values[:, : shape[1]], quant.round_to_q8(x)) and not values[:, shape[1] :].any()
    assert np.array_equal(xoff, offset * xq.reshape(shape[0], blocks, 32).astype(np.int32).sum(-1))


def test_input_rounding_ties_to_even_and_zero_blocks_in_the_vector_path():
    """Whole blocks round in vectors (jit.block_peak, jit.round_block): a block whose peak is 127 has
    inv = 1, so its halves are ties and round to even (2.5 -> 2, -3.5 -> -4, as np.rint); a block of zeros
    (and of negative zeros) gets scale 0 and levels 0; a block of one huge value beside tiny ones."""
    x = np.zeros((3, 96), np.float32)
    x[0, :32] = np.linspace(-15.5, 15.5, 32, dtype=np.float32)
    x[0, 0] = np.float32(127.0)
    x[0, 64:] = -0.0
    x[1, :32] = np.float32(1e-30)
    x[1, 7] = np.float32(-3e30)
    x[2] = rng.standard_normal(96, dtype=np.float32)
    xq, sx, xoff = matmul.rounded_rows(x, 8, 3)
    values = (xq.reshape(3, 3, 32) * sx[..., None]).reshape(3, -1)
    assert np.array_equal(values, quant.round_to_q8(x))
    assert np.array_equal(xq[0, 1:32], np.rint(x[0, 1:32]).astype(np.int8))       # inv = 1: the ties as rint's
    assert not xq[0, 32:].any() and not sx[0, 1:].any() and not xoff[0, 1:].any()
    assert xq[1, 7] == -127 and not np.delete(xq[1, :32], 7).any()


@functools.cache
def _rows_of(dot, inputs):                                 # every group of rows against 4 inputs, `inputs` at a time
    """One compiled function per dot (kept across test cases: each compiles once per argument types)."""
    import numba

    @numba.njit
    def f(packed, d, xq, xoff, sx, M, blocks, ahead):
        out = np.empty((4, packed.shape[0] * 8), np.float32)
        for g in range(packed.shape[0]):
            for n in range(0, 4, inputs):
                v = dot(packed, d, g, xq, xoff, sx, n, blocks, ahead)
                for i in range(inputs):
                    for r in range(8):
                        out[n + i, 8 * g + r] = v[8 * i + r]
        return out[:, :M]
    return f


@pytest.mark.parametrize("M, K", [(7, 64), (33, 128), (300, 768), (5, 3072), (9, 32 * 3)])   # partial groups; an odd block count: the tail
def test_integer_dots_with_and_without_avx2_equal_the_exact_sum(M, K):
    """jit.dot_q8 / dot_q8x4 / dot_q4 / dot_q4x4 (AVX512-VNNI or AVX2 when the CPU has them), and each on
    every instruction path this CPU can run (VNNI, AVX2 alone, plain vector IR), against float64: block
    dots are exact integers, so only the float32 scaling and sums differ (~1e-7 relative; bounded by
    1e-6 of the sum of the terms' magnitudes)."""
    from npgpt.kernels import jit

    blocks = K // 32
    sx = rng.uniform(0.001, 1.0, size=(4, blocks)).astype(np.float32)
    xq = rng.integers(-127, 128, size=(4, K)).astype(np.int8)
    levels = xq.astype(np.int32).reshape(4, blocks, 32).sum(-1)

    w = quant.Int8(rng.integers(-127, 128, size=(M, K)).astype(np.int8), rng.uniform(0.001, 1.0, size=(M, 1)).astype(np.float32))
    prods = (w.q[None].astype(np.float64) * xq[:, None]).reshape(4, M, blocks, 32).sum(-1)          # [inputs, rows, blocks]
    magnitude = np.abs(w.q[None].astype(np.float64) * xq[:, None]).reshape(4, M, blocks, 32).sum(-1)
    exact, scale = (prods * sx[:, None]).sum(-1) * w.scale.T, (magnitude * sx[:, None]).sum(-1) * w.scale.T
    rows = kernels.head_rows(w)
    for dot, inputs in ((jit.dot_q8, 1), (jit.dot_q8x4, 4), *((dot, 1) for dot in jit.dot_q8_isa.values())):
        for ahead in (0, 4096):                            # hints (past the last row's end too) change nothing
            got = _rows_of(dot, inputs)(rows.packed, rows.scale, xq, (128 * levels).astype(np.int32), sx, M, blocks, ahead)
            assert np.all(np.abs(got - exact) <= 1e-6 * scale)

    q4 = rng.integers(-8, 8, size=(M, K)).astype(np.int8)
    for d in (rng.uniform(0.001, 1.0, size=(M, blocks)).astype(np.float32), rng.uniform(0.001, 1.0, size=(M, blocks)).astype(np.float16)):
        exact = (q4[None].astype(np.float64) * xq[:, None]).reshape(4, M, blocks, 32).sum(-1) * d[None]   # float16 scales (as their bits) too
        magnitude = np.abs((q4[None] + 8).astype(np.float64) * xq[:, None]).reshape(4, M, blocks, 32).sum(-1) * d[None]   # the stored q + 8's
        exact, scale = (exact * sx[:, None]).sum(-1), (magnitude * sx[:, None]).sum(-1)
        packed = matmul.int4_rows(q4, d)
        assert packed.scale.dtype == (np.uint16 if d.dtype == np.float16 else np.float32)
        for dot, inputs in ((jit.dot_q4, 1), (jit.dot_q4x4, 4), *((dot, 1) for dot in jit.dot_q4_isa.values())):
            for ahead in (0, 4096):
                got = _rows_of(dot, inputs)(packed.packed, packed.scale, xq, (8 * levels).astype(np.int32), sx, M, blocks, ahead)
                assert np.all(np.abs(got - exact) <= 1e-6 * scale)


@pytest.mark.parametrize("n_in", [64, 60, 33])            # whole int4 blocks, a partial last block, an odd input count
def test_int4_is_blockwise_symmetric_and_packs_two_per_byte(n_in):
    w = rng.standard_normal((n_in, 50), dtype=np.float32) * rng.uniform(0.01, 3, size=(n_in, 1)).astype(np.float32)
    q = quant.to_int4(w, 0)
    blocks = -(-n_in // 32)
    assert q.q.dtype == np.int8 and q.q.min() >= -8 and q.q.max() <= 7 and q.scale.shape == (blocks, 50)
    scale = np.repeat(q.scale, 32, axis=0)[:n_in]
    err = np.abs(quant.dequantize(q) - w)
    assert np.all(err <= np.abs(scale) / 2 * (1 + 1e-6) + (q.q == 7) * np.abs(scale))   # rounding; +8 clipped to 7
    for j in range(blocks):                                # each block's value of largest magnitude is exactly -8 * scale
        part = w[32 * j : 32 * j + 32]
        i = np.abs(part).argmax(axis=0)
        assert np.all(q.q[32 * j + i, np.arange(50)] == -8)
    packed = quant.pack4(q.q.T)
    assert packed.dtype == np.uint8 and packed.shape == (50, 16 * blocks)
    assert packed[0, 0] == (int(q.q[0, 0]) + 8) | ((int(q.q[16, 0]) + 8) << 4)   # q4_0's order: inputs i and 16 + i share byte i
    assert np.array_equal(quant.unpack4(packed, n_in), q.q.T)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 13, 16, 17, 300])         # GEMV up to 16 rows, tiled sgemm above
# fp32 (and bf16 widened): 4 rows a quarter of a task apart against 4 inputs at a time, the rest one at a time; int8/int4: 4 inputs per load
@pytest.mark.parametrize("n_in, n_out", [(60, 180), (180, 60), (768, 301), (61, 37)])   # bf16: even n_in as pairs (runs of 8 and a tail), odd as is
def test_linear_on_quantized_weights(fmt, rows, n_in, n_out):
    x, b = rng.standard_normal((rows, n_in), dtype=np.float32), rng.standard_normal(n_out, dtype=np.float32)
    w = quant.convert(rng.standard_normal((n_in, n_out), dtype=np.float32) * np.float32(0.1), fmt, 1)
    got = matmul.linear(x, **kernels.transpose_linear({"weight": w, "bias": b}))
    assert max_rel_err(got, spec.linear(x, w, b)) < 1e-5                # same quantized weights, fp32 arithmetic


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 17, 40])          # each GEMV path (one row per task, 4x4 tiles, the rest), and bands
def test_linear_with_gelu_equals_the_spec(fmt, rows):
    """matmul_rows(..., gelu=True), the decode step's MLP: GELU applied in the GEMV (or on each band), as
    spec.gelu(spec.linear(...)); TOL as each kernel's own (the products within 1e-5, GELU within TOL)."""
    x, b = rng.standard_normal((rows, 180), dtype=np.float32), rng.standard_normal(301, dtype=np.float32)
    w = quant.convert(rng.standard_normal((180, 301), dtype=np.float32) * np.float32(0.2), fmt, 1)
    layer = kernels.transpose_linear({"weight": w, "bias": b})
    assert max_rel_err(matmul.matmul_rows(x, layer["weight_t"], b, gelu=True), spec.gelu(spec.linear(x, w, b))) < 1e-5
    assert max_rel_err(matmul.matmul_rows(x, layer["weight_t"], None, gelu=True), spec.gelu(spec.linear(x, w, np.zeros(301, np.float32)))) < 1e-5


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("N, K, M", [(17, 100, 37), (130, 96, 301), (23, 33, 8), (41, 300, 130)])
@pytest.mark.parametrize("then", ["bias", "gelu", "residual"])
@pytest.mark.parametrize("inline_values", [0, 1 << 19])    # inputs rounded in bands, or on the calling thread (matmul.ROUND_INLINE_VALUES)
def test_prefill_tiles_and_integer_dots_equal_the_spec(fmt, N, K, M, then, inline_values, monkeypatch):
    """Prefill's bf16 tiles and int8/int4 integer dots (each band's product written transposed, then
    finished): inputs not a multiple of 4 (a tail of single dots), rows not a multiple of 4 or of 8 (a
    partial tile or group), K not a multiple of 32 (a partial block). bf16's pairs run in blocks of 8 inputs
    against chunks of 4 rows here (the defaults cover every input and 64 KiB of rows): partial blocks
    and chunks too (bf16 panels, without vdpbf16ps: a partial panel and group). Tolerance: float32 sums in another order, 1e-5 relative; GELU as its kernel's."""
    monkeypatch.setattr(matmul, "TILE_INPUT_BYTES", 4 * K * 8)
    monkeypatch.setattr(matmul, "TILE_WEIGHT_BYTES", 2 * K * 4)
    monkeypatch.setattr(matmul, "ROUND_INLINE_VALUES", inline_values)
    x, b, start = (rng.standard_normal(s, dtype=np.float32) for s in ((N, K), M, (N, M)))
    w = quant.convert(rng.standard_normal((K, M), dtype=np.float32) * np.float32(0.2), fmt, 1)
    out = start.copy()
    matmul.matmul_into(x, kernels.rows(w), out, b, getattr(matmul, then.upper()))
    y = spec.linear(x, w, b)
    want = {"bias": y, "gelu": spec.gelu(y), "residual": start + y}[then]
    assert max_rel_err(out, want) < 1e-5


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("then", ["bias", "gelu", "residual"])
def test_integer_products_in_sub_bands_of_any_size_equal_each_other_bit_for_bit(fmt, then, monkeypatch):
    """A thread's band of groups of 8 rows is multiplied and finished matmul.sub_groups(N) groups by up to
    SUB_INPUTS inputs at a time: 1 group, 3 (the band's last sub-band partial) or the whole band at once,
    by all 37 inputs or 16 or 8 at a time (the last block partial), give the same bits (each output is one
    group's dot of one input, whichever block it falls in) and equal the spec within 1e-5 (float32 sums in
    another order). 299 rows: the last group partial."""
    N, K, M = 37, 100, 299
    x, b, start = (rng.standard_normal(s, dtype=np.float32) for s in ((N, K), M, (N, M)))
    w = quant.convert(rng.standard_normal((K, M), dtype=np.float32) * np.float32(0.2), fmt, 1)
    outs = []
    for sub, inputs in ((1, 37), (3, 16), (1000, 37), (2, 8), (1000, 16)):
        monkeypatch.setattr(matmul, "SUB_INPUTS", inputs)
        monkeypatch.setattr(matmul, "SUB_BYTES", sub * 4 * matmul.GROUP * (-(-min(N, inputs) // 16) * 16 + 16))
        assert matmul.sub_groups(N) == sub
        out = start.copy()
        matmul.matmul_into(x, kernels.rows(w), out, b, getattr(matmul, then.upper()))
        outs.append(out)
    assert all(np.array_equal(out, outs[0]) for out in outs[1:])
    y = spec.linear(x, w, b)
    assert max_rel_err(outs[0], {"bias": y, "gelu": spec.gelu(y), "residual": start + y}[then]) < 1e-5


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("shape", [(1, 60), (2, 3, 60), (1, 40, 60)])
def test_lm_head_on_quantized_weights(fmt, shape):
    x = rng.standard_normal(shape, dtype=np.float32)
    w = quant.convert(rng.standard_normal((1000, 60), dtype=np.float32), fmt, 0)
    assert max_rel_err(matmul.lm_head(x, kernels.head_rows(w)), spec.lm_head(x, w)) < 1e-5


@pytest.mark.parametrize("fmt, tol, min_cosine", [("bf16", 1e-2, 0.9999), ("int8", 1e-2, 0.999), ("int4", 1e-2, 0.97)])
def test_quantized_model_numba_matches_numpy_and_stays_close_to_fp32(tiny_params, fmt, tol, min_cosine):
    """Every format rounds each matmul's inputs (int8/int4 to int8 levels, bf16 to bf16): where the two
    paths' ~1e-6 differences straddle a rounding midpoint, that input moves by a whole level (1/127 of
    its block's peak; a bf16 step, 2**-8 of it), and later layers carry it on: ~1e-3 to 2e-3 measured,
    1e-2 allowed. Each kernel alone equals the spec within 1e-5 (test_linear_on_quantized_weights)."""
    params = quant.quantize(tiny_params, fmt)
    ref = npgpt.Model(params, TINY).forward(IDS)
    assert max_rel_err(npgpt.Model(params, TINY, backend="numba").forward(IDS), ref) < tol
    fp32 = npgpt.Model(tiny_params, TINY).forward(IDS).astype(np.float64)
    cosine = (ref * fp32).sum() / np.linalg.norm(ref) / np.linalg.norm(fp32)
    assert cosine >= min_cosine


def test_numba_int8_model_holds_no_float32_matmul_weights(tiny_params):
    prepared = npgpt.Model(quant.quantize(tiny_params, "int8"), TINY, backend="numba").params
    for name, w in weights.flatten(prepared).items():
        if name.endswith("weight_t") or name == "lm_head.weight":
            assert isinstance(w, quant.Int8Rows) and w.packed.dtype == np.uint8, name


def test_numba_int4_model_holds_packed_nibbles_and_saves_back_the_same_values(tiny_params, tmp_path):
    params = quant.quantize(tiny_params, "int4")
    model = npgpt.Model(params, TINY, backend="numba")
    for name, w in weights.flatten(model.params).items():
        if name.endswith("weight_t") or name == "lm_head.weight":
            assert isinstance(w, quant.Int4Rows) and w.packed.dtype == np.uint8, name
            assert w.nbytes == 8 * -(-w.shape[0] // 8) * -(-w.shape[1] // 32) * (16 + 2), name   # 16 bytes of nibbles + a float16 scale per 32 inputs (q4_0's 18), rows in 8s
    model.save(tmp_path)                                   # unpacked again from the kernels' layout, then packed into the file
    back = npgpt.load(tmp_path)
    for name, w in weights.flatten(params).items():
        got = weights.flatten(back.params)[name]
        if isinstance(w, quant.Int4):
            assert isinstance(got, quant.Int4) and np.array_equal(got.q, w.q) and np.array_equal(got.scale, w.scale), name


@pytest.mark.parametrize("pairs", [True, False])
def test_numba_bf16_model_holds_its_cpus_layout_and_saves_back_the_same_bits(tiny_params, tmp_path, monkeypatch, pairs):
    """bf16 weights as the kernels keep them: rows (bits [out, in]) where the CPU has vdpbf16ps, else
    panels of 16 rows (quant.BF16Panels: TINY's vocabulary is no multiple of 16, a partial panel), the
    same bytes give or take the padding; model.save unpacks them to the very bits that were loaded."""
    from npgpt.kernels import jit
    monkeypatch.setattr(jit, "BF16_PAIRS", pairs)
    params = quant.quantize(tiny_params, "bf16")
    model = npgpt.Model(params, TINY, backend="numba")
    for name, w in weights.flatten(model.params).items():
        if name.endswith("weight_t") or name == "lm_head.weight":
            assert isinstance(w, quant.BF16 if pairs else quant.BF16Panels), name
            assert w.nbytes == 2 * w.shape[1] * (w.shape[0] if pairs else -(-w.shape[0] // 16) * 16), name
    model.save(tmp_path)
    back = npgpt.load(tmp_path, weights="bf16")             # as stored (the default widens to float32)
    for name, w in weights.flatten(params).items():
        if isinstance(w, quant.BF16):
            got = weights.flatten(back.params)[name]
            assert isinstance(got, quant.BF16) and np.array_equal(got.bits, w.bits), name


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_quantize_command_round_trips_without_requantizing(tmp_path, tiny_file, fmt):
    out = tmp_path / "q" / "model.safetensors"
    out.parent.mkdir()
    assert main(["quantize", str(tiny_file), str(out), "--dtype", fmt]) == 0
    expected = quant.quantize(npgpt.load(tiny_file).params, fmt)
    loaded = npgpt.load(out, weights=fmt)
    assert loaded.info.format == fmt and loaded.weights == fmt
    for name, w in weights.flatten(expected).items():
        got = weights.flatten(loaded.params)[name]
        assert type(got) is type(w), name
        for a, b in zip(got if isinstance(w, tuple) else [got], w if isinstance(w, tuple) else [w]):
            assert np.array_equal(a, b), name                  # bit for bit: nothing was re-quantized
    assert np.array_equal(loaded.forward(IDS), npgpt.Model(expected, TINY).forward(IDS))


def test_quantize_refuses_to_overwrite_its_input(tiny_file, capsys):
    assert main(["quantize", str(tiny_file), str(tiny_file), "--dtype", "int8"]) == 1
    assert "is the input checkpoint" in capsys.readouterr().err
    assert npgpt.load(tiny_file).weights == "fp32"


def test_int4_checkpoint_stores_packed_rows_and_block_scales(tmp_path, tiny_file):
    out = tmp_path / "int4" / "model.safetensors"
    out.parent.mkdir()
    assert main(["quantize", str(tiny_file), str(out), "--dtype", "int4"]) == 0
    f = weights.SafetensorsFile(out)
    c_attn, head = f.tensors["h.0.attn.c_attn.weight"], f.tensors["lm_head.weight"]
    assert c_attn.dtype == "U8" and c_attn.shape == (180, 32) and f.tensors["h.0.attn.c_attn.weight_scale"].shape == (180, 2)
    assert head.dtype == "U8" and head.shape == (1000, 32) and f.tensors["lm_head.weight_scale"].shape == (1000, 2)
    assert f.metadata["npgpt.weights"] == "int4" and f.metadata["npgpt.int4_block"] == "32"
    assert f.tensors["h.0.attn.c_attn.weight_scale"].dtype == f.tensors["lm_head.weight_scale"].dtype == "F16"   # as q4_0's
    assert npgpt.load(out).weights == "int4"


def test_an_int4_checkpoint_with_float32_scales_loads_them_as_stored_and_runs_on_both_backends(tmp_path, tiny_file):
    """Files quantized before scales were float16 hold F32 ones: they load as float32 (not rounded to
    float16: the model computes what it computed when it was written), the kernels read them as they are
    (jit.dot_q4 takes either), and the numba model equals the spec on them as on float16 ones (1e-2, as
    test_fused_prefill_equals_the_spec: an input rounded to the neighbouring int8 level)."""
    out = tmp_path / "int4" / "model.safetensors"
    out.parent.mkdir()
    assert main(["quantize", str(tiny_file), str(out), "--dtype", "int4"]) == 0
    scales = [n for n in weights.SafetensorsFile(out).tensors if n.endswith("_scale")]
    older = np.float32(1 + 2.0**-15)                       # a factor no float16 scale times it is a float16 again
    _rewrite(out, lambda t: t.update({n: ("F32", t[n][1].astype(np.float32) * older) for n in scales}))
    spec_model, fused = npgpt.load(out), npgpt.load(out, backend="numba")
    w, stored = spec_model.params["h"][0]["attn"]["c_attn"]["weight"], weights.SafetensorsFile(out).array("h.0.attn.c_attn.weight_scale")
    assert w.scale.dtype == np.float32 and np.array_equal(w.scale, stored.T)
    assert not np.array_equal(w.scale.astype(np.float16).astype(np.float32), w.scale)   # not float16 values: none was rounded
    assert fused.params["h"][0]["attn"]["c_attn"]["weight_t"].scale.dtype == np.float32
    ids = rng.integers(0, TINY.n_vocab, size=(2, 24))
    assert max_rel_err(fused.forward(ids), spec_model.forward(ids)) < 1e-2   # prefill
    caches = [spec_model.new_cache(batch=2), fused.new_cache(batch=2)]
    for m, cache in zip((spec_model, fused), caches):
        m.forward(ids, cache=cache)
    step = [m.forward(ids[:, :1], cache=cache) for m, cache in zip((spec_model, fused), caches)]   # decode
    assert max_rel_err(step[1], step[0]) < 1e-2


def test_int4_scales_are_float16_and_a_weight_beyond_its_range_is_refused():
    w = rng.standard_normal((64, 3), dtype=np.float32)
    w[:32, 1] *= np.float32(1e-8)                          # a block whose scale is below float16's smallest: stored as zeros
    q = quant.to_int4(w, 0)
    assert q.scale.dtype == np.float16 and np.all(q.q[:32, 1] == 0) and np.all(np.isfinite(quant.dequantize(q)))
    assert np.abs(quant.dequantize(q)[:32, 1]).max() == 0 and np.abs(w[:32, 1]).max() < 1e-7
    assert np.abs(q.q[32:, 1]).max() == 8 and q.scale[1, 1] != 0   # the block below it is quantized as usual
    w[5, 2] = np.float32(6e5)                              # / 8 > 65504, float16's largest
    with pytest.raises(npgpt.InputError, match="int4 scales are float16"):
        quant.to_int4(w, 0)


def test_int8_checkpoint_loads_as_int8_by_default_and_names_its_scales(tmp_path, tiny_file):
    out = tmp_path / "int8" / "model.safetensors"
    out.parent.mkdir()
    assert main(["quantize", str(tiny_file), str(out), "--dtype", "int8"]) == 0
    names = weights.SafetensorsFile(out).tensors
    assert names["h.0.attn.c_attn.weight"].dtype == "I8" and names["h.0.attn.c_attn.weight_scale"].shape == (180,)
    assert names["lm_head.weight"].dtype == "I8" and names["lm_head.weight_scale"].shape == (1000,)
    assert names["wte.weight"].dtype == "F32" and names["h.0.ln_1.weight"].dtype == "F32"
    assert npgpt.load(out).weights == "int8"


def test_bf16_checkpoint_loads_as_bf16_bits_without_float32_round_trip(tmp_path, tiny_params):
    weights.save(tiny_params, tmp_path / "model.safetensors", TINY, dtype="BF16")
    m = npgpt.load(tmp_path, weights="bf16")
    stored = weights.SafetensorsFile(tmp_path / "model.safetensors")
    w = m.params["h"][1]["mlp"]["c_fc"]["weight"]
    assert isinstance(w, quant.BF16) and not w.bits.flags.owndata             # a view of the file, not a copy
    assert np.array_equal(w.bits, stored.array("h.1.mlp.c_fc.weight"))
    assert np.array_equal(m.params["lm_head"]["weight"].bits, stored.array("wte.weight"))   # tied head


def test_unknown_weights_format_is_refused(tiny_file):
    with pytest.raises(npgpt.InputError, match="unknown weights format 'int3'"):
        npgpt.load(tiny_file, weights="int3")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc (Linux)")
def test_loading_int4_leaves_only_the_packed_weights_resident(tmp_path):
    """Unpacking the file's rows and tiling them frees several times the weights' size; glibc kept that
    heap (loading gpt2 left 104 MiB of it beside 77 MiB of weights) until the loader handed it back."""
    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    cfg = npgpt.Config(n_vocab=4096, n_ctx=64, n_embd=768, n_head=12, n_layer=6)
    npgpt.random_model(cfg, seed=0, weights="int4").save(tmp_path)
    npgpt.load(tmp_path, backend="numba")                  # imports, compiled code, first-use allocations
    before = rss_mb()
    model = npgpt.load(tmp_path, backend="numba")
    packed = sum(w.nbytes for name, w in weights.flatten(model.params).items() if name.endswith("weight_t") or name == "lm_head.weight")
    assert rss_mb() - before < packed / 2**20 + 8          # measured: the packed rows + 0.05 MiB; without handing back: + 20 MiB


def _rewrite(path, change=lambda tensors: None, metadata=None):   # a checkpoint's tensors, changed, written back
    f = weights.SafetensorsFile(path)
    tensors = {name: (t.dtype, np.array(f.array(name))) for name, t in f.tensors.items()}
    meta = {**f.metadata, **(metadata or {})}
    del f
    change(tensors)
    checkpoint.write(path, tensors, meta)


@pytest.mark.parametrize("fmt, change, metadata, message", [
    ("int4", lambda t: t.pop("h.0.attn.c_attn.weight_scale"), None, "int4 tensor 'h.0.attn.c_attn.weight' has no 'h.0.attn.c_attn.weight_scale'"),
    ("int4", lambda t: t.update({"h.0.mlp.c_fc.weight_scale": ("F32", np.ones((240, 1), np.float32))}), None,
     r"'h.0.mlp.c_fc.weight_scale' is F32 \(240, 1\); int4 scales must be F16 \(or F32\) \(240, 2\)"),
    ("int4", lambda t: t.update({"h.0.mlp.c_fc.weight_scale": ("I32", np.ones((240, 2), np.int32))}), None,
     r"'h.0.mlp.c_fc.weight_scale' is I32 \(240, 2\); int4 scales must be F16 \(or F32\) \(240, 2\)"),
    ("int4", lambda t: t.update({"h.1.mlp.c_proj.weight": ("U8", np.zeros((60, 16), np.uint8))}), None,
     r"'h.1.mlp.c_proj.weight' has shape \(60, 16\)"),
    ("int4", lambda t: None, {"npgpt.int4_block": "64"}, "int4 blocks of 64 inputs; npgpt reads blocks of 32"),
    ("int8", lambda t: t.pop("lm_head.weight_scale"), None, "int8 tensor 'lm_head.weight' has no 'lm_head.weight_scale'"),
    ("int8", lambda t: t.update({"lm_head.weight_scale": ("F32", np.ones(999, np.float32))}), None,
     r"int8 scales must be F32 \(1000,\)"),
])
def test_a_quantized_checkpoint_with_bad_scales_or_packing_is_refused_by_name(tmp_path, tiny_file, fmt, change, metadata, message):
    out = tmp_path / "q" / "model.safetensors"
    out.parent.mkdir()
    assert main(["quantize", str(tiny_file), str(out), "--dtype", fmt]) == 0
    _rewrite(out, change, metadata)
    with pytest.raises(npgpt.CheckpointError, match=message):
        npgpt.load(out)
