"""The training report: what each train worker hands Ray Train at a log step, typed.

The trainer builds a `TrainReport`; `to_dict` is its one serialised form, the dict Ray Train
carries to the driver, the tracker logs and the final checkpoint keeps as metrics.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

__all__ = ["Metrics", "Scalar", "TrainReport"]

Scalar = float | int | None  # None: e.g. resumed_from_step of a run that never restarted
Metrics = dict[str, Scalar]  # a report as Ray Train, metrics.json and the model's record hold it


@dataclass(frozen=True)
class TrainReport:
    """One log step. `values` holds what varies by task and step, in the order it was added: the
    starting model's `initial_*`, the held-out metrics when evaluated, the task's extra numbers
    (the target pool's), and `export_*` on the last report."""

    step: int
    epoch: int
    loss: float
    lr: float
    tokens_per_s: float
    resumed_from_step: int | None
    values: Mapping[str, Scalar] = field(default_factory=dict)

    def with_values(self, more: Mapping[str, Scalar]) -> TrainReport:
        return replace(self, values={**self.values, **more})

    def get(self, key: str) -> Scalar:
        return self.to_dict().get(key)

    def to_dict(self) -> Metrics:
        # a value named like a field replaces it in place, as dict.update did before this type
        return {"step": self.step, "epoch": self.epoch, "loss": self.loss, "lr": self.lr,
                "tokens_per_s": self.tokens_per_s, "resumed_from_step": self.resumed_from_step, **self.values}
