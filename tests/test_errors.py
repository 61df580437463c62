"""Bad input -> one typed error (NpgptError family) whose message names the culprit."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

import npgpt
from npgpt import weights
from npgpt import CheckpointError, ConfigError, InputError, NpgptError
from npgpt.cli import main
from npgpt.weights.checkpoint import write
from conftest import TINY


def flat_of(tiny):
    return {n: ("F32", a) for n, a in weights.flatten(tiny.params).items() if n != "lm_head.weight"}


def write_model(tmp_path, flat):                           # n_embd=60 is no released size: config.json says n_head
    write(tmp_path / "m.safetensors", flat)
    (tmp_path / "config.json").write_text(json.dumps({"n_head": TINY.n_head}))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        npgpt.load(tmp_path / "nope.safetensors")


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        npgpt.load(tmp_path)


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match=".safetensors checkpoints only"):
        npgpt.load(tmp_path / "pytorch_model.bin")


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1000])
def test_truncated_file(tiny_file, keep):
    data = tiny_file.read_bytes()
    tiny_file.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="model.safetensors: .*(too short|does not fit|outside|truncated)"):
        npgpt.load(tiny_file)


def test_corrupt_header_json(tmp_path):
    header = b'{"wte.weight": {"dtype": "F32", '
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        npgpt.load(tmp_path / "bad.safetensors")


def test_header_byte_count_disagrees_with_shape(tmp_path):
    header = json.dumps({"wte.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"'wte.weight': F32 \(4, 4\) needs 64 bytes but data_offsets span 60"):
        npgpt.load(tmp_path / "bad.safetensors")


def test_overlapping_tensors(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 24)
    with pytest.raises(CheckpointError, match="overlap"):
        npgpt.load(tmp_path / "bad.safetensors")


def test_tensor_with_wrong_shape(tmp_path, tiny):
    flat = flat_of(tiny)
    flat["h.1.attn.c_attn.weight"] = ("F32", flat["h.1.attn.c_attn.weight"][1].T.copy())   # transposed: Linear layout
    write_model(tmp_path, flat)
    with pytest.raises(CheckpointError, match=r"'h.1.attn.c_attn.weight' has shape \(180, 60\).* needs \(60, 180\)"):
        npgpt.load(tmp_path / "m.safetensors")


def test_tensor_with_wrong_dtype(tmp_path, tiny):
    flat = flat_of(tiny)
    flat["ln_f.bias"] = ("I32", np.zeros(60, np.int32))
    write_model(tmp_path, flat)
    with pytest.raises(CheckpointError, match="'ln_f.bias' has dtype I32"):
        npgpt.load(tmp_path / "m.safetensors")


def test_missing_tensor_is_named(tmp_path, tiny):
    flat = flat_of(tiny)
    del flat["h.2.mlp.c_fc.bias"]
    write_model(tmp_path, flat)
    with pytest.raises(CheckpointError, match="missing tensor 'h.2.mlp.c_fc.bias'"):
        npgpt.load(tmp_path / "m.safetensors")


def test_unexpected_tensor_is_named(tmp_path, tiny):
    flat = flat_of(tiny)
    flat["classifier.weight"] = ("F32", np.zeros((2, 60), np.float32))
    write_model(tmp_path, flat)
    with pytest.raises(CheckpointError, match="unexpected tensor 'classifier.weight'"):
        npgpt.load(tmp_path / "m.safetensors")


def test_config_json_disagreeing_with_tensors(tmp_path, tiny):
    weights.save(tiny.params, tmp_path / "model.safetensors", TINY)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "n_layer": 12}))
    with pytest.raises(ConfigError, match="n_layer=12 but the checkpoint's tensors say 3"):
        npgpt.load(tmp_path)


def test_unknown_n_head_without_config_json(tiny_file):
    with pytest.raises(ConfigError, match="cannot infer n_head for n_embd=60"):
        (tiny_file.parent / "config.json").unlink()
        npgpt.load(tiny_file)


@pytest.mark.parametrize("ids, message", [
    ([5, 1000], "token id 1000 at position 1 .* outside the vocabulary \\[0, 1000\\)"),
    ([[3, -1]], "token id -1 at position 1"),
    ([], "empty input"),
    ([[1, 2], [3]], "must form a \\[T\\] or \\[B, T\\] array"),
    ([1.5, 2.0], "must be integers"),
    (np.zeros((1, 1, 2), int), "must be \\[T\\] or \\[B, T\\]"),
    (np.zeros(65, int), "65 tokens .* exceeds the context of 64"),
])
def test_bad_token_ids(tiny, ids, message):
    with pytest.raises(InputError, match=message):
        tiny.forward(ids)


def test_cache_overflow_and_batch_mismatch(tiny):
    cache = tiny.new_cache(batch=2)
    tiny.forward(np.zeros((2, 60), int), cache=cache)
    with pytest.raises(InputError, match="66 tokens \\(60 cached \\+ 6 new\\)"):
        tiny.forward(np.zeros((2, 6), int), cache=cache)
    with pytest.raises(InputError, match="batch size 1 but the KV cache was made for batch size 2"):
        tiny.forward(np.zeros((1, 1), int), cache=cache)


def test_empty_prompt(tiny):
    with pytest.raises(InputError, match="empty prompt"):
        tiny.generate("")


def test_prompt_longer_than_context(tiny):
    with pytest.raises(InputError, match="exceeds the context of 64"):
        tiny.generate(list(range(70)), max_new_tokens=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be"), ({"temperature": float("nan")}, "temperature must be"),
    ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"), ({"top_p": 1.5}, "top_p must be"),
    ({"top_k": -1}, "top_k must be an integer >= 0"), ({"top_k": 2.5}, "top_k must be"),
    ({"max_new_tokens": -3}, "max_new_tokens must be"),
])
def test_invalid_sampling_arguments(tiny, kwargs, message):
    with pytest.raises(InputError, match=message):
        tiny.generate([1, 2, 3], **kwargs)


def test_every_error_is_an_npgpt_error():
    for cls in (CheckpointError, ConfigError, InputError, npgpt.TokenizerError):
        assert issubclass(cls, NpgptError)


def test_cli_prints_one_line_and_exits_nonzero(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("npgpt: error:") and "missing.safetensors" in err


def test_cli_bad_sampling_argument_is_one_line(tiny_file):
    r = subprocess.run([sys.executable, "-m", "npgpt", "generate", "--weights", str(tiny_file), "--prompt", "x",
                        "--top-p", "2"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["npgpt: error: top_p must be in (0, 1]; got 2.0"]
