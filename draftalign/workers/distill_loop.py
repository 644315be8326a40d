"""The distillation loop inside each Ray Train worker: the draft learns the target's
next-token distributions, which a pool of target actors streams beside it.

Everything arrives in `loop_config` (see pipelines/distill.py); nothing reads globals.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from draftalign.cluster.metrics import record
from draftalign.config import DistillConfig
from draftalign.distillation import heldout_means, heldout_sums
from draftalign.losses import SparseTargetLogprobs, get_loss, masked_mean
from draftalign.workers.train_loop import LoopHooks, mean_across_workers, run_training


def _target_tensor(reply: dict[str, Any], device) -> torch.Tensor | SparseTargetLogprobs:
    """The pool's reply as the loss expects it: [1, N, V] dense or [1, N, K] sparse."""
    if "logprobs" in reply:
        return torch.from_numpy(np.asarray(reply["logprobs"])).to(device)[None]
    return SparseTargetLogprobs(
        indices=torch.from_numpy(np.asarray(reply["indices"])).long().to(device)[None],
        logprobs=torch.from_numpy(np.asarray(reply["values"])).to(device)[None])


def _dense(target, vocab: int) -> torch.Tensor:
    from draftalign.losses import densify_topk

    return densify_topk(target, vocab) if isinstance(target, SparseTargetLogprobs) else target


def distill_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    from transformers import AutoModelForCausalLM

    from draftalign.workers.target_pool import LocalTarget, TargetPool

    d: DistillConfig = loop_config["distill"]
    t, pool_cfg = d.train, d.target_pool
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(loop_config["init_from"], dtype=torch.float32,
                                                 use_safetensors=True)
    vocab = model.config.vocab_size
    loss_fn = get_loss(d.loss.name)
    options = {"variant": d.loss.variant} if d.loss.name == "tvd++" else {}
    if pool_cfg.in_process:
        target = LocalTarget(loop_config["target"], pool_cfg)
    else:
        target = TargetPool(loop_config["target"], pool_cfg, loop_config.get("death_marker"))
    train_shard = ray.train.get_dataset_shard("train")
    holdout_shard = ray.train.get_dataset_shard("holdout")

    def batches(shard, skip: int = 0, limit: int | None = None) -> Iterator[tuple[int, dict]]:
        it = shard.iter_torch_batches(batch_size=t.micro_batch_size, dtypes=torch.long, drop_last=limit is None)
        for i, batch in enumerate(it):
            if limit is not None and i >= limit:
                return
            if i >= skip:
                yield i, batch

    def micro_batches(skip: int) -> Iterator[tuple[int, Any]]:
        # Skipped batches (trained before a restart) never reach the pool.
        for i, batch, reply in target.stream(batches(train_shard, skip)):
            yield i, (batch, reply)

    def draft_and_target(engine, batch, reply):
        mask = batch["loss_mask"].to(engine.device).bool()
        logits = engine(input_ids=batch["input_ids"].to(engine.device),
                        attention_mask=batch["attention_mask"].to(engine.device)).logits
        return logits[mask][None], _target_tensor(reply, engine.device), mask

    def step(engine, item) -> tuple[torch.Tensor, int]:
        batch, reply = item
        draft_sel, target_sel, mask = draft_and_target(engine, batch, reply)
        ones = torch.ones(draft_sel.shape[:2], dtype=torch.bool, device=engine.device)
        return masked_mean(loss_fn(draft_sel, target_sel, ones, **options), ones), int(mask.sum())

    def evaluate(engine) -> dict[str, float]:
        sums: dict[str, float] = {}
        loss_total, n = 0.0, 0
        with torch.no_grad():
            for _, batch, reply in target.stream(batches(holdout_shard, limit=t.eval_batches)):
                draft_sel, target_sel, mask = draft_and_target(engine, batch, reply)
                if not mask.any():
                    continue
                ones = torch.ones(draft_sel.shape[:2], dtype=torch.bool, device=engine.device)
                loss_total += float(masked_mean(loss_fn(draft_sel, target_sel, ones, **options), ones))
                n += 1
                part = heldout_sums(draft_sel[0], _dense(target_sel, vocab)[0], mask.cpu(), d.eval_gamma)
                for k, v in part.items():
                    sums[k] = sums.get(k, 0.0) + v
        out = heldout_means(sums, d.eval_gamma)
        if n:
            out["holdout_loss"] = mean_across_workers(loss_total / n, engine.device)
        return out

    recorded = {"wait_s": 0.0, "positions": 0}

    def to_dashboard(metrics: dict[str, Any]) -> None:
        stats, tags = target.stats, {"stage": "distill", "loss": d.loss.name}
        record("draftalign_distill_loss", metrics.get("loss"), **tags)
        record("draftalign_distill_tokens_per_s", metrics.get("tokens_per_s"), **tags)
        record("draftalign_expected_acceptance", metrics.get("holdout_acceptance"), **tags)
        record("draftalign_target_pool_queue_depth", stats.queue_depth, **tags)
        record("draftalign_trainer_wait_seconds_total", stats.wait_s - recorded["wait_s"], **tags)
        record("draftalign_target_tokens_total", stats.positions - recorded["positions"], **tags)
        recorded.update(wait_s=stats.wait_s, positions=stats.positions)

    hooks = LoopHooks(micro_batches=micro_batches, step=step, evaluate=evaluate,
                      extra_metrics=target.stats.snapshot, on_metrics=to_dashboard, eval_at_start=True)
    try:
        run_training(loop_config["name"], t, d.optim, model, hooks)
    finally:
        target.shutdown()
