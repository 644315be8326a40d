"""Bootstrap intervals for pooled ratios such as τ, over prompts (numpy only).

A cell's τ is a ratio of sums over its n prompts, τ = Σ_i a_i / Σ_i b_i (a_i: tokens the prompt
emitted, b_i: its target calls; see draftalign.evaluation.report.tau_counts). The prompts are the
sampling unit, so the interval resamples them:

* percentile bootstrap: draw B index vectors I_1..I_B, each n prompts with replacement from a seeded
  ``numpy.random.Generator``; τ*_j = Σ_{i∈I_j} a_i / Σ_{i∈I_j} b_i; the (1 − level)/2 and
  (1 + level)/2 quantiles of τ*_1..τ*_B are the interval (95%: the 2.5% and 97.5% quantiles);
* paired difference of drafters A and B on the same prompts (only the prompt ids both have): one
  index vector per resample serves both, Δ*_j = τ*_A,j − τ*_B,j, so the prompts' shared difficulty
  cancels; its percentile interval is the interval of Δ = τ_A − τ_B;
* a comparison group (one task × engine × γ × T): the drafters ranked by τ; the leader is "best" only
  where the interval of leader − runner-up excludes 0 (lies above it), else "tied" with every drafter
  whose interval against the leader does not lie above 0. (The ranking pools each drafter's own
  prompts; the pairing only the common ones, where a lead can reverse: that is a tie, not a best.)

A resample whose denominators sum to 0 (no target call at all) takes ``empty`` (τ = 1 by convention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["RESAMPLES", "SEED", "LEVEL", "bootstrap_ci", "paired_difference_ci", "compare_drafters"]

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


def _ratios(num: np.ndarray, den: np.ndarray, idx: np.ndarray, empty: float) -> np.ndarray:
    """Σ num / Σ den over each row of ``idx`` (one resample per row)."""
    top, bottom = num[idx].sum(axis=-1), den[idx].sum(axis=-1)
    return np.divide(top, bottom, out=np.full(top.shape, empty, dtype=float), where=bottom > 0)


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` × n prompt indices drawn with replacement: the same for the same (n, resamples, seed)."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ci(numerators: Sequence[float], denominators: Sequence[float], resamples: int = RESAMPLES,
                 seed: int = SEED, level: float = LEVEL, empty: float = 1.0) -> tuple[float, float, float]:
    """(Σa / Σb, low, high): the pooled ratio and its percentile bootstrap interval over the items.

    Items i = 1..n carry a_i = numerators[i], b_i = denominators[i]; B = ``resamples`` resamples of
    n items with replacement (``numpy.random.default_rng(seed)``), the interval the (1 ∓ level)/2
    quantiles of the resampled ratios. One item gives a zero-width interval; none raises ValueError.
    """
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if num.shape != den.shape or num.ndim != 1 or not len(num):
        raise ValueError("numerators and denominators must be equal-length, non-empty sequences")
    point = float(_ratios(num, den, np.arange(len(num)), empty))
    return (point, *_interval(_ratios(num, den, _indices(len(num), resamples, seed), empty), level))


def paired_difference_ci(num_a: Sequence[float], den_a: Sequence[float], num_b: Sequence[float],
                         den_b: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                         level: float = LEVEL, empty: float = 1.0) -> tuple[float, float, float]:
    """(Δ, low, high) for Δ = Σa_A/Σb_A − Σa_B/Σb_B over the same items, item i of A paired with item i of B.

    Each resample draws one index vector and applies it to both drafters, so Δ*_j is the difference
    on the same resampled prompts; the interval is the (1 ∓ level)/2 quantiles of Δ*_1..Δ*_B.
    Identical drafters give Δ*_j = 0 for every j: the interval [0, 0], which contains 0.
    """
    arrays = [np.asarray(x, dtype=float) for x in (num_a, den_a, num_b, den_b)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1 or not len(arrays[0]):
        raise ValueError("the four sequences must be equal-length and non-empty (the same items, in order)")
    n = len(arrays[0])
    full, idx = np.arange(n), _indices(n, resamples, seed)
    point = float(_ratios(*arrays[:2], full, empty) - _ratios(*arrays[2:], full, empty))
    diffs = _ratios(*arrays[:2], idx, empty) - _ratios(*arrays[2:], idx, empty)
    return (point, *_interval(diffs, level))


def _paired(a: Mapping[str, tuple[float, float]], b: Mapping[str, tuple[float, float]], resamples: int,
            seed: int, level: float) -> tuple[float, float, float, int]:
    """Paired (Δ, low, high, n) of two drafters over the prompt ids both have (in A's order)."""
    common = [p for p in a if p in b]
    if not common:
        return float("nan"), float("nan"), float("nan"), 0
    cols = [[x[p][k] for p in common] for x in (a, b) for k in (0, 1)]
    return (*paired_difference_ci(*cols, resamples=resamples, seed=seed, level=level), len(common))


def _pooled(counts, empty: float = 1.0) -> float:
    """Σa / Σb of (a, b) pairs; ``empty`` when Σb = 0."""
    top, bottom = sum(a for a, _ in counts), sum(b for _, b in counts)
    return top / bottom if bottom else empty


def _ahead(lo: float) -> bool:
    """The leader − other interval lies above 0 (a NaN, no prompt in common, is not ahead)."""
    return bool(lo > 0)


def compare_drafters(cells: Mapping[str, Mapping[str, tuple[float, float]]], resamples: int = RESAMPLES,
                     seed: int = SEED, level: float = LEVEL) -> dict:
    """Rank one comparison group's drafters by pooled τ and decide "best" or "tied".

    cells: drafter -> {prompt id: (a_i, b_i)}. Returns ``ranking`` (drafters, highest τ first; equal τ
    keep the given order), ``verdict`` ("best" when the paired interval of leader − runner-up excludes
    0, i.e. its low end is above 0; else "tied"), ``leaders`` (the leader alone when best; when tied,
    the leader and every drafter whose paired interval against the leader is not above 0), and ``pairs``: for each drafter but the
    leader, (Δ, low, high, n) of the leader − that drafter on their common prompts. Fewer than two
    drafters: verdict None.
    """
    taus = {d: _pooled(c.values()) for d, c in cells.items() if c}
    ranking = sorted(taus, key=lambda d: -taus[d])
    if len(ranking) < 2:
        return {"ranking": ranking, "verdict": None, "leaders": ranking, "pairs": {}}
    leader = ranking[0]
    pairs = {d: _paired(cells[leader], cells[d], resamples, seed, level) for d in ranking[1:]}
    best = _ahead(pairs[ranking[1]][1])
    tied = [leader] if best else [leader, *(d for d in ranking[1:] if not _ahead(pairs[d][1]))]
    return {"ranking": ranking, "verdict": "best" if best else "tied", "leaders": tied, "pairs": pairs}
