"""The evaluation report: pooled summary records, summary.json/.csv, report.md and PNG plots.

Rates pool the counts of every prompt of a (drafter, task, engine, γ, T) cell, as vLLM
does, never a mean of per-prompt ratios (paper-spec 7.6). Speed-up is tokens/s of
speculative decoding over tokens/s of the target alone on the same prompts, same process.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from draftalign.evaluation.metrics import (
    acceptance_of_tested,
    acceptance_per_position,
    acceptance_rate,
    block_efficiency,
    implied_block_efficiency,
    mbsu,
)

__all__ = ["CONTRACT_KEYS", "pooled_block_efficiency", "summarize_rows", "markdown_table", "write_report"]

# summary.json's contract (issue 5): every record has at least these keys.
# `draft_acceptance_rate` is accepted / drafted tokens (vLLM's acceptance rate), not the distill stage's
# expected acceptance Σ min(p, q); `acceptance_rate` stays as its alias for readers of older files.
CONTRACT_KEYS = ("drafter", "task", "engine", "gamma", "temperature", "block_efficiency",
                 "draft_acceptance_rate", "acceptance_rate", "mbsu", "num_prompts")
_CELL = ("drafter", "task", "engine", "gamma", "temperature")


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def pooled_block_efficiency(group: Sequence[dict]) -> float:
    """τ of one engine's rows, pooled: Σ tokens / Σ target calls for the reference engine.

    The reference engine records every emitted token and every target call, so τ is their ratio
    exactly (paper-spec 6.3); 1 + accepted / drafts would count a bonus token after an accepted EOS
    draft that is never emitted. vLLM's counters give its own definition, 1 + accepted / drafts:
    its prefill step emits a token without a draft call, so generated / drafts would over-count.
    """
    drafts = sum(r["num_drafts"] for r in group)
    if group and all(r["engine"] == "reference" for r in group):
        return sum(r["num_generated_tokens"] for r in group) / drafts if drafts else 1.0
    return block_efficiency(sum(r["num_accepted"] for r in group), drafts, group[0]["gamma"] if group else None)


def summarize_rows(rows: Sequence[dict], parameters: dict[str, int], target_parameters: int) -> list[dict]:
    """One record per (drafter, task, engine, γ, T), in the rows' order of first appearance.

    parameters: drafter name -> parameter count; MBSU uses c = that / target_parameters.
    """
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault(tuple(r[k] for k in _CELL), []).append(r)
    out = []
    for key, group in cells.items():
        rec: dict[str, Any] = dict(zip(_CELL, key, strict=True))
        gamma = rec["gamma"]
        drafts = sum(r["num_drafts"] for r in group)
        drafted = sum(r["num_draft_tokens"] for r in group)
        accepted = sum(r["num_accepted"] for r in group)
        per_pos = [sum(r["accepted_per_pos"][i] for r in group) for i in range(gamma)]
        tau = pooled_block_efficiency(group)
        alpha = acceptance_rate(accepted, drafted)
        tested = acceptance_of_tested(accepted, drafts, per_pos)
        c = parameters[rec["drafter"]] / target_parameters
        spec_tokens = sum(r["num_generated_tokens"] for r in group)
        spec_secs = sum(r["spec_seconds"] for r in group)
        timed_ar = [r for r in group if r.get("ar_seconds") is not None]
        ar_tps = _ratio(sum(r["ar_generated_tokens"] for r in timed_ar), sum(r["ar_seconds"] for r in timed_ar))
        spec_tps = _ratio(spec_tokens, spec_secs)
        matches = [r["matches_autoregressive"] for r in group if r.get("matches_autoregressive") is not None]
        rec.update({
            "drafter_path": group[0]["drafter_path"], "top_p": group[0]["top_p"], "num_prompts": len(group),
            "generated_tokens": spec_tokens, "num_drafts": drafts, "num_draft_tokens": drafted,
            "num_accepted": accepted, "block_efficiency": tau,
            "draft_acceptance_rate": alpha, "acceptance_rate": alpha,
            "acceptance_per_position": acceptance_per_position(per_pos, drafts),
            # the i.i.d. formula needs the per-token acceptance of tested drafts, not accepted / drafted
            "tested_acceptance": tested, "implied_block_efficiency": implied_block_efficiency(tested, gamma),
            "mbsu": mbsu(tau, gamma, c), "param_ratio": c, "draft_parameters": parameters[rec["drafter"]],
            "target_parameters": target_parameters, "tokens_per_s_spec": spec_tps, "tokens_per_s_ar": ar_tps,
            "speedup": _ratio(spec_tps or 0.0, ar_tps or 0.0) if ar_tps else None,
            "greedy_match_rate": _ratio(sum(matches), len(matches)) if matches else None,
        })
        out.append(rec)
    return out


def _fmt(v: Any, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown_table(records: Sequence[dict]) -> str:
    """drafter × task × engine × γ × T → τ, draft acceptance rate, MBSU, speed-up (and the tokens/s behind it)."""
    lines = ["| drafter | task | engine | γ | T | τ | draft acceptance (accepted/drafted) | MBSU | speed-up "
             "| tok/s spec | tok/s AR |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['drafter']} | {r['task']} | {r['engine']} | {r['gamma']} | {r['temperature']:g} | "
                     f"{_fmt(r['block_efficiency'])} | {_fmt(r['draft_acceptance_rate'])} | {_fmt(r['mbsu'])} | "
                     f"{_fmt(r['speedup'])} | {_fmt(r['tokens_per_s_spec'], 1)} | {_fmt(r['tokens_per_s_ar'], 1)} |")
    return "\n".join(lines) + "\n"


def comparison_table(records: Sequence[dict], metric: str = "block_efficiency") -> str:
    """The paper's layout: a row per task × engine × γ × T, a column per drafter, the best of
    each row in bold (ties all bold). Empty when there is one drafter: nothing to compare."""
    drafters = list(dict.fromkeys(r["drafter"] for r in records))
    if len(drafters) < 2:
        return ""
    cells: dict[tuple, dict[str, float]] = {}
    for r in records:
        cells.setdefault((r["task"], r["engine"], r["gamma"], r["temperature"]), {})[r["drafter"]] = r[metric]
    lines = [f"| task | engine | γ | T | {' | '.join(drafters)} |",
             "|---|---|---:|---:|" + "---:|" * len(drafters)]
    for (task, engine, gamma, temp), row in cells.items():
        best = max((v for v in row.values() if v is not None), default=None)
        shown = [("**" + _fmt(row[d]) + "**") if row.get(d) is not None and best is not None
                 and round(row[d], 2) == round(best, 2) else _fmt(row.get(d)) for d in drafters]
        lines.append(f"| {task} | {engine} | {gamma} | {temp:g} | {' | '.join(shown)} |")
    return "\n".join(lines) + "\n"


def _comparison_plot(out: Path, records: Sequence[dict], plt) -> list[str]:
    """τ per drafter, grouped by task, at each temperature, for the γ the paper reports (3, else
    the middle one): the comparison table at a glance."""
    drafters = list(dict.fromkeys(r["drafter"] for r in records))
    if len(drafters) < 2:
        return []
    gammas = sorted({r["gamma"] for r in records})
    gamma = 3 if 3 in gammas else gammas[len(gammas) // 2]
    temps = sorted({r["temperature"] for r in records})
    tasks = list(dict.fromkeys(r["task"] for r in records))
    fig, axes = plt.subplots(1, len(temps), figsize=(1.2 + 0.9 * len(tasks) * len(drafters) / 2.5 * len(temps), 3.8),
                             squeeze=False, sharey=True)
    width = 0.8 / len(drafters)
    for ax, temp in zip(axes[0], temps, strict=True):
        for j, drafter in enumerate(drafters):
            vals = [next((r["block_efficiency"] for r in records if r["task"] == task and r["drafter"] == drafter
                          and r["gamma"] == gamma and r["temperature"] == temp), 0.0) for task in tasks]
            ax.bar([i + j * width for i in range(len(tasks))], vals, width, label=drafter)
        ax.set(title=f"γ={gamma}, T={temp:g}", xticks=[i + 0.4 - width / 2 for i in range(len(tasks))],
               xticklabels=tasks, ylim=(1, gamma + 1))
    axes[0][0].set_ylabel("block efficiency τ")
    axes[0][-1].legend(fontsize=7)
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


def write_report(out: str | Path, records: Sequence[dict], header: str = "", plots: bool = True) -> dict[str, str]:
    """summary.json, summary.csv, report.md and (optionally) the PNG plots; returns their paths."""
    from draftalign.util.atomicio import write_json_atomic, write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", list(records))
    _write_csv(out / "summary.csv", records)
    files = {"summary.json": str(out / "summary.json"), "summary.csv": str(out / "summary.csv")}
    pngs = _plots(out, records) if plots else []
    comparison = comparison_table(records)
    if comparison:
        comparison = "\n## Block efficiency τ by drafter (best of each row in bold)\n\n" + comparison
    body = (header + comparison + "\n## Every cell\n\n" + markdown_table(records)
            + "".join(f"\n![{p}]({p})\n" for p in pngs))
    write_text_atomic(out / "report.md", body)
    files["report.md"] = str(out / "report.md")
    files.update({p: str(out / p) for p in pngs})
    return files
