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


@pytest.fixture
def feature_pair():
    """A tiny target and a feature drafter started from it, its head cut to half the vocabulary."""
    from draftalign.models.feature import feature_from_target, feature_spec, restrict_head
    from tests.test_specdecode import tiny_llama

    target = tiny_llama(0, vocab=64, hidden=32, layers=4, heads=2, lm_scale=8.0)
    draft = feature_from_target(target, feature_spec(target.config))
    restrict_head(draft, list(range(0, 64, 2)))
    return target, draft


@pytest.mark.usefixtures("one_torch_thread")
def test_a_feature_drafters_step_is_its_forward_so_the_hooks_time_it(bench, feature_pair):
    import torch

    _, draft = feature_pair
    timer = bench.ForwardTimer(draft)
    try:
        with torch.inference_mode():
            hidden = draft.fuse(torch.zeros(1, 3, 3 * 32))
            draft.step(hidden, torch.tensor([[1, 2, 3]]), torch.arange(3), [])
    finally:
        timer.remove()
    assert timer.calls == 1 and timer.seconds > 0 and not draft._forward_hooks
    # one step with a 16-token cache, from features of the drafter's input width
    assert bench.feature_step_ms(draft, list(range(16)), repeats=2) > 0


@pytest.mark.usefixtures("one_torch_thread")
def test_a_tiny_reference_run_times_a_feature_drafter_losslessly(bench, feature_pair, tmp_path):
    from draftalign.evaluation.featurespec import FeatureProposer
    from draftalign.evaluation.specdecode import autoregressive_generate, speculative_generate
    from draftalign.models.feature import save_feature_drafter

    target, draft = feature_pair
    prompts = [[1, 5, 9, 3], [2, 7, 4, 8, 6]]
    res = bench.reference_engine(target, draft, prompts, [1, 2], max_new_tokens=6, context_len=16, repeats=2)
    assert res["timing"]["context_tokens"] == 16 and res["timing"]["t_draft"] > 0
    rows = {r["gamma"]: r for r in res["rows"]}
    assert list(rows) == [0, 1, 2] and rows[0]["draft_s"] == 0
    for g in (1, 2):
        r = rows[g]
        assert r["tokens"] == rows[0]["tokens"] == 12
        assert r["draft_s"] > 0 and r["verify_s"] > 0 and r["draft_s"] + r["verify_s"] < r["wall_s"]
        assert 1.0 <= r["tau"] <= g + 1 and r["limit"] > 0
    assert not draft._forward_hooks and not draft.fc._forward_hooks and not target._forward_hooks
    # what the bench compares is the same decoding: at T = 0 each γ's tokens are the target's own
    for ids in prompts:
        plain = autoregressive_generate(target, ids, 6)
        for g in (1, 2):
            assert speculative_generate(target, FeatureProposer(draft), ids, g, 6).tokens == plain
    save_feature_drafter(draft, tmp_path / "feature")
    loaded, described, vocab = bench.load_drafter(str(tmp_path / "feature"))
    assert vocab == 32 and described.startswith("feature drafter") and "draft vocabulary 32 tokens" in described
    assert "1 decoder layer(s)" in described and "[0, 2, 3]" in described


def test_vllm_prices_a_feature_drafters_drafts_at_the_reference_t_draft_or_says_na(bench):
    target_run = {"tokens": 100, "wall_s": 1.0}
    spec = {2: {"tokens": 100, "wall_s": 0.6, "num_drafts": 40, "num_draft_tokens": 80, "num_accepted": 60}}
    note, source = bench.feature_vllm_note(2.0, 2)
    assert "cannot run alone in vLLM" in note and "reference engine's t_draft (2.00 ms" in note
    res = bench.vllm_rows(target_run, None, spec, 2.0, note)
    row = res["rows"][1]
    assert [r["setting"] for r in res["rows"]] == ["target alone", "γ=2"] and res["note"] == note
    assert row["draft_ms"] == pytest.approx(80 * 2.0 / 100) and row["verify_ms"] == pytest.approx(40 * 10.0 / 100)
    note, _ = bench.feature_vllm_note(None, 2)
    assert "n/a" in note and "did not run" in note
    res = bench.vllm_rows(target_run, None, spec, None, note)
    assert math.isnan(res["rows"][1]["draft_ms"]) and math.isnan(res["rows"][1]["limit"])
    assert res["rows"][1]["speedup"] == pytest.approx(100 * 10.0 / 600)  # measured: no t_draft needed
    printed = bench.table("vLLM", res, est=True)
    assert "t_draft n/a ms" in printed and "| n/a |" in printed and "nan" not in printed
