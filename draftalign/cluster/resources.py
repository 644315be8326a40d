"""What each stage asks Ray for, computed without starting Ray: the bundles the stages request
and the `--plan` view of them."""

from __future__ import annotations

from typing import TypedDict

from draftalign.config import (
    DistillConfig,
    EngineConfig,
    PretrainJob,
    TargetPoolConfig,
    TrainConfig,
    VllmEvalConfig,
)

Bundle = dict[str, float]  # Ray resource name -> amount


class TrainResources(TypedDict, total=False):
    """A pretrain job's Ray Train workers in the --plan view (just a note for a drafter cut from the target)."""

    ray_train_workers: int
    note: str
    per_worker: Bundle
    total: Bundle
    deepspeed_zero_stage: int
    precision: str
    global_batch_sequences: int
    global_batch_tokens: int
    optimizer_steps: int
    tokens_total: int


class DistillResources(TypedDict):
    ray_train_workers: int
    per_worker: Bundle
    target_actors_per_worker: int  # each worker starts its own pool, on its own node (0: in_process)
    target_actors: int  # all workers' together
    per_target_actor: Bundle
    total: Bundle
    deepspeed_zero_stage: int
    precision: str
    global_batch_sequences: int
    optimizer_steps: int


class GenerateResources(TypedDict):
    engine_replicas: int
    tensor_parallel_size: int
    per_replica: Bundle
    total: Bundle
    batch_size: int
    max_concurrent_batches: int


def train_worker(train: TrainConfig) -> dict[str, float]:
    """One Ray Train worker's resources (pretrain and distill)."""
    return {"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {}), **train.resources}


def target_actor(pool: TargetPoolConfig) -> dict[str, float]:
    """One distill target actor's resources."""
    return {"CPU": pool.cpus_per_actor, **({"GPU": pool.gpus_per_actor} if pool.use_gpu else {}), **pool.resources}


def replica_bundles(engine: EngineConfig) -> list[dict[str, float]]:
    """One Ray resource bundle per tensor-parallel worker of one generate engine replica."""
    bundle = {"CPU": engine.cpus_per_replica, **({"GPU": engine.gpus_per_replica} if engine.use_gpu else {}),
              **engine.resources}
    return [dict(bundle) for _ in range(engine.tensor_parallel_size)]


def vllm_eval_engine(v: VllmEvalConfig) -> dict[str, float]:
    """One evaluate vLLM engine actor's resources (all its tensor-parallel GPUs)."""
    return {"CPU": v.cpus_per_engine, **({"GPU": v.gpus_per_engine * v.tensor_parallel_size} if v.use_gpu else {})}


def train_resources(job: PretrainJob) -> TrainResources:
    t = job.train
    if t is None:
        return {"ray_train_workers": 0, "note": "built from the target in the driver; no corpus pretraining"}
    per_worker = train_worker(t)
    return {
        "ray_train_workers": t.num_workers,
        "per_worker": per_worker,
        "total": {k: v * t.num_workers for k, v in per_worker.items()},
        "deepspeed_zero_stage": t.zero_stage,
        "precision": t.dtype_name,
        "global_batch_sequences": t.micro_batch_size * t.grad_accum * t.num_workers,
        "global_batch_tokens": t.micro_batch_size * t.grad_accum * t.num_workers * t.seq_len,
        "optimizer_steps": t.max_steps,
        "tokens_total": t.micro_batch_size * t.grad_accum * t.num_workers * t.seq_len * t.max_steps,
    }


def distill_resources(d: DistillConfig) -> DistillResources:
    t, pool = d.train, d.target_pool
    worker, actor = train_worker(t), target_actor(pool)
    per = 0 if pool.in_process else pool.actors
    actors = per * t.num_workers
    return {
        "ray_train_workers": t.num_workers, "per_worker": worker,
        "target_actors_per_worker": per, "target_actors": actors, "per_target_actor": actor,
        "total": {k: worker.get(k, 0) * t.num_workers + actor.get(k, 0) * actors for k in sorted({*worker, *actor})},
        "deepspeed_zero_stage": t.zero_stage, "precision": t.dtype_name,
        "global_batch_sequences": t.micro_batch_size * t.grad_accum * t.num_workers,
        "optimizer_steps": t.max_steps,
    }


def generate_resources(eng: EngineConfig) -> GenerateResources:
    per_replica: dict[str, float] = {}
    for bundle in replica_bundles(eng):
        for k, v in bundle.items():
            per_replica[k] = per_replica.get(k, 0) + v
    return {
        "engine_replicas": eng.replicas, "tensor_parallel_size": eng.tensor_parallel_size,
        "per_replica": per_replica,
        "total": {k: v * eng.replicas for k, v in per_replica.items()},
        "batch_size": eng.batch_size, "max_concurrent_batches": eng.max_concurrent_batches,
    }
