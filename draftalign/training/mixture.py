"""The on-policy mixture (GKD's lmbda): which training rows come from the target's answers and
which from the drafter's own, as a fraction λ of the rows, the same on every run.

Pure functions, no Ray: the driver plans the mixture from the two sets' row keys, and Ray Data
keeps a row when its rank is within its set's cut. A row's rank is a seeded hash of its set and
row key, so the choice depends on neither file nor block order, and a rerun picks the same rows
(distill resumes and reuses by the same rule).

The mixture is the largest one with exactly λ on-policy rows that repeats no row: with sets of
n_T and n_O training rows it takes k_O = λ N and k_T = (1 − λ) N rows, N as large as both sets
allow. At λ = 0.5 with equal sets that is every row of both; at λ = 0.25, every target row and
a third of the on-policy ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["TARGET", "ON_POLICY", "Cut", "MixturePlan", "row_rank", "mixture_counts", "cut_for", "plan_mixture"]

TARGET, ON_POLICY = "target", "on_policy"  # the two sets' tags in the ranks

Rank = tuple[int, str]  # (64-bit hash, row key): ties broken by the key, so every cut is exact


def row_rank(seed: int, tag: str, key: str) -> Rank:
    """A row's place in its set's seeded random order (tag: TARGET or ON_POLICY, so a row key that
    both sets hold, the same seed and setting, is ranked independently in each)."""
    digest = hashlib.blake2b(f"{seed}\0{tag}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big"), key


def mixture_counts(n_target: int, n_on_policy: int, fraction: float) -> tuple[int, int]:
    """(k_target, k_on_policy): the largest mixture with k_on_policy / (k_target + k_on_policy) = λ
    (rounded to whole rows) that takes no row twice."""
    lam = Fraction(fraction).limit_denominator(10**6)  # exact arithmetic: no off-by-one from floats
    if lam == 0:
        return n_target, 0
    if lam == 1:
        return 0, n_on_policy
    # N = min(n_T / (1 - λ), n_O / λ): one of the sets is used whole, the other as λ asks.
    if n_on_policy * (1 - lam) <= n_target * lam:
        return min(n_target, round(n_on_policy * (1 - lam) / lam)), n_on_policy
    return n_target, min(n_on_policy, round(n_target * lam / (1 - lam)))


@dataclass(frozen=True)
class Cut:
    """Keep the `count` rows of one set whose rank is at most `last` (None: keep none)."""

    tag: str
    count: int
    of: int  # the set's training rows
    last: Rank | None

    def keeps(self, seed: int, key: str) -> bool:
        return self.last is not None and row_rank(seed, self.tag, key) <= self.last


def cut_for(keys: Iterable[str], seed: int, tag: str, count: int) -> Cut:
    """The cut that keeps exactly `count` of `keys` (unique row keys), lowest ranks first."""
    ranks = sorted(row_rank(seed, tag, k) for k in keys)
    count = min(count, len(ranks))
    return Cut(tag, count, len(ranks), ranks[count - 1] if count else None)


@dataclass(frozen=True)
class MixturePlan:
    fraction: float
    seed: int
    target: Cut
    on_policy: Cut

    def summary(self) -> dict[str, object]:
        """What the logs and the exported model's metrics record."""
        t, o = self.target, self.on_policy
        total = t.count + o.count
        return {"on_policy_fraction": self.fraction, "target_rows": t.count, "target_rows_available": t.of,
                "on_policy_rows": o.count, "on_policy_rows_available": o.of,
                "on_policy_share": round(o.count / total, 4) if total else 0.0}


def plan_mixture(target_keys: Iterable[str], on_policy_keys: Iterable[str], fraction: float, seed: int) -> MixturePlan:
    """The rows to train on: the training (not held-out) row keys of each set in, two cuts out."""
    target_keys, on_policy_keys = set(target_keys), set(on_policy_keys)
    k_target, k_on_policy = mixture_counts(len(target_keys), len(on_policy_keys), fraction)
    return MixturePlan(fraction, seed, cut_for(target_keys, seed, TARGET, k_target),
                       cut_for(on_policy_keys, seed, ON_POLICY, k_on_policy))
