"""Speculative-decoding metrics, defined as vLLM defines them (paper-spec §1.3 and §6.3).

All counts are pooled over every draft of every prompt: rates are ratios of totals, never a mean of
per-prompt means.  Vocabulary used throughout:

* a *draft* (one speculative iteration) is one target forward call that verifies up to γ draft tokens;
* ``num_draft_tokens`` is the number of draft tokens proposed (γ per draft unless a draft was shortened);
* ``num_accepted`` is the number of draft tokens that passed the acceptance test;
* ``accepted_per_pos[i]`` is the number of drafts whose position i (0-based) was accepted.

Block efficiency  τ = 1 + num_accepted / num_drafts       (vLLM's "mean acceptance length")
                  = num_emitted / num_drafts for SpecStats (the reference engine knows every emitted
                  token; the two differ only when a generation ends on an accepted EOS draft)
Acceptance rate   α̂ = num_accepted / num_draft_tokens        ("draft acceptance rate", vLLM's)
Tested acceptance α = num_accepted / (num_accepted + rejections), rejections = drafts stopped before γ
Per position      a_i = accepted_per_pos[i] / num_drafts
MBSU              τ / (1 + γ·c),  c = N_draft / N_target   (memory-bound speed-up)
Implied τ         (1 − α^{γ+1}) / (1 − α)                  (i.i.d. acceptance α; α = 1 gives γ + 1)

The implied τ takes the *tested* acceptance α, not α̂: drafts after the first rejection of a block are
never tested, so α̂ is well below the per-token acceptance (i.i.d. α = 0.8 at γ = 5 gives α̂ ≈ 0.54,
whose implied τ 2.13 is far from the measured 3.69).  Neither is Σ min(p, q) (``draftalign.training.losses.expected_acceptance``,
the distill stage's held-out "expected acceptance"), which is a per-position probability.

Each draft emits its accepted tokens plus one correction or bonus token, so 1 ≤ τ ≤ γ + 1.
Pure Python / numpy: no torch needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SpecStats",
    "acceptance_of_tested",
    "acceptance_per_position",
    "acceptance_rate",
    "block_efficiency",
    "implied_block_efficiency",
    "mbsu",
]


def _count(name: str, value: int) -> int:
    """Check that ``value`` is a non-negative integer count and return it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer count, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def block_efficiency(num_accepted: int, num_drafts: int, gamma: int | None = None) -> float:
    """Block efficiency τ = 1 + num_accepted / num_drafts (tokens emitted per target call).

    With zero drafts nothing was verified and τ = 1.0 by convention (plain decoding emits one token per
    target call).  When ``gamma`` is given, ``num_accepted <= gamma * num_drafts`` is checked, which is
    what guarantees τ ≤ γ + 1.
    """
    num_accepted = _count("num_accepted", num_accepted)
    num_drafts = _count("num_drafts", num_drafts)
    if gamma is not None and num_accepted > _count("gamma", gamma) * num_drafts:
        raise ValueError(f"num_accepted={num_accepted} exceeds gamma*num_drafts={gamma}*{num_drafts}")
    if num_drafts == 0:
        if num_accepted:
            raise ValueError(f"num_accepted={num_accepted} with zero drafts")
        return 1.0
    return 1.0 + num_accepted / num_drafts


def acceptance_rate(num_accepted: int, num_draft_tokens: int) -> float:
    """Draft acceptance rate α̂ = num_accepted / num_draft_tokens (0.0 when no token was drafted)."""
    num_accepted = _count("num_accepted", num_accepted)
    num_draft_tokens = _count("num_draft_tokens", num_draft_tokens)
    if num_accepted > num_draft_tokens:
        raise ValueError(f"num_accepted={num_accepted} exceeds num_draft_tokens={num_draft_tokens}")
    return num_accepted / num_draft_tokens if num_draft_tokens else 0.0


def acceptance_per_position(accepted_per_pos: Sequence[int], num_drafts: int) -> list[float]:
    """a_i = accepted_per_pos[i] / num_drafts: the fraction of drafts whose position i was accepted.

    Σ_i a_i = τ − 1.  With zero drafts every entry is 0.0.
    """
    num_drafts = _count("num_drafts", num_drafts)
    counts = [_count(f"accepted_per_pos[{i}]", c) for i, c in enumerate(accepted_per_pos)]
    for i, c in enumerate(counts):
        if c > num_drafts:
            raise ValueError(f"accepted_per_pos[{i}]={c} exceeds num_drafts={num_drafts}")
    return [c / num_drafts if num_drafts else 0.0 for c in counts]


def acceptance_of_tested(num_accepted: int, num_drafts: int, accepted_per_pos: Sequence[int]) -> float:
    """Per-token acceptance over the draft tokens that were tested: accepted / (accepted + rejections).

    Positions after a block's first rejection are never tested, so accepted / drafted underestimates
    the per-token acceptance.  A rejection is a block that stopped before γ = len(accepted_per_pos):
    num_drafts − accepted_per_pos[γ−1].  This is the maximum-likelihood α of i.i.d. acceptance, so
    ``implied_block_efficiency(acceptance_of_tested(...), γ)`` estimates τ when acceptance is i.i.d.
    Pooled counts cannot tell a final block shortened by the token budget or an EOS draft from a
    rejected one: such a block (at most one per prompt) counts as a rejection.  0.0 with nothing tested.
    """
    num_accepted = _count("num_accepted", num_accepted)
    num_drafts = _count("num_drafts", num_drafts)
    if not accepted_per_pos:
        raise ValueError("accepted_per_pos must hold gamma >= 1 counts")
    full = _count("accepted_per_pos[-1]", accepted_per_pos[-1])
    if full > num_drafts:
        raise ValueError(f"accepted_per_pos[-1]={full} exceeds num_drafts={num_drafts}")
    tested = num_accepted + num_drafts - full
    return num_accepted / tested if tested else 0.0


def mbsu(tau: float, gamma: int, c: float) -> float:
    """Memory-bound speed-up MBSU = τ / (1 + γ·c), with c = draft params / target params.

    Assumes per-call latency proportional to parameter count and free verification (paper-spec §6.3);
    e.g. τ = 2.3, γ = 3, c = 0.0164 gives ≈ 2.19.
    """
    gamma = _count("gamma", gamma)
    if not c >= 0:
        raise ValueError(f"c (draft/target parameter ratio) must be >= 0, got {c}")
    if not 1.0 - 1e-9 <= tau <= gamma + 1 + 1e-9:
        raise ValueError(f"tau={tau} outside [1, gamma + 1] = [1, {gamma + 1}]")
    return float(tau) / (1.0 + gamma * float(c))


def implied_block_efficiency(alpha: float, gamma: int) -> float:
    """τ implied by i.i.d. acceptance α: (1 − α^{γ+1}) / (1 − α) = Σ_{i=0}^{γ} α^i (γ + 1 at α = 1).

    Computed as the finite sum, which is exact at α = 1 and stable near it.
    """
    gamma = _count("gamma", gamma)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return float(sum(float(alpha) ** i for i in range(gamma + 1)))


@dataclass(frozen=True)
class SpecStats:
    """Pooled speculative-decoding counters for one draft length γ; add them to pool over prompts.

    ``num_drafts`` counts speculative iterations, i.e. target forward calls, including a final one
    whose draft was shortened (possibly to zero tokens) by the token budget or an EOS.
    ``num_emitted`` is the number of tokens actually emitted; it defaults to num_drafts + num_accepted
    (every draft emits its accepted tokens plus one) and can be smaller only when a generation ended on
    an accepted EOS draft token, which emits no extra token.  Invariants (ValueError otherwise):

    * every count >= 0, ``len(accepted_per_pos) == gamma``;
    * num_accepted <= num_draft_tokens <= gamma * num_drafts;
    * num_drafts >= accepted_per_pos[0] >= accepted_per_pos[1] >= ... (position i accepted implies all
      earlier positions were), and sum(accepted_per_pos) == num_accepted;
    * max(num_drafts, num_accepted) <= num_emitted <= num_drafts + num_accepted.

    Hence 1 <= τ = num_emitted / num_drafts <= γ + 1.  With zero drafts τ = 1.0 and the rates are 0.0.
    """

    num_drafts: int
    num_draft_tokens: int
    num_accepted: int
    accepted_per_pos: tuple[int, ...]
    num_emitted: int | None = None
    gamma: int | None = field(default=None)

    def __post_init__(self) -> None:
        # frozen dataclass: normalise fields through object.__setattr__
        per_pos = tuple(_count(f"accepted_per_pos[{i}]", c) for i, c in enumerate(self.accepted_per_pos))
        gamma = len(per_pos) if self.gamma is None else _count("gamma", self.gamma)
        drafts = _count("num_drafts", self.num_drafts)
        drafted = _count("num_draft_tokens", self.num_draft_tokens)
        accepted = _count("num_accepted", self.num_accepted)
        emitted = drafts + accepted if self.num_emitted is None else _count("num_emitted", self.num_emitted)
        if len(per_pos) != gamma:
            raise ValueError(f"accepted_per_pos has length {len(per_pos)}, expected gamma={gamma}")
        if accepted > drafted:
            raise ValueError(f"num_accepted={accepted} exceeds num_draft_tokens={drafted}")
        if drafted > gamma * drafts:
            raise ValueError(f"num_draft_tokens={drafted} exceeds gamma*num_drafts={gamma}*{drafts}")
        if any(b > a for a, b in zip(((drafts,) + per_pos)[:-1], per_pos, strict=True)):
            raise ValueError(
                f"accepted_per_pos={list(per_pos)} must be non-increasing and <= num_drafts={drafts}"
            )
        if sum(per_pos) != accepted:
            raise ValueError(f"sum(accepted_per_pos)={sum(per_pos)} != num_accepted={accepted}")
        if not max(drafts, accepted) <= emitted <= drafts + accepted:
            raise ValueError(
                f"num_emitted={emitted} outside [max(num_drafts, num_accepted), num_drafts + num_accepted]"
                f" = [{max(drafts, accepted)}, {drafts + accepted}]"
            )
        normalised = {"accepted_per_pos": per_pos, "gamma": gamma, "num_drafts": drafts,
                      "num_draft_tokens": drafted, "num_accepted": accepted, "num_emitted": emitted}
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @classmethod
    def empty(cls, gamma: int) -> SpecStats:
        """Zero counters for draft length ``gamma`` (the neutral element of ``+``)."""
        return cls(0, 0, 0, (0,) * _count("gamma", gamma), 0, gamma)

    @classmethod
    def from_iterations(cls, gamma: int, iterations: Iterable[tuple[int, int, int]]) -> SpecStats:
        """Build from per-iteration ``(num_drafted, num_accepted, num_emitted)`` records."""
        per_pos = [0] * _count("gamma", gamma)
        drafts = drafted = accepted = emitted = 0
        for n_drafted, n_accepted, n_emitted in iterations:
            # an iteration emits its accepted drafts plus one token, or only them if it ended on an EOS
            if not (0 <= n_accepted <= n_drafted <= gamma and n_emitted in (n_accepted, n_accepted + 1)
                    and n_emitted >= 1):
                raise ValueError(f"impossible iteration (drafted, accepted, emitted)="
                                 f"({n_drafted}, {n_accepted}, {n_emitted}) for gamma={gamma}")
            drafts, drafted = drafts + 1, drafted + n_drafted
            accepted, emitted = accepted + n_accepted, emitted + n_emitted
            for i in range(n_accepted):
                per_pos[i] += 1
        return cls(drafts, drafted, accepted, tuple(per_pos), emitted, gamma)

    def merge(self, other: SpecStats) -> SpecStats:
        """Pool two sets of counters (same γ): every count is summed."""
        if not isinstance(other, SpecStats):
            return NotImplemented
        if other.gamma != self.gamma:
            raise ValueError(f"cannot merge stats with gamma={self.gamma} and gamma={other.gamma}")
        return SpecStats(
            self.num_drafts + other.num_drafts,
            self.num_draft_tokens + other.num_draft_tokens,
            self.num_accepted + other.num_accepted,
            tuple(a + b for a, b in zip(self.accepted_per_pos, other.accepted_per_pos, strict=True)),
            self.num_emitted + other.num_emitted,
            self.gamma,
        )

    __add__ = merge

    def __radd__(self, other: object) -> SpecStats:
        # lets sum(list_of_stats) start from 0
        if other == 0:
            return self
        return NotImplemented

    @property
    def block_efficiency(self) -> float:
        """τ = num_emitted / num_drafts, tokens emitted per target call (paper-spec §6.3; 1.0 with zero
        drafts).

        Equal to vLLM's 1 + num_accepted / num_drafts except when a generation ended on an accepted EOS
        draft, which emits no bonus token: counting one there made a 1-token, 1-call run report τ = 2.
        """
        return self.num_emitted / self.num_drafts if self.num_drafts else 1.0

    @property
    def acceptance_rate(self) -> float:
        """num_accepted / num_draft_tokens."""
        return acceptance_rate(self.num_accepted, self.num_draft_tokens)

    @property
    def acceptance_per_position(self) -> list[float]:
        """Fraction of drafts whose position i was accepted, i = 0..γ−1."""
        return acceptance_per_position(self.accepted_per_pos, self.num_drafts)

    def mbsu(self, c: float) -> float:
        """Memory-bound speed-up τ / (1 + γ·c) for parameter ratio c = N_draft / N_target."""
        return mbsu(self.block_efficiency, self.gamma, c)
