"""Speculative sampling over tiny random Llama models: losslessness (greedy and sampled), stats, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftalign.evaluation.metrics import SpecStats
from draftalign.evaluation.specdecode import adjust_probs, autoregressive_generate, speculative_generate

V = 64  # vocabulary of the greedy tests
V_SMALL = 12  # vocabulary of the sampled tests


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(seed: int, vocab: int = V, hidden: int = 64, layers: int = 2, heads: int = 4,
               lm_scale: float = 1.0) -> LlamaForCausalLM:
    """Seeded random Llama; ``lm_scale`` multiplies lm_head to sharpen its distributions."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_scale)
    return model


def perturbed(model: LlamaForCausalLM, noise: float, seed: int) -> LlamaForCausalLM:
    """A draft close to ``model``: Gaussian noise on every matrix (partial agreement)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std() / 0.02)  # relative to init std
    return out


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0, lm_scale=8.0)


@pytest.fixture(scope="module")
def drafts(target):
    return {"small": tiny_llama(1, hidden=32, layers=1, heads=2, lm_scale=4.0),
            "close": perturbed(target, 0.005, seed=5)}


PROMPTS = [[7], [3, 14, 15, 9], [26, 5, 35, 8, 9, 7, 9], [32, 38, 4, 6, 2, 6, 43, 38, 3, 2]]


def check_stats(res, gamma):
    s = res.stats
    assert s.num_drafts == len(res.iterations)
    assert s.num_emitted == len(res.tokens) == sum(r.num_emitted for r in res.iterations)
    assert 1.0 <= s.block_efficiency <= gamma + 1
    assert s.block_efficiency == pytest.approx(len(res.tokens) / len(res.iterations))
    assert all(r.num_accepted <= r.num_drafted <= gamma for r in res.iterations)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_matches_target_greedy(target, drafts, gamma):
    pooled = {}
    for prompt in PROMPTS:
        expected = autoregressive_generate(target, prompt, max_new_tokens=24)
        assert len(expected) == 24
        for name, draft in drafts.items():
            res = speculative_generate(target, draft, prompt, gamma, max_new_tokens=24)
            assert res.tokens == expected, (name, prompt)
            check_stats(res, gamma)
            pooled[name] = res.stats + pooled.get(name, SpecStats.empty(gamma))
    # the close draft agrees often but not always, so both branches were exercised
    assert 0.1 < pooled["close"].acceptance_rate < 0.95
    assert pooled["close"].block_efficiency > pooled["small"].block_efficiency


def test_draft_is_target_accepts_everything(target):
    gamma, n_new = 3, 22
    for prompt in PROMPTS:
        res = speculative_generate(target, target, prompt, gamma, max_new_tokens=n_new)
        assert res.tokens == autoregressive_generate(target, prompt, n_new)
        # 5 full blocks of 4 tokens, then 2 tokens left: the last draft is shortened to 1
        records = [(r.num_drafted, r.num_accepted, r.num_emitted) for r in res.iterations]
        assert records == [(3, 3, 4)] * 5 + [(1, 1, 2)]
        assert res.stats.acceptance_rate == 1.0
        assert res.stats.block_efficiency == pytest.approx(1 + 16 / 6)
        assert res.stats.accepted_per_pos == (6, 5, 5)


@pytest.mark.parametrize("gamma", [1, 3])
def test_tau_is_emitted_tokens_per_target_call_when_an_eos_draft_is_accepted(target, gamma):
    # the draft (the target itself) proposes EOS first and it is accepted: 1 token, 1 target call, no
    # bonus token after the EOS, so τ must be 1.0 (it was 1 + accepted/drafts = 2.0)
    prompt = PROMPTS[0]
    eos = autoregressive_generate(target, prompt, 1)[0]
    res = speculative_generate(target, target, prompt, gamma, 24, eos_token_id=eos)
    assert res.tokens == [eos] and len(res.iterations) == 1
    assert [(r.num_drafted, r.num_accepted, r.num_emitted) for r in res.iterations] == [(1, 1, 1)]
    assert res.stats.block_efficiency == 1.0 == len(res.tokens) / len(res.iterations)
    assert res.stats.acceptance_rate == 1.0  # the EOS draft was accepted: the acceptance count keeps it
    # later in the answer: k accepted drafts ending on EOS emit k tokens in that call
    full = autoregressive_generate(target, prompt, 24)
    eos = full[6]
    res = speculative_generate(target, target, prompt, gamma, 24, eos_token_id=eos)
    assert res.tokens == full[: full.index(eos) + 1]
    assert res.stats.block_efficiency == pytest.approx(len(res.tokens) / len(res.iterations))


@pytest.mark.parametrize("draft_name", ["small", "close", "target"])
def test_eos_stops_generation(target, drafts, draft_name):
    draft = target if draft_name == "target" else drafts[draft_name]
    prompt = PROMPTS[1]
    full = autoregressive_generate(target, prompt, 24)
    for pos in (0, 5, 9):
        eos = full[pos]
        expected = full[: full.index(eos) + 1]
        assert autoregressive_generate(target, prompt, 24, eos_token_id=eos) == expected
        for gamma in (1, 3):
            res = speculative_generate(target, draft, prompt, gamma, 24, eos_token_id=[eos, 10_000])
            assert res.tokens == expected
            check_stats(res, gamma)


def test_zero_tokens_tensor_input_and_errors(target, drafts):
    res = speculative_generate(target, drafts["small"], [1, 2], 3, max_new_tokens=0)
    assert res.tokens == [] and res.iterations == [] and res.stats.block_efficiency == 1.0
    as_list = speculative_generate(target, drafts["small"], PROMPTS[2], 2, 8).tokens
    assert speculative_generate(target, drafts["small"], torch.tensor([PROMPTS[2]]), 2, 8).tokens == as_list
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, drafts["small"], [1], 0, 4)
    with pytest.raises(ValueError, match="input_ids"):
        speculative_generate(target, drafts["small"], [], 2, 4)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, drafts["small"], [1], 2, 4, temperature=-1.0)


def test_sliding_window_caches_roll_back():
    # Mistral-style sliding-window layers can only be cropped once past recording is on
    from transformers import MistralConfig, MistralForCausalLM

    def mistral(seed, lm_scale):
        torch.manual_seed(seed)
        config = MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                               max_position_embeddings=256)
        model = MistralForCausalLM(config).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(lm_scale)
        return model

    target = mistral(0, 8.0)
    draft = perturbed(target, 0.005, seed=3)
    prompt = PROMPTS[3]
    expected = autoregressive_generate(target, prompt, 20)
    for d in (draft, target):
        res = speculative_generate(target, d, prompt, 3, 20)
        assert res.tokens == expected
        check_stats(res, 3)


def test_vocab_mismatch_raises(target):
    other = tiny_llama(2, vocab=48, hidden=32, layers=1, heads=2)
    with pytest.raises(ValueError, match=r"target vocab_size=64.*draft vocab_size=48"):
        speculative_generate(target, other, [1, 2], 3, 4)


def test_adjust_probs():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0]], dtype=torch.float64)
    probs = adjust_probs(logits, 1.0)
    assert probs.dtype == torch.float32 and torch.allclose(probs, torch.softmax(logits.float(), -1))
    assert torch.equal(adjust_probs(logits, 0.0), torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]]))
    sharp = adjust_probs(logits, 0.5)
    assert sharp[0, 0] > probs[0, 0]
    # softmax row 0 = [.644, .237, .087, .032]: nucleus 0.8 keeps the first two tokens
    nucleus = adjust_probs(logits, 1.0, top_p=0.8)[0]
    assert torch.allclose(nucleus, torch.tensor([0.644, 0.237, 0, 0]) / 0.881, atol=2e-3)
    assert adjust_probs(logits, 1.0, top_p=1e-6)[0].tolist() == [1.0, 0, 0, 0]
    for bad in [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5)]:
        with pytest.raises(ValueError):
            adjust_probs(logits, **bad)


# ---- sampled losslessness ------------------------------------------------------------------------


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; cells expecting < 5 are pooled into one."""
    n = counts.sum().item()
    expected = probs.double().flatten() * n
    counts = counts.double().flatten()
    small = expected < 5
    e = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    c = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    keep = e > 0
    assert (c[~keep] == 0).all(), "a token with zero target probability was emitted"
    return float(((c[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.001 quantile of chi-square(df), Wilson-Hilferty approximation (no scipy needed)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def next_probs(model, seqs: list[list[int]], temperature: float, top_p: float) -> torch.Tensor:
    with torch.inference_mode():
        return adjust_probs(model(input_ids=torch.tensor(seqs)).logits[:, -1], temperature, top_p).double()


@pytest.mark.parametrize("temperature,top_p,runs", [(1.0, 1.0, 1000), (0.7, 0.9, 600)])
def test_sampled_output_follows_target(temperature, top_p, runs):
    target = tiny_llama(10, vocab=V_SMALL, hidden=32, layers=1, heads=2, lm_scale=12.0)
    draft = tiny_llama(11, vocab=V_SMALL, hidden=32, layers=1, heads=2, lm_scale=4.0)
    prompt, gamma = [3, 1, 4], 2
    # exact target law of the first three emitted tokens
    p1 = next_probs(target, [prompt], temperature, top_p)[0]
    p2 = next_probs(target, [prompt + [a] for a in range(V_SMALL)], temperature, top_p)
    joint12 = p1[:, None] * p2
    pairs = [prompt + [a, b] for a in range(V_SMALL) for b in range(V_SMALL)]
    p3 = next_probs(target, pairs, temperature, top_p)
    marg3 = (joint12.flatten()[:, None] * p3).sum(0)
    beta1 = torch.minimum(p1, next_probs(draft, [prompt], temperature, top_p)[0]).sum().item()

    gen = torch.Generator().manual_seed(1234)
    counts12 = torch.zeros(V_SMALL, V_SMALL)
    counts3 = torch.zeros(V_SMALL)
    first_accepted = 0
    for _ in range(runs):
        res = speculative_generate(target, draft, prompt, gamma, max_new_tokens=3, temperature=temperature,
                                   top_p=top_p, generator=gen)
        t1, t2, t3 = res.tokens
        counts12[t1, t2] += 1
        counts3[t3] += 1
        first_accepted += res.iterations[0].num_accepted >= 1
        assert res.iterations[0].num_drafted == gamma
    for counts, probs in [(counts12, joint12), (counts3, marg3)]:
        stat, df = chi2_stat(counts, probs)
        assert stat < chi2_critical(df), (stat, df)
    # acceptance of draft position 1 is sum(min(p, q)) = 1 - TVD(p, q)
    assert 0.2 < beta1 < 0.95
    se = math.sqrt(beta1 * (1 - beta1) / runs)
    assert abs(first_accepted / runs - beta1) < 4 * se
