"""bench/spec_time_split.py: the limit, the per-token split, the best γ, and one tiny reference-engine run."""

import math

import pytest

from tests.benches import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("spec_time_split")


def test_the_physical_limit_is_tau_target_tokens_over_one_iterations_cost(bench):
    # τ = 3 tokens per iteration; the iteration costs 2 drafts of 1 ms and a 3-token verify of 12 ms
    assert bench.physical_limit(3.0, 2, 10.0, 1.0, 12.0) == pytest.approx(30.0 / 14.0)
    # free drafts and a verify as cheap as one target token: the limit is τ itself
    assert bench.physical_limit(2.5, 4, 8.0, 0.0, 8.0) == pytest.approx(2.5)
    assert math.isnan(bench.physical_limit(2.0, 1, 8.0, 0.0, 0.0))


def test_the_split_per_emitted_token_adds_up_to_the_wall_time(bench):
    s = bench.split_per_token(wall_s=2.0, draft_s=0.5, verify_s=1.2, tokens=100)
    assert s == pytest.approx({"ms_per_token": 20.0, "draft_ms": 5.0, "verify_ms": 12.0, "overhead_ms": 3.0})
    assert all(math.isnan(v) for v in bench.split_per_token(1.0, 0.0, 0.0, 0).values())


def test_the_best_gamma_is_the_fastest_measured_one(bench):
    rows = [{"gamma": 0, "speedup": 1.0}, {"gamma": 1, "speedup": 1.2}, {"gamma": 3, "speedup": 1.6},
            {"gamma": 5, "speedup": 1.4}, {"gamma": 4, "speedup": float("nan")}]
    assert bench.best_gamma(rows) == 3
    assert bench.best_gamma(rows[:1]) is None
    assert bench.speedup(20.0, 10.0) == 2.0


def test_a_row_holds_speedup_against_the_baseline_and_the_limit(bench):
    timing = {"t_target": 10.0, "t_draft": 1.0, "t_verify": {3: 12.0}}
    base = bench.summarize("target alone", 0, 100, 1.0, 0.0, 0.9, 1.0, None, timing)
    assert base["speedup"] == 1.0 and base["ms_per_token"] == pytest.approx(10.0) and base["limit"] == 1.0
    row = bench.summarize("γ=2", 2, 100, 0.5, 0.1, 0.3, 2.8, base["ms_per_token"], timing)
    assert row["speedup"] == pytest.approx(2.0) and row["tokens_per_s"] == pytest.approx(200.0)
    assert row["overhead_ms"] == pytest.approx(1.0) and row["limit"] == pytest.approx(2.8 * 10 / 14)


def test_a_tiny_reference_run_splits_time_between_the_two_models(bench):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny(seed: int, layers: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
        return LlamaForCausalLM(cfg).eval()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        target, draft = tiny(0, 2), tiny(1, 1)
        res = bench.reference_engine(target, draft, [[1, 5, 9, 3], [2, 7, 4, 8, 6]], [1, 2], max_new_tokens=6,
                                     context_len=16, repeats=2)
    finally:
        torch.set_num_threads(threads)
    assert set(res["timing"]["t_verify"]) == {2, 3} and res["timing"]["context_tokens"] == 16
    assert all(res["timing"][k] > 0 for k in ("t_target", "t_draft"))
    rows = {r["gamma"]: r for r in res["rows"]}
    assert list(rows) == [0, 1, 2] and res["best_gamma"] in (1, 2)
    assert rows[0]["draft_s"] == 0 and rows[0]["verify_s"] > 0 and rows[0]["speedup"] == 1.0
    for g in (1, 2):
        r = rows[g]
        assert r["tokens"] == 12 and r["draft_s"] > 0 and r["verify_s"] > 0
        assert r["draft_s"] + r["verify_s"] < r["wall_s"]
        assert 1.0 <= r["tau"] <= g + 1 and r["limit"] > 0
        assert r["draft_ms"] + r["verify_ms"] + r["overhead_ms"] == pytest.approx(r["ms_per_token"])
    # the hooks were taken off again
    assert not target._forward_hooks and not target._forward_pre_hooks and not draft._forward_hooks
