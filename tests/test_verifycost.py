"""draftalign/evaluation/verifycost.py: r = t_verify(k) / t_target, the context it is timed after, the
median's warm-up and reset, and one measurement on a tiny Llama (no timing is asserted, only its shape)."""

import math

import pytest

from draftalign.evaluation import verifycost


def test_r_is_each_k_tokens_forward_over_one_tokens():
    assert verifycost.verify_ratios(40.0, {4: 100.0, 2: 60.0}) == {2: 1.5, 4: 2.5}
    assert list(verifycost.verify_ratios(40.0, {5: 1.0, 2: 1.0})) == [2, 5]  # sorted by k
    assert all(math.isnan(r) for r in verifycost.verify_ratios(0.0, {2: 1.0}).values())


def test_the_context_is_the_prompt_of_median_length():
    prompts = [[1] * 9, [2] * 3, [3] * 5, [4] * 7]
    assert verifycost.prompt_sized_context(prompts) == [4] * 7  # of 3, 5, 7, 9: the longer middle one
    assert verifycost.prompt_sized_context(iter([[5, 6]])) == [5, 6]
    with pytest.raises(ValueError, match="no prompt"):
        verifycost.prompt_sized_context([])


def test_the_median_skips_the_warmup_and_resets_after_every_call():
    calls, resets = [], []
    verifycost.median_seconds(lambda: calls.append(len(resets)), repeats=3, warmup=2, reset=lambda: resets.append(1))
    assert calls == [0, 1, 2, 3, 4] and len(resets) == 5  # each call sees the state the reset left


def test_a_measurement_on_a_tiny_llama_has_every_gammas_k_and_leaves_no_state():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    synced = []
    cost = verifycost.measure_verify_cost(model, list(range(1, 13)), [3, 1, 3], "a tiny Llama", repeats=2,
                                          sync=lambda: synced.append(1))
    assert set(cost["t_verify_ms"]) == set(cost["r"]) == {2, 4} and cost["context_tokens"] == 12
    assert cost["t_target_ms"] > 0 and cost["measured_on"] == "a tiny Llama" and cost["repeats"] == 2
    assert cost["r"] == {k: t / cost["t_target_ms"] for k, t in cost["t_verify_ms"].items()}
    assert len(synced) == 3 * (2 + verifycost.WARMUP)  # every call, warm-up included, ends synchronised
    assert "γ=1: " in verifycost.verify_cost_line(cost) and "a 12-token context" in verifycost.verify_cost_line(cost)
