"""The n-gram (prompt lookup) drafter: the free baseline a user would try first, with vLLM's rule.

vLLM's `method: ngram` (vllm/v1/spec_decode/ngram_proposer.py, `_find_longest_matched_ngram_and_propose_tokens`,
vLLM 0.32) looks the sequence's last n tokens up earlier in the same sequence (prompt and answer
so far) and proposes the tokens that followed:

* n is the longest in [prompt_lookup_min, prompt_lookup_max] whose suffix n-gram occurs earlier
  (an occurrence may overlap the suffix, but not be it); none: no proposal;
* of that n-gram's occurrences, the earliest in the sequence;
* it proposes the (up to) k tokens after that occurrence, fewer where the sequence ends first.

No weights and no distribution of its own: q is one-hot on each proposal, so exact speculative
sampling accepts x with probability p(x) and, on a rejection, samples the residual p with x
removed (renormalised); vLLM's rejection sampler does the same for drafts without probabilities.
The reference decoder stops a proposal after an EOS token (nothing after EOS is emitted); vLLM
proposes through it, which changes no emitted token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NgramProposer", "ngram_proposal"]


def ngram_proposal(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """vLLM's n-gram proposal for ``tokens``: up to ``k`` tokens (the module doc states the rule)."""
    if not 1 <= min_n <= max_n:
        raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, {max_n}")
    seq = list(tokens)
    total = len(seq)
    if k <= 0 or total < min_n:
        return []
    # Longest first: an occurrence of the n-gram holds one of every shorter suffix, so the first n
    # that matches is vLLM's longest match, which it then checks against min_n.
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = seq[total - n:]
        head = suffix[0]
        for start in range(total - n):  # earliest first; the suffix itself starts at total - n
            if seq[start] == head and seq[start:start + n] == suffix:
                return seq[start + n:start + n + k]
    return []


class NgramProposer:
    """The n-gram drafter as a ``specdecode.Proposer``: stateless, so one object serves every
    generation; q is one-hot over the target's ``vocab_size`` tokens."""

    target_hidden_layers = None

    def __init__(self, vocab_size: int, prompt_lookup_min: int = 2, prompt_lookup_max: int = 4,
                 device: torch.device | str = "cpu") -> None:
        ngram_proposal([], 0, prompt_lookup_min, prompt_lookup_max)  # validates the window
        self.vocab_size, self.min_n, self.max_n = vocab_size, prompt_lookup_min, prompt_lookup_max
        self.device = torch.device(device)

    def propose(self, tokens: list[int], n_max: int, temperature: float, top_p: float, greedy: bool,
                eos: set[int], generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
        drafts = ngram_proposal(tokens, n_max, self.min_n, self.max_n)
        cut = next((i + 1 for i, x in enumerate(drafts) if x in eos), len(drafts))
        drafts = drafts[:cut]  # nothing after an EOS is ever emitted
        if not drafts:
            return [], []
        q = torch.nn.functional.one_hot(torch.tensor(drafts, device=self.device), self.vocab_size).float()
        return drafts, list(q.unbind(0))

    def accept(self, length: int, target_hidden: tuple[torch.Tensor, ...] | None, first: int) -> None:
        pass  # it reads the tokens anew at every proposal
