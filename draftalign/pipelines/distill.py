"""`draftalign distill`: fine-tune the pretrained drafter on the distillation set, against the
target's next-token distributions streamed from a pool of target actors.

Ray Data reads the set's Parquet, keeps some seeds aside, builds fixed-length sequences and
shards them to Ray Train workers; each worker runs DeepSpeed around the draft and feeds a
target pool beside it (workers/distill_loop.py). The export lands in
`distill.output/<loss>/model`, reused when it exists for the same inputs and config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from draftalign.config import Config, ConfigError, DistillConfig
from draftalign.distillation import build_sequences, holdout_row
from draftalign.models import check_compatible, count_parameters, load_model_config
from draftalign.pipelines.generate import check_target_folder, target_identity
from draftalign.pipelines.locks import locked_output
from draftalign.pipelines.outputs import claim_output, publish_model, reusable
from draftalign.pipelines.training import fit, materialize_in_order
from draftalign.runinfo import fingerprint, write_run_info
from draftalign.schemas import DISTILL_SCHEMA, check_table

_COLUMNS = ["id", "prompt_token_ids", "response_token_ids"]


def data_files(path: str) -> list[Path]:
    """The distillation set's Parquet files: a file, a folder of them, or a stage folder."""
    p = Path(path)
    if p.is_dir() and (p / "data").is_dir():
        p = p / "data"
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p] if p.is_file() else []
    if not files:
        raise ConfigError(f"no distillation set at {path!r}: run `draftalign generate` first "
                          "or set distill.data to a Parquet file or folder")
    return files


def _check_schema(files: list[Path]) -> None:
    import pyarrow.parquet as pq

    for f in files:
        try:
            check_table(pq.read_schema(f), DISTILL_SCHEMA)
        except (OSError, ValueError) as exc:  # a truncated or corrupt file, or another schema
            raise ConfigError(f"{f} is not a distillation set of this version: {exc}") from None


def _resources(d: DistillConfig) -> dict[str, Any]:
    t, pool = d.train, d.target_pool
    worker = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    actor = {"CPU": pool.cpus_per_actor, **({"GPU": pool.gpus_per_actor} if pool.use_gpu else {})}
    actors = 0 if pool.in_process else pool.actors * t.num_workers
    return {
        "ray_train_workers": t.num_workers, "per_worker": worker,
        "target_actors": actors, "per_target_actor": actor,
        "total": {k: worker.get(k, 0) * t.num_workers + actor.get(k, 0) * actors for k in sorted({*worker, *actor})},
        "deepspeed_zero_stage": t.zero_stage, "precision": t.dtype_name,
        "global_batch_sequences": t.micro_batch_size * t.grad_accum * t.num_workers,
        "optimizer_steps": t.max_steps,
    }


def describe_distill(cfg: Config) -> dict[str, Any]:
    d = cfg.distill
    return {"data": cfg.distill_data_path(), "init_from": d.init_from or cfg.draft_path(),
            "target": cfg.target_path(), "loss": d.loss.model_dump(),
            "output": str(Path(cfg.distilled_path())), "resources": _resources(d)}


def _split(files: list[Path], d: DistillConfig, pad_id: int):
    """(train, holdout) Ray Datasets of {input_ids, attention_mask, loss_mask} int64 [seq_len]."""
    import ray.data

    def to_sequences(batch: dict[str, Any]) -> dict[str, Any]:
        return build_sequences(batch["prompt_token_ids"], batch["response_token_ids"], d.train.seq_len,
                               d.loss.include_prompt, pad_id)

    ds = ray.data.read_parquet([str(f) for f in files], columns=_COLUMNS)
    frac = d.holdout_fraction
    train = ds.filter(lambda r: not holdout_row(r["id"], frac))
    # One seeded shuffle, so rows of one seed are not back to back and a rerun sees one order.
    train = train.random_shuffle(seed=d.train.seed).map_batches(to_sequences, batch_format="numpy")
    holdout = ds.filter(lambda r: holdout_row(r["id"], frac)).map_batches(to_sequences, batch_format="numpy")
    return train, materialize_in_order(holdout)


def _absolute(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path


def _model_config(cfg: Config, role: str, path: str, key: str):
    try:
        return load_model_config(path, cfg.models.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the {role} {path!r} ({str(exc).splitlines()[0]}): run "
                          f"`draftalign pretrain` first or set {key}") from None


@locked_output("distill", lambda cfg: Path(cfg.distilled_path()).parent)
def run_distill(cfg: Config) -> Path:
    """Distil (or reuse) the drafter for `distill.loss`; returns the exported model folder."""
    from draftalign.tokenization import load_tokenizer

    d = cfg.distill
    # Ray workers run in another directory: hand them absolute paths for local folders.
    target, init_from = (_absolute(p) for p in (cfg.target_path(), d.init_from or cfg.draft_path()))
    target_cfg = _model_config(cfg, "target", target, "models.target")
    if Path(target).is_dir():
        check_target_folder(Path(target))  # the target actors load safetensors only
    draft_cfg = _model_config(cfg, "drafter to start from", init_from, "distill.init_from")
    check_compatible(target_cfg, draft_cfg)
    files = data_files(cfg.distill_data_path())
    _check_schema(files)
    tok = load_tokenizer(init_from)
    job_dir = Path(cfg.distilled_path()).resolve().parent
    model_dir = job_dir / "model"
    # Chaos switches and the failure budget do not change what is trained: a rerun without them
    # resumes the same run.
    chaos = {"output": True, "overwrite": True, "train": {"inject_failure_at_step", "max_failures"},
             "target_pool": {"inject_actor_death_at_request"}}
    fp = fingerprint(d.model_dump(mode="json", exclude=chaos),
                     [(f.name, f.stat().st_size) for f in files],
                     target_identity(target)["target_hash"], target_identity(init_from)["target_hash"])
    if reusable(model_dir, fp):
        print(f"[distill {d.loss.name}] reusing {model_dir} (same inputs and config)", flush=True)
        return model_dir
    claim_output(job_dir, fp, d.overwrite, "distill.overwrite")
    write_run_info(job_dir, cfg, "distill", {"fingerprint": fp, "data_files": [str(f) for f in files]})
    result = _fit(cfg, files, job_dir, target, init_from, tok.pad_token_id or 0)
    m = result.metrics
    publish_model(result.checkpoint, model_dir, tok,
                  {"fingerprint": fp, "role": "distilled", "loss": d.loss.model_dump(), "metrics": m,
                   "initialised_from": init_from, "parameters": count_parameters(draft_cfg)})
    g = d.eval_gamma
    before = (m.get("initial_holdout_acceptance"), m.get(f"initial_holdout_tau_gamma{g}"))
    after = (m.get("holdout_acceptance"), m.get(f"holdout_tau_gamma{g}"))
    if None not in before + after:
        print(f"[distill {d.loss.name}] held-out expected acceptance {before[0]:.4f} -> {after[0]:.4f}, "
              f"implied tau at gamma={g} {before[1]:.3f} -> {after[1]:.3f}", flush=True)
    print(f"[distill {d.loss.name}] exported {model_dir}", flush=True)
    return model_dir


def _fit(cfg: Config, files: list[Path], job_dir: Path, target: str, init_from: str, pad_id: int):
    from draftalign.cluster.session import init_ray
    from draftalign.workers.distill_loop import distill_loop

    d = cfg.distill
    init_ray(cfg.ray)
    train_ds, holdout_ds = _split(files, d, pad_id)
    marker = job_dir / "chaos" / "target_actor_died" if d.target_pool.inject_actor_death_at_request else None
    if marker:
        marker.parent.mkdir(parents=True, exist_ok=True)
    loop_config = {"name": f"distill {d.loss.name}", "distill": d, "target": target, "init_from": init_from,
                   "death_marker": str(marker) if marker else None}
    return fit(distill_loop, loop_config, d.train, f"{cfg.run.name}-distill", job_dir,
               {"train": train_ds, "holdout": holdout_ds}, _resources(d)["per_worker"])
