"""The n-gram (prompt lookup) drafter: vLLM's proposal rule, and exact speculative sampling with it."""

from __future__ import annotations

import math
import random

import pytest
import torch

from draftalign.evaluation.ngram import NgramProposer, ngram_proposal
from draftalign.evaluation.specdecode import autoregressive_generate, speculative_generate
from tests.test_specdecode import PROMPTS, V_SMALL, V, chi2_critical, chi2_stat, next_probs, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("tokens", "k", "window", "expected"), [
    # the 3-gram [1, 2, 3] occurred at the start: the 3 tokens after it
    ([1, 2, 3, 4, 1, 2, 3], 3, (2, 4), [4, 1, 2]),
    # the longest n wins over an earlier, shorter match: [5, 1, 2] at 3, not [1, 2] at 0
    ([1, 2, 9, 5, 1, 2, 7, 5, 1, 2], 3, (2, 4), [7, 5, 1]),
    # of equally long matches, the earliest: [1, 2] at 0, not at 3
    ([1, 2, 8, 1, 2, 9, 1, 2], 3, (2, 4), [8, 1, 2]),
    # prompt_lookup_max caps n: with 2, the earliest [4, 5]; with 5, [1, 2, 3, 4, 5]
    ([4, 5, 7, 1, 2, 3, 4, 5, 8, 1, 2, 3, 4, 5], 3, (2, 2), [7, 1, 2]),
    ([4, 5, 7, 1, 2, 3, 4, 5, 8, 1, 2, 3, 4, 5], 3, (2, 5), [8, 1, 2]),
    # prompt_lookup_min: [7, 3] never occurred before, a 1-gram match is below the minimum
    ([1, 2, 3, 7, 3], 3, (2, 4), []),
    # ... allowed with minimum 1, and the sequence ends after 2 of the k = 3 tokens
    ([1, 2, 3, 7, 3], 3, (1, 4), [7, 3]),
    # an occurrence may overlap the suffix (not be it): [5, 5, 5] at 0 is followed by one token
    ([5, 5, 5, 5], 3, (2, 3), [5]),
    ([5, 5, 5, 5, 5, 5], 2, (2, 3), [5, 5]),
    # too short for the minimum, nothing asked, nothing repeated
    ([1], 3, (2, 4), []), ([1, 2, 1, 2], 0, (2, 4), []), ([1, 2, 3, 4, 5, 6], 3, (1, 4), []),
])
def test_proposals_follow_vllms_rule(tokens, k, window, expected):
    assert ngram_proposal(tokens, k, *window) == expected


def test_proposals_equal_vllms_own_function_on_random_sequences():
    ngram = pytest.importorskip("vllm.v1.spec_decode.ngram_proposer")
    np = pytest.importorskip("numpy")
    vllm_rule = ngram._find_longest_matched_ngram_and_propose_tokens.py_func  # the numba function's Python
    rng = random.Random(0)
    for _ in range(400):
        tokens = [rng.randrange(rng.choice([2, 3, 5])) for _ in range(rng.randrange(1, 40))]
        k, lo = rng.randrange(1, 6), rng.randrange(1, 4)
        hi = lo + rng.randrange(0, 4)
        theirs = vllm_rule(np.array(tokens, dtype=np.int32), lo, hi, 10_000, k).tolist()
        assert ngram_proposal(tokens, k, lo, hi) == theirs, (tokens, k, lo, hi)


def test_the_proposer_gives_one_hot_q_and_stops_after_eos():
    proposer = NgramProposer(vocab_size=10, prompt_lookup_min=2, prompt_lookup_max=4)
    drafts, qs = proposer.propose([1, 2, 3, 4, 1, 2], 3, 1.0, 1.0, False, set(), None)
    assert drafts == [3, 4, 1] and len(qs) == 3
    assert all(q.shape == (10,) and q[x] == 1.0 and q.sum() == 1.0 for q, x in zip(qs, drafts, strict=True))
    assert proposer.propose([1, 2, 3, 4, 1, 2], 3, 1.0, 1.0, False, {4}, None)[0] == [3, 4]
    assert proposer.propose([1, 2, 3, 4, 5], 3, 1.0, 1.0, False, set(), None) == ([], [])
    with pytest.raises(ValueError, match="prompt_lookup_min <= prompt_lookup_max"):
        NgramProposer(10, 3, 2)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0, lm_scale=8.0)


REPEATING = [[5, 9, 2, 5, 9, 2, 5, 9], [3, 14, 15, 9, 26, 3, 14], *PROMPTS]


def _replayed_proposals(res, prompt: list[int], gamma: int, max_new: int) -> list[int]:
    """What the n-gram rule proposes before each iteration, from the tokens emitted until then."""
    out, done = [], 0
    for r in res.iterations:
        out.append(len(ngram_proposal(prompt + res.tokens[:done], min(gamma, max_new - done - 1), 2, 4)))
        done += r.num_emitted
    return out


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_output_is_the_targets_and_drafts_are_the_rules(target, gamma):
    proposer, accepted, max_new = NgramProposer(V, 2, 4), 0, 24
    for prompt in REPEATING:
        expected = autoregressive_generate(target, prompt, max_new)
        res = speculative_generate(target, proposer, prompt, gamma, max_new)
        assert res.tokens == expected, prompt
        # every iteration drafted what the rule proposes there; none matched: a plain target step
        assert [r.num_drafted for r in res.iterations] == _replayed_proposals(res, prompt, gamma, max_new)
        assert res.stats.block_efficiency == pytest.approx(len(res.tokens) / len(res.iterations))
        accepted += res.stats.num_accepted
    assert accepted > 0  # the target's loops repeat n-grams: some drafts were right


def test_a_sequence_without_repeats_is_decoded_by_plain_target_steps(target):
    res = speculative_generate(target, NgramProposer(V, 2, 4), [1, 2, 3, 4, 5, 6], 3, 1)
    assert [(r.num_drafted, r.num_accepted, r.num_emitted) for r in res.iterations] == [(0, 0, 1)]
    assert res.tokens == autoregressive_generate(target, [1, 2, 3, 4, 5, 6], 1)


def _likely_lookup(target, temperature: float, top_p: float) -> tuple[list[int], float]:
    """A prompt ending in a repeated bigram whose lookup proposes the token the target gives the most
    even odds at the first step (of 144 such prompts), so acceptance and rejection (the residual)
    are both exercised often."""
    prompts = [[b, 1, a, 5, b, 1] for b in range(V_SMALL) for a in range(V_SMALL)]
    p1 = next_probs(target, prompts, temperature, top_p)
    p_draft = p1[torch.arange(len(prompts)), torch.tensor([x[2] for x in prompts])]
    i = int((p_draft - 0.5).abs().argmin())
    return prompts[i], float(p_draft[i])


@pytest.mark.parametrize("temperature,top_p,runs", [(1.0, 1.0, 1000), (0.7, 0.9, 600)])
def test_sampled_output_follows_the_target(temperature, top_p, runs):
    target = tiny_llama(10, vocab=V_SMALL, hidden=32, layers=1, heads=2, lm_scale=12.0)
    prompt, p_draft = _likely_lookup(target, temperature, top_p)
    assert ngram_proposal(prompt, 2, 2, 4) == [prompt[2], 5]
    # exact target law of the first three emitted tokens
    p1 = next_probs(target, [prompt], temperature, top_p)[0]
    joint12 = p1[:, None] * next_probs(target, [prompt + [a] for a in range(V_SMALL)], temperature, top_p)
    p3 = next_probs(target, [prompt + [a, b] for a in range(V_SMALL) for b in range(V_SMALL)], temperature, top_p)
    marg3 = (joint12.flatten()[:, None] * p3).sum(0)
    gen, proposer = torch.Generator().manual_seed(99), NgramProposer(V_SMALL, 2, 4)
    counts12, counts3, first_accepted = torch.zeros(V_SMALL, V_SMALL), torch.zeros(V_SMALL), 0
    for _ in range(runs):
        res = speculative_generate(target, proposer, prompt, 2, 3, temperature, top_p, generator=gen)
        t1, t2, t3 = res.tokens
        counts12[t1, t2] += 1
        counts3[t3] += 1
        first_accepted += res.iterations[0].num_accepted >= 1
    for counts, probs in [(counts12, joint12), (counts3, marg3)]:
        stat, df = chi2_stat(counts, probs)
        assert stat < chi2_critical(df), (stat, df)
    # a one-hot q is accepted with probability Σ min(p, q) = p(x)
    assert 0.15 < p_draft < 0.85
    assert abs(first_accepted / runs - p_draft) < 4 * math.sqrt(p_draft * (1 - p_draft) / runs)
