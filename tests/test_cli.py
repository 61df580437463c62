"""The npgpt command: the same API underneath, one line on error."""

import subprocess
import sys

import npgpt
from npgpt.cli import main


def test_generate_streams_the_same_text_as_the_api(tiny_file, capsys):
    assert main(["generate", "--weights", str(tiny_file), "--backend", "numpy", "--prompt", "a b", "--max-new-tokens", "6", "--seed", "2",
                 "--top-k", "40", "--top-p", "0.95", "--temperature", "0.8"]) == 0
    expected = npgpt.load(tiny_file).generate("a b", max_new_tokens=6, seed=2, top_k=40, top_p=0.95, temperature=0.8)
    assert capsys.readouterr().out == "a b" + expected + "\n"


def test_generate_without_weights_says_it_is_noise(capsys):
    assert main(["generate", "--prompt", "Hi", "--max-new-tokens", "2", "--seed", "0"]) == 0
    assert "seeded random model" in capsys.readouterr().err


def test_inspect_reports_config_and_dtypes(tiny_file, capsys):
    assert main(["inspect", str(tiny_file)]) == 0
    out = capsys.readouterr().out
    assert "n_embd=60 n_head=6 n_layer=3" in out and "F32 x" in out and "tied to wte" in out


def test_python_dash_m_is_the_same_command(tiny_file):
    r = subprocess.run([sys.executable, "-m", "npgpt", "inspect", str(tiny_file)], capture_output=True, text=True)
    assert r.returncode == 0 and "n_vocab=1000" in r.stdout
