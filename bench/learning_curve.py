"""The learning curve: held-out Σ min(p, q) and implied τ against the number of training tokens,
for every drafter a config distils (the demo's: the feature drafter and the cut).

From a finished run's distillation set (default: the demo's, runs/smollm2/generate/data), each
fraction of its training rows (nested: the 25% set lies inside the 50% set) is written beside every
held-out row (the split is distill's own, by row id, so every point is scored on the same rows),
and `draftalign distill CONFIG` trains every loss of the config on it, from the run's pretrained
drafters, for the config's max_steps (the same compute at every point: fewer rows, more passes).
The target pool's cache is the run's own (entries are keyed by sequence), so the target scores
a row at most once over all the points.

    .venv/bin/python bench/learning_curve.py                       # the demo's run, 25/50/100%
    .venv/bin/python bench/learning_curve.py --fractions 0.5,1 --report docs/results/learning-curve.md

Writes OUT/curve.json and, with --report, a markdown table; figures are each export's held-out
metrics (draftalign_model.json): the exported step's Σ min(p, q) of draft 1 (and draft 2 for a
feature drafter) and τ implied at distill.eval_gamma.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from draftalign.config import load_config  # noqa: E402
from draftalign.pipelines.outputs import MODEL_INFO  # noqa: E402
from draftalign.training.distillation import holdout_row  # noqa: E402


def _rank(row_id: str) -> str:
    """A row's place in the nested order of training rows: a hash, so the subsets are spread over
    seeds and kinds, and each smaller one lies inside each larger one."""
    return hashlib.sha256(f"learning-curve:{row_id}".encode()).hexdigest()


def write_subset(rows: pa.Table, fraction: float, holdout_fraction: float, out: Path) -> dict:
    """All held-out rows and the first `fraction` of the training rows (by _rank) as one Parquet file
    in `out`; returns the counts (rows, training tokens: prompt + response)."""
    ids = rows.column("id").to_pylist()
    held = [i for i, r in enumerate(ids) if holdout_row(r, holdout_fraction)]
    train = sorted(set(range(len(ids))) - set(held), key=lambda i: _rank(ids[i]))
    kept = train[:round(fraction * len(train))]
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows.take(sorted(kept + held)), out / "part-0.parquet")
    lengths = [len(p) + len(r) for p, r in zip(rows.column("prompt_token_ids").to_pylist(),
                                              rows.column("response_token_ids").to_pylist(), strict=True)]
    tokens = sum(lengths[i] for i in kept)
    return {"train_rows": len(kept), "holdout_rows": len(held), "train_tokens": tokens}


def figures(model_dir: Path, gamma: int) -> dict:
    """The exported drafter's held-out figures (its exported step's, or the last step's)."""
    m = json.loads((model_dir / MODEL_INFO).read_text())["metrics"]
    pick = {"acceptance_draft1": m.get("holdout_expected_acceptance"),
            "acceptance_draft2": m.get("holdout_expected_acceptance_draft2"),
            "tau": m.get(f"export_holdout_tau_gamma{gamma}", m.get(f"holdout_tau_gamma{gamma}")),
            "initial_tau": m.get(f"initial_holdout_tau_gamma{gamma}"),
            "export_step": m.get("export_step", m.get("step"))}
    return {k: v for k, v in pick.items() if v is not None}


def run_point(config: str, run_dir: Path, data: Path, out: Path) -> float:
    """`draftalign distill` on one subset; its seconds."""
    cmd = [str(ROOT / ".venv/bin/draftalign"), "distill", config, f"distill.data={data}", f"distill.output={out}",
           f"run.output={run_dir}", f"distill.target_pool.cache_dir={run_dir / 'distill' / 'target_cache'}"]
    print("[learning-curve] " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - t0


def report(points: list[dict], gamma: int, command: str) -> str:
    lines = [f"`{command}`", "",
             f"| drafter | share of the training rows | training rows | training tokens | held-out Σ min(p, q), "
             f"draft 1 | draft 2 | implied τ at γ = {gamma} (start → exported) | seconds (the point, both drafters) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        f = p["figures"]
        d2 = f"{f['acceptance_draft2']:.3f}" if "acceptance_draft2" in f else "–"
        lines.append(f"| {p['drafter']} | {p['fraction']:.0%} | {p['train_rows']} | {p['train_tokens']:,} | "
                     f"{f['acceptance_draft1']:.3f} | {d2} | {f['initial_tau']:.3f} → {f['tau']:.3f} | "
                     f"{p['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="examples/smollm2.yaml")
    ap.add_argument("--fractions", default="0.25,0.5,1")
    ap.add_argument("--out", default="runs/bench/learning_curve")
    ap.add_argument("--report", help="a markdown file for the table")
    args = ap.parse_args()
    cfg = load_config(args.config)
    run_dir, out = Path(cfg.run.output).resolve(), Path(args.out).resolve()
    data = run_dir / "generate" / "data"
    if not any(data.glob("*.parquet")):
        sys.exit(f"learning_curve: no distillation set in {data}: run `draftalign run {args.config}` first")
    rows = pq.read_table(sorted(data.glob("*.parquet")))
    points = []
    for frac in (float(f) for f in args.fractions.split(",")):
        name = f"frac-{frac:g}"
        counts = write_subset(rows, frac, cfg.distill.holdout_fraction, out / name / "data")
        seconds = run_point(args.config, run_dir, out / name / "data", out / name / "distill")
        for loss in cfg.distill.losses:
            model_dir = out / name / "distill" / cfg.distill.drafter_folder(loss) / "model"
            points.append({"drafter": cfg.distill.drafter_label(loss), "fraction": frac, **counts,
                           "seconds": seconds, "figures": figures(model_dir, cfg.distill.eval_gamma)})
        (out / "curve.json").write_text(json.dumps(points, indent=1))
    table = report(points, cfg.distill.eval_gamma, "python bench/learning_curve.py " + " ".join(sys.argv[1:]))
    print(table)
    if args.report:
        Path(args.report).write_text(table)


if __name__ == "__main__":
    main()
