"""npgpt train: runs that resume exactly, ordinary checkpoints, and bad input that loses nothing."""

import json
import os

import numpy as np
import pytest

import npgpt
from npgpt import InputError, TrainingError, train, weights

MICRO = npgpt.Config(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=2)
WORDS = "the cat sat on a mat and then ran to the big red door while a dog sat by the old tree".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(" ".join(np.random.default_rng(0).choice(WORDS, 3000)))
    return str(path)


@pytest.fixture(scope="module")
def micro_init(tmp_path_factory):
    folder = tmp_path_factory.mktemp("init")
    npgpt.Model(weights.init_params(MICRO, 0), MICRO).save(folder)
    return str(folder)


def settings(corpus, micro_init, out, **kw):
    base = dict(data=corpus, init=micro_init, out=str(out), steps=6, batch=2, seq=16, lr=3e-3, warmup=2,
                eval_every=3, eval_batches=2, save_every=2, backend="numpy")
    return train.Settings(**{**base, **kw})


def losses(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("dropout", [0.0, 0.2])          # the masks come from the saved RNG too
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(corpus, micro_init, tmp_path, dropout):
    whole = train.Run(settings(corpus, micro_init, tmp_path / "whole", dropout=dropout), log=lambda m: None)
    whole.run()

    def interrupt(row):
        if row["step"] == 3:
            raise KeyboardInterrupt
    first = train.Run(settings(corpus, micro_init, tmp_path / "cut", dropout=dropout), log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        first.run(progress=interrupt)
    assert train.saved_step(str(tmp_path / "cut")) == 3  # Ctrl-C saved the step it had finished
    resumed = train.Run(train.Settings(out=str(tmp_path / "cut"), steps=6, backend="numpy"), resume=True, log=lambda m: None)
    assert resumed.step == 3
    resumed.run()
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r.get("val_loss")) for r in a] == [(r["loss"], r.get("val_loss")) for r in b]
    for name, p in npgpt.load(tmp_path / "whole").state_dict().items():
        assert np.array_equal(p, npgpt.load(tmp_path / "cut").state_dict()[name]), name


def test_the_run_directory_is_an_ordinary_checkpoint_and_training_lowers_the_loss(corpus, micro_init, tmp_path):
    run = train.Run(settings(corpus, micro_init, tmp_path, steps=30, eval_every=30, save_every=30, backend="numba"),
                    log=lambda m: None)
    before = run.val_loss()
    run.run()
    model = npgpt.load(tmp_path)
    assert model.config == MICRO
    assert losses(tmp_path)[-1]["val_loss"] < before - 0.5
    assert isinstance(model.generate("the cat", max_new_tokens=3, temperature=0), str)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("trainer-")) == ["trainer-00000030.npz"]
    assert open(tmp_path / "loss.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"     # matplotlib: the train extra


def test_tokens_are_cached_and_rebuilt_when_the_text_changes(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    ids, sha = npgpt.data.tokens(text, tmp_path / "run")
    mtime = os.path.getmtime(tmp_path / "run" / "tokens.bin")
    again, sha2 = npgpt.data.tokens(text, tmp_path / "run")
    assert sha2 == sha and np.array_equal(ids, again) and os.path.getmtime(tmp_path / "run" / "tokens.bin") == mtime
    text.write_text("goodbye " * 50)
    changed, sha3 = npgpt.data.tokens(text, tmp_path / "run")
    assert sha3 != sha and changed[0] != ids[0]


@pytest.mark.parametrize("change, error, message", [
    ({"lr": 0.0}, InputError, "learning rate must be a finite number > 0"),
    ({"betas": (0.9, 1.0)}, InputError, "betas must be two numbers in \\[0, 1\\)"),
    ({"weight_decay": -0.1}, InputError, "weight decay must be a finite number >= 0"),
    ({"seq": 40}, InputError, "--seq 40 is longer than the model's context n_ctx=32"),
    ({"steps": 0}, InputError, "--steps must be an integer >= 1"),
    ({"dropout": 1.0}, InputError, "--dropout must be a probability in \\[0, 1\\)"),
    ({"dropout": -0.1}, InputError, "--dropout must be a probability"),
])
def test_bad_settings(corpus, micro_init, tmp_path, change, error, message):
    with pytest.raises(error, match=message):
        train.Run(settings(corpus, micro_init, tmp_path / "r", **change), log=lambda m: None)


def test_text_too_short_and_not_utf8(micro_init, tmp_path):
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(InputError, match="needs at least 34"):
        train.Run(settings(str(tmp_path / "short.txt"), micro_init, tmp_path / "a"), log=lambda m: None)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin1") * 100)
    with pytest.raises(InputError, match="latin1.txt: not UTF-8 text"):
        train.Run(settings(str(tmp_path / "latin1.txt"), micro_init, tmp_path / "b"), log=lambda m: None)


def test_out_holding_another_run_and_resume_without_a_run(corpus, micro_init, tmp_path):
    train.Run(settings(corpus, micro_init, tmp_path / "r", steps=1), log=lambda m: None).run()
    with pytest.raises(TrainingError, match="holds another run; continue it with --resume"):
        train.Run(settings(corpus, micro_init, tmp_path / "r"), log=lambda m: None)
    with pytest.raises(TrainingError, match="holds no npgpt training run"):
        train.Run(train.Settings(out=str(tmp_path / "empty")), resume=True, log=lambda m: None)


def test_low_precision_weights_cannot_train(corpus, micro_init, tmp_path):
    int8 = tmp_path / "int8"
    npgpt.quantize_checkpoint(micro_init, int8, "int8")    # loads as int8 by default
    with pytest.raises(InputError, match="training needs fp32 weights; .* int8"):
        train.Run(settings(corpus, str(int8), tmp_path / "r"), log=lambda m: None)
    with pytest.raises(InputError, match="training needs fp32 weights; .* bf16"):
        npgpt.load(micro_init, weights="bf16").value_and_grad([1, 2, 3])
    assert not os.path.exists(tmp_path / "r" / "run.json")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # the overflows this test provokes
def test_a_diverging_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(corpus, micro_init, tmp_path):
    run = train.Run(settings(corpus, micro_init, tmp_path, steps=50, lr=1e4, warmup=0, grad_clip=1e9, save_every=1),
                    log=lambda m: None)
    with pytest.raises(TrainingError, match=r"step (\d+): the loss is (nan|inf).* last checkpoint \(step \d+\) is intact"):
        run.run()
    last = train.saved_step(str(tmp_path))
    assert last == run.step and os.path.exists(train.trainer_path(str(tmp_path), last))
    assert npgpt.load(tmp_path).config == MICRO             # loads: its weights are finite (the loader checks)
