"""`draftalign evaluate`: speculative decoding of held-out prompts with each drafter.

The driver resolves the drafters (model folders, plus the n-gram prompt-lookup baseline
`ngram`, which has none), refuses any model that cannot draft for the target (vocabulary,
then a few tokens as transformers' assistant_model), renders every task's prompts with the
target's chat template, and runs the sweep drafter x task x γ x temperature on each engine:
`reference` (draftalign.evaluation.specdecode, exact, batch 1, in this process) and `vllm` (one engine
per (drafter, γ) in a Ray actor). Per-prompt rows go to Parquet; the pooled summary to
summary.json/.csv, report.md and PNG plots.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TypedDict

from draftalign.cluster.metrics import record
from draftalign.cluster.resources import vllm_eval_engine
from draftalign.config import Config, ConfigError, EvaluateConfig
from draftalign.evaluation.cells import Baseline, CellStore
from draftalign.evaluation.metrics import acceptance_rate, block_efficiency
from draftalign.evaluation.report import (
    SummaryRecord,
    comparison_table,
    markdown_table,
    paired_differences,
    speedup_table,
    summarize_rows,
    verify_cost_note,
    write_report,
)
from draftalign.evaluation.rows import EvalRow, eval_table
from draftalign.evaluation.tasks import bundled_path, load_task_prompts
from draftalign.evaluation.verifycost import VerifyCost
from draftalign.models.identity import (
    absolute_model_path,
    check_target_folder,
    is_feature_drafter,
    looks_local,
    target_identity,
)
from draftalign.pipelines.locks import locked_output
from draftalign.pipelines.outputs import MODEL_INFO
from draftalign.training.tracking import TrackingRun, open_tracker, summary_metrics, tracking_run
from draftalign.util import console
from draftalign.util.atomicio import write_parquet_atomic
from draftalign.util.redact import redact_argv
from draftalign.util.runinfo import fingerprint, write_run_info
from draftalign.workers.generate_engine import engine_kwargs


def _exists(path: str) -> bool:
    return Path(path).expanduser().is_dir() or not looks_local(path)


class _DrafterBase(TypedDict):
    name: str
    path: str | None  # a model folder or hub name; None: the n-gram baseline, which has no model
    exists: bool


class Drafter(_DrafterBase, total=False):
    """A drafter the sweep runs. `method` is its vLLM speculative method, absent for a model
    folder ("draft_model"); the n-gram baseline has `method` "ngram" and its lookup window."""

    method: str
    prompt_lookup_min: int
    prompt_lookup_max: int


def has_model(d: dict) -> bool:
    """Whether a drafter is a model folder (weights to load, count, check and describe)."""
    return d.get("path") is not None


def _with_baselines(ev: EvaluateConfig, drafters: list[Drafter]) -> list[Drafter]:
    """The drafters, then the n-gram baseline (evaluate.ngram), which every table shows unless off."""
    if ev.ngram is None:
        return drafters
    return [*drafters, {"name": "ngram", "path": None, "exists": True, "method": "ngram",
                        "prompt_lookup_min": ev.ngram.prompt_lookup_min,
                        "prompt_lookup_max": ev.ngram.prompt_lookup_max}]


class VllmPlan(TypedDict):
    engines: int
    one_at_a_time: bool
    per_engine: dict[str, float]
    engine_kwargs: dict[str, Any]  # what vLLM's engine is given, the user's engine_kwargs included


class EvaluatePlan(TypedDict, total=False):
    """The evaluate stage in the --plan view; `vllm` only when that engine runs."""

    target: str
    output: str
    drafters: list[Drafter]
    tasks: list[dict[str, str | int]]
    engines: list[str]
    gammas: list[int]
    temperatures: list[float]
    engine_temperatures: dict[str, list[float]]
    top_p: float
    max_new_tokens: int
    cells: str
    vllm: VllmPlan


def resolve_drafters(cfg: Config, strict: bool = True) -> list[Drafter]:
    """[{"name", "path", "exists"}]. Default: the undistilled drafter (Config.start_name: "start" or
    "pretrained") plus each distilled export that exists.

    strict: raise ConfigError for a listed drafter that does not exist, or when none is left;
    without it (a plan) the configured distillation's drafter is listed even before it exists.
    """
    ev = cfg.evaluate
    if ev.drafters is not None:
        out: list[Drafter] = [{"name": d.name, "path": d.path, "exists": _exists(d.path),
                               **({"method": "eagle3"} if is_feature_drafter(d.path) else {})} for d in ev.drafters]
        missing = [f"{d['name']} ({d['path']})" for d in out if not d["exists"]]
        if strict and missing:
            raise ConfigError(f"evaluate.drafters lists drafters that do not exist: {', '.join(missing)}")
        return out
    out = [{"name": cfg.start_name(), "path": cfg.draft_path(), "exists": _exists(cfg.draft_path())}]
    features = {cfg.distill.drafter_label(loss) for loss in cfg.distill.losses if loss.drafter_kind == "feature"}
    for name, path in _distilled_drafters(cfg).items():
        made = Path(path).expanduser().is_dir()
        # A plan shows the drafters the configured distillation will export, made or not yet.
        if made or not strict:
            feature = is_feature_drafter(path) if made else name in features
            out.append({"name": name, "path": path, "exists": made, **({"method": "eagle3"} if feature else {})})
    if strict and not out[0]["exists"]:
        out = out[1:]
        if not out:
            raise ConfigError(f"no drafter to evaluate: the undistilled drafter {cfg.draft_path()!r} does not "
                              "exist (run `draftalign pretrain` or set models.draft) and no distilled one does")
    return out


def _distilled_drafters(cfg: Config) -> dict[str, str]:
    """{drafter name: model folder}: the configured losses' exports, then any other export an
    earlier run left under distill.output (named as its draftalign_model.json says)."""
    out: dict[str, str] = {}
    d = cfg.distill
    for loss in d.losses:
        # Every on-policy round's drafter, so one two-round run compares one round with two.
        for r, path in enumerate(cfg.round_paths(loss), start=1):
            out[d.drafter_label(loss) + f"-round{r}"] = path
        if not d.on_policy.rounds:
            out[d.drafter_label(loss)] = cfg.distilled_path(loss)
    root = Path(d.output).expanduser()
    for meta in sorted([*root.glob(f"*/model/{MODEL_INFO}"), *root.glob(f"rounds/round-*/*/model/{MODEL_INFO}")]):
        info = json.loads(meta.read_text())
        name = info.get("drafter") or info.get("loss", {}).get("name") or meta.parent.parent.name
        out.setdefault(name, str(meta.parent))
    return out


def describe_evaluate(cfg: Config) -> EvaluatePlan:
    """The --plan view: drafters, tasks, the sweep and the engines, offline and without Ray."""
    ev = cfg.evaluate
    drafters = _with_baselines(ev, resolve_drafters(cfg, strict=False))
    tasks = [{"name": t.name, "kind": t.kind, "data": t.data or str(bundled_path(t.kind)),
              "max_prompts": t.max_prompts or ev.max_prompts} for t in ev.tasks]
    drafters_of = {e: ev.engine_drafters(e, drafters) for e in ev.engines}
    cells = {e: len(drafters_of[e]) * len(ev.tasks) * len(ev.gammas) * len(ev.engine_temperatures(e))
             for e in ev.engines}
    plan: EvaluatePlan = {
        "target": cfg.target_path(), "output": ev.output,
        "drafters": list(drafters),
        "tasks": tasks, "engines": ev.engines, "gammas": ev.gammas, "temperatures": ev.temperatures,
        "engine_temperatures": {e: ev.engine_temperatures(e) for e in ev.engines},
        "top_p": ev.top_p, "max_new_tokens": ev.max_new_tokens,
        "cells": ", ".join(f"{e}: {n}" for e, n in cells.items()) + " (drafter x task x γ x T)",
    }
    if "vllm" in ev.engines:
        v = ev.vllm
        per = vllm_eval_engine(v)
        plan["vllm"] = {"engines": len(drafters_of["vllm"]) * len(ev.gammas) + int(v.measure_autoregressive),
                        "one_at_a_time": True, "per_engine": per, "engine_kwargs": engine_kwargs(v)}
    return plan


def _prompts(cfg: Config, tok: Any, context: int, log) -> dict[str, list[dict]]:
    from draftalign.data.prompts import encode_prompt, render_prompt

    ev = cfg.evaluate
    out: dict[str, list[dict]] = {}
    said = []
    for task in ev.tasks:
        # read a few extra rows so that prompts dropped as too long can be replaced
        rows = load_task_prompts(task, (task.max_prompts or ev.max_prompts) * 2)
        keep, too_long = [], 0
        for p in rows:
            ids = encode_prompt(tok, render_prompt(tok, [{"role": "user", "content": p["user"]}], ev.system_prompt))
            if len(ids) + ev.max_new_tokens > context:
                too_long += 1
                continue
            if len(keep) < (task.max_prompts or ev.max_prompts):
                keep.append({**p, "token_ids": ids})
        if not keep:
            raise ConfigError(f"task {task.name!r}: every prompt is longer than the context ({context}) "
                              f"minus evaluate.max_new_tokens ({ev.max_new_tokens})")
        out[task.name] = keep
        said.append(f"{task.name} ({task.kind}) {len(keep)}"
                    + (f" ({too_long} skipped as too long for the context)" if too_long else ""))
    log(f"[evaluate] prompts per task: {', '.join(said)}")
    return out


class _RayVllmEngine:
    """A VllmEngine in a Ray actor, called like the engine itself; `close` stops and kills it."""

    def __init__(self, cfg: Config, target: str, speculative: dict[str, Any] | None) -> None:
        import ray

        from draftalign.cluster.session import init_ray
        from draftalign.workers.evaluate_vllm import VllmEngine

        v = cfg.evaluate.vllm
        init_ray(cfg.ray)
        per = vllm_eval_engine(v)
        options = {"num_cpus": per["CPU"], **({"num_gpus": per["GPU"]} if "GPU" in per else {}),
                   **({"runtime_env": {"env_vars": dict(v.env)}} if v.env else {})}
        self.actor = ray.remote(**options)(VllmEngine).remote(target, speculative, v)

    def generate(self, *args) -> list[dict]:
        import ray

        return ray.get(self.actor.generate.remote(*args))

    def close(self) -> None:
        import ray

        try:  # let vLLM stop its engine-core process before the actor goes
            ray.get(self.actor.close.remote(), timeout=60)
        except Exception:
            pass
        ray.kill(self.actor)


class VllmSweep:
    """The `vllm` engine's cells: one engine per (drafter, γ), started only when one of its cells
    is not in the cell store yet, so a comparison that gains drafters runs only theirs; the target
    alone first, once per (task, T), when the speed-up is measured.

    start(speculative_config or None) -> an engine with VllmEngine's generate and close."""

    def __init__(self, ev: EvaluateConfig, target_model: str, prompts: dict[str, list[dict]], cells: CellStore,
                 start, log) -> None:
        self.ev, self.target_model, self.prompts, self.cells, self.start, self.log = \
            ev, target_model, prompts, cells, start, log
        self.ar: dict[tuple, Baseline] = {}

    def cells_of(self) -> list[tuple[str, float]]:
        return [(task, temp) for task in self.prompts for temp in self.ev.engine_temperatures("vllm")]

    def baselines(self) -> None:
        """The target alone on every prompt of every (task, T), read back when written earlier."""
        got = {cell: self.cells.baseline("vllm-autoregressive", *cell) for cell in self.cells_of()}
        for (task, temp), base in got.items():
            if base is not None:
                self.log(f"[evaluate] vllm autoregressive / {task} T={temp:g}: written earlier")
        missing = [cell for cell, base in got.items() if base is None]
        if missing:
            self._with_engine(None, "the target",
                              lambda engine: got.update({cell: self._baseline(engine, *cell) for cell in missing}))
        for (task, temp), base in got.items():
            self.ar.update({(task, temp, pid): (list(tokens), secs) for pid, (tokens, secs) in base.items()})

    def _baseline(self, engine, task: str, temp: float) -> dict[str, Baseline]:
        """The target alone on one (task, T), stored as it finishes: prompt id -> (tokens, seconds)."""
        t0 = time.time()
        got = self._generate(engine, task, temp)
        base = {g["id"]: (g["tokens"], g["seconds"]) for g in got}
        self.cells.put_baseline(base, "vllm-autoregressive", task, temp)
        n, s = sum(len(g["tokens"]) for g in got), sum(g["seconds"] for g in got)
        self.log(f"[evaluate] vllm autoregressive / {task} T={temp:g}: {n / s:.1f} tokens/s "
                 f"({len(got)} prompts, {time.time() - t0:.1f} s)")
        return base

    def drafter_rows(self, d: dict, gamma: int) -> list[EvalRow]:
        """Every (task, T) cell of drafter `d` ({"name", "path", "identity"?, "method"?, ...}) at γ:
        from the store, or from one engine for the missing ones."""
        from draftalign.workers.evaluate_reference import progress_line
        from draftalign.workers.evaluate_vllm import speculative_config

        keys = {cell: ("vllm", d["name"], d.get("identity", ""), cell[0], gamma, cell[1]) for cell in self.cells_of()}
        done = {cell: self.cells.rows(*key) for cell, key in keys.items()}
        missing = [cell for cell, rows in done.items() if rows is None]
        for (task, temp), rows in done.items():
            if rows is not None:
                self.log(progress_line("vllm", d["name"], task, gamma, temp, rows, 0.0) + " (written earlier)")
        if not missing:
            return [r for cell in self.cells_of() for r in done[cell]]
        self.log(f"[evaluate] vllm: starting an engine for {d['name']} γ={gamma}")
        spec = speculative_config(d, gamma)
        draft = spec.get("model", "")  # the rows' drafter_path: "" for a drafter without a model

        def run(engine) -> None:
            for task, temp in missing:
                t0 = time.time()
                rows = _rows_from_vllm(d["name"], draft, task, self.prompts[task], gamma, temp,
                                       self._generate(engine, task, temp), self.ar, self.ev.top_p, self.target_model)
                self.cells.put_rows(rows, *keys[(task, temp)])
                done[(task, temp)] = rows
                self.log(progress_line("vllm", d["name"], task, gamma, temp, rows, time.time() - t0))

        self._with_engine(spec, f"drafter {d['name']!r} ({draft or 'no model'}) as vLLM {spec['method']}", run)
        return [r for cell in self.cells_of() for r in done[cell]]

    def _generate(self, engine, task: str, temp: float) -> list[dict]:
        ev = self.ev
        return engine.generate([{"id": p["id"], "token_ids": p["token_ids"]} for p in self.prompts[task]], temp,
                               ev.top_p, ev.max_new_tokens, ev.seed, ev.vllm.warmup_tokens, ev.vllm.batch_size)

    def _with_engine(self, speculative: dict[str, Any] | None, role: str, work) -> None:
        import ray

        engine = self.start(speculative)
        try:
            work(engine)
        except ray.exceptions.RayError as exc:
            raise RuntimeError(f"vLLM could not serve {role} for target {self.target_model!r}: {exc}") from exc
        finally:
            engine.close()


def _vllm_rows(cfg: Config, target: str, drafters: list[dict], prompts: dict[str, list[dict]], cells: CellStore,
               log) -> list[EvalRow]:
    path = absolute_model_path(target)
    sweep = VllmSweep(cfg.evaluate, target, prompts, cells,
                      lambda speculative: _RayVllmEngine(cfg, path, speculative), log)
    if cfg.evaluate.vllm.measure_autoregressive:
        sweep.baselines()
    return [r for d in drafters for gamma in cfg.evaluate.gammas for r in sweep.drafter_rows(d, gamma)]


def _rows_from_vllm(name: str, draft: str, task: str, rows: list[dict], gamma: int, temp: float, got: list[dict],
                    ar: dict[tuple, Baseline], top_p: float, target_model: str) -> list[EvalRow]:
    out = []
    for p, g in zip(rows, got, strict=True):
        base_tokens, base_seconds = ar.get((task, temp, p["id"]), (None, None))
        out.append(EvalRow(
            drafter=name, drafter_path=draft, task=task, task_kind=p["kind"], prompt_id=p["id"],
            engine="vllm", gamma=gamma, temperature=float(temp), top_p=float(top_p),
            num_input_tokens=len(p["token_ids"]), num_generated_tokens=len(g["tokens"]),
            num_drafts=g["num_drafts"], num_draft_tokens=g["num_draft_tokens"],
            num_accepted=g["num_accepted"], accepted_per_pos=g["accepted_per_pos"],
            block_efficiency=block_efficiency(g["num_accepted"], g["num_drafts"], gamma),
            acceptance_rate=acceptance_rate(g["num_accepted"], g["num_draft_tokens"]),
            spec_seconds=g["seconds"], ar_seconds=base_seconds,
            ar_generated_tokens=len(base_tokens) if base_tokens is not None else None,
            matches_autoregressive=(g["tokens"] == base_tokens) if base_tokens is not None and temp == 0 else None,
            generated_token_ids=g["tokens"], target_model=target_model,
        ))
    return out


def _check_and_count(engine: Any, target: str, drafters: list[dict], prompt: list[int], check: bool,
                     log) -> tuple[int, dict[str, int]]:
    """Weights read per decoding step (models.arch.step_weights, MBSU's c) of the loaded models,
    after the assistant_model check when asked; 0 for a drafter without a model (the n-gram
    baseline reads no weights: c = 0, its MBSU is its τ)."""
    from draftalign.models.arch import step_weights
    from draftalign.models.exportcheck import check_transformers
    from draftalign.models.feature import feature_parameters, load_feature_spec

    params = {d["name"]: 0 for d in drafters if not has_model(d)}
    for d in drafters:  # a feature drafter reads its trained weights and one embedding row a step
        if d.get("method") == "eagle3":
            params[d["name"]] = feature_parameters(load_feature_spec(d["path"]))["trained"]
    drafters = [d for d in drafters if has_model(d) and d.get("method") != "eagle3"]
    for d in drafters:
        draft = engine.load_draft(d["path"])
        params[d["name"]] = step_weights(draft)
        if check:
            check_transformers(engine.target, draft, target, d["path"], prompt[:16])
        del draft
    if check and drafters:
        log(f"[evaluate] export check: {', '.join(d['name'] for d in drafters)} "
            f"{'runs' if len(drafters) == 1 else 'run'} as transformers' assistant_model")
    return step_weights(engine.target), params


def _vocab_note(path: str, feature: bool = False) -> str:
    """The reduced draft vocabulary of a drafter folder, as the header states it ("" for none)."""
    from draftalign.models.draftvocab import read_draft_vocab

    vocab = read_draft_vocab(path) if Path(path).is_dir() else None
    if vocab is None:
        return ""
    cov = vocab.get("holdout_coverage")
    shown = f", held-out coverage {cov:.3f}" if isinstance(cov, float) else ""
    engines = ("both engines draft over it (vLLM through the export's d2t)" if feature else
               "the reference engine drafts over it; vLLM loads the full-vocabulary head")
    return f"; draft vocabulary {vocab['size']:,} tokens{shown} ({engines})"


def _header(cfg: Config, target: str, drafters: list[dict], params: dict[str, int], target_params: int) -> str:
    ev = cfg.evaluate
    lines = ["# draftalign evaluate", "",
             f"Command: `{shlex.join(['draftalign', *redact_argv(sys.argv[1:])])}`", "",
             f"Target: `{target}` ({target_params / 1e6:.1f}M weights read per step). "
             f"Tasks: {', '.join(t.name for t in ev.tasks)}. γ: {ev.gammas}; temperatures: {ev.temperatures}; "
             f"top-p {ev.top_p}; at most {ev.max_new_tokens} new tokens per prompt, {_batch_note(ev)}.", ""]
    for d in drafters:
        c = params[d["name"]] / target_params
        if not has_model(d):
            lines.append(f"- drafter `{d['name']}`: n-gram prompt lookup (vLLM's method `ngram`, n from "
                         f"{d['prompt_lookup_min']} to {d['prompt_lookup_max']}), no weights: c = 0, its MBSU is its τ")
            continue
        feature = d.get("method") == "eagle3"
        kind = "a feature drafter (EAGLE-3 style, vLLM's `eagle3`) reading the target's hidden states, " if feature else ""
        lines.append(f"- drafter `{d['name']}`: `{d['path']}` ({kind}{params[d['name']] / 1e6:.1f}M weights read "
                     f"per step, c = {c:.4f}){_vocab_note(d['path'], feature)}")
    lines += ["", "τ: tokens per target call, pooled over prompts; draft acceptance: accepted / drafted tokens "
              "(vLLM's acceptance rate; not the distill stage's expected acceptance Σ min(p, q)); "
              "MBSU = τ / (1 + γc), c the ratio of weights read per step (all parameters but an untied input "
              "embedding table, of which a step reads one row); speed-up: tokens/s speculative over tokens/s of the target alone on the run's "
              "fastest engine for that task and T (over each engine's own target alone: `speedup_own_engine`).", ""]
    if _vllm_sampled(ev):
        lines += [VLLM_SAMPLED_NOTE, ""]
    return "\n".join(lines)


def _batch_note(ev) -> str:
    """The batch each engine decodes at: vLLM's prompts go evaluate.vllm.batch_size at a time
    (τ and acceptance are per prompt either way; tokens/s is then a batch's)."""
    if "vllm" not in ev.engines or ev.vllm.batch_size == 1:
        return "batch 1"
    ref = "the reference engine at batch 1, " if "reference" in ev.engines else ""
    return f"{ref}vLLM {ev.vllm.batch_size} prompts at a time (its tokens/s is a batch's)"


def _vllm_sampled(ev) -> bool:
    """Whether the sweep has vLLM rows at T > 0 under another draft_sample_method than
    probabilistic (standard speculative sampling), which VLLM_SAMPLED_NOTE qualifies."""
    method = ev.vllm.speculative_config.get("draft_sample_method", "probabilistic")
    return "vllm" in ev.engines and method != "probabilistic" and any(t > 0 for t in ev.engine_temperatures("vllm"))


VLLM_SAMPLED_NOTE = (
    "Note: at T > 0 the `vllm` rows measure vLLM's draft_sample_method set in evaluate.vllm.speculative_config, "
    "not the standard speculative sampling of the `reference` rows (draft_sample_method: probabilistic, the "
    "default): the drafter's proposals and their acceptance follow another rule. Compare drafters within one "
    "engine; at T = 0 the engines agree.")


def _checked_models(cfg: Config) -> tuple[str, list[dict]]:
    """(target, drafters), each refused here if it is missing, unloadable or of another vocabulary."""
    from draftalign.models.exportcheck import check_feature_vocab, check_vocab

    target = cfg.target_path()
    if looks_local(target) and not Path(target).expanduser().is_dir():
        raise ConfigError(f"target {target!r} does not exist: run `draftalign pretrain` or set models.target")
    if Path(target).expanduser().is_dir():
        check_target_folder(Path(target).expanduser())
    drafters = resolve_drafters(cfg)
    for d in drafters:
        if d.get("method") == "eagle3":
            check_feature_vocab(target, d["path"], cfg.models.trust_remote_code)
        else:
            check_vocab(target, d["path"], cfg.models.trust_remote_code)
    return target, _with_baselines(cfg.evaluate, drafters)


def _cells_fingerprint(cfg: Config, target: str, prompts: dict[str, list[dict]]) -> str:
    """What determines every evaluation cell: the settings, the target, the prompts. Each
    drafter's export is in its own cells' key (`_with_identities`), so adding a drafter to a
    comparison leaves the other drafters' cells in place."""
    # Which drafters run (evaluate.drafters, each engine's subset, the n-gram baseline and its
    # window) is not: each has its own cells, its settings in its identity.
    ev = cfg.evaluate.model_dump(mode="json", exclude={"output": True, "plots": True, "export_check": True,
                                                       "drafters": True, "reference": {"drafters"},
                                                       "vllm": {"drafters"}, "ngram": True})
    return fingerprint(ev, target_identity(target)["target_hash"],
                       {task: [(p["id"], p["token_ids"]) for p in rows] for task, rows in prompts.items()})


def _with_identities(drafters: list[dict]) -> list[dict]:
    """Each drafter with `identity`: a digest of its name, folder, target and export record, so
    a drafter retrained in place (or a name pointed elsewhere) never reads its old cells; of a
    drafter without a model, its name, method and settings (the n-gram window)."""
    out = []
    for d in drafters:
        if not has_model(d):
            settings = {k: v for k, v in d.items() if k not in ("name", "path", "exists")}
            out.append({**d, "identity": fingerprint(d["name"], settings)})
            continue
        info = Path(d["path"]).expanduser() / MODEL_INFO
        out.append({**d, "identity": fingerprint(d["name"], d["path"], target_identity(d["path"])["target_hash"],
                                                 info.read_text() if info.is_file() else None)})
    return out


def _context_length(cfg: Config, target: str) -> int:
    """The longest context a prompt plus its answer may take: the target's, capped by vLLM's window."""
    from draftalign.models.arch import load_model_config

    context = load_model_config(target, cfg.models.trust_remote_code).get_text_config().max_position_embeddings
    if "vllm" in cfg.evaluate.engines:
        context = min(context, cfg.evaluate.vllm.max_model_len)
    return context


def _count_on_meta(cfg: Config, target: str, drafters: list[dict]) -> tuple[int, dict[str, int]]:
    """The target's and each drafter's step weights, counted on the meta device: a vLLM-only run on a
    big target does not load it here."""
    from draftalign.models.arch import step_weights_of

    target_params = step_weights_of(target, cfg.models.trust_remote_code)
    params = {d["name"]: step_weights_of(d["path"], cfg.models.trust_remote_code) if has_model(d) else 0
              for d in drafters}
    return target_params, params


@locked_output("evaluate", lambda cfg: cfg.evaluate.output)
def run_evaluate(cfg: Config, log=None) -> list[SummaryRecord]:
    """Run the sweep and write the report under evaluate.output; returns the summary records."""
    from draftalign.data.tokenization import ensure_chat_template, load_tokenizer
    from draftalign.workers.evaluate_reference import ReferenceEngine, ReferenceSweep, reference_rows

    log = log or console.line  # a sweep cell's line: a bar update on a terminal
    ev, t_start = cfg.evaluate, time.time()
    tracking = tracking_run(cfg.tracking, cfg.run, "evaluate")  # a missing backend fails now, not after the sweep
    target, drafters = _checked_models(cfg)
    out = Path(ev.output)
    tok = ensure_chat_template(load_tokenizer(target), cfg.tokenizer.chat_template)
    context = _context_length(cfg, target)
    drafters_of = {e: ev.engine_drafters(e, drafters) for e in ev.engines}
    prompts = _prompts(cfg, tok, context, log)
    console.expect_cells(len(prompts) * sum(len(ev.engine_temperatures(e)) * (len(drafters_of[e]) * len(ev.gammas)
                                                                            + _times_target_alone(ev, e))
                                            for e in ev.engines))
    write_run_info(out, cfg, "evaluate", {"drafters": drafters})  # after every input check: a refusal writes nothing
    if _vllm_sampled(ev):
        log(f"[evaluate] {VLLM_SAMPLED_NOTE}")
    first = next(iter(prompts.values()))[0]["token_ids"]
    ref_engine = None
    if "reference" in ev.engines or ev.export_check:
        ref_engine = ReferenceEngine(target, ev.reference.device, cfg.models.trust_remote_code,
                                     ev.reference.threads)
        target_params, params = _check_and_count(ref_engine, target, drafters, first, ev.export_check, log)
    else:
        target_params, params = _count_on_meta(cfg, target, drafters)
    verify_cost = _verify_cost(ref_engine, ev.gammas, prompts, log)
    rows: list[EvalRow] = []
    cells = CellStore(out, _cells_fingerprint(cfg, target, prompts))  # both engines' finished cells
    if "reference" in ev.engines:
        sweep = ReferenceSweep(gammas=tuple(ev.gammas), temperatures=tuple(ev.engine_temperatures("reference")),
                               top_p=ev.top_p, max_new_tokens=ev.max_new_tokens, eos=tok.eos_token_id, seed=ev.seed,
                               measure_ar=ev.reference.measure_autoregressive,
                               warmup_tokens=ev.reference.warmup_tokens, target_model=target)
        rows += reference_rows(ref_engine, _with_identities(drafters_of["reference"]), prompts, sweep, log, cells)
    del ref_engine
    if "vllm" in ev.engines:
        rows += _vllm_rows(cfg, target, _with_identities(drafters_of["vllm"]), prompts, cells, log)
    write_parquet_atomic(eval_table(rows), out / "rows.parquet")
    records = summarize_rows(rows, params, target_params, verify_cost=verify_cost)
    for r in records:
        record("draftalign_eval_block_efficiency", r["block_efficiency"], stage="evaluate", drafter=r["drafter"],
               task=r["task"], engine=r["engine"], gamma=r["gamma"], temperature=r["temperature"])
    files = write_report(out, records, _header(cfg, target, drafters, params, target_params)
                         + verify_cost_note(verify_cost), ev.plots, paired_differences(rows))
    log(f"[evaluate] {len(rows)} per-prompt rows in {out / 'rows.parquet'}; report files: "
        f"{', '.join(files)} in {out} ({time.time() - t_start:.0f} s)")
    _print_table(records, out)
    _write_cards(drafters, records, log)
    _track(tracking, cfg, records)
    return records


def _verify_cost(engine: Any, gammas: list[int], prompts: dict[str, list[dict]], log) -> VerifyCost | None:
    """This machine's verify cost r = t_verify(γ+1) / t_target for each γ of the sweep, measured once
    per evaluation (a few seconds) on the reference engine's target, logged. None where that target
    is not loaded (vLLM alone, evaluate.export_check off): loading a target that may be large in
    the driver only for this would cost more than the figure, and the report says r was not measured."""
    from draftalign.evaluation.verifycost import prompt_sized_context, verify_cost_line

    cost = None
    if engine is not None:
        cost = engine.verify_cost(prompt_sized_context(p["token_ids"] for rows in prompts.values() for p in rows),
                                  gammas)
    log(f"[evaluate] {verify_cost_line(cost)}")
    return cost


def _times_target_alone(ev, engine: str) -> int:
    """1 when `engine` also runs the target alone (a cell per task and T: the speed-up baseline)."""
    sweep = ev.reference if engine == "reference" else ev.vllm
    return int(sweep.measure_autoregressive)


def _print_table(records: list[SummaryRecord], out: Path) -> None:
    """The stage's last lines: every cell for one drafter; for several, their τ side by side
    (every cell's figures are in report.md, and printing both doubled the screen)."""
    comparison = comparison_table(records)
    if comparison:
        print(f"[evaluate] every cell (acceptance, MBSU, tokens/s): {out / 'report.md'}\n"
              "block efficiency τ by drafter (**bold**: best; =: tied):\n" + comparison, end="", flush=True)
    else:
        print(markdown_table(records), end="", flush=True)
    speed = speedup_table(records)
    if speed and comparison:
        print("how much faster the target answers (wall clock, each drafter at its fastest γ, over the target "
              "alone on the run's fastest engine; r: the machine's verify cost at that γ):\n" + speed,
              end="", flush=True)


def _track(tracking: TrackingRun, cfg: Config, records: list[dict]) -> None:
    """The summary to the experiment tracker (tracking.backend), as one step."""
    tracker = open_tracker(tracking, cfg.evaluate.model_dump(mode="json"))
    try:
        tracker.log_metrics(summary_metrics(records), 0)
    finally:
        tracker.close()


def _write_cards(drafters: list[dict], records: list[dict], log) -> None:
    """A model card (README.md) in every evaluated drafter folder draftalign exported."""
    from draftalign.models.card import write_card

    for d in filter(has_model, drafters):
        folder = Path(d["path"]).expanduser()
        if not (folder / MODEL_INFO).is_file():
            continue  # a hub model or a folder draftalign did not export: not ours to describe
        try:
            log(f"[evaluate] model card: {write_card(folder, records)}")
        except (OSError, ValueError) as exc:  # a card is a courtesy; never fail the measured run
            log(f"[evaluate] could not write a model card into {folder}: {exc}")
