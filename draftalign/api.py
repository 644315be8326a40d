"""The Python API: run a stage from a notebook, a script or a Ray workflow.

    from draftalign import load_config, run_stage

    result = run_stage("evaluate", "examples/tiny.yaml", overrides=["evaluate.gammas=[3]"])
    result.output     # Path of evaluate.output
    result.summary    # the summary.json records: drafter, task, engine, gamma, temperature, block_efficiency, ...
    result.models     # {drafter name: model folder}

It is the command line without the parsing: the same config validation (a bad key raises
`draftalign.errors.ConfigError` naming it, before any work), the same GGUF import, the same stage
functions, locks, reuse and outputs. Nothing heavy is imported until a stage runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from draftalign.config import Config
    from draftalign.evaluation.report import SummaryRecord
    from draftalign.pipelines.generate import GenerateManifest

STAGES = ("pretrain", "generate", "distill", "evaluate", "run")


@dataclass(frozen=True)
class StageResult:
    """What a stage made.

    stage: the stage that ran. output: its output folder (`run.output` for `run`).
    summary: evaluate's records (one per drafter × task × engine × γ × T, as in summary.json)
    when evaluate ran, else None. models: exported model folders by name (pretrain jobs,
    distilled drafters by loss, evaluated drafters). manifest: generate's manifest or run's
    run manifest, when the stage writes one. config: the resolved config it ran with.
    """

    stage: str
    output: Path
    summary: list[SummaryRecord] | None = None
    models: dict[str, Path] = field(default_factory=dict)
    # generate's GenerateManifest, or run's RunManifest.to_json()
    manifest: GenerateManifest | dict[str, str | float | list[dict[str, str | float]]] | None = None
    config: Config | None = field(default=None, repr=False)


def load_config(config: str | Path | None, overrides: list[str] | None = None, *,
                resolve_models: bool = True) -> Config:
    """The validated, frozen config tree of a YAML file plus `a.b=value` overrides.

    Raises ConfigError (naming the dotted key) for an unknown key or a bad value.
    resolve_models: import GGUF models into folders now, as every stage does before Ray starts
    (`False` keeps the sources as written, e.g. to inspect a config offline).
    """
    from draftalign.config import load_config as _load
    from draftalign.util.redact import secret_overrides_from_env

    cfg = _load(config, [*(overrides or []), *secret_overrides_from_env()])
    if resolve_models:
        from draftalign.models.gguf import resolve_sources

        cfg = resolve_sources(cfg)
    return cfg


def plan_stage(stage: str, config: str | Path | Config, overrides: list[str] | None = None) -> dict[str, dict]:
    """What `draftalign STAGE CONFIG --plan` prints, as a dict (actors, CPUs, GPUs; no Ray)."""
    from draftalign.cli import _plan
    from draftalign.util.redact import redact

    return redact(_plan(_config(config, overrides), _check_stage(stage)).to_dict())


def run_stage(stage: str, config: str | Path | Config, overrides: list[str] | None = None) -> StageResult:
    """Run one stage (or `run`, every stage in order) and return what it made.

    stage: pretrain, generate, distill, evaluate or run. config: a YAML path or a Config from
    load_config (overrides then apply only to a path). Stages start (or join) Ray as configured
    (`ray.address`); inside a Ray job or workflow task an unset address joins that cluster.
    """
    cfg = _config(config, overrides)
    stage = _check_stage(stage)
    from draftalign.models.support import check_target

    check_target(cfg, stage)  # a target no stage can handle: one error now, before Ray starts
    if stage == "pretrain":
        from draftalign.pipelines.pretrain import run_pretrain

        models = {k: Path(v) for k, v in run_pretrain(cfg).items()}
        return StageResult(stage, Path(cfg.pretrain.output), models=models, config=cfg)
    if stage == "generate":
        from draftalign.pipelines.generate import run_generate

        return StageResult(stage, Path(cfg.generate.output), manifest=run_generate(cfg), config=cfg)
    if stage == "distill":
        from draftalign.pipelines.distill import run_distill

        paths = run_distill(cfg)
        models = {cfg.distill.drafter_label(loss): Path(p) for loss, p in zip(cfg.distill.losses, paths, strict=True)}
        return StageResult(stage, Path(cfg.distill.output), models=models, config=cfg)
    if stage == "evaluate":
        from draftalign.pipelines.evaluate import run_evaluate

        records = run_evaluate(cfg)
        return StageResult(stage, Path(cfg.evaluate.output), summary=records, models=_drafters(records),
                           config=cfg)
    from draftalign.pipelines.run import run_all

    manifest = run_all(cfg).to_json()
    summary = _read_summary(Path(cfg.evaluate.output) / "summary.json")
    models: dict[str, Path] = {}
    for meta in sorted(Path(cfg.pretrain.output).glob("*/model/draftalign_model.json")):
        models[meta.parent.parent.name] = meta.parent
    d = cfg.distill
    for loss in d.losses:
        # Without rounds the drafter; with them each round's (`…-round1`, `…-round2`, …).
        rounds = [(f"{d.drafter_label(loss)}-round{r}", p) for r, p in enumerate(cfg.round_paths(loss), start=1)]
        for name, path in rounds or [(d.drafter_label(loss), cfg.distilled_path(loss))]:
            if Path(path).is_dir():
                models[name] = Path(path)
    return StageResult(stage, Path(cfg.run.output), summary=summary, models=models, manifest=manifest, config=cfg)


def _check_stage(stage: str) -> str:
    from draftalign.errors import ConfigError

    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    return stage


def _config(config: str | Path | Config, overrides: list[str] | None) -> Config:
    from draftalign.config import Config
    from draftalign.errors import ConfigError

    if isinstance(config, Config):
        if overrides:
            raise ConfigError("overrides apply to a config file; pass the path, or apply them in load_config")
        return config
    return load_config(config, overrides)


def _drafters(records: list[SummaryRecord]) -> dict[str, Path]:
    return {r["drafter"]: Path(r["drafter_path"]) for r in records if r.get("drafter_path")}


def _read_summary(path: Path) -> list[SummaryRecord] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
