"""A feature drafter as speculative decoding's draft side, as vLLM's eagle3 method runs it.

The drafter keeps its own KV cache. Positions whose target features are known (every final token
but the newest: the target's verify pass computed them) enter that cache through the fused target
features; each draft then chains on the drafter's own output. After a verify step the chained
entries are dropped and the accepted positions come back with the target's features instead, so a
draft always starts from the target's view of every token it can see.

The first iteration has no target features yet (the target has not read the prompt), so it drafts
nothing: that pass is the target's prefill, which emits the first token, as in vLLM. From then on
every iteration drafts up to γ tokens.
"""

from __future__ import annotations

import torch

from draftalign.evaluation.specdecode import adjust_probs
from draftalign.models.draftvocab import scatter_to_full
from draftalign.models.feature import FeatureDrafter

__all__ = ["FeatureProposer"]


class FeatureProposer:
    """The draft side of one generation (specdecode.Proposer) for a :class:`FeatureDrafter`."""

    def __init__(self, draft: FeatureDrafter) -> None:
        self.draft = draft
        self.target_hidden_layers = tuple(draft.spec.target_layers)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cached = 0  # positions 0..cached-1 are in the cache, from the target's features
        self.pending: list[torch.Tensor] = []  # target features [n, k·H] not yet fed, in position order
        self.known = 0  # positions 0..known-1 have target features

    def accept(self, length: int, target_hidden: tuple[torch.Tensor, ...] | None, first: int) -> None:
        if target_hidden is None:
            raise ValueError("a feature drafter needs the target's hidden states from every verify pass")
        if first != self.known:
            raise ValueError(f"target features from position {first}, expected {self.known}")
        self.pending.append(torch.cat(target_hidden, dim=-1))
        self.known = length - 1

    def propose(self, tokens: list[int], n_max: int, temperature: float, top_p: float, greedy: bool,
                eos: set[int], generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
        if n_max <= 0 or self.known == 0:
            return [], []
        logits, hidden = self._catch_up(tokens)
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        position = self.known  # where the first chained step sits: after the last known position
        while True:
            q = adjust_probs(self._full_vocab(logits), temperature, top_p)
            x = int(q.argmax()) if greedy else int(torch.multinomial(q, 1, generator=generator))
            drafts.append(x)
            qs.append(q)
            if x in eos or len(drafts) == n_max:
                return drafts, qs
            step_logits, hidden = self.draft.step(hidden, self._ids([x]), self._positions(position, 1), self.cache)
            logits, position = step_logits[0, -1], position + 1

    def _catch_up(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the last chain, feed the positions whose target features came in; the last one's
        logits [V'] and output [1, 1, H] (the first draft, and what the chain continues from)."""
        for i, (k, v) in enumerate(self.cache):
            self.cache[i] = (k[:, :, :self.cached], v[:, :, :self.cached])
        features = torch.cat(self.pending).to(self.draft.device)
        self.pending = []
        # position t reads the token after it, x_{t+1}
        nxt = self._ids(tokens[self.cached + 1:self.known + 1])
        logits, hidden = self.draft.step(self.draft.fuse(features)[None], nxt,
                                         self._positions(self.cached, self.known - self.cached), self.cache)
        self.cached = self.known
        return logits[0, -1], hidden[:, -1:]

    def _full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [V'] as the target's [V]: −inf (q = 0) outside the draft vocabulary."""
        return scatter_to_full(logits, self.draft.draft_ids, self.draft.spec.vocab_size)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.draft.device)

    def _positions(self, start: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n, device=self.draft.device)
