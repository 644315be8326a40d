"""What each stage would ask Ray for: the `--plan` view, computed without starting Ray."""

from __future__ import annotations

from typing import Any

from draftalign.config import PretrainJob


def train_resources(job: PretrainJob) -> dict[str, Any]:
    t = job.train
    per_worker = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
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

