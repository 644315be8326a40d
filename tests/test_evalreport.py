"""The pooled evaluation summary (draftalign/evaluation/report.py) on simulated per-prompt rows."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from draftalign.evaluation.metrics import SpecStats
from draftalign.evaluation.report import summarize_rows
from draftalign.evaluation.rows import EvalRow
from draftalign.workers.evaluate_reference import progress_line


def _row(stats: SpecStats, engine: str = "reference", gamma: int = 5, prompt: str = "p0") -> EvalRow:
    """One evaluation row carrying ``stats`` (the fields summarize_rows reads; the rest are placeholders)."""
    return EvalRow(drafter="d", drafter_path="/d", task="t", task_kind="open_ended", prompt_id=prompt,
                   engine=engine, gamma=gamma, temperature=1.0, top_p=1.0, num_input_tokens=1,
                   num_generated_tokens=stats.num_emitted, num_drafts=stats.num_drafts,
                   num_draft_tokens=stats.num_draft_tokens, num_accepted=stats.num_accepted,
                   accepted_per_pos=list(stats.accepted_per_pos), block_efficiency=0.0, acceptance_rate=0.0,
                   spec_seconds=1.0, ar_seconds=None, ar_generated_tokens=None, matches_autoregressive=None,
                   generated_token_ids=[], target_model="t")


def _iid_rows(alpha: float, gamma: int, prompts: int, blocks: int, seed: int) -> list[EvalRow]:
    """Prompts whose every draft position is accepted independently with probability ``alpha``."""
    rng = random.Random(seed)
    rows = []
    for i in range(prompts):
        iters = []
        for _ in range(blocks):
            k = 0
            while k < gamma and rng.random() < alpha:
                k += 1
            iters.append((gamma, k, k + 1))
        rows.append(_row(SpecStats.from_iterations(gamma, iters), gamma=gamma, prompt=f"p{i}"))
    return rows


@pytest.mark.parametrize(("alpha", "gamma"), [(0.8, 5), (0.5, 3), (0.95, 7)])
def test_implied_block_efficiency_matches_tau_under_iid_acceptance(alpha, gamma):
    # accepted / drafted is ~0.54 at α = 0.8, γ = 5 (drafts after a rejection are never tested);
    # put into the i.i.d. formula it gave 2.13 where τ is 3.7
    (rec,) = summarize_rows(_iid_rows(alpha, gamma, prompts=20, blocks=200, seed=1), {"d": 1}, 10)
    assert rec["implied_block_efficiency"] == pytest.approx(rec["block_efficiency"], abs=0.06)
    assert rec["tested_acceptance"] == pytest.approx(alpha, abs=0.02)


def test_reference_tau_is_emitted_tokens_per_target_call():
    # a reference prompt that ended on an accepted EOS draft: 1 token in 1 call, no bonus
    eos_end = SpecStats.from_iterations(3, [(1, 1, 1)])
    full = SpecStats.from_iterations(3, [(3, 3, 4), (3, 1, 2)])
    rows = [_row(eos_end, gamma=3, prompt="a"), _row(full, gamma=3, prompt="b")]
    (rec,) = summarize_rows(rows, {"d": 1}, 10)
    assert rec["block_efficiency"] == pytest.approx((1 + 6) / 3)  # emitted / target calls
    assert f"τ={7 / 3:.2f} " in progress_line("reference", "d", "t", 3, 1.0, rows, 0.1)
    # vLLM's counters: τ = 1 + accepted / drafts, vLLM's own definition (its prefill token is not
    # emitted by a draft call, so generated / drafts would over-count)
    vllm = [replace(r, engine="vllm", num_generated_tokens=r.num_generated_tokens + 1) for r in rows]
    (rec,) = summarize_rows(vllm, {"d": 1}, 10)
    assert rec["block_efficiency"] == pytest.approx(1 + 5 / 3)


def test_draft_acceptance_rate_is_labelled_apart_from_expected_acceptance(tmp_path):
    from draftalign.evaluation.report import CONTRACT_KEYS, markdown_table, write_report

    # vLLM's acceptance rate (accepted / drafted) is not the distill stage's Σ min(p, q)
    stats = SpecStats.from_iterations(3, [(3, 3, 4), (3, 1, 2)])
    (rec,) = summarize_rows([_row(stats, gamma=3)], {"d": 1}, 10)
    assert rec["draft_acceptance_rate"] == pytest.approx(4 / 6)
    assert rec["acceptance_rate"] == rec["draft_acceptance_rate"]  # alias for readers of older files
    assert set(CONTRACT_KEYS) <= rec.keys() and "expected_acceptance" not in rec  # summary.json's contract
    header = markdown_table([dict(rec, speedup=None, tokens_per_s_spec=None, tokens_per_s_ar=None)]).splitlines()[0]
    assert "| draft acceptance (accepted/drafted) |" in header and "| acceptance |" not in header
    line = progress_line("reference", "d", "t", 3, 1.0, [_row(stats, gamma=3)], 0.1)
    assert "draft_acceptance=0.67 " in line
    write_report(tmp_path, [rec], plots=False)
    assert "draft acceptance (accepted/drafted)" in (tmp_path / "report.md").read_text()


def test_the_comparison_table_has_a_column_per_drafter_and_marks_the_best(tmp_path):
    from draftalign.evaluation.report import comparison_table, write_report

    def rec(drafter, task, tau, rank, verdict=None, against=None, diff=None, gamma=3, t=0.0):
        return {"drafter": drafter, "task": task, "engine": "reference", "gamma": gamma, "temperature": t,
                "block_efficiency": tau, "draft_acceptance_rate": 0.5, "mbsu": 1.0, "speedup": None,
                "tokens_per_s_spec": None, "tokens_per_s_ar": None, "acceptance_per_position": [0.5, 0.4, 0.3],
                "block_efficiency_ci_low": tau - 0.1, "block_efficiency_ci_high": tau + 0.1, "prompts": 24,
                "ci_level": 0.95, "ci_resamples": 2000, "ci_seed": 0, "rank": rank, "verdict": verdict,
                "paired_against": against, "paired_difference": diff,
                "paired_ci_low": None if diff is None else diff - 0.15, "paired_ci_high": None if diff is None else diff + 0.15}

    records = [rec("pretrained", "open_ended", 1.5, 3), rec("tvd", "open_ended", 2.25, 2),
               rec("tvd++", "open_ended", 2.5, 1, "best", "tvd", 0.25),
               rec("pretrained", "translate", 1.4, 1, "tied", "tvd++", 0.0), rec("tvd", "translate", 1.2, 3),
               rec("tvd++", "translate", 1.4, 2, "tied", "pretrained", 0.0)]
    lines = comparison_table(records).splitlines()
    assert lines[0] == "| task | engine | γ | T | pretrained | tvd | tvd++ | verdict |"
    best_row = ("| open_ended | reference | 3 | 0 | 1.50 [1.40, 1.60] | 2.25 [2.15, 2.35] | **2.50 [2.40, 2.60]** "
                "| best: Δ(tvd++ − tvd) = +0.25 [+0.10, +0.40] |")
    assert lines[2] == best_row
    assert lines[3] == ("| translate | reference | 3 | 0 | = 1.40 [1.30, 1.50] | 1.20 [1.10, 1.30] | = 1.40 [1.30, 1.50] "
                        "| tied: Δ(pretrained − tvd++) = +0.00 [-0.15, +0.15] |")  # a tie: marked, none bold
    assert lines[5].startswith("τ [95% interval]: pooled over n = 24 prompts per cell") and "2000 resamples, seed 0" in lines[5]
    assert comparison_table([r for r in records if r["drafter"] == "tvd"]) == ""  # one drafter: no comparison
    files = write_report(tmp_path, records, "# header\n")
    assert "comparison.png" in files and best_row in (tmp_path / "report.md").read_text()
    # Many drafters: a row per drafter, a column per task × T, the verdicts in the last row.
    more = [*records, *(rec(f"lk{i}", task, 1.0, 4 + i) for i in range(4) for task in ("open_ended", "translate"))]
    lines = comparison_table(more).splitlines()
    assert lines[0] == "| drafter | open_ended T=0 | translate T=0 |"
    assert lines[4] == "| tvd++ | **2.50 [2.40, 2.60]** | = 1.40 [1.30, 1.50] |"
    assert lines[9] == ("| verdict | best: Δ(tvd++ − tvd) = +0.25 [+0.10, +0.40] "
                        "| tied: Δ(pretrained − tvd++) = +0.00 [-0.15, +0.15] |")


def test_the_speedup_table_shows_each_drafters_fastest_gamma(tmp_path):
    from draftalign.evaluation.report import speedup_table, write_report

    def rec(drafter, gamma, speedup, task="open_ended", t=0.0):
        return {"drafter": drafter, "task": task, "engine": "reference", "gamma": gamma, "temperature": t,
                "block_efficiency": 1.0 + gamma / 10, "speedup": speedup, "draft_acceptance_rate": 0.5,
                "mbsu": 1.0, "tokens_per_s_spec": None, "tokens_per_s_ar": None,
                "acceptance_per_position": [0.5] * gamma}

    records = [rec("start", 1, 0.8), rec("start", 3, 0.6), rec("kl", 1, 1.05), rec("kl", 3, 1.12),
               rec("kl", 3, 0.9, t=1.0), rec("kl", 1, None, t=1.0), rec("start", 1, None, task="translate")]
    lines = speedup_table(records).splitlines()
    assert lines[0] == "| task | engine | T | target alone, tok/s | start | kl |"
    # no target-alone tokens/s nor r in these records: "–"
    assert lines[2] == "| open_ended | reference | 0 | – | 0.80× (γ=1, τ 1.10, r –) | 1.12× (γ=3, τ 1.30, r –) |"
    assert lines[3] == "| open_ended | reference | 1 | – | – | 0.90× (γ=3, τ 1.30, r –) |"  # untimed cells are skipped
    assert len(lines) == 4 and speedup_table([rec("kl", 1, None)]) == ""
    write_report(tmp_path, records, plots=False)
    assert lines[2] in (tmp_path / "report.md").read_text()


def test_tau_on_both_engines_is_shown_side_by_side_and_disagreement_is_flagged():
    from draftalign.evaluation.report import engine_agreement_table

    def rec(engine, tau, lo, hi, drafter="kl", task="open_ended"):
        return {"drafter": drafter, "task": task, "engine": engine, "gamma": 3, "temperature": 0.0,
                "block_efficiency": tau, "block_efficiency_ci_low": lo, "block_efficiency_ci_high": hi}

    records = [rec("reference", 1.40, 1.30, 1.50), rec("vllm", 1.45, 1.35, 1.55),
               rec("reference", 1.20, 1.15, 1.25, task="translate"), rec("vllm", 1.40, 1.30, 1.50, task="translate"),
               rec("vllm", 1.1, 1.0, 1.2, drafter="start")]  # one engine only: not compared
    lines = engine_agreement_table(records).splitlines()
    assert lines[2] == "| kl | open_ended | 3 | 0 | 1.40 [1.30, 1.50] | 1.45 [1.35, 1.55] | yes |"
    assert lines[3] == "| kl | translate | 3 | 0 | 1.20 [1.15, 1.25] | 1.40 [1.30, 1.50] | no |"
    assert len(lines) == 4 and engine_agreement_table(records[-1:]) == ""


def test_the_eval_row_has_the_schemas_columns_in_order():
    # EvalRow restates EVAL_SCHEMA's columns as fields: the two must not drift apart.
    from dataclasses import fields

    from draftalign.data.schemas import EVAL_SCHEMA
    from draftalign.evaluation.rows import EvalRow

    assert [f.name for f in fields(EvalRow)] + ["schema_version"] == EVAL_SCHEMA.names


# ---- the speed-up against the fastest engine, and the machine's verify cost -----------------------

# t_target 40 ms, t_verify(4) 100 ms: r = 2.5 at γ = 3 (k = 4); as summary.json would hold it, keys as strings
VERIFY = {"t_target_ms": 40.0, "t_verify_ms": {"2": 60.0, "4": 100.0}, "r": {"2": 1.5, "4": 2.5},
          "context_tokens": 50, "repeats": 10, "measured_on": "the reference engine's target (PyTorch, cpu, 2 threads)"}


def _timed(engine: str, temperature: float, spec_s: float, ar_s: float | None, prompt: str) -> EvalRow:
    """A prompt of 6 emitted tokens (τ = 3 at γ = 3 on either engine), speculative in spec_s seconds,
    the target alone in ar_s (None: not timed)."""
    stats = SpecStats.from_iterations(3, [(3, 3, 4), (3, 1, 2)])
    return replace(_row(stats, engine=engine, gamma=3, prompt=prompt), temperature=temperature, spec_seconds=spec_s,
                   ar_seconds=ar_s, ar_generated_tokens=None if ar_s is None else 6)


def _two_engine_records() -> list[dict]:
    # T = 1 on both engines: the reference's target alone runs at 20 tokens/s, vLLM's at 14;
    # speculative, the reference at 24 tokens/s and vLLM at 15. T = 0 on vLLM alone.
    rows = [_timed("reference", 1.0, 0.25, 0.3, p) for p in ("a", "b")]
    rows += [_timed("vllm", 1.0, 0.4, 6 / 14, p) for p in ("a", "b")]
    rows += [_timed("vllm", 0.0, 0.4, 0.5, p) for p in ("a", "b")]
    return summarize_rows(rows, {"d": 1}, 10, verify_cost=VERIFY)


def test_the_headline_speedup_divides_by_the_fastest_engines_target_alone():
    from draftalign.evaluation.report import fastest_target_alone

    ref, vllm, vllm_t0 = _two_engine_records()
    assert fastest_target_alone([ref, vllm, vllm_t0]) == {("t", 1.0): ("reference", pytest.approx(20.0)),
                                                          ("t", 0.0): ("vllm", pytest.approx(12.0))}
    # the reference engine holds the fastest target alone: its two speed-ups are one
    assert ref["speedup"] == ref["speedup_own_engine"] == pytest.approx(24 / 20)
    assert ref["baseline_engine"] == "reference" and ref["tokens_per_s_baseline"] == pytest.approx(20.0)
    # vLLM beats its own target alone (15 / 14) but not the reference's (15 / 20): the headline says so
    assert vllm["tokens_per_s_ar"] == pytest.approx(14.0) and vllm["speedup_own_engine"] == pytest.approx(15 / 14)
    assert vllm["speedup"] == pytest.approx(0.75) and vllm["baseline_engine"] == "reference"
    assert vllm["tokens_per_s_baseline"] == pytest.approx(20.0)
    # at T = 0 only vLLM timed the target alone: it is the fastest there
    assert vllm_t0["speedup"] == vllm_t0["speedup_own_engine"] == pytest.approx(15 / 12)
    # r at each record's γ, from a cost read back from JSON
    for r in (ref, vllm, vllm_t0):
        assert (r["verify_ratio"], r["t_target_ms"], r["t_verify_ms"]) == (2.5, 40.0, 100.0)


def test_no_target_alone_and_no_verify_cost_leave_the_speedup_and_r_empty():
    (rec,) = summarize_rows([_timed("reference", 1.0, 0.25, None, "a")], {"d": 1}, 10)
    assert rec["speedup"] is rec["speedup_own_engine"] is rec["baseline_engine"] is None
    assert rec["verify_ratio"] is rec["t_target_ms"] is rec["t_verify_ms"] is None


def test_the_speedup_table_names_the_baseline_engine_and_r(tmp_path):
    from draftalign.evaluation.report import markdown_table, speedup_table, verify_cost_note, write_report

    records = _two_engine_records()
    lines = speedup_table(records).splitlines()
    assert lines[0] == "| task | engine | T | target alone, tok/s | d |"
    assert lines[2] == "| t | reference | 1 | 20.0 | 1.20× (γ=3, τ 3.00, r 2.50) |"
    assert lines[3] == ("| t | vllm | 1 | 14.0 (fastest: reference 20.0) "
                        "| 0.75× (γ=3, τ 3.00, r 2.50; 1.07× over vllm's own) |")
    assert lines[4] == "| t | vllm | 0 | 12.0 | 1.25× (γ=3, τ 3.00, r 2.50) |"
    every = markdown_table(records).splitlines()
    assert every[0].endswith("| MBSU | speed-up | speed-up, own engine | r | tok/s spec | tok/s AR |")
    assert every[3].endswith("| 0.75 | 1.07 | 2.50 | 15.0 | 14.0 |")
    note = verify_cost_note(VERIFY)
    assert note == ("\nVerify cost r = t_verify(γ+1) / t_target: γ=1: 1.50, γ=3: 2.50 (t_target 40.00 ms, "
                    "t_verify(k) k=2: 60.00, k=4: 100.00 ms; the reference engine's target (PyTorch, cpu, 2 threads), "
                    "median of 10 forwards after a 50-token context). Every speed-up in this report is read with "
                    "the r at its γ.\n")
    assert "not measured" in verify_cost_note(None)
    write_report(tmp_path, records, "# header\n" + note, plots=False)
    md = (tmp_path / "report.md").read_text()
    assert note in md and lines[3] in md and "divides by the target alone on the fastest engine of this run" in md
