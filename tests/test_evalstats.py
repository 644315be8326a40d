"""Bootstrap intervals of τ over prompts and the best/tied rule (draftalign/evaluation/stats.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from draftalign.evaluation.metrics import SpecStats
from draftalign.evaluation.report import comparison_table, paired_differences, summarize_rows, write_report
from draftalign.evaluation.rows import EvalRow
from draftalign.evaluation.stats import bootstrap_ci, compare_drafters, paired_difference_ci
from tests.test_evalreport import _row

# ten prompts: tokens emitted, target calls; PINNED: their 95% interval at 2,000 resamples, seed 0
PINNED = (1.9047619047619047, 2.5)  # 40/21 and 5/2: quantiles of ratios of sums
EMITTED = [3, 5, 2, 7, 4, 6, 3, 5, 4, 8]
CALLS = [2, 2, 1, 3, 2, 2, 2, 2, 2, 3]


def _prompts(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n prompts of 5–40 target calls each emitting 1–4 tokens per call."""
    rng = np.random.default_rng(seed)
    calls = rng.integers(5, 40, size=n)
    return calls * rng.uniform(1.0, 4.0, size=n), calls


def test_a_seeded_bootstrap_is_pinned():
    point, lo, hi = bootstrap_ci(EMITTED, CALLS, resamples=2000, seed=0)
    assert point == pytest.approx(47 / 21)  # the pooled ratio Σ emitted / Σ calls, not a mean of ratios
    assert (lo, hi) == pytest.approx(PINNED, abs=1e-9)
    assert bootstrap_ci(EMITTED, CALLS, resamples=2000, seed=0) == (point, lo, hi)  # seeded: repeatable
    assert bootstrap_ci(EMITTED, CALLS, resamples=2000, seed=1)[1:] != (lo, hi)
    assert bootstrap_ci([4], [2]) == (2.0, 2.0, 2.0)  # one prompt: nothing to resample
    assert bootstrap_ci([0, 0], [0, 0]) == (1.0, 1.0, 1.0)  # no target call: τ = 1 by convention
    with pytest.raises(ValueError):
        bootstrap_ci([], [])


def test_the_interval_holds_the_estimate_and_shrinks_with_more_prompts():
    widths = []
    for n in (20, 80, 320):
        point, lo, hi = bootstrap_ci(*_prompts(n, seed=n), seed=3)
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.5)  # ∝ 1/√n


def test_identical_drafters_are_tied():
    a, b = _prompts(30, seed=5)
    assert paired_difference_ci(a, b, a, b) == (0.0, 0.0, 0.0)
    same = {str(i): (x, y) for i, (x, y) in enumerate(zip(a, b, strict=True))}
    v = compare_drafters({"d1": same, "d2": dict(same)})
    assert v["verdict"] == "tied" and v["leaders"] == ["d1", "d2"]
    assert v["pairs"]["d2"][:3] == (0.0, 0.0, 0.0) and v["pairs"]["d2"][3] == 30


def test_a_drafter_better_on_every_prompt_is_best():
    a, b = _prompts(30, seed=7)
    base = {str(i): (x, y) for i, (x, y) in enumerate(zip(a, b, strict=True))}
    better = {p: (x * 1.15, y) for p, (x, y) in base.items()}  # 15% more tokens per call on every prompt
    worse = {p: (x * 0.8, y) for p, (x, y) in base.items()}
    v = compare_drafters({"base": base, "better": better, "worse": worse})
    assert v["ranking"][0] == "better" and v["verdict"] == "best" and v["leaders"] == ["better"]
    diff, lo, hi, n = v["pairs"]["base"]
    assert 0 < lo <= diff <= hi and n == 30
    # the pairing: the same gap, unpaired, hides under the prompts' spread
    width_paired = hi - lo
    _, lo_a, hi_a = bootstrap_ci(*zip(*better.values(), strict=True))
    assert width_paired < (hi_a - lo_a) / 2


def test_a_paired_difference_uses_only_the_prompts_both_drafters_have():
    a = {"p1": (4, 2), "p2": (6, 2), "p3": (9, 3)}
    b = {"p2": (4, 2), "p3": (6, 3), "p4": (100, 1)}
    v = compare_drafters({"a": a, "b": b})
    assert v["ranking"] == ["b", "a"]  # b's τ is higher over all its prompts (p4)...
    assert v["pairs"]["a"][0] == pytest.approx((4 + 6) / (2 + 3) - (6 + 9) / (2 + 3))  # ...but not on p2, p3
    assert v["pairs"]["a"][3] == 2
    assert v["verdict"] == "tied" and v["leaders"] == ["b", "a"]  # a lead that reverses on the pairs is no best
    assert compare_drafters({"a": a, "c": {"p9": (3, 1)}})["pairs"]["a"][3] == 0  # nothing in common: tied
    assert compare_drafters({"a": a, "c": {"p9": (3, 1)}})["verdict"] == "tied"


def _two_drafters(gain: int) -> list[EvalRow]:
    """24 prompts of drafters d1 and d2; d2 accepts ``gain`` more tokens per block on every prompt."""
    rows = []
    for i in range(24):
        k = i % 3
        for name, extra in (("d1", 0), ("d2", gain)):
            stats = SpecStats.from_iterations(5, [(5, k + extra, k + extra + 1)] * (4 + i % 5) + [(5, 0, 1)])
            rows.append(replace(_row(stats, prompt=f"p{i}"), drafter=name, drafter_path=f"/{name}"))
    return rows


def test_summarize_rows_carries_the_intervals_and_the_verdict(tmp_path):
    records = summarize_rows(_two_drafters(gain=0), {"d1": 1, "d2": 1}, 10, resamples=500, seed=4)
    for rec in records:
        assert rec["block_efficiency_ci_low"] <= rec["block_efficiency"] <= rec["block_efficiency_ci_high"]
        assert rec["prompts"] == rec["num_prompts"] == 24
        assert (rec["ci_resamples"], rec["ci_seed"], rec["ci_level"]) == (500, 4, 0.95)
        assert rec["verdict"] == "tied" and rec["paired_difference"] == 0.0
    assert [r["rank"] for r in records] == [1, 2] and records[0]["paired_against"] == "d2"
    line = comparison_table(records).splitlines()[2]
    assert line.count("| = ") == 2 and "**" not in line and "| tied: Δ(d1 − d2) = +0.00 [+0.00, +0.00] |" in line

    rows = _two_drafters(gain=1)
    records = summarize_rows(rows, {"d1": 1, "d2": 1}, 10)
    by = {r["drafter"]: r for r in records}
    assert by["d2"]["verdict"] == "best" and by["d2"]["rank"] == 1 and by["d1"]["verdict"] is None
    assert by["d2"]["paired_ci_low"] > 0 and by["d1"]["paired_ci_high"] < 0  # d1 − d2, below 0
    assert by["d2"]["paired_difference"] == pytest.approx(by["d2"]["block_efficiency"] - by["d1"]["block_efficiency"])
    table = comparison_table(records)
    assert f"**{by['d2']['block_efficiency']:.2f} [" in table and "best: Δ(d2 − d1) = +" in table
    assert "n = 24 prompts per cell" in table and "2000 resamples, seed 0" in table
    (pair,) = paired_differences(rows)
    assert (pair["drafter_a"], pair["drafter_b"], pair["prompts"]) == ("d1", "d2", 24) and pair["ci_high"] < 0
    files = write_report(tmp_path, records, plots=False, pairs=[pair])
    assert "paired.json" in files and "| d1 − d2 |" in (tmp_path / "report.md").read_text()
