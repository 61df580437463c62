"""What a new user hits first: padded vocabularies, quantize paths, quality and seed arguments, the CLI."""

import io
import json
import os

import numpy as np
import pytest

import npgpt
from npgpt import InputError, weights
from npgpt.cli import main
from npgpt.sampling import sample
from npgpt.weights.checkpoint import write
from conftest import TINY

PADDED = npgpt.Config(n_vocab=50304, n_ctx=16, n_embd=8, n_head=2, n_layer=1)   # as nanoGPT and llm.c train


def padded_model():
    """Every position's final hidden state is ln_f.bias, and the head scores padded ids far above the rest."""
    params = weights.random_params(PADDED, seed=3)
    params["ln_f"] = {"weight": np.zeros(8, np.float32), "bias": np.ones(8, np.float32)}
    head = np.array(params["wte"]["weight"])
    head[50257:] = 5.0                                     # 40 per padded logit, against ~0.1 for real tokens
    params["lm_head"] = {"weight": head}
    return npgpt.Model(params, PADDED)


def test_padded_vocabulary_never_samples_undecodable_ids_for_text():
    model = padded_model()
    assert model.generate([1, 2], max_new_tokens=1, temperature=0)[0] >= 50257          # ids out: the model's own choice
    for kwargs in ({"temperature": 0}, {"temperature": 1.0, "seed": 0}, {"temperature": 0.7, "top_k": 5, "seed": 1}):
        text = model.generate("Hello", max_new_tokens=4, **kwargs)                     # text out: padded ids masked
        assert isinstance(text, str) and len(text) > 0


def test_non_finite_logits_raise_instead_of_choosing_token_zero():
    logits = np.zeros((2, 5), np.float32)
    logits[1, 3] = np.nan
    for temperature in (0, 1.0):
        with pytest.raises(InputError, match="logits are not finite .* row 1"):
            sample(logits, np.random.default_rng(0), temperature=temperature)


def test_tiny_temperature_is_the_argmax():
    logits = np.array([[0.1, 3.0, -2.0, 2.9]], np.float32)
    assert sample(logits, np.random.default_rng(0), temperature=5e-324)[0] == 1


@pytest.mark.parametrize("seed", [-1, 1.5, "x", True])
def test_bad_seed_is_an_input_error(tiny, seed):
    with pytest.raises(InputError, match="seed must be an integer >= 0"):
        tiny.generate([1, 2], max_new_tokens=2, seed=seed)
    with pytest.raises(InputError, match="seed must be an integer >= 0"):
        npgpt.random_model(TINY, seed=seed)


def test_cli_negative_seed_is_one_line(tiny_file, capsys):
    assert main(["generate", "--weights", str(tiny_file), "--prompt", "x", "--seed", "-1"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["npgpt: error: seed must be an integer >= 0 or None; got -1"]


def test_quantize_creates_the_output_folder(tmp_path, tiny_file, capsys):
    out = tmp_path / "new" / "deeper" / "model.safetensors"
    assert main(["quantize", str(tiny_file), str(out), "--dtype", "int8"]) == 0
    assert npgpt.load(out.parent).weights == "int8"


def test_quantize_into_a_directory_writes_model_safetensors_there(tmp_path, tiny_file):
    out = tmp_path / "int8dir"
    out.mkdir()
    assert main(["quantize", str(tiny_file), str(out), "--dtype", "bf16"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_quantize_keeps_config_keys_it_does_not_own(tmp_path, tiny_file):
    config = tiny_file.parent / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "task_specific_params": {"x": 1}, "bos_token_id": 50256}))
    assert main(["quantize", str(tiny_file), str(tiny_file.parent / "int8.safetensors"), "--dtype", "int8"]) == 0
    kept = json.loads(config.read_text())                  # the source folder's own config.json, rewritten in place
    assert kept["task_specific_params"] == {"x": 1} and kept["bos_token_id"] == 50256 and kept["n_head"] == 6
    other = tmp_path / "elsewhere"
    assert main(["quantize", str(tiny_file), str(other), "--dtype", "int8"]) == 0
    assert json.loads((other / "config.json").read_text())["task_specific_params"] == {"x": 1}


def test_a_failed_write_leaves_no_temp_file_and_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    write(path, {"a": ("F32", np.ones(4, np.float32))})
    before = path.read_bytes()

    def broken(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        write(path, {"a": ("F32", np.zeros(4, np.float32))})
    assert os.listdir(tmp_path) == ["model.safetensors"] and path.read_bytes() == before


def test_quantize_reports_an_unwritable_destination(tmp_path, tiny_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["quantize", str(tiny_file), str(blocker / "sub" / "model.safetensors"), "--dtype", "int8"]) == 1
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be an integer >= 1; got 0"),
    (["--text", "SHORT"], "the text has 2 tokens; quality needs at least 17"),
    (["--text", "MISSING"], "cannot read UTF-8 text"),
])
def test_quality_bad_arguments_are_one_line(tmp_path, tiny_file, capsys, args, message):
    (tmp_path / "short.txt").write_text("Hi there")
    args = [a.replace("SHORT", str(tmp_path / "short.txt")).replace("MISSING", str(tmp_path / "none.txt")) for a in args]
    assert main(["quality", "--weights", str(tiny_file), "--backend", "numpy", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_endoftext_in_prompt_text_is_the_special_token():
    assert npgpt.encode("a<|endoftext|>b") == [64, npgpt.EOT, 65]


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"npgpt {npgpt.__version__}\n"


def test_generate_cli_defaults_to_the_numba_backend():
    from npgpt.cli import build_parser
    assert build_parser().parse_args(["generate", "--prompt", "x"]).backend == "numba"


def test_generate_reads_the_prompt_from_a_file_or_stdin(tmp_path, tiny_file, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("a b")
    common = ["generate", "--weights", str(tiny_file), "--backend", "numpy", "--max-new-tokens", "5", "--seed", "1"]
    assert main([*common, "--prompt", "a b"]) == 0
    direct = capsys.readouterr().out
    assert main([*common, "--prompt-file", str(tmp_path / "p.txt")]) == 0
    assert capsys.readouterr().out == direct
    monkeypatch.setattr("sys.stdin", io.StringIO("a b"))
    assert main([*common, "--prompt-file", "-"]) == 0
    assert capsys.readouterr().out == direct


def test_stop_strings_end_the_text_before_them(tiny):
    full = tiny.generate("a b", max_new_tokens=30, seed=4)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(stop) == 2
    cut = tiny.generate("a b", max_new_tokens=30, seed=4, stop=[stop, "\x00never"])
    assert cut == full[: full.index(stop)]
    assert "".join(tiny.stream("a b", max_new_tokens=30, seed=4, stop=stop)) == cut


def test_stop_strings_split_across_pieces():
    from npgpt.generate import TextOut

    def cut(pieces, stops):
        out = TextOut(None, stops)
        released = [out.add_text(p) for p in pieces]
        return "".join(released) + out.finish()
    assert cut(["he", "llo wo", "rld"], ["o w"]) == "hell"
    assert cut(["ab", "c"], ["cd"]) == "abc"               # held back "c", then released at the end
    assert cut(["x"], []) == "x"


def test_text_out_releases_held_text_at_the_end_of_text_token_and_never_after_a_stop():
    from npgpt.generate import TextOut
    enc = npgpt.get_encoding()
    out = TextOut(enc, stops=["cd"])
    pieces = [out.push(t) for t in enc.encode("ab c")]
    assert "".join(pieces) == "ab " and not out.stopped       # "c" held: it may start "cd"
    assert out.push(50256) == "c" and out.stopped             # <|endoftext|>: the held text is released
    assert out.push(enc.encode("x")[0]) == "" and out.finish() == ""
    out = TextOut(enc, stops=["lo w"])
    assert "".join(out.push(t) for t in enc.encode("hello world")) == "hel" and out.stopped
    smile = enc.encode("🙂")                                   # one character over two byte tokens
    out = TextOut(enc)
    assert len(smile) == 2 and [out.push(t) for t in smile] == ["", "🙂"]


def test_bad_stop_argument(tiny):
    with pytest.raises(InputError, match="stop must be a non-empty string"):
        tiny.generate("a", stop=[""])
    with pytest.raises(InputError, match="stop strings apply to text"):
        tiny.generate([1, 2], stop="x")


def test_generate_cli_prints_timings_and_warns_at_the_context_end(tiny_file, capsys):
    assert main(["generate", "--weights", str(tiny_file), "--backend", "numpy", "--prompt", "a b c",
                 "--max-new-tokens", "100", "--temperature", "0", "-t", "1"]) == 0
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if "warning" in line]
    assert len(warnings) == 1 and "room for 62 new tokens in the 64-token context" in warnings[0]
    timing = err[-1]
    assert timing.startswith("npgpt: prompt eval: 3 tokens") and "eval: 61 tokens" in timing   # 62 new: 1 from prefill


def test_generate_cli_rejects_bad_thread_counts(tiny_file, capsys):
    assert main(["generate", "--weights", str(tiny_file), "--prompt", "a", "-t", "0"]) == 1
    assert "threads must be an integer from 1 to" in capsys.readouterr().err
