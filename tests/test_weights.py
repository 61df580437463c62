"""Loading checkpoints: layouts HF uses, dtypes, zero-copy, config inference."""

import json

import numpy as np
import pytest
import safetensors.numpy

import npgpt
from npgpt import weights
from npgpt.weights.checkpoint import narrow, widen, write
from npgpt.weights.gpt2 import infer_config
from conftest import TINY, max_rel_err

IDS = np.arange(0, 900, 37)


def test_save_then_load_round_trips(tiny, tiny_file):
    loaded = npgpt.load(tiny_file)
    assert loaded.config == TINY
    for name, a in weights.flatten(tiny.params).items():
        assert np.array_equal(weights.flatten(loaded.params)[name], a), name


def test_f32_tensors_are_memory_mapped_not_copied(tiny_file):
    w = npgpt.load(tiny_file).params["h"][0]["attn"]["c_attn"]["weight"]
    assert w.dtype == np.float32 and not w.flags.owndata and not w.flags.writeable


def test_our_files_read_by_safetensors_package(tiny, tiny_file):
    theirs = safetensors.numpy.load_file(str(tiny_file))
    assert "lm_head.weight" not in theirs                  # tied head is not written
    assert np.array_equal(theirs["h.2.mlp.c_fc.weight"], tiny.params["h"][2]["mlp"]["c_fc"]["weight"])


def test_prefixed_and_unprefixed_names_give_same_logits(tmp_path, tiny, tiny_file):
    weights.save(tiny.params, tmp_path / "prefixed.safetensors", prefix="transformer.")
    a = npgpt.load(tmp_path / "prefixed.safetensors")
    assert a.info.prefix == "transformer."
    assert np.array_equal(a.forward(IDS), npgpt.load(tiny_file).forward(IDS))


def test_explicit_lm_head_is_used(tmp_path, tiny):
    head = np.random.default_rng(1).standard_normal((TINY.n_vocab, TINY.n_embd), dtype=np.float32)
    params = {**tiny.params, "lm_head": {"weight": head}}
    weights.save(params, tmp_path / "untied.safetensors", TINY)
    m = npgpt.load(tmp_path / "untied.safetensors")
    assert not m.info.tied
    assert max_rel_err(m.forward(IDS), npgpt.Model(params, TINY).forward(IDS)) < 1e-6
    assert max_rel_err(m.forward(IDS), tiny.forward(IDS)) > 1e-2   # and it does change the logits


def test_tied_explicit_head_equal_to_wte_matches_tied(tmp_path, tiny, tiny_file):
    params = {**tiny.params, "lm_head": {"weight": tiny.params["wte"]["weight"].copy()}}
    weights.save(params, tmp_path / "explicit.safetensors")
    assert np.array_equal(npgpt.load(tmp_path / "explicit.safetensors").forward(IDS), npgpt.load(tiny_file).forward(IDS))


@pytest.mark.parametrize("dtype, tol", [("F16", 2e-2), ("BF16", 1e-1)])
def test_half_precision_checkpoints_load_as_float32(tmp_path, tiny, dtype, tol):
    weights.save(tiny.params, tmp_path / "half.safetensors", TINY, dtype=dtype)
    m = npgpt.load(tmp_path / "half.safetensors")
    w = m.params["h"][1]["mlp"]["c_proj"]["weight"]
    assert w.dtype == np.float32 and m.info.dtypes == {dtype: len(weights.tensor_shapes(TINY))}
    ref = tiny.params["h"][1]["mlp"]["c_proj"]["weight"]
    assert np.array_equal(w, widen(narrow(ref, dtype), dtype))                 # exactly the stored values, widened
    logits = m.forward(IDS)
    assert logits.dtype == np.float32
    # fp16 keeps 11 significant bits, bf16 8: the logits move by that much, and no more
    assert max_rel_err(logits, tiny.forward(IDS)) < tol


def test_bf16_rounds_to_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-9, -2.5], dtype=np.float32)
    bits = narrow(x, "BF16")
    assert widen(bits, "BF16").tolist() == [1.0, 1.0, 1.0 + 2**-6, 1.0, -2.5]


def test_attention_mask_buffers_are_ignored(tmp_path, tiny, tiny_file):
    flat = {n: ("F32", a) for n, a in weights.flatten(tiny.params).items() if n != "lm_head.weight"}
    flat["h.0.attn.bias"] = ("F32", np.tril(np.ones((1, 1, 64, 64), np.float32)))
    flat["h.0.attn.masked_bias"] = ("F32", np.array(-1e4, np.float32))
    write(tmp_path / "buffers.safetensors", flat)
    m = npgpt.load(tmp_path / "buffers.safetensors")
    assert m.info.ignored == ["h.0.attn.bias", "h.0.attn.masked_bias"]
    assert np.array_equal(m.forward(IDS), npgpt.load(tiny_file).forward(IDS))


def test_n_head_taken_from_config_json(tmp_path, tiny):
    cfg = npgpt.Config(n_vocab=1000, n_ctx=64, n_embd=60, n_head=4, n_layer=3)
    weights.save(tiny.params, tmp_path / "model.safetensors", cfg)
    m = npgpt.load(tmp_path)
    assert m.config.n_head == 4 and "config.json" in m.info.config_source
    hf = json.loads((tmp_path / "config.json").read_text())   # both context keys, as HF's gpt2 config.json
    assert hf["n_positions"] == hf["n_ctx"] == 64


def test_n_head_and_eps_from_known_gpt2_sizes_without_config_json():
    shapes = {"wte.weight": (50257, 1024), "wpe.weight": (1024, 1024), **{f"h.{i}.ln_1.weight": (1024,) for i in range(24)}}
    cfg, source = infer_config(shapes, shapes.get, None, None)
    assert cfg == npgpt.preset("gpt2-medium")
    assert "gpt2-medium" in source and "no config.json" in source


def test_layer_norm_epsilon_from_config_json(tmp_path, tiny):
    weights.save(tiny.params, tmp_path / "model.safetensors", TINY)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "layer_norm_epsilon": 1e-3}))
    assert npgpt.load(tmp_path).config.eps == 1e-3
