"""The Ray Train set-up both training stages share: one TorchTrainer per job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from draftalign.cluster.resources import train_worker
from draftalign.config import TrainConfig

if TYPE_CHECKING:  # Ray is imported only when a job trains
    from ray.data import Dataset


def fit(loop: Callable[[Any], None], loop_config: Any, train: TrainConfig, run_name: str,
        job_dir: Path, datasets: dict[str, Dataset]):
    """Train `loop(loop_config)` on `train.num_workers` workers (loop_config: the loop's frozen
    dataclass); checkpoints under job_dir/ray; returns the Result.

    Only "train" is split across workers (see in_micro_batch_blocks); every worker reads the whole
    held-out set (small, and no shard can come out empty): pretraining evaluates all of it on each,
    distillation scores each rank's share of it and adds the sums up (DistillTask.holdout_batches).
    Rows keep their order on every run, so a resumed epoch can skip exactly what was trained. A
    rerun with the same name and folder resumes the run.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    for ds in datasets.values():
        # Training prints its own progress every log step. Ray Data's bars for these streams,
        # redrawn around each forwarded log line, were most of a run's output and outlived it.
        ds.context.enable_progress_bars = False
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=train_worker(train)),
        run_config=RunConfig(
            name=run_name, storage_path=str(job_dir / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=train.max_failures)),
        datasets=datasets,
        # Held-out too: unordered, each evaluation's first `eval_batches` were other rows, so the
        # before/after numbers and the export selection compared different sets.
        dataset_config=DataConfig(datasets_to_split=["train"],
                                  execution_options={"train": ingest, "holdout": ingest}),
    )
    return trainer.fit()


def in_micro_batch_blocks(ds, micro_batch_size: int):
    """`ds` materialized in order, in blocks of exactly `micro_batch_size` rows (the last one
    shorter), so that W data-parallel workers at micro-batch m train on the global batches one
    worker at W·m does (DistillTask's equivalence).

    Why that holds: Ray Train splits "train" with streaming_split(W, equal=True) under
    preserve_order, which turns locality off and hands the ordered blocks out one at a time, each
    to the worker that has received the fewest rows so far (Ray Data's OutputSplitter). With blocks
    of m rows, worker r gets blocks r, r + W, r + 2W, …, so its i-th micro-batch is block i·W + r,
    and the i-th global batch is blocks i·W … i·W + W − 1: rows [i·W·m, (i + 1)·W·m), one
    worker's i-th batch at W·m. The tail (fewer than W·m rows) is split evenly and dropped by
    drop_last on every worker alike, as one worker drops its last partial batch.
    tests/test_distill_ray.py checks it end to end.
    """
    return materialize_in_order(ds.repartition(target_num_rows_per_block=micro_batch_size, strict=True))


def materialize_in_order(ds):
    """`ds` materialized in read order. Held-out metrics use its first `eval_batches` batches;
    in completion order the same weights scored differently from run to run (held-out
    perplexity 350.9 and 392.5 in two demo runs with identical weights)."""
    ds.context.execution_options.preserve_order = True
    return ds.materialize()
