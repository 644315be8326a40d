"""The Python API (`from draftalign import load_config, run_stage`): no Ray here, stages mocked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import draftalign
from draftalign import StageResult, load_config, plan_stage, run_stage
from draftalign.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")


def test_import_is_light() -> None:
    code = ("import sys, draftalign; from draftalign import run_stage, load_config; "
            "heavy = [m for m in ('torch', 'ray', 'vllm', 'transformers', 'deepspeed', 'pyarrow') if m in sys.modules]; "
            "print(heavy); assert not heavy")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_public_names_have_docstrings() -> None:
    for name in draftalign.__all__:
        assert getattr(draftalign, name).__doc__, name
    with pytest.raises(AttributeError):
        draftalign.no_such_thing  # noqa: B018


def test_bad_override_raises_config_error_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="generate.nope"):
        run_stage("generate", TINY, overrides=["generate.nope=1", f"run.output={tmp_path}/r"])
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="unknown stage"):
        run_stage("train", TINY)


def test_load_config_applies_overrides() -> None:
    cfg = load_config(TINY, ["evaluate.gammas=[3]", "run.output=/tmp/x"])
    assert cfg.evaluate.gammas == [3] and cfg.evaluate.output == "/tmp/x/evaluate"
    with pytest.raises(ConfigError, match="overrides apply to a config file"):
        run_stage("evaluate", cfg, overrides=["evaluate.gammas=[1]"])


def test_generate_returns_output_and_manifest(monkeypatch, tmp_path: Path) -> None:
    import draftalign.pipelines.generate as gen

    seen = {}

    def fake(cfg):
        seen["max_seeds"] = cfg.generate.max_seeds
        return {"counts": {"rows_in_data": 7}}

    monkeypatch.setattr(gen, "run_generate", fake)
    res = run_stage("generate", TINY, overrides=["generate.max_seeds=5", f"run.output={tmp_path}"])
    assert isinstance(res, StageResult)
    assert seen == {"max_seeds": 5}
    assert res.output == tmp_path / "generate" and res.manifest == {"counts": {"rows_in_data": 7}}
    assert res.summary is None and res.models == {}


def test_evaluate_returns_summary_and_models(monkeypatch, tmp_path: Path) -> None:
    import draftalign.pipelines.evaluate as ev

    records = [{"drafter": "pretrained", "drafter_path": "runs/tiny/pretrain/draft/model", "task": "open",
                "gamma": 3, "temperature": 0.0, "block_efficiency": 2.1},
               {"drafter": "tvd++", "drafter_path": "runs/tiny/distill/tvdpp/model", "task": "open",
                "gamma": 3, "temperature": 0.0, "block_efficiency": 2.4}]
    monkeypatch.setattr(ev, "run_evaluate", lambda cfg: records)
    cfg = load_config(TINY, [f"run.output={tmp_path}"])
    res = run_stage("evaluate", cfg)
    assert res.output == tmp_path / "evaluate" and res.summary == records
    assert res.models == {"pretrained": Path("runs/tiny/pretrain/draft/model"),
                          "tvd++": Path("runs/tiny/distill/tvdpp/model")}
    assert res.config is cfg


def test_distill_names_models_by_loss(monkeypatch, tmp_path: Path) -> None:
    import draftalign.pipelines.distill as dist

    monkeypatch.setattr(dist, "run_distill", lambda cfg: [Path(cfg.distilled_path(x)) for x in cfg.distill.losses])
    res = run_stage("distill", TINY, overrides=[f"run.output={tmp_path}", "distill.losses=[{name: tvd}, {name: tvd++}]"])
    assert res.models == {"tvd": tmp_path / "distill" / "tvd" / "model",
                          "tvd++": tmp_path / "distill" / "tvdpp" / "model"}


def test_plan_stage_is_the_plan_as_a_dict() -> None:
    plan = plan_stage("evaluate", TINY, overrides=["evaluate.gammas=[2]"])
    assert plan["evaluate"]["gammas"] == [2] and "drafters" in plan["evaluate"]
