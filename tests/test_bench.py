"""The bench's report: how it states its bounds (figures themselves come from `npgpt bench`, not tests)."""
import pytest

from npgpt import bench


def report(tokens_per_s, bound):
    result = {"model": "m", "params": 1e6, "backend": "numba", "weights": "fp32", "threads": 2, "batch": 1,
              "test": "tg128", "tokens_per_s": tokens_per_s, "std": 0.0, "bound": bound, "samples": []}
    return {"results": [result], "ceilings": {"read_bandwidth_gbs": 20.0, "sgemm_gflops": 100.0},
            "machine": {"threads": 2}}


def test_a_result_above_its_bound_says_the_bound_was_measured_low():
    text = bench.table(report(131.0, 100.0))
    assert "| 131% (!) |" in text and "the bound was measured low" in text


@pytest.mark.parametrize("weights, test, pairs, mark", [
    ("int4", "pp512", False, "(int)"), ("int8", "pp128-all", True, "(int)"), ("int8", "tg128", True, "(!)"),
    ("bf16", "pp128", True, "(bf16)"), ("bf16", "pp128", False, "(!)"), ("bf16", "tg128", True, "(!)"), ("fp32", "pp512", True, "(!)")])
def test_integer_and_bf16_prompts_are_measured_against_sgemm_but_not_bounded_by_it(weights, test, pairs, mark):
    """An int8/int4 prompt runs integer dots, a bf16 prompt bf16 pair dots (vdpbf16ps, where the CPU has it:
    the report's bf16_pairs), which can pass the float32 sgemm ceiling without any measuring error: its %
    is marked (int) or (bf16) and explained, never "(!) measured low"; its decode still is, and so are an
    fp32 prompt and a bf16 prompt without vdpbf16ps (float32 FMAs on widened weights, as sgemm's)."""
    r = report(131.0, 100.0)
    r["machine"]["bf16_pairs"] = pairs
    r["results"][0].update(weights=weights, test=test)
    text = bench.table(r)
    assert f"| 131% {mark} |" in text
    assert ("(int) int8/int4 prompts" in text) == (mark == "(int)")
    assert ("(bf16) bf16 prompts" in text) == (mark == "(bf16)")
    assert ("measured low" in text) == (mark == "(!)")


def test_each_run_is_also_put_against_the_ceiling_timed_beside_it_in_its_round():
    """% of round's bound: the median over rounds of run / that round's bound, not the run's median over the
    rounds' median bound: here 120 of 100 and 60 of 200 read 120% and 30% (median 75%), where the medians'
    ratio would read 90 / 150 = 60%. A report without per-round bounds shows a dash."""
    r = report(90.0, 100.0)
    r["results"][0].update(samples=[120.0, 60.0], round_bounds=[100.0, 200.0])
    assert bench.round_pct(r["results"][0]) == pytest.approx(75.0)
    text = bench.table(r)
    assert "| 90% | 75% |" in text and "measured low" not in text
    r["results"][0].update(samples=[130.0, 220.0])                # 130% and 110%
    assert "| 90% | 120% (!) |" in bench.table(r) and "measured low" in bench.table(r)
    assert "| 50% | – |" in bench.table(report(50.0, 100.0))


def test_interleaved_rounds_time_the_ceiling_once_a_round_after_the_runners(monkeypatch):
    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    timed, probed = bench._interleaved(fns, 10, 3, lambda msg: None, (lambda: calls.append("probe") or len(calls), "GB/s"))
    assert calls == ["a", "b"] + ["a", "b", "probe"] * 3          # one warm-up each, then 3 rounds
    assert probed == [5, 8, 11] and [len(s) for _, _, s in timed] == [3, 3]
    timed, probed = bench._interleaved(fns, 10, 2, lambda msg: None)
    assert probed == [] and calls.count("probe") == 3


def test_a_result_within_its_bound_has_no_note():
    text = bench.table(report(50.0, 100.0))
    assert "| 50% |" in text and "measured low" not in text


def test_train_table_reports_ratio_to_torch_and_peak_memory():
    from npgpt import bench_train

    rows = [{"model": "tiny", "params": 16e6, "backend": b, "threads": 2, "batch": 4, "seq": 256, "tokens_per_s": t,
             "std": 1.0, "bound": 2000.0, "peak_rss_mb": 1024.0} for b, t in (("numba", 1500.0), ("torch", 1000.0))]
    text = bench_train.table({"results": rows, "ceilings": {"sgemm_gflops": 190.0}, "machine": {"threads": 2},
                              "torch": "torch x"})
    assert "| tiny | 16.00 M | numba | 2 | 4 | 256 | 1500.0 ± 1.0 | 75% | 1.00 GiB |" in text
    assert "tiny b4 T256: 1.50x" in text


def test_bench_train_runs_each_trainer_in_turns_and_bounds_it(monkeypatch):
    """bench_train.run end to end on a tiny config, one round (ceilings stubbed: their timing is no test's):
    every trainer gets a figure and a bound from the sgemm ceiling."""
    from npgpt import bench_train, config

    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
    monkeypatch.setattr(bench, "measure_ceilings", lambda: {"read_bandwidth_gbs": 20.0, "sgemm_gflops": 100.0})
    monkeypatch.setitem(bench_train.PRESETS, "micro", config.Config(n_vocab=61, n_ctx=16, n_embd=16, n_head=2, n_layer=1))
    report = bench_train.run(configs=["micro"], batches=[2], seqs=[8], reps=1, memory=False, log=lambda msg: None)
    rows = report["results"]
    assert [r["backend"] for r in rows] == ["numpy", "numba"]
    assert all(r["tokens_per_s"] > 0 and len(r["samples"]) == 1 for r in rows)
    assert all(r["bound"] == pytest.approx(100e9 / r["flop_per_token"], rel=1e-6) for r in rows)


def test_bench_train_refuses_options_that_do_not_apply(capsys):
    from npgpt import cli

    assert cli.main(["bench", "--train", "--weights", "x.safetensors"]) != 0
    assert "--weights and --weights-dtype do not apply" in capsys.readouterr().err
    assert cli.main(["bench", "--config", "gpt2,tiny"]) != 0
    assert "takes one config" in capsys.readouterr().err


def test_prefill_flops_count_the_head_and_the_last_blocks_mlp_once_per_sequence_unless_all_logits():
    """pp<T> (generation's prefill) runs the LM head, and the last block's projection, MLP and attention
    query, on the last position only (kernels.prefill); pp<T>-all every position's: at GPT-2 124M and
    T=512 that is ~1.5x the work, which the bounds must reflect."""
    import npgpt

    cfg = npgpt.preset("gpt2")
    T, C = 512, cfg.n_embd
    every, last = bench.flops_per_token(cfg, T), bench.flops_per_token(cfg, T, all_logits=False)
    assert 1.4 < every / last < 1.55
    skipped = 2 * (cfg.n_vocab * C + 9 * C**2) * (1 - 1 / T) + 2 * 2 * C * ((T + 1) / 2 - 1)
    assert every - last == pytest.approx(skipped)


def test_p_0_skips_prefill_as_in_llama_bench(capsys):
    from npgpt import cli

    assert cli.main(["bench", "-p", "0", "-n", "0"]) != 0
    assert "nothing to measure" in capsys.readouterr().err
    assert cli.main(["bench", "--train", "-p", "0"]) != 0
    assert "need lengths" in capsys.readouterr().err
    assert cli.main(["bench", "--config", "tiny", "--backend", "numba", "-p", "0", "-n", "4", "--reps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert [line.split("|")[7].strip() for line in rows] == ["tg4"]


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])   # bf16 runs fp32's path (the region); its compile took 36-46 s of CI
def test_resident_memory_loads_the_kernels_of_the_checkpoints_format_and_depth_before_its_baseline(fmt, tmp_path, monkeypatch, capsys):
    """rss_child (what `npgpt bench` runs in a fresh process per format) warms up on a tiny checkpoint of the
    same weights format and layer count, loaded from a file as the measured one is, before it reads the
    baseline: decode's region is compiled per format and layer count, arrays from a file are typed read-only,
    and compiling them after the baseline counted 70-150 MiB of compilation as the model's. fp32 stands for
    the formats decoded in one region (bf16 too), int8 and int4 for those decoded kernel by kernel."""
    import json

    import npgpt
    from npgpt import api, quant, weights

    cfg = npgpt.Config(n_vocab=97, n_ctx=32, n_embd=32, n_head=2, n_layer=3)
    path = str(tmp_path / "m.safetensors")
    weights.save(quant.quantize(weights.random_params(cfg, seed=1), fmt), path, cfg)
    loaded, load = [], api.load
    monkeypatch.setattr(api, "load", lambda p, **kw: loaded.append(load(p, **kw)) or loaded[-1])
    bench.rss_child(path, fmt, tokens=2, n_layer=cfg.n_layer)
    formats = [quant.format_of(m.params["h"][0]["attn"]["c_attn"]["weight_t"]) for m in loaded]
    assert [m.config.n_layer for m in loaded] == [3, 3] and formats == [fmt, fmt]   # the warm-up, then the model
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["weights"] == fmt and row["model_mb"] == pytest.approx(row["rss_decoding_mb"] - row["rss_before_mb"])
