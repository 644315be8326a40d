"""Experiment tracking: one small interface over TensorBoard, MLflow and Weights & Biases.

The training stages open a tracker on rank 0 of their Ray Train run (through Ray's own
integrations, `setup_mlflow` and `setup_wandb`; TensorBoard through tensorboardX, which Ray's
TensorBoard logger uses too) and log each log step's metrics: loss, lr, tokens/s, the target
pool's queue depth and the trainer's wait, and the held-out metrics when an evaluation ran.
Evaluate logs its summary from the driver. Backends are imported only when chosen.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftalign.config import RunConfig, TrackingConfig
from draftalign.errors import ConfigError
from draftalign.training.trainreport import Scalar

# A field of evaluate's summary records (evaluation.report.SummaryRecord, a layer above this one).
SummaryValue = str | float | int | list[float] | None

# The package each backend needs (checked before Ray starts, so a missing one is a config error).
BACKEND_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
# What evaluate tracks of each summary record.
SUMMARY_KEYS = ("block_efficiency", "tested_acceptance", "draft_acceptance_rate", "mbsu", "speedup",
                "speedup_own_engine", "verify_ratio", "tokens_per_s_spec", "tokens_per_s_ar")


@dataclass(frozen=True)
class TrackingRun:
    """Where one job logs: the backend, its resolved location, experiment and run name."""

    backend: str = "none"
    uri: str = ""  # MLflow tracking URI, or TensorBoard's folder for this job
    experiment: str = ""
    run_name: str = ""


def tracking_run(cfg: TrackingConfig, run: RunConfig, job: str) -> TrackingRun:
    """Resolve `cfg` for one job (`job`: e.g. "pretrain-draft", "distill-tvdpp", "evaluate").

    Paths become absolute here, on the driver: Ray Train workers run in another folder.
    """
    if cfg.backend == "none":
        return TrackingRun()
    check_backend(cfg)
    name = f"{run.name}-{job}"
    if cfg.backend == "tensorboard":
        uri = str(Path(cfg.uri or Path(run.output) / "tensorboard").resolve() / name)
    elif cfg.backend == "mlflow" and cfg.uri:
        uri = cfg.uri
    elif cfg.backend == "mlflow":
        # MLflow 3 refuses its plain-file store; SQLite is its own recommended local default.
        db = Path(run.output).resolve() / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    else:
        uri = cfg.uri or ""
    return TrackingRun(cfg.backend, uri, cfg.experiment or run.name, name)


def check_backend(cfg: TrackingConfig) -> None:
    """A chosen backend whose package is missing is a ConfigError naming the key."""
    package = BACKEND_PACKAGES.get(cfg.backend)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"tracking.backend={cfg.backend} needs the {package!r} package, which is not "
                          f"installed (pip install 'draftalign[tracking]', or {package})")


def metric_name(name: str) -> str:
    """A name every backend takes (MLflow allows letters, digits and _-. :/): "+" reads as "p",
    as in the drafters' folders (tvd++ -> tvdpp), anything else as "_"."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name.replace("+", "p"))


def summary_metrics(records: Sequence[Mapping[str, SummaryValue]]) -> dict[str, float]:
    """Evaluate's summary as tracked metrics: `drafter/task/engine/gammaG/TT/<metric>`."""
    out: dict[str, float] = {}
    for r in records:
        cell = metric_name(f"{r['drafter']}/{r['task']}/{r['engine']}/gamma{r['gamma']}/T{r['temperature']:g}")
        for key in SUMMARY_KEYS:
            if r.get(key) is not None:
                out[f"{cell}/{key}"] = r[key]
    return scalars(out)


def scalars(metrics: Mapping[str, Scalar | str]) -> dict[str, float]:
    """The finite numbers of `metrics` (no bools, None or NaN): what every backend can plot."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys with string values (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            out[name] = str(value)
    return out


class Tracker:
    """No tracking: the interface every backend implements."""

    def log_metrics(self, metrics: Mapping[str, Scalar], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run: TrackingRun, config: dict[str, Any]) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=run.uri)
        params = flat_params(config)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())))

    def log_metrics(self, metrics: Mapping[str, Scalar], step: int) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed run keeps every step it logged

    def close(self) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    def __init__(self, run: TrackingRun, config: dict[str, Any]) -> None:
        from ray.air.integrations.mlflow import setup_mlflow

        # rank_zero_only=False: the trainer opens trackers on rank 0 only, and evaluate's driver
        # has no Ray Train context for Ray to ask.
        self.mlflow = setup_mlflow(config=flat_params(config), tracking_uri=run.uri,
                                   experiment_name=run.experiment, run_name=run.run_name,
                                   create_experiment_if_not_exists=True, rank_zero_only=False)

    def log_metrics(self, metrics: Mapping[str, Scalar], step: int) -> None:
        self.mlflow.log_metrics(scalars(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker(Tracker):
    def __init__(self, run: TrackingRun, config: dict[str, Any]) -> None:
        from ray.air.integrations.wandb import setup_wandb

        self.wandb = setup_wandb(config=config, project=run.experiment, name=run.run_name,
                                 rank_zero_only=False)

    def log_metrics(self, metrics: Mapping[str, Scalar], step: int) -> None:
        self.wandb.log(scalars(metrics), step=step)

    def close(self) -> None:
        self.wandb.finish()


BACKENDS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


def open_tracker(run: TrackingRun | None, config: dict[str, Any], rank: int = 0) -> Tracker:
    """The tracker for `run` on rank 0 (with the job's resolved config as its parameters);
    a no-op tracker on other ranks and when tracking is off."""
    if run is None or run.backend == "none" or rank != 0:
        return Tracker()
    return BACKENDS[run.backend](run, config)
