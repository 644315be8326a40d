"""Experiment tracking (draftalign/training/tracking.py): where each job logs, what it logs, and the
evaluate summary read back from a real TensorBoard event file and MLflow store."""

from pathlib import Path

import pytest

from draftalign.config import ConfigError, RunConfig, TrackingConfig
from draftalign.training.tracking import (
    BACKEND_PACKAGES,
    TrackingRun,
    flat_params,
    open_tracker,
    scalars,
    summary_metrics,
    tracking_run,
)
from tests.trackread import mlflow_runs, tensorboard_scalars

RUN = RunConfig(name="exp", output="runs/x")


def test_off_by_default_and_a_no_op():
    assert tracking_run(TrackingConfig(), RUN, "distill-tvdpp") == TrackingRun()
    tracker = open_tracker(TrackingRun(), {})
    tracker.log_metrics({"loss": 1.0}, 1)  # nothing to write, nothing raised
    tracker.close()


def test_locations_are_absolute_and_named_after_the_run_and_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tb = tracking_run(TrackingConfig(backend="tensorboard"), RUN, "distill-tvdpp")
    assert tb == TrackingRun("tensorboard", str(tmp_path / "runs/x/tensorboard/exp-distill-tvdpp"), "exp",
                             "exp-distill-tvdpp")
    ml = tracking_run(TrackingConfig(backend="mlflow", experiment="e"), RUN, "evaluate")
    assert ml.uri == f"sqlite:///{tmp_path / 'runs/x/mlflow.db'}" and ml.experiment == "e"
    given = tracking_run(TrackingConfig(backend="mlflow", uri="http://mlflow:5000"), RUN, "evaluate")
    assert given.uri == "http://mlflow:5000"


def test_a_backend_whose_package_is_missing_is_a_config_error(monkeypatch):
    monkeypatch.setitem(BACKEND_PACKAGES, "wandb", "no_such_package_draftalign")
    with pytest.raises(ConfigError, match="tracking.backend=wandb needs the 'no_such_package_draftalign'"):
        tracking_run(TrackingConfig(backend="wandb"), RUN, "distill-tvdpp")


def test_only_finite_numbers_are_logged_and_params_are_flat():
    assert scalars({"loss": 2, "ok": True, "none": None, "nan": float("nan"), "name": "x", "lr": 1e-3}) == \
        {"loss": 2.0, "lr": 1e-3}
    assert flat_params({"train": {"lr": 0.1, "betas": [0.9, 0.95]}, "empty": {}}) == \
        {"train.lr": "0.1", "train.betas": "[0.9, 0.95]", "empty": "{}"}


RECORDS = [
    {"drafter": "tvd++", "task": "summarize", "engine": "reference", "gamma": 3, "temperature": 0.0,
     "block_efficiency": 1.5, "mbsu": 1.2, "speedup": None},
    {"drafter": "pretrained", "task": "summarize", "engine": "reference", "gamma": 3, "temperature": 1.0,
     "block_efficiency": 1.25, "mbsu": 1.0},
]


def test_evaluate_summary_metrics_name_each_cell():
    assert summary_metrics(RECORDS) == {
        "tvdpp/summarize/reference/gamma3/T0/block_efficiency": 1.5,
        "tvdpp/summarize/reference/gamma3/T0/mbsu": 1.2,
        "pretrained/summarize/reference/gamma3/T1/block_efficiency": 1.25,
        "pretrained/summarize/reference/gamma3/T1/mbsu": 1.0,
    }


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_the_summary_reads_back_from_each_backend(tmp_path, backend):
    uri = str(tmp_path / "tb") if backend == "tensorboard" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = open_tracker(TrackingRun(backend, uri, "exp", "exp-evaluate"), {"gammas": [3]})
    tracker.log_metrics(summary_metrics(RECORDS), 0)
    tracker.close()
    if backend == "tensorboard":
        logged = tensorboard_scalars(Path(uri))
    else:
        run = mlflow_runs(uri, "exp")["exp-evaluate"]
        assert run["params"] == {"gammas": "[3]"}
        logged = run["metrics"]
    assert logged["tvdpp/summarize/reference/gamma3/T0/block_efficiency"] == [(0, 1.5)]
    assert len(logged) == 4
