"""specdecode's draft side as a Proposer: what accept() receives, and the target's hidden states."""

from __future__ import annotations

import pytest
import torch

from draftalign.evaluation.specdecode import (
    ModelProposer,
    Proposer,
    autoregressive_generate,
    speculative_generate,
)
from tests.test_specdecode import PROMPTS, V, perturbed, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Scripted:
    """Proposes the target's own greedy continuation, wrong in every other block's second draft and
    silent in its first call (as a feature drafter is before any target pass), recording accept()."""

    def __init__(self, answer: list[int], n_prompt: int, layers: tuple[int, ...] | None) -> None:
        self.answer, self.n_prompt, self.target_hidden_layers = answer, n_prompt, layers
        self.calls: list[tuple[int, int, tuple[torch.Tensor, ...] | None]] = []  # (length, first, hidden)
        self.proposals = 0

    def propose(self, tokens, n_max, temperature, top_p, greedy, eos, generator):
        self.proposals += 1
        if self.proposals == 1:
            return [], []
        done = len(tokens) - self.n_prompt
        drafts = self.answer[done:done + n_max]
        if self.proposals % 2 and len(drafts) > 1:
            drafts[1] = (drafts[1] + 1) % V  # rejected: the target's argmax is the answer's token
        q = torch.nn.functional.one_hot(torch.tensor(drafts, dtype=torch.long), V).float()
        return drafts, list(q.unbind(0))

    def accept(self, length, target_hidden, first):
        self.calls.append((length, first, target_hidden))


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0, lm_scale=8.0)


def test_models_and_proposers_are_told_apart():
    assert isinstance(ModelProposer(tiny_llama(3, hidden=32, layers=1, heads=2)), Proposer)
    assert not isinstance(tiny_llama(3, hidden=32, layers=1, heads=2), Proposer)


@pytest.mark.parametrize("layers", [(0, 1, -1), (2,)])
def test_accept_receives_the_targets_hidden_states_of_the_final_positions(target, layers):
    prompt, gamma, n_new = PROMPTS[3], 3, 20
    answer = autoregressive_generate(target, prompt, n_new)
    proposer = Scripted(answer, len(prompt), layers)
    res = speculative_generate(target, proposer, prompt, gamma, n_new)
    assert res.tokens == answer
    assert any(r.num_accepted < r.num_drafted for r in res.iterations)  # rejections were rolled back
    final = prompt + res.tokens
    with torch.inference_mode():
        full = target(input_ids=torch.tensor([final]), output_hidden_states=True).hidden_states
    position = 0
    for length, first, hidden in proposer.calls:
        assert first == position  # the passes tile the sequence: each starts at the previous newest token
        assert len(hidden) == len(layers)
        for h, layer in zip(hidden, layers, strict=True):
            assert h.shape == (length - 1 - first, full[layer].shape[-1])
            torch.testing.assert_close(h, full[layer][0, first:length - 1], atol=1e-4, rtol=1e-4)
        position = length - 1
    assert position == len(final) - 1 and len(proposer.calls) == len(res.iterations)


def test_the_target_computes_hidden_states_only_for_a_proposer_that_reads_them(target):
    asked: list[bool] = []
    hook = target.register_forward_pre_hook(
        lambda module, args, kwargs: asked.append(bool(kwargs.get("output_hidden_states"))), with_kwargs=True)
    try:
        answer = autoregressive_generate(target, PROMPTS[1], 8)
        asked.clear()
        proposer = Scripted(answer, len(PROMPTS[1]), None)
        speculative_generate(target, proposer, PROMPTS[1], 3, 8)
        assert asked and not any(asked) and all(hidden is None for _, _, hidden in proposer.calls)
        speculative_generate(target, Scripted(answer, len(PROMPTS[1]), (1,)), PROMPTS[1], 3, 8)
        assert all(asked[len(proposer.calls):])
    finally:
        hook.remove()


def test_a_model_drafts_the_same_wrapped_or_not(target):
    draft = perturbed(target, 0.005, seed=5)
    for prompt in PROMPTS:
        plain = speculative_generate(target, draft, prompt, 3, 16)
        wrapped = speculative_generate(target, ModelProposer(draft), prompt, 3, 16)
        assert wrapped.tokens == plain.tokens and wrapped.iterations == plain.iterations


def test_a_proposer_whose_q_is_not_over_the_targets_vocabulary_is_refused(target):
    class Narrow(Scripted):
        def propose(self, tokens, n_max, *args):
            return [1], [torch.ones(V // 2) / (V // 2)]

    with pytest.raises(ValueError, match="shape"):
        speculative_generate(target, Narrow([], 1, None), [1, 2], 3, 4)
