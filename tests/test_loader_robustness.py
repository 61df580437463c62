"""Every file either loads correctly or gets a CheckpointError/ConfigError naming the problem.

Named regression tests for the defects a mutation campaign found, then a seeded fuzz test over a few
thousand mutations of a small valid checkpoint. "Loads correctly" is checked against the safetensors
library: whatever npgpt accepts, it reads and npgpt's arrays equal its arrays.
"""

import json
import os
import resource
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import safetensors.numpy

import npgpt
from npgpt import CheckpointError, ConfigError, InputError, NpgptError
from npgpt import weights
from npgpt.weights.checkpoint import write

MICRO = npgpt.Config(n_vocab=32, n_ctx=8, n_embd=8, n_head=2, n_layer=2)


def micro_flat(seed=0):
    params = weights.random_params(MICRO, seed)
    return {n: ("F32", a) for n, a in weights.flatten(params).items() if n != "lm_head.weight"}


def split(blob):                                           # file bytes -> (header dict, data bytes)
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header, data, raw=None):                          # (header dict or raw JSON bytes, data) -> file bytes
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.fixture
def micro(tmp_path):
    """A valid micro checkpoint directory; returns (dir, file bytes)."""
    write(tmp_path / "model.safetensors", micro_flat())
    (tmp_path / "config.json").write_text(json.dumps({"n_head": MICRO.n_head}))
    return tmp_path, (tmp_path / "model.safetensors").read_bytes()


def load_bytes(folder, blob):
    (folder / "model.safetensors").write_bytes(blob)
    return npgpt.load(folder)


def test_micro_checkpoint_loads(micro):
    folder, _ = micro
    assert npgpt.load(folder).config == MICRO


def test_stray_huge_layer_index_fails_fast_with_bounded_memory(micro):
    """One extra entry h.100000000.attn.bias used to build a dict of 1.2e9 names (3 GiB in 27 s). In a child
    capped at 1 GiB of address space beyond what it has, a regression dies of MemoryError instead of passing."""
    folder, blob = micro
    header, data = split(blob)
    header["h.100000000.attn.bias"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    (folder / "model.safetensors").write_bytes(join(header, data))
    code = ("import resource, npgpt\n"
            "soft = 2**30 + int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
            "resource.setrlimit(resource.RLIMIT_AS, (soft, resource.RLIM_INFINITY))\n"
            f"try:\n    npgpt.load({str(folder)!r})\nexcept npgpt.CheckpointError as e:\n    print('CheckpointError:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "CheckpointError:" in r.stdout and "h.100000000" in r.stdout and "h.2" in r.stdout


def test_header_length_off_by_one_is_rejected_not_read_shifted(micro):
    folder, blob = micro
    (n,) = struct.unpack("<Q", blob[:8])
    assert blob[8 + n - 1 : 8 + n] == b" "                 # the writer's padding: JSON stays valid one byte shorter
    shifted = struct.pack("<Q", n - 1) + blob[8:]
    with pytest.raises(CheckpointError, match="data section has .* bytes but the tensors cover"):
        load_bytes(folder, shifted)
    with pytest.raises(Exception):                         # the reference library rejects the same file
        safetensors.numpy.load(shifted)


@pytest.mark.parametrize("gap", ["before", "trailing"])
def test_bytes_outside_every_tensor_are_rejected(micro, gap):
    folder, blob = micro
    header, data = split(blob)
    if gap == "trailing":
        blob = join(header, data + b"\0" * 4)
        match = "tensors cover"
    else:
        for entry in header.values():
            if isinstance(entry, dict) and "data_offsets" in entry:
                entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]
        blob = join(header, b"\0" * 4 + data)
        match = "4 bytes before tensor"
    with pytest.raises(CheckpointError, match=match):
        load_bytes(folder, blob)


def entry_mutation(name, key, value):
    def mutate(header):
        header[name][key] = value
    return mutate


@pytest.mark.parametrize("mutate, error, message", [
    (entry_mutation("wte.weight", "shape", [32 * 8]), CheckpointError, r"'wte.weight' has shape \(256,\); an embedding table is 2-D"),
    (entry_mutation("wpe.weight", "shape", [2, 4, 8]), CheckpointError, r"'wpe.weight' has shape \(2, 4, 8\)"),
    (entry_mutation("ln_f.bias", "dtype", ["F32"]), CheckpointError, r"'ln_f.bias': unknown dtype \['F32'\]"),
    (entry_mutation("ln_f.bias", "shape", [2**63, 0]), CheckpointError, r"'ln_f.bias'.*needs 0 bytes but data_offsets span 32"),
    (entry_mutation("ln_f.bias", "shape", [2**64 + 8]), CheckpointError, r"'ln_f.bias'.*needs more bytes than the file holds"),
    (entry_mutation("ln_f.bias", "shape", [True, 8]), CheckpointError, r"'ln_f.bias': shape .* not a list of non-negative integers"),
])
def test_malformed_header_entries_get_checkpoint_errors(micro, mutate, error, message):
    folder, blob = micro
    header, data = split(blob)
    mutate(header)
    with pytest.raises(error, match=message):
        load_bytes(folder, join(header, data))


def test_shape_whose_int64_product_wraps_to_zero(micro):
    folder, blob = micro
    header, data = split(blob)
    header["extra"] = {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}
    with pytest.raises(CheckpointError, match="'extra': F32 .* needs more bytes than the file holds but data_offsets span 0"):
        load_bytes(folder, join(header, data))


def test_deeply_nested_header(micro):
    folder, _ = micro
    raw = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(CheckpointError, match="nested too deeply|not valid JSON"):
        load_bytes(folder, join(None, b"", raw))


def test_integer_beyond_pythons_digit_limit_in_header(micro):
    folder, blob = micro
    header, data = split(blob)
    text = json.dumps(header).replace('"shape": [8]', '"shape": [' + "9" * 5000 + "]", 1).encode()
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_bytes(folder, join(None, data, text))


def test_layer_index_beyond_digit_limit(micro):
    folder, blob = micro
    header, data = split(blob)
    header["h." + "9" * 5000 + ".attn.bias"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    with pytest.raises(CheckpointError, match="layer index of 5000 digits"):
        load_bytes(folder, join(header, data))


def test_duplicate_key_is_named(micro):
    folder, blob = micro
    header, data = split(blob)
    entry = json.dumps({"dtype": "F32", "shape": [8], "data_offsets": header["ln_f.bias"]["data_offsets"]})
    text = json.dumps(header)[:-1] + ', "ln_f.bias": ' + entry + "}"
    with pytest.raises(CheckpointError, match="header names 'ln_f.bias' twice"):
        load_bytes(folder, join(None, data, text.encode()))


@pytest.mark.parametrize("eps", ['"small"', "[1e-5]", "1e400", "-1e-5", "0", "true", "NaN"])
def test_bad_layer_norm_epsilon(micro, eps):
    folder, _ = micro
    (folder / "config.json").write_text('{"n_head": 2, "layer_norm_epsilon": ' + eps + "}")
    with pytest.raises(ConfigError, match="layer_norm_epsilon must be a finite positive number|cannot read config.json"):
        npgpt.load(folder)


def test_huge_integer_in_config_json(micro):
    folder, _ = micro
    (folder / "config.json").write_text('{"n_head": ' + "9" * 5000 + "}")
    with pytest.raises(ConfigError, match="cannot read config.json"):
        npgpt.load(folder)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_is_named_at_load(micro, value):
    folder, _ = micro
    flat = micro_flat()
    flat["h.1.mlp.c_fc.weight"][1][3, 5] = value
    write(folder / "model.safetensors", flat)
    with pytest.raises(CheckpointError, match=r"'h.1.mlp.c_fc.weight' holds 1 non-finite values .* index \(3, 5\)"):
        npgpt.load(folder)


def test_non_finite_bf16_weight_is_named(micro):
    folder, _ = micro
    params = weights.random_params(MICRO, 0)
    params["h"][0]["attn"]["c_proj"]["weight"][0, 0] = np.inf
    weights.save(params, folder / "model.safetensors", dtype="BF16")
    with pytest.raises(CheckpointError, match="'h.0.attn.c_proj.weight' holds 1 non-finite"):
        npgpt.load(folder, weights="bf16")


def test_kv_cache_of_another_model_gets_a_clear_error():
    small, other = npgpt.random_model(MICRO), npgpt.random_model(npgpt.Config(n_vocab=32, n_ctx=8, n_embd=8, n_head=4, n_layer=2))
    with pytest.raises(InputError, match=r"KV cache was made for another model: n_head 4 \(model: 2\), head_dim 2 \(model: 4\)"):
        small.forward([1, 2], cache=other.new_cache())


def shard(folder, n_shards=2, prefix="transformer."):
    """Write the micro model as save_pretrained shards it: model-0000i-of-0000n.safetensors + index."""
    flat = {prefix + n: t for n, t in micro_flat().items()}
    names = list(flat)
    weight_map = {}
    for i in range(n_shards):
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: flat[n] for n in names[i::n_shards]}
        write(folder / file, part)
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"n_head": MICRO.n_head}))
    return weight_map


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir(), sharded.mkdir()
    write(single / "model.safetensors", micro_flat())
    (single / "config.json").write_text(json.dumps({"n_head": MICRO.n_head}))
    shard(sharded)
    a, b = npgpt.load(single), npgpt.load(sharded)
    assert a.config == b.config
    ids = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(a.forward(ids), b.forward(ids))
    wte = b.params["wte"]["weight"]
    assert not wte.flags.owndata and not wte.flags.writeable       # memory-mapped, as a single file is
    assert npgpt.load(sharded / "model.safetensors.index.json").config == MICRO


def test_shard_index_disagreeing_with_shards(tmp_path):
    weight_map = shard(tmp_path)
    weight_map["ln_f.bias"] = weight_map.pop("transformer.ln_f.bias")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="holds tensor 'transformer.ln_f.bias' but the index puts it in None"):
        npgpt.load(tmp_path)


def test_shard_index_naming_a_path_outside_the_directory(tmp_path):
    weight_map = shard(tmp_path)
    weight_map["transformer.ln_f.bias"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="is not a file name in the index's directory"):
        npgpt.load(tmp_path)


def test_missing_shard_is_named(tmp_path):
    shard(tmp_path)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: no such file"):
        npgpt.load(tmp_path)


# ---- the fuzz test ----------------------------------------------------------------------------------

WEIRD = [None, True, -1, 0, 1, 7, 2**31, 2**63, 2**64, -(2**63), 1.5, float("inf"), "", "F32", "BF16", "I8", "x" * 300,
         [], [0], [1, 2], [-1], [2**62, 4], [[1]], {}, {"a": 1}, [0, 0], [0, 2**70]]


def mutate(rng, blob, names):
    """One random mutation of the file: header values, keys, JSON text, the length field, bytes, or size."""
    header, data = split(blob)
    kind = rng.integers(9)
    name = names[rng.integers(len(names))]
    if kind == 0:                                          # a field of an entry gets a weird value
        key = ["dtype", "shape", "data_offsets"][rng.integers(3)]
        header[name][key] = WEIRD[rng.integers(len(WEIRD))]
    elif kind == 1:                                        # an entry loses a field or becomes a weird value
        if rng.random() < 0.5:
            del header[name][["dtype", "shape", "data_offsets"][rng.integers(3)]]
        else:
            header[name] = WEIRD[rng.integers(len(WEIRD))]
    elif kind == 2:                                        # rename, drop, or add an entry
        choice = rng.integers(3)
        if choice == 0:
            header[f"h.{[1, 2, 3, 17, 10**8][rng.integers(5)]}.{name.split('.', 2)[-1]}"] = header.pop(name)
        elif choice == 1:
            del header[name]
        else:
            header[f"h.{rng.integers(0, 10**9)}.attn.bias"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    elif kind == 3:                                        # an offset moves by a few bytes
        b, e = header[name]["data_offsets"]
        d = int(rng.integers(-8, 9))
        header[name]["data_offsets"] = [b + d, e + d] if rng.random() < 0.5 else [b, e + d]
    elif kind == 4:                                        # a shape changes but keeps its size or not
        header[name]["shape"] = [int(d) for d in rng.permutation(header[name]["shape"] + [1])][: rng.integers(1, 4)]
    text = json.dumps(header).encode()
    if kind == 5:                                          # flip bytes of the JSON text
        text = bytearray(text)
        for _ in range(rng.integers(1, 4)):
            text[rng.integers(len(text))] = rng.integers(256)
        text = bytes(text)
    out = join(None, data, text)
    if kind == 6:                                          # the length field is off
        (n,) = struct.unpack("<Q", out[:8])
        out = struct.pack("<Q", max(0, n + int(rng.integers(-16, 17)))) + out[8:]
    elif kind == 7:                                        # truncated or extended
        cut = int(rng.integers(0, len(out) + 16))
        out = out[:cut] if cut <= len(out) else out + b"\0" * (cut - len(out))
    elif kind == 8:                                        # data bytes flipped: may make NaN/inf weights
        out = bytearray(out)
        for _ in range(rng.integers(1, 6)):
            out[rng.integers(len(out) - len(data), len(out))] = rng.integers(256)
        out = bytes(out)
    return out


def check_loaded_matches_reference(model, blob):
    """npgpt accepted the file: the reference reader must accept it too, with the same values."""
    reference = safetensors.numpy.load(blob)
    for name, array in weights.flatten(model.params).items():
        if name == "lm_head.weight" and name not in reference:
            continue
        np.testing.assert_array_equal(array, reference[name])
    with np.errstate(all="ignore"):                        # flipped data bytes can make huge (finite) weights overflow
        assert model.forward([1, 2, 3]).shape == (3, MICRO.n_vocab)


def test_fuzz_every_mutation_loads_correctly_or_raises_an_npgpt_error(micro):
    folder, blob = micro
    names = [n for n in split(blob)[0]]
    rng = np.random.default_rng(2026)
    outcomes = {"loaded": 0, "rejected": 0}
    tracemalloc.start()
    try:
        for i in range(3000):
            mutated = mutate(rng, blob, names)
            (folder / "model.safetensors").write_bytes(mutated)
            tracemalloc.reset_peak()
            try:
                model = npgpt.load(folder)
            except NpgptError:
                outcomes["rejected"] += 1
            except Exception as e:                         # anything else is the defect this test exists for
                pytest.fail(f"mutation {i}: {type(e).__name__}: {e}")
            else:
                outcomes["loaded"] += 1
                check_loaded_matches_reference(model, mutated)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 16 * 2**20, f"mutation {i}: loading a {len(mutated)}-byte file peaked at {peak / 2**20:.0f} MiB"
    finally:
        tracemalloc.stop()
    print(outcomes)
    assert outcomes["rejected"] > 1000 and outcomes["loaded"] > 50, outcomes   # the mutations reach both outcomes
