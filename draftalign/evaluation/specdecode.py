"""Reference speculative sampling (Leviathan et al. 2023; Chen et al. 2023): an HF target and a draft side.

Batch size 1, pure torch, KV caches kept across iterations.  The draft side is a ``Proposer``: an HF
causal LM (``ModelProposer``, what ``speculative_generate`` makes of a model it is given), the n-gram
prompt lookup of ``draftalign.evaluation.ngram``, or any object with the protocol's two methods.  One
iteration:

1. the proposer drafts x_1..x_n with their distributions q_i (a model samples x_i ~ q_i = q(·|prefix,
   x_<i) autoregressively; a deterministic proposer gives a one-hot q_i);
2. the target scores prefix + x_1..x_n in ONE forward pass, giving p_1..p_{n+1};
3. x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), stopping at the first rejection;
4. at a rejection of x_{k+1} a correction is sampled from norm(max(0, p_{k+1} − q_{k+1}));
   if all n are accepted a bonus token is sampled from p_{n+1}.

The emitted tokens are distributed exactly as the target's own samples.  Temperature and top-p are
applied to both p and q first (``adjust_probs``).  Temperature 0 is greedy decoding, the limit case:
x_i = argmax q_i is accepted iff it equals argmax p_i and the correction is argmax p_{k+1}, so the
output is token-identical to the target's greedy decoding (up to floating-point ties between logits).

Draft length and stopping (how the statistics stay consistent):

* n = min(γ, remaining − 1), where remaining = max_new_tokens − tokens emitted so far.  An iteration
  emits at most n + 1 tokens, so max_new_tokens is never overshot and no accepted token is thrown
  away; only the final iteration(s) can draft fewer than γ tokens (n = 0 is a plain target step).
* A proposer stops proposing after an EOS token (tokens after EOS are never emitted).  If
  that EOS draft is accepted the generation ends without a bonus token: that iteration emits n tokens,
  not n + 1.  An emitted correction or bonus equal to EOS also ends the generation.

Every iteration is one target forward call and is recorded as (num_drafted, num_accepted,
num_emitted); ``SpecResult.stats`` pools them into a ``SpecStats`` (τ = emitted tokens / target calls,
which is 1 + accepted / drafts except after an accepted EOS draft: it emits no bonus token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers import DynamicCache, PreTrainedModel

from draftalign.evaluation.metrics import SpecStats

__all__ = ["IterationRecord", "ModelProposer", "Proposer", "SpecResult", "adjust_probs", "autoregressive_generate",
           "speculative_generate"]


@dataclass(frozen=True)
class IterationRecord:
    """One speculative iteration (= one target forward call)."""

    num_drafted: int
    num_accepted: int
    num_emitted: int


@dataclass
class SpecResult:
    """New tokens (prompt excluded), per-iteration records and their pooled statistics."""

    tokens: list[int]
    iterations: list[IterationRecord]
    stats: SpecStats


@runtime_checkable
class Proposer(Protocol):
    """The draft side of ONE speculative generation; ``speculative_generate`` calls, per iteration,
    ``propose``, then the target's verify pass, then ``accept``.

    An object may keep per-generation state (caches): give each generation a fresh one, as
    ``speculative_generate`` does for a model.  A stateless proposer (the n-gram one) may be reused.

    ``target_hidden_layers``: indices into the target's HF ``output_hidden_states`` tuple (0: the
    embeddings, i: the output of decoder layer i, the last after the final norm in HF Llama;
    negative indices count from the end) that ``accept`` receives from every verify pass.  None:
    none, and the target's forward does not compute them.
    """

    target_hidden_layers: tuple[int, ...] | None

    def propose(self, tokens: list[int], n_max: int, temperature: float, top_p: float, greedy: bool,
                eos: set[int], generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
        """Up to ``n_max`` (may be 0) drafts to follow ``tokens`` (the whole sequence so far, prompt
        included; do not modify it), and each draft's distribution q_i over the target's vocabulary,
        shape [V], already adjusted for ``temperature``/``top_p`` (``adjust_probs``); a one-hot for a
        deterministic proposer.  At T > 0 each x_i must be a sample of q_i (q_i(x_i) > 0); ``greedy``
        (T = 0): x_i = argmax q_i.  Stop after an EOS draft: nothing after EOS is ever emitted."""
        ...

    def accept(self, length: int, target_hidden: tuple[torch.Tensor, ...] | None, first: int) -> None:
        """After a verify pass: ``tokens[:length]`` are final and the next ``propose`` gets exactly them.

        The newest token, at position ``length - 1``, is a correction or bonus token the proposer did
        not propose, at a position where a rejected draft may have stood: keep state (caches) only for
        positions < ``length - 1``.  ``first``: the first position this verify pass fed to the target
        (0 on the first pass, which feeds the prompt; then the previous call's ``length - 1``).
        ``target_hidden``: None without ``target_hidden_layers``; else, per requested layer in its
        order, the target's hidden states [length - 1 - first, H] at positions first .. length - 2,
        all final tokens.  Over one generation they tile positions 0 .. final length - 2 without gap or
        overlap; the newest token's come with the next pass, which starts at it.
        """
        ...


def adjust_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Renormalised float32 probabilities softmax(logits / T) restricted to the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p`` (the most likely
    token is always kept).  ``temperature == 0`` gives the one-hot argmax distribution (greedy).
    Works on any leading shape; the vocabulary is the last dimension.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _prompt_list(input_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError(f"batch size must be 1, got input_ids of shape {tuple(input_ids.shape)}")
        input_ids = input_ids.reshape(-1).tolist()
    ids = [int(t) for t in input_ids]
    if not ids:
        raise ValueError("input_ids must hold at least one token")
    return ids


def _eos_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


def _check_args(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    adjust_probs(torch.zeros(1), temperature, top_p)  # validates temperature and top_p


def _forward(model: PreTrainedModel, cache: DynamicCache, ids: list[int], keep: int, temperature: float,
             top_p: float, hidden_layers: tuple[int, ...] | None = None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Feed ``ids`` after what ``cache`` holds: adjusted probs of the last ``keep`` positions, (keep, V),
    and with ``hidden_layers`` those hidden states at every fed position, each (len(ids), H)."""
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    # Hidden states cost memory and time: asked for only when a proposer reads them.
    extra = {} if hidden_layers is None else {"output_hidden_states": True}
    # position ids are derived from the cache length; logits_to_keep skips the lm_head on the prefix
    out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=keep, **extra)
    hidden = None if hidden_layers is None else tuple(out.hidden_states[i][0] for i in hidden_layers)
    return adjust_probs(out.logits[0, -keep:], temperature, top_p), hidden


def _forward_probs(model: PreTrainedModel, cache: DynamicCache, ids: list[int], keep: int,
                   temperature: float, top_p: float) -> torch.Tensor:
    """Feed ``ids`` after what ``cache`` holds; adjusted probs of the last ``keep`` positions, (keep, V)."""
    return _forward(model, cache, ids, keep, temperature, top_p)[0]


def _sample(probs: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> int:
    if greedy:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def _new_cache(model: PreTrainedModel) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    # sliding-window / linear-attention layers can only be cropped (rolled back) when they keep their
    # past states; full-attention layers ignore this
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()
    return cache


def _crop(cache: DynamicCache, length: int) -> None:
    """Keep only the first ``length`` positions of ``cache``.

    transformers 5.x: ``crop(-k)`` removes k positions (a positive argument is the deprecated
    "keep n" form) and crop(0) must be avoided (in 4.x it emptied the cache), so only call with k > 0.
    """
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def autoregressive_generate(target: PreTrainedModel, input_ids: Sequence[int] | torch.Tensor,
                            max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                            eos_token_id: int | Sequence[int] | None = None,
                            generator: torch.Generator | None = None) -> list[int]:
    """Plain target decoding, one target call per token, with the same sampler (baseline and tests).

    Returns the new tokens (at most ``max_new_tokens``; ends after an EOS token).
    """
    _check_args(max_new_tokens, temperature, top_p)
    tokens, eos, greedy = _prompt_list(input_ids), _eos_set(eos_token_id), temperature == 0
    new: list[int] = []
    with torch.inference_mode():
        cache = _new_cache(target)
        while len(new) < max_new_tokens:
            p = _forward_probs(target, cache, tokens[cache.get_seq_length():], 1, temperature, top_p)[0]
            y = _sample(p, greedy, generator)
            tokens.append(y)
            new.append(y)
            if y in eos:
                break
    return new


def _draft_block(draft: PreTrainedModel, d_cache: DynamicCache, pending: list[int], n_max: int, temperature: float,
                 top_p: float, greedy: bool, eos: set[int], generator: torch.Generator | None
                 ) -> tuple[list[int], list[torch.Tensor]]:
    """Step 1: the draft proposes up to ``n_max`` tokens (stopping after an EOS); their q distributions."""
    drafts: list[int] = []
    qs: list[torch.Tensor] = []
    for _ in range(n_max):
        q = _forward_probs(draft, d_cache, pending, 1, temperature, top_p)[0]
        x = _sample(q, greedy, generator)
        drafts.append(x)
        qs.append(q)
        pending = [x]
        if x in eos:  # nothing after EOS is ever emitted: stop drafting
            break
    return drafts, qs


class ModelProposer:
    """An HF causal LM as the draft side: samples its drafts autoregressively, with a KV cache that
    ``accept`` rolls back to the final tokens.  One generation per object."""

    target_hidden_layers = None

    def __init__(self, draft: PreTrainedModel) -> None:
        self.draft, self.cache = draft, _new_cache(draft)

    def propose(self, tokens: list[int], n_max: int, temperature: float, top_p: float, greedy: bool,
                eos: set[int], generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
        # the cache holds a prefix of ``tokens``: feed what it lacks, then the drafts one by one
        return _draft_block(self.draft, self.cache, tokens[self.cache.get_seq_length():], n_max, temperature,
                            top_p, greedy, eos, generator)

    def accept(self, length: int, target_hidden: tuple[torch.Tensor, ...] | None, first: int) -> None:
        # a rejected draft may sit at length - 1 in the cache: the newest token is fed next time
        _crop(self.cache, length - 1)


def _model_proposer(target: PreTrainedModel, draft: PreTrainedModel) -> ModelProposer:
    t_vocab, d_vocab = target.config.get_text_config().vocab_size, draft.config.get_text_config().vocab_size
    if t_vocab != d_vocab:
        raise ValueError(f"target vocab_size={t_vocab} differs from draft vocab_size={d_vocab}: "
                         "speculative decoding needs one shared vocabulary")
    return ModelProposer(draft)


def _num_accepted(p: torch.Tensor, qs: list[torch.Tensor], drafts: list[int], greedy: bool,
                  generator: torch.Generator | None) -> int:
    """Step 3: the acceptance test, k = number of leading accepted drafts."""
    n = len(drafts)
    if n == 0:
        return 0
    if greedy:
        return int((p[:n].argmax(-1) == torch.tensor(drafts, device=p.device)).long().cumprod(0).sum())
    q = torch.stack(qs).to(p.device)
    idx, xs = torch.arange(n, device=p.device), torch.tensor(drafts, device=p.device)
    ratio = p[idx, xs] / q[idx, xs]  # q_i(x_i) > 0 since x_i was sampled from q_i
    u = torch.rand(n, generator=generator, device=p.device)
    return int((u < ratio).long().cumprod(0).sum())  # P(u < r) = min(1, r) for u ~ U[0, 1)


def _emit(p: torch.Tensor, qs: list[torch.Tensor], drafts: list[int], k: int, greedy: bool, eos: set[int],
          generator: torch.Generator | None) -> tuple[list[int], bool]:
    """Step 4: the accepted drafts plus the correction from the residual at the first rejection, or the
    bonus token from p_{n+1}; and whether the generation is done."""
    n, emitted = len(drafts), drafts[:k]
    if k == n and n > 0 and drafts[-1] in eos:
        return emitted, True  # accepted EOS draft ends the generation: no bonus token
    if k < n and not greedy:
        residual = (p[k] - qs[k].to(p.device)).clamp_min(0.0)
        # residual sums to 0 only if p_k == q_k up to rounding; then p_k is the right law
        y = _sample(residual if residual.sum() > 0 else p[k], False, generator)
    else:
        y = _sample(p[k], greedy, generator)
    emitted.append(y)
    return emitted, y in eos


def speculative_generate(target: PreTrainedModel, draft: PreTrainedModel | Proposer,
                         input_ids: Sequence[int] | torch.Tensor, gamma: int, max_new_tokens: int,
                         temperature: float = 0.0, top_p: float = 1.0,
                         eos_token_id: int | Sequence[int] | None = None,
                         generator: torch.Generator | None = None) -> SpecResult:
    """Speculative sampling of up to ``max_new_tokens`` tokens with draft length ``gamma`` (see module doc).

    ``draft``: an HF model (a fresh ``ModelProposer`` drafts with it) or a ``Proposer``, used for this one
    generation.  Models must be in eval mode, on the same device as ``generator`` (None: torch's global
    RNG).  Raises ValueError if a draft model's ``config.vocab_size`` differs from the target's.
    """
    proposer = draft if isinstance(draft, Proposer) else _model_proposer(target, draft)
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    _check_args(max_new_tokens, temperature, top_p)
    tokens, eos, greedy = _prompt_list(input_ids), _eos_set(eos_token_id), temperature == 0
    n_prompt, records, done = len(tokens), [], False
    layers = proposer.target_hidden_layers
    with torch.inference_mode():
        # invariant at the top of the loop: the target's cache holds ``tokens`` without the last one
        t_cache = _new_cache(target)
        while not done and (remaining := max_new_tokens - (len(tokens) - n_prompt)) > 0:
            base, first = len(tokens), t_cache.get_seq_length()
            # 1. the proposer drafts n <= min(gamma, remaining - 1) tokens so that n + 1 fits the budget
            drafts, qs = proposer.propose(list(tokens), min(gamma, remaining - 1), temperature, top_p, greedy,
                                          eos, generator)
            n = len(drafts)
            # 2. one target pass over the uncached tokens and all drafts gives p_1..p_{n+1}
            p, hidden = _forward(target, t_cache, tokens[first:] + drafts, n + 1, temperature, top_p, layers)
            _check_q(qs, n, p)
            k = _num_accepted(p, qs, drafts, greedy, generator)
            emitted, done = _emit(p, qs, drafts, k, greedy, eos, generator)
            tokens.extend(emitted)
            records.append(IterationRecord(n, k, len(emitted)))
            # drop rejected drafts from the cache; the newest token stays uncached for the next pass
            _crop(t_cache, base + k)
            # the pass fed positions first..base+n-1; those before the newest token hold final tokens
            final = None if hidden is None else tuple(h[:len(tokens) - 1 - first] for h in hidden)
            proposer.accept(len(tokens), final, first)
    return SpecResult(tokens=tokens[n_prompt:], iterations=records,
                      stats=SpecStats.from_iterations(gamma, [(r.num_drafted, r.num_accepted, r.num_emitted)
                                                              for r in records]))


def _check_q(qs: list[torch.Tensor], n: int, p: torch.Tensor) -> None:
    """A proposer's q must be one [V] distribution per draft over the target's vocabulary."""
    if len(qs) != n or any(q.shape != p.shape[1:] for q in qs):
        raise ValueError(f"a proposer returned {n} drafts with q of shapes {[tuple(q.shape) for q in qs]}; "
                         f"the target's distributions have shape {tuple(p.shape[1:])}")
