"""The evaluation report: pooled summary records, summary.json/.csv, report.md and PNG plots.

Rates pool the counts of every prompt of a (drafter, task, engine, γ, T) cell, as vLLM
does, never a mean of per-prompt ratios (paper-spec 7.6). The headline speed-up (`speedup`) is
tokens/s of speculative decoding over tokens/s of the target alone on the same prompts on the
run's fastest engine for that task and T: a drafter only helps a user who could not simply run
the target alone on a faster engine. `speedup_own_engine` is the same over the target alone on
the cell's own engine, what that engine's user sees. Each record carries the machine's verify
cost r = t_verify(γ+1) / t_target at its γ (draftalign.evaluation.verifycost), which a speed-up
is to be read with: the same τ gains less where verifying γ + 1 tokens costs more.
τ comes with a percentile bootstrap interval over the cell's prompts, and the drafters of each
task × engine × γ × T with paired differences (draftalign.evaluation.stats): a drafter is "best"
only where its lead over the runner-up excludes 0, else the leaders are "tied".
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

from draftalign.evaluation.metrics import (
    acceptance_of_tested,
    acceptance_per_position,
    acceptance_rate,
    block_efficiency,
    implied_block_efficiency,
    mbsu,
)
from draftalign.evaluation.rows import EvalRow
from draftalign.evaluation.stats import (
    LEVEL,
    RESAMPLES,
    SEED,
    bootstrap_ci,
    compare_drafters,
    paired_difference_ci,
)
from draftalign.evaluation.verifycost import verify_cost_line

__all__ = ["CONTRACT_KEYS", "SummaryRecord", "pooled_block_efficiency", "tau_counts", "summarize_rows", "paired_differences",
           "fastest_target_alone", "markdown_table", "comparison_table", "pairs_table", "speedup_table", "verify_cost_note", "write_report"]

# summary.json's contract (issue 5): every record has at least these keys.
# `draft_acceptance_rate` is accepted / drafted tokens (vLLM's acceptance rate), not the distill stage's
# expected acceptance Σ min(p, q); `acceptance_rate` stays as its alias for readers of older files.
CONTRACT_KEYS = ("drafter", "task", "engine", "gamma", "temperature", "block_efficiency",
                 "draft_acceptance_rate", "acceptance_rate", "mbsu", "num_prompts")
_GROUP = ("task", "engine", "gamma", "temperature")  # the drafters compared side by side


class SummaryRecord(TypedDict, total=False):
    """One summary.json record: a (drafter, task, engine, γ, T) cell pooled over its prompts (summarize_rows),
    then its τ interval and place among the drafters (_add_intervals), in this key order."""

    drafter: str
    task: str
    engine: str
    gamma: int
    temperature: float
    drafter_path: str
    top_p: float
    num_prompts: int
    generated_tokens: int
    num_drafts: int
    num_draft_tokens: int
    num_accepted: int
    block_efficiency: float
    draft_acceptance_rate: float
    acceptance_rate: float
    acceptance_per_position: list[float]
    tested_acceptance: float
    implied_block_efficiency: float
    mbsu: float
    param_ratio: float
    draft_parameters: int
    target_parameters: int
    tokens_per_s_spec: float | None
    tokens_per_s_ar: float | None
    speedup: float | None  # against the target alone on the run's fastest engine for (task, T)
    speedup_own_engine: float | None  # against the target alone on this record's engine
    baseline_engine: str | None  # the engine of the target alone `speedup` divides by
    tokens_per_s_baseline: float | None  # that target alone's tokens/s
    verify_ratio: float | None  # r = t_verify(γ+1) / t_target on this machine; None: not measured
    t_target_ms: float | None
    t_verify_ms: float | None  # t_verify(γ+1)
    greedy_match_rate: float | None
    block_efficiency_ci_low: float
    block_efficiency_ci_high: float
    prompts: int
    ci_level: float
    ci_resamples: int
    ci_seed: int
    rank: int
    verdict: str | None
    paired_against: str | None
    paired_difference: float | None
    paired_ci_low: float | None
    paired_ci_high: float | None
    paired_prompts: int


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def pooled_block_efficiency(group: Sequence[EvalRow]) -> float:
    """τ of one engine's rows, pooled: Σ tokens / Σ target calls for the reference engine.

    The reference engine records every emitted token and every target call, so τ is their ratio
    exactly (paper-spec 6.3); 1 + accepted / drafts would count a bonus token after an accepted EOS
    draft that is never emitted. vLLM's counters give its own definition, 1 + accepted / drafts:
    its prefill step emits a token without a draft call, so generated / drafts would over-count.
    """
    drafts = sum(r.num_drafts for r in group)
    if group and all(r.engine == "reference" for r in group):
        return sum(r.num_generated_tokens for r in group) / drafts if drafts else 1.0
    return block_efficiency(sum(r.num_accepted for r in group), drafts, group[0].gamma if group else None)


def tau_counts(row: EvalRow) -> tuple[int, int]:
    """(a, b) of one prompt's row with τ of its cell = Σa / Σb (as pooled_block_efficiency pools them):
    reference (emitted tokens, target calls); vLLM (drafts + accepted, drafts), i.e. 1 + accepted / drafts."""
    if row.engine == "reference":
        return row.num_generated_tokens, row.num_drafts
    return row.num_drafts + row.num_accepted, row.num_drafts


def _group_key(row: EvalRow) -> tuple:
    return row.task, row.engine, row.gamma, row.temperature  # _GROUP's fields


def _grouped(rows: Sequence[EvalRow]) -> dict[tuple, dict[str, dict[str, tuple[int, int]]]]:
    """(task, engine, γ, T) -> drafter -> prompt id -> tau_counts: the bootstrap's input (a prompt id
    seen twice in one cell counts as one prompt, its counts summed, so Σa / Σb stays the pooled τ)."""
    out: dict[tuple, dict[str, dict[str, tuple[int, int]]]] = {}
    for r in rows:
        cell = out.setdefault(_group_key(r), {}).setdefault(r.drafter, {})
        a, b = tau_counts(r)
        a0, b0 = cell.get(r.prompt_id, (0, 0))
        cell[r.prompt_id] = (a0 + a, b0 + b)
    return out


def _add_intervals(records: list[SummaryRecord], rows: Sequence[EvalRow], resamples: int, seed: int, level: float) -> None:
    """Each record's τ interval: a bootstrap over its prompts, then its place among the drafters."""
    groups = _grouped(rows)
    for rec in records:
        counts = list(groups[tuple(rec[k] for k in _GROUP)][rec["drafter"]].values())
        _, lo, hi = bootstrap_ci([a for a, _ in counts], [b for _, b in counts], resamples, seed, level)
        rec.update({"block_efficiency_ci_low": lo, "block_efficiency_ci_high": hi, "prompts": len(counts),
                    "ci_level": level, "ci_resamples": resamples, "ci_seed": seed})
    verdicts = {key: compare_drafters(cells, resamples, seed, level) for key, cells in groups.items()}
    for rec in records:
        rec.update(_place(rec["drafter"], verdicts[tuple(rec[k] for k in _GROUP)]))


def _place(me: str, v: dict) -> dict:
    """A drafter's rank, verdict ("best", "tied" among the leaders, else None) and paired difference:
    the leader's against the runner-up (leader − runner-up), any other's against the leader (this − leader)."""
    ranking, leader = v["ranking"], v["ranking"][0]
    if len(ranking) < 2:
        return {"rank": 1, "verdict": None, "paired_against": None, "paired_difference": None,
                "paired_ci_low": None, "paired_ci_high": None, "paired_prompts": 0}
    if me == leader:
        other, (diff, lo, hi, n) = ranking[1], v["pairs"][ranking[1]]
        verdict = v["verdict"]
    else:
        other, (diff, lo, hi, n) = leader, v["pairs"][me]
        diff, lo, hi = -diff + 0.0, -hi + 0.0, -lo + 0.0  # + 0.0: no "-0.0"
        verdict = "tied" if me in v["leaders"] else None
    if not n:  # no prompt in common: nothing to pair
        diff = lo = hi = None
    return {"rank": ranking.index(me) + 1, "verdict": verdict, "paired_against": other, "paired_difference": diff,
            "paired_ci_low": lo, "paired_ci_high": hi, "paired_prompts": n}


def paired_differences(rows: Sequence[EvalRow], resamples: int = RESAMPLES, seed: int = SEED,
                       level: float = LEVEL) -> list[dict]:
    """Every pair of drafters in every comparison group: Δτ = τ_a − τ_b on the prompts both have, with
    its paired bootstrap interval (draftalign.evaluation.stats.paired_difference_ci)."""
    out = []
    for key, cells in _grouped(rows).items():
        names = list(cells)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                common = [p for p in cells[a] if p in cells[b]]
                if not common:
                    continue
                cols = [[cells[d][p][k] for p in common] for d in (a, b) for k in (0, 1)]
                diff, lo, hi = paired_difference_ci(*cols, resamples=resamples, seed=seed, level=level)
                out.append({**dict(zip(_GROUP, key, strict=True)), "drafter_a": a, "drafter_b": b,
                            "difference": diff, "ci_low": lo, "ci_high": hi, "prompts": len(common)})
    return out


def summarize_rows(rows: Sequence[EvalRow], parameters: dict[str, int], target_parameters: int,
                   resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL,
                   verify_cost: Mapping[str, Any] | None = None) -> list[SummaryRecord]:
    """One record per (drafter, task, engine, γ, T), in the rows' order of first appearance.

    parameters: drafter name -> parameter count; MBSU uses c = that / target_parameters.
    resamples, seed, level: τ's bootstrap interval over prompts and the drafters' paired comparison
    (_add_intervals; keys block_efficiency_ci_low/high, prompts, rank, verdict, paired_*).
    verify_cost: this machine's verify cost (verifycost.VerifyCost) for each record's r; None: not measured.
    """
    cells: dict[tuple, list[EvalRow]] = {}
    for r in rows:
        cells.setdefault((r.drafter, r.task, r.engine, r.gamma, r.temperature), []).append(r)
    out = []
    for group in cells.values():
        first = group[0]
        rec: SummaryRecord = {"drafter": first.drafter, "task": first.task, "engine": first.engine,
                              "gamma": first.gamma, "temperature": first.temperature}
        out.append(rec)
        gamma = first.gamma
        drafts = sum(r.num_drafts for r in group)
        drafted = sum(r.num_draft_tokens for r in group)
        accepted = sum(r.num_accepted for r in group)
        per_pos = [sum(r.accepted_per_pos[i] for r in group) for i in range(gamma)]
        tau = pooled_block_efficiency(group)
        alpha = acceptance_rate(accepted, drafted)
        tested = acceptance_of_tested(accepted, drafts, per_pos)
        c = parameters[group[0].drafter] / target_parameters
        spec_tokens = sum(r.num_generated_tokens for r in group)
        matches = [r.matches_autoregressive for r in group if r.matches_autoregressive is not None]
        rec.update({
            "drafter_path": group[0].drafter_path, "top_p": group[0].top_p, "num_prompts": len(group),
            "generated_tokens": spec_tokens, "num_drafts": drafts, "num_draft_tokens": drafted,
            "num_accepted": accepted, "block_efficiency": tau,
            "draft_acceptance_rate": alpha, "acceptance_rate": alpha,
            "acceptance_per_position": acceptance_per_position(per_pos, drafts),
            # the i.i.d. formula needs the per-token acceptance of tested drafts, not accepted / drafted
            "tested_acceptance": tested, "implied_block_efficiency": implied_block_efficiency(tested, gamma),
            "mbsu": mbsu(tau, gamma, c), "param_ratio": c, "draft_parameters": parameters[group[0].drafter],
            "target_parameters": target_parameters, **_speed(group), **_verify_fields(verify_cost, gamma),
            "greedy_match_rate": _ratio(sum(matches), len(matches)) if matches else None,
        })
    _against_fastest_engine(out)
    _add_intervals(out, rows, resamples, seed, level)
    return out


def _speed(group: Sequence[EvalRow]) -> dict[str, Any]:
    """A cell's tokens/s, speculative and of its engine's target alone, and the speed-up of one over
    the other; `speedup` and its baseline are this engine's until _against_fastest_engine."""
    spec_tps = _ratio(sum(r.num_generated_tokens for r in group), sum(r.spec_seconds for r in group))
    timed_ar = [r for r in group if r.ar_seconds is not None]
    ar_tps = _ratio(sum(r.ar_generated_tokens or 0 for r in timed_ar), sum(r.ar_seconds or 0.0 for r in timed_ar))
    own = _ratio(spec_tps or 0.0, ar_tps) if ar_tps else None
    return {"tokens_per_s_spec": spec_tps, "tokens_per_s_ar": ar_tps, "speedup": own, "speedup_own_engine": own,
            "baseline_engine": group[0].engine if ar_tps else None, "tokens_per_s_baseline": ar_tps}


def _verify_fields(cost: Mapping[str, Any] | None, gamma: int) -> dict[str, float | None]:
    """r, t_target and t_verify(γ + 1) of one γ from a verify cost (its k keys are strings once read
    from JSON); None each where it was not measured."""
    if cost is None:
        return {"verify_ratio": None, "t_target_ms": None, "t_verify_ms": None}
    r = {int(k): v for k, v in cost["r"].items()}.get(gamma + 1)
    t_verify = {int(k): v for k, v in cost["t_verify_ms"].items()}.get(gamma + 1)
    return {"verify_ratio": r, "t_target_ms": cost["t_target_ms"], "t_verify_ms": t_verify}


def fastest_target_alone(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, float], tuple[str, float]]:
    """(task, T) -> (engine, tokens/s) of the fastest target alone among the run's engines, from each
    record's own engine's figure (`tokens_per_s_ar`); only where some engine timed it."""
    best: dict[tuple[str, float], tuple[str, float]] = {}
    for r in records:
        tps = r.get("tokens_per_s_ar")
        key = (r["task"], r["temperature"])
        if tps is not None and (key not in best or tps > best[key][1]):
            best[key] = (r["engine"], tps)
    return best


def _against_fastest_engine(records: list[SummaryRecord]) -> None:
    """Each record's headline speed-up over the fastest target alone of its (task, T), whichever
    engine ran it: a speed-up over a slow engine's own target alone is no gain to a user who could
    run the target alone on the fast one. The two baselines were timed at different moments, so on
    a machine whose load drifts this ratio is less steady than `speedup_own_engine`."""
    fastest = fastest_target_alone(records)
    for r in records:
        engine, tps = fastest.get((r["task"], r["temperature"]), (None, None))
        spec = r.get("tokens_per_s_spec")
        r["speedup"] = spec / tps if tps and spec is not None else None
        r["baseline_engine"], r["tokens_per_s_baseline"] = engine, tps


def verify_cost_note(cost: Mapping[str, Any] | None) -> str:
    """The report's paragraph on the machine's verify cost (verifycost.verify_cost_line)."""
    line = verify_cost_line(cost)
    return f"\n{line[0].upper()}{line[1:]}. Every speed-up in this report is read with the r at its γ.\n"


def _fmt(v: Any, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown_table(records: Sequence[dict]) -> str:
    """drafter × task × engine × γ × T → τ, draft acceptance rate, MBSU, speed-up over the fastest
    engine's target alone and over this engine's, r at that γ, and the tokens/s behind them."""
    lines = ["| drafter | task | engine | γ | T | τ | draft acceptance (accepted/drafted) | MBSU | speed-up "
             "| speed-up, own engine | r | tok/s spec | tok/s AR |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['drafter']} | {r['task']} | {r['engine']} | {r['gamma']} | {r['temperature']:g} | "
                     f"{_fmt(r['block_efficiency'])} | {_fmt(r['draft_acceptance_rate'])} | {_fmt(r['mbsu'])} | "
                     f"{_fmt(r['speedup'])} | {_fmt(r.get('speedup_own_engine'))} | {_fmt(r.get('verify_ratio'))} | "
                     f"{_fmt(r['tokens_per_s_spec'], 1)} | {_fmt(r['tokens_per_s_ar'], 1)} |")
    return "\n".join(lines) + "\n"


def _tau_ci(r: dict | None, metric: str) -> str:
    """"τ [low, high]" of a record (the value alone without an interval; "–" without a record)."""
    if r is None or r.get(metric) is None:
        return "–"
    if metric != "block_efficiency" or r.get("block_efficiency_ci_low") is None:
        return _fmt(r[metric])
    return f"{_fmt(r[metric])} [{_fmt(r['block_efficiency_ci_low'])}, {_fmt(r['block_efficiency_ci_high'])}]"


def _verdict_cell(row: dict[str, dict]) -> str:
    """The last column: the leader's verdict and its paired lead over the runner-up, Δ [low, high]."""
    lead = next((r for r in row.values() if r.get("rank") == 1 and r.get("verdict")), None)
    if lead is None:
        return "–"
    if lead.get("paired_difference") is None:
        return lead["verdict"]
    return (f"{lead['verdict']}: Δ({lead['drafter']} − {lead['paired_against']}) = {lead['paired_difference']:+.2f} "
            f"[{lead['paired_ci_low']:+.2f}, {lead['paired_ci_high']:+.2f}]")


def _ci_note(records: Sequence[dict]) -> str:
    """The line under the comparison table: n prompts, resamples and seed of the intervals, and the rule."""
    ns = sorted({r["prompts"] for r in records if r.get("prompts")})
    r0 = next((r for r in records if r.get("ci_resamples")), None)
    if r0 is None:
        return ""
    n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    return (f"\nτ [{r0['ci_level']:.0%} interval]: pooled over n = {n} prompts per cell, percentile bootstrap over "
            f"prompts ({r0['ci_resamples']} resamples, seed {r0['ci_seed']}). **Bold**: best, the paired interval "
            "of its lead over the runner-up lies above 0; =: tied leaders, where it does not.\n")


SPEEDUP_NOTE = (
    "Each speed-up divides by the target alone on the fastest engine of this run for that task and T "
    "(its tokens/s beside this engine's own), not by each engine's own target alone; where those differ, "
    "the speed-up over this engine's own target alone follows, what this engine's user sees. r = "
    "t_verify(γ+1) / t_target is this machine's verify cost at that γ (see the header): the same τ gains "
    "less where r is higher, and r ≈ 1 where decoding is bound by reading weights (a GPU).")

WIDE = 6  # drafters a comparison_table shows as columns at most, unless it has as many rows


def comparison_table(records: Sequence[dict], metric: str = "block_efficiency") -> str:
    """The paper's layout: a row per task × engine × γ × T, a column per drafter ("τ [low, high]"), and
    the verdict; with more than WIDE drafters and more drafters than rows, transposed (a row per
    drafter). The leader is in bold only when "best" (summarize_rows: its paired interval against
    the runner-up excludes 0); tied leaders are marked "="; records without a verdict mark nothing.
    Empty when there is one drafter: nothing to compare."""
    drafters = list(dict.fromkeys(r["drafter"] for r in records))
    if len(drafters) < 2:
        return ""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in records:
        cells.setdefault(tuple(r[k] for k in _GROUP), {})[r["drafter"]] = r
    if len(drafters) > max(len(cells), WIDE):  # many drafters read down, a drafter per row
        return _drafter_rows(drafters, cells, metric) + _ci_note(records)
    lines = [f"| task | engine | γ | T | {' | '.join(drafters)} | verdict |",
             "|---|---|---:|---:|" + "---:|" * len(drafters) + "---|"]
    for (task, engine, gamma, temp), row in cells.items():
        shown = [_marked(row.get(d), metric) for d in drafters]
        lines.append(f"| {task} | {engine} | {gamma} | {temp:g} | {' | '.join(shown)} | {_verdict_cell(row)} |")
    return "\n".join(lines) + "\n" + _ci_note(records)


def _marked(r: dict | None, metric: str) -> str:
    """A comparison cell: "τ [low, high]", in bold when best, after "=" when tied."""
    text, verdict = _tau_ci(r, metric), (r or {}).get("verdict")
    return f"**{text}**" if verdict == "best" else f"= {text}" if verdict == "tied" else text


def _drafter_rows(drafters: list[str], cells: dict[tuple, dict[str, dict]], metric: str) -> str:
    """comparison_table transposed: a row per drafter, a column per task × engine × γ × T (engine and
    γ named only where they vary), and a last row with each column's verdict."""
    keys = list(cells)
    varies = [len({k[i] for k in keys}) > 1 for i in range(len(_GROUP))]
    names = [" ".join([task] + [f"{engine}"] * varies[1] + [f"γ={gamma}"] * varies[2] + [f"T={temp:g}"])
             for task, engine, gamma, temp in keys]
    lines = [f"| drafter | {' | '.join(names)} |", "|---|" + "---:|" * len(keys)]
    for d in drafters:
        lines.append(f"| {d} | {' | '.join(_marked(cells[k].get(d), metric) for k in keys)} |")
    lines.append(f"| verdict | {' | '.join(_verdict_cell(cells[k]) for k in keys)} |")
    return "\n".join(lines) + "\n"


def fastest_gammas(records: Sequence[dict]) -> dict[tuple, dict]:
    """(drafter, task, engine, T) -> the record of the γ with the highest measured speed-up over the
    target alone (wall clock, the same prompts); only where a speed-up was measured."""
    best: dict[tuple, dict] = {}
    for r in records:
        if r.get("speedup") is None:
            continue
        key = (r["drafter"], r["task"], r["engine"], r["temperature"])
        if key not in best or r["speedup"] > best[key]["speedup"]:
            best[key] = r
    return best


def speedup_table(records: Sequence[dict]) -> str:
    """How much faster the target answers with each drafter: a row per task × engine × T, the target
    alone's tokens/s (this engine's, and the fastest engine's where that is another), a column per
    drafter: "speed-up× over the fastest target alone at the fastest γ (its τ, r there)", then the
    speed-up over this engine's own target alone where the fastest is another engine's. Empty where
    nothing was timed."""
    best = fastest_gammas(records)
    if not best:
        return ""
    drafters = list(dict.fromkeys(k[0] for k in best))
    rows = list(dict.fromkeys(k[1:] for k in best))
    lines = [f"| task | engine | T | target alone, tok/s | {' | '.join(drafters)} |",
             "|---|---|---:|---:|" + "---:|" * len(drafters)]
    for task, engine, temp in rows:
        row = [r for d in drafters if (r := best.get((d, task, engine, temp)))]
        lines.append(f"| {task} | {engine} | {temp:g} | {_baseline_cell(row[0])} | "
                     + " | ".join(_speedup_cell(best.get((d, task, engine, temp))) for d in drafters) + " |")
    return "\n".join(lines) + "\n"


def _baseline_cell(r: dict) -> str:
    """This engine's target alone (tokens/s), and the fastest engine's where that is another."""
    own = _fmt(r.get("tokens_per_s_ar"), 1)
    if r.get("baseline_engine") in (None, r["engine"]):
        return own
    return f"{own} (fastest: {r['baseline_engine']} {r['tokens_per_s_baseline']:.1f})"


def _speedup_cell(r: dict | None) -> str:
    """"1.05× (γ=3, τ 1.30, r 2.10)", with "; 1.40× over vllm's own" where the baseline is another engine's."""
    if r is None:
        return "–"
    own = r.get("speedup_own_engine")
    other = (f"; {own:.2f}× over {r['engine']}'s own" if own is not None
             and r.get("baseline_engine") not in (None, r["engine"]) else "")
    return (f"{r['speedup']:.2f}× (γ={r['gamma']}, τ {r['block_efficiency']:.2f}, "
            f"r {_fmt(r.get('verify_ratio'))}{other})")


def engine_agreement_table(records: Sequence[dict]) -> str:
    """τ of the same drafter, task, γ and T on both engines, with their intervals: τ does not
    depend on the engine, so the two must agree within their intervals ("no" flags a cell to
    look at). Empty unless some cell ran on both engines."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in records:
        by_key.setdefault((r["drafter"], r["task"], r["gamma"], r["temperature"]), {})[r["engine"]] = r
    lines = ["| drafter | task | γ | T | τ reference | τ vLLM | intervals overlap |",
             "|---|---|---:|---:|---:|---:|---|"]
    for (drafter, task, gamma, temp), pair in by_key.items():
        ref, vl = pair.get("reference"), pair.get("vllm")
        if ref is None or vl is None:
            continue
        overlap = "–"
        if ref.get("block_efficiency_ci_low") is not None and vl.get("block_efficiency_ci_low") is not None:
            apart = (ref["block_efficiency_ci_high"] < vl["block_efficiency_ci_low"]
                     or vl["block_efficiency_ci_high"] < ref["block_efficiency_ci_low"])
            overlap = "no" if apart else "yes"
        lines.append(f"| {drafter} | {task} | {gamma} | {temp:g} | {_tau_ci(ref, 'block_efficiency')} | "
                     f"{_tau_ci(vl, 'block_efficiency')} | {overlap} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def _yerr(recs: Sequence[dict | None]) -> list[list[float]] | None:
    """matplotlib's asymmetric yerr, [[below], [above]], from the records' τ intervals (None without them)."""
    if not any(r and r.get("block_efficiency_ci_low") is not None for r in recs):
        return None
    pairs = [(r["block_efficiency"] - r["block_efficiency_ci_low"], r["block_efficiency_ci_high"] - r["block_efficiency"])
             if r and r.get("block_efficiency_ci_low") is not None else (0.0, 0.0) for r in recs]
    return [[max(lo, 0.0) for lo, _ in pairs], [max(hi, 0.0) for _, hi in pairs]]


def _comparison_plot(out: Path, records: Sequence[dict], plt) -> list[str]:
    """τ per drafter, grouped by task, a panel per temperature (stacked), for the γ the paper
    reports (3, else the middle one), with the 95% bootstrap interval as error bars: the comparison
    table at a glance. The y axis spans the intervals, not 1..γ+1: drafters differ by tenths."""
    drafters = list(dict.fromkeys(r["drafter"] for r in records))
    if len(drafters) < 2:
        return []
    gammas = sorted({r["gamma"] for r in records})
    gamma = 3 if 3 in gammas else gammas[len(gammas) // 2]
    temps = sorted({r["temperature"] for r in records})
    tasks = list(dict.fromkeys(r["task"] for r in records))
    shown = [r for r in records if r["gamma"] == gamma]
    top = max(r.get("block_efficiency_ci_high") or r["block_efficiency"] for r in shown)
    colors = plt.get_cmap("tab20" if len(drafters) > 10 else "tab10").colors  # one color per drafter
    fig, axes = plt.subplots(len(temps), 1, figsize=(2.5 + len(tasks) * max(2.0, 0.3 * len(drafters)),
                                                     0.8 + 2.6 * len(temps)), squeeze=False, sharex=True)
    width = 0.8 / len(drafters)
    for ax, temp in zip(axes[:, 0], temps, strict=True):
        for j, drafter in enumerate(drafters):
            recs = [next((r for r in shown if r["task"] == task and r["drafter"] == drafter
                          and r["temperature"] == temp), None) for task in tasks]
            vals = [r["block_efficiency"] if r else 0.0 for r in recs]
            ax.bar([i + j * width for i in range(len(tasks))], vals, width, label=drafter, yerr=_yerr(recs),
                   capsize=2, error_kw={"elinewidth": 0.8}, color=colors[j % len(colors)])
        ax.set(title=f"γ={gamma}, T={temp:g}", ylabel="block efficiency τ", ylim=(1, 1 + 1.08 * (top - 1) + 0.02),
               xticks=[i + 0.4 - width / 2 for i in range(len(tasks))], xticklabels=tasks)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)
    return ["comparison.png"]


def _write_csv(path: Path, records: Sequence[dict]) -> None:
    from draftalign.util.atomicio import write_text_atomic

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(records[0]))
    w.writeheader()
    for r in records:
        # a list does not fit a CSV cell: positions joined by ";"
        w.writerow({k: ";".join(f"{x:.4f}" for x in v) if isinstance(v, list) else v for k, v in r.items()})
    write_text_atomic(path, buf.getvalue())


def _plots(out: Path, records: Sequence[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in records))
    engines = list(dict.fromkeys(r["engine"] for r in records))
    written = []
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks, strict=True):
        lines: dict[tuple, list[dict]] = {}
        for r in records:
            if r["task"] == task:
                lines.setdefault((r["drafter"], r["engine"], r["temperature"]), []).append(r)
        gammas = sorted({r["gamma"] for r in records})
        ax.plot(gammas, [g + 1 for g in gammas], ":", color="grey", label="γ + 1 (all accepted)")
        for (drafter, engine, t), rs in lines.items():
            rs = sorted(rs, key=lambda r: r["gamma"])
            label = f"{drafter} T={t:g}" + (f" ({engine})" if len(engines) > 1 else "")
            ax.plot([r["gamma"] for r in rs], [r["block_efficiency"] for r in rs], "o-" if t == 0 else "s--",
                    label=label)
        ax.set(title=task, xlabel="γ (draft tokens)", xticks=gammas)
    axes[0][0].set_ylabel("block efficiency τ")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tau_vs_gamma.png", dpi=110)
    plt.close(fig)
    written.append("tau_vs_gamma.png")
    # acceptance per position at the largest γ, where the decay along the draft is longest
    gmax = max(r["gamma"] for r in records)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in records:
            if r["task"] == task and r["gamma"] == gmax:
                label = f"{r['drafter']} T={r['temperature']:g}" + (f" ({r['engine']})" if len(engines) > 1 else "")
                ax.plot(range(1, gmax + 1), r["acceptance_per_position"], "o-" if r["temperature"] == 0 else "s--",
                        label=label)
        ax.set(title=f"{task}, γ={gmax}", xlabel="draft position", xticks=list(range(1, gmax + 1)), ylim=(0, 1.02))
    axes[0][0].set_ylabel("fraction of drafts accepted at position")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "acceptance_per_position.png", dpi=110)
    plt.close(fig)
    written.append("acceptance_per_position.png")
    return written + _comparison_plot(out, records, plt)


def pairs_table(pairs: Sequence[dict]) -> str:
    """Every pair of drafters of each task × engine × γ × T: Δτ = τ_a − τ_b [low, high] on their common prompts."""
    lines = ["| task | engine | γ | T | a − b | Δτ [interval] | prompts |", "|---|---|---:|---:|---|---:|---:|"]
    for p in pairs:
        lines.append(f"| {p['task']} | {p['engine']} | {p['gamma']} | {p['temperature']:g} | {p['drafter_a']} − "
                     f"{p['drafter_b']} | {p['difference']:+.2f} [{p['ci_low']:+.2f}, {p['ci_high']:+.2f}] "
                     f"| {p['prompts']} |")
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, records: Sequence[dict], header: str = "", plots: bool = True,
                 pairs: Sequence[dict] | None = None) -> dict[str, str]:
    """summary.json, summary.csv, report.md, (optionally) the PNG plots and, given ``pairs``
    (paired_differences), paired.json and their table; returns the files' paths."""
    from draftalign.util.atomicio import write_json_atomic, write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", list(records))
    _write_csv(out / "summary.csv", records)
    files = {"summary.json": str(out / "summary.json"), "summary.csv": str(out / "summary.csv")}
    if pairs:
        write_json_atomic(out / "paired.json", list(pairs))
        files["paired.json"] = str(out / "paired.json")
    pngs = _plots(out, records) if plots else []
    comparison = comparison_table(records)
    if comparison:
        comparison = "\n## Block efficiency τ by drafter (bold: best; =: tied)\n\n" + comparison
    if pairs:
        comparison += "\n## Paired differences of τ, every pair of drafters\n\n" + pairs_table(pairs)
    speed = speedup_table(records)
    if speed:
        comparison += ("\n## Speed-up over the target alone on the run's fastest engine, at each drafter's "
                       "fastest γ (wall clock)\n\n" + SPEEDUP_NOTE + "\n\n" + speed)
    agreement = engine_agreement_table(records)
    if agreement:
        comparison += "\n## τ on both engines (the same prompts: they should agree)\n\n" + agreement
    body = (header + comparison + "\n## Every cell\n\n" + markdown_table(records)
            + "".join(f"\n![{p}]({p})\n" for p in pngs))
    write_text_atomic(out / "report.md", body)
    files["report.md"] = str(out / "report.md")
    files.update({p: str(out / p) for p in pngs})
    return files
