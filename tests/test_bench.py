"""The bench's report: how it states its bounds (figures themselves come from `npgpt bench`, not tests)."""

from npgpt import bench


def report(tokens_per_s, bound):
    result = {"model": "m", "params": 1e6, "backend": "numba", "weights": "fp32", "threads": 2, "batch": 1,
              "test": "tg128", "tokens_per_s": tokens_per_s, "std": 0.0, "bound": bound, "samples": []}
    return {"results": [result], "ceilings": {"read_bandwidth_gbs": 20.0, "sgemm_gflops": 100.0},
            "machine": {"threads": 2}}


def test_a_result_above_its_bound_says_the_bound_was_measured_low():
    text = bench.table(report(131.0, 100.0))
    assert "| 131% (!) |" in text and "the bound was measured low" in text


def test_a_result_within_its_bound_has_no_note():
    text = bench.table(report(50.0, 100.0))
    assert "| 50% |" in text and "measured low" not in text
