"""bench/llamacpp_target.py without llama_cpp: its arithmetic, its answer cut, its table, and the
message when llama_cpp is not installed (the bench's measurements are in docs/benchmarks.md)."""

import math
import sys

import pytest

from tests.benches import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("llamacpp_target")


def test_the_forward_sizes_parse_sorted_and_refuse_k_below_2(bench):
    assert bench.parse_ks("4, 2,3,4") == [2, 3, 4]
    for bad in ("1,2", "", "two"):
        with pytest.raises(ValueError, match="--ks"):
            bench.parse_ks(bad)


def test_an_answer_stops_at_the_budget_or_at_eos_which_it_keeps(bench):
    ticks = iter(range(100, 200))
    tokens, first = bench.take_answer(iter([5, 6, 7, 8]), eos=[2], max_new_tokens=3, clock=lambda: next(ticks))
    assert tokens == [5, 6, 7] and first == 100  # the clock read once, at the first token
    assert bench.take_answer(iter([5, 2, 9]), eos=[2], max_new_tokens=10)[0] == [5, 2]
    tokens, first = bench.take_answer(iter([]), eos=[2], max_new_tokens=4)
    assert tokens == [] and math.isnan(first)


def test_speeds_pool_prompts_and_split_off_the_first_token(bench):
    # 10 tokens in 1.0 s (the first after 0.4 s) and 5 in 0.5 s (the first after 0.1 s)
    s = bench.speeds([{"tokens": 10, "seconds": 1.0, "first_s": 0.4}, {"tokens": 5, "seconds": 0.5, "first_s": 0.1}])
    assert s["tokens_per_s"] == pytest.approx(15 / 1.5)
    assert s["decode_tokens_per_s"] == pytest.approx((9 + 4) / (0.6 + 0.4))
    one = bench.speeds([{"tokens": 1, "seconds": 0.2, "first_s": 0.2}])  # nothing decoded after the first
    assert one["tokens_per_s"] == pytest.approx(5.0) and math.isnan(one["decode_tokens_per_s"])


def test_the_cost_table_lists_t_1_then_each_k(bench):
    from draftalign.evaluation.verifycost import verify_ratios

    t_k = {2: 12.6, 4: 17.35}
    assert bench.cost_table(6.5, t_k, verify_ratios(6.5, t_k)).splitlines() == [
        "| k | t_k ms | r_k = t_k / t_1 |", "|---:|---:|---:|", "| 1 | 6.50 | 1.00 |", "| 2 | 12.60 | 1.94 |",
        "| 4 | 17.35 | 2.67 |"]


def test_without_llama_cpp_the_script_says_how_to_install_it(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # an import of it now fails, installed or not
    with pytest.raises(SystemExit) as exc:
        bench.require_llama_cpp()
    assert "make bench-llamacpp" in str(exc.value) and "llama-cpp-python==0.3.36" in str(exc.value)
