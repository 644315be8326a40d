"""Training curves: the loss and the held-out metrics of a training job, as a PNG beside its model.

The trainer keeps one point per log step (`curve_point`) in its checkpointed state, so a
resumed run draws the whole run; the export writes `training_history.json` and
`training_curves.png` (`write_curves`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

from draftalign.training.trainreport import Scalar
from draftalign.util.atomicio import write_json_atomic

HISTORY_FILE = "training_history.json"
CURVES_FILE = "training_curves.png"
CURVE_FILES = (HISTORY_FILE, CURVES_FILE)
# What the right-hand panel draws, first found wins: distillation's held-out expected acceptance
# Σ min(p, q) and implied τ, or pretraining's held-out perplexity.
HELDOUT_KEYS = ("holdout_expected_acceptance", "holdout_perplexity")
KEPT_PREFIXES = ("holdout_",)
KEPT_KEYS = ("step", "loss", "lr", "tokens_per_s")


def curve_point(metrics: Mapping[str, Scalar]) -> dict[str, float]:
    """The numbers of one log step worth drawing: step, loss, lr, tokens/s, held-out metrics."""
    return {k: float(v) for k, v in metrics.items()
            if (k in KEPT_KEYS or k.startswith(KEPT_PREFIXES))
            and isinstance(v, int | float) and not isinstance(v, bool)}


def write_curves(history: list[dict[str, float]], folder: Path, title: str) -> list[Path]:
    """Write HISTORY_FILE and CURVES_FILE into `folder`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    from matplotlib.figure import Figure

    write_json_atomic(folder / HISTORY_FILE, {"title": title, "points": history})
    fig = Figure(figsize=(10, 3.8))
    loss_ax, heldout_ax = fig.subplots(1, 2)
    train = [p for p in history if "loss" in p]
    loss_ax.plot([p["step"] for p in train], [p["loss"] for p in train], marker=".")
    loss_ax.set(xlabel="optimizer step", ylabel="training loss", title="loss")
    key = next((k for k in HELDOUT_KEYS if any(k in p for p in history)), None)
    if key is not None:
        held = [p for p in history if key in p]
        heldout_ax.plot([p["step"] for p in held], [p[key] for p in held], marker="o")
        heldout_ax.set(xlabel="optimizer step", ylabel=key, title="held-out")
    else:
        heldout_ax.text(0.5, 0.5, "no held-out evaluation", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    path = folder / CURVES_FILE
    fig.savefig(path, dpi=100)
    return [folder / HISTORY_FILE, path]


class History(TypedDict):
    """training_history.json: the job's title and a curve_point per log step."""

    title: str
    points: list[dict[str, float]]


def read_history(folder: Path) -> History:
    return json.loads((folder / HISTORY_FILE).read_text())
