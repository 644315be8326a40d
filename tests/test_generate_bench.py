"""bench/generate_throughput.py: the model sizes it builds and its steady-state arithmetic."""

import pytest

from tests.benches import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("generate_throughput")


def test_the_larger_size_is_above_100m_parameters_and_the_small_one_is_the_toy_target(bench):
    from draftalign.models.arch import build_config, count_parameters

    counts = {name: count_parameters(build_config(s["preset"], s.get("overrides"), vocab_size=32000))
              for name, s in bench.SIZES.items()}
    assert counts["134m"] >= 100e6 and round(counts["134m"] / 1e6) == 134
    assert round(counts["toy"] / 1e5) == 196  # the embedded toy target's 19.6M


def test_blocks_are_counted_as_they_arrive(bench, monkeypatch):
    clock = iter([0.0, 10.0, 14.0])  # start, the first block, the end
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench._timed_blocks([100, 50, 50], count=lambda b: b) == {"tokens": 200, "seconds": 14.0, "first_s": 10.0}


def test_steady_state_takes_out_the_start_up_both_passes_pay(bench):
    # 20 s of start-up in both; 300 tokens/s after it
    whole, quarter = {"tokens": 12000, "seconds": 60.0}, {"tokens": 3000, "seconds": 30.0}
    assert bench.steady_rate(whole, quarter) == 300.0
    assert bench.steady_rate(quarter, quarter) != bench.steady_rate(quarter, quarter)  # NaN, not a division by 0
