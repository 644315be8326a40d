"""The distillation task inside each Ray Train worker: the draft learns the target's
next-token distributions, which a pool of target actors streams beside it.

Everything arrives in a `DistillLoopConfig` (built by pipelines/distill.py); nothing reads globals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from draftalign.cluster.metrics import record
from draftalign.config import DistillConfig, LossConfig
from draftalign.models.draftvocab import draft_vocab_ids, install_reduced_head, load_draft_model
from draftalign.training.distillation import heldout_means, heldout_sums, masked_logits, trim_padding
from draftalign.training.losses import (
    SparseTargetLogprobs,
    SupportTargetLogprobs,
    densify_topk,
    get_loss,
    loss_options,
    masked_mean,
)
from draftalign.training.tracking import TrackingRun
from draftalign.training.trainreport import TrainReport
from draftalign.workers.target_pool import Reply
from draftalign.workers.trainer import Trainer, mean_across_workers


@dataclass(frozen=True)
class DistillLoopConfig:
    """What a distillation worker needs; built by pipelines/distill.py."""

    name: str  # the progress lines' tag
    distill: DistillConfig  # training, optimizer, pool and evaluation settings
    loss: LossConfig  # the one loss this job trains (one of distill.losses)
    target: str  # the target's model folder
    init_from: str  # the drafter to start from
    cache_dir: str | None = None  # target_pool.cache: where the pool memoises log-probs
    death_marker: str | None = None  # chaos testing: a target actor dies once per run
    tracking: TrackingRun | None = None  # experiment tracking, on rank 0
    # The reduced draft vocabulary's ids (distill.draft_vocab, chosen by the driver), or None.
    draft_vocab: tuple[int, ...] | None = None


def _target_tensor(reply: Reply, device) -> torch.Tensor | SparseTargetLogprobs:
    """The pool's reply as the loss expects it: [1, N, V] dense, [1, N, V'] on S, or [1, N, K] sparse."""
    if "support_logprobs" in reply:
        return SupportTargetLogprobs(torch.from_numpy(np.asarray(reply["support_logprobs"])).to(device)[None])
    if "logprobs" in reply:
        return torch.from_numpy(np.asarray(reply["logprobs"])).to(device)[None]
    return SparseTargetLogprobs(
        indices=torch.from_numpy(np.asarray(reply["indices"])).long().to(device)[None],
        logprobs=torch.from_numpy(np.asarray(reply["values"])).to(device)[None])


def _first_row(target_sel, vocab: int):
    """The [1, N, ...] target of _target_tensor as heldout_sums takes it: [N, V] or on S [N, V']."""
    if isinstance(target_sel, SupportTargetLogprobs):
        return SupportTargetLogprobs(target_sel.logprobs[0])
    if isinstance(target_sel, SparseTargetLogprobs):
        return densify_topk(target_sel, vocab)[0]
    return target_sel[0]


class DistillTask:
    eval_at_start = True

    def __init__(self, cfg: DistillLoopConfig, target, train_shard, holdout_shard, vocab: int) -> None:
        self.cfg, self.d, self.target = cfg, cfg.distill, target
        self.train_shard, self.holdout_shard, self.vocab = train_shard, holdout_shard, vocab
        self.loss_fn = get_loss(cfg.loss.name)
        self.options = loss_options(cfg.loss)
        self.draft_vocab: torch.Tensor | None = None  # set by distill_loop for a reduced head
        # The paper picks its checkpoint by validation block efficiency; this is its held-out proxy.
        self.select_metric = f"holdout_tau_gamma{self.d.eval_gamma}"
        self.recorded = {"wait_s": 0.0, "positions": 0}

    def _batches(self, shard, skip: int = 0, limit: int | None = None) -> Iterator[tuple[int, dict]]:
        t = self.d.train
        it = shard.iter_torch_batches(batch_size=t.micro_batch_size, dtypes=torch.long, drop_last=limit is None)
        for i, batch in enumerate(it):
            if limit is not None and i >= limit:
                return
            if i >= skip:
                yield i, batch

    def micro_batches(self, skip: int, device: torch.device) -> Iterator[tuple[int, Any]]:
        # Skipped batches (trained before a restart) never reach the pool.
        for i, batch, reply in self.target.stream(self._batches(self.train_shard, skip)):
            yield i, (batch, reply)

    def _draft_and_target(self, engine, batch, reply):
        batch = trim_padding(batch)
        mask = batch["loss_mask"].to(engine.device).bool()
        # The DeepSpeed engine's module, called by part (its hooks sit on the submodules).
        logits = masked_logits(engine.module, batch["input_ids"].to(engine.device),
                               batch["attention_mask"].to(engine.device), mask)
        return logits[None], _target_tensor(reply, engine.device), mask

    def _loss(self, draft_sel, target_sel) -> torch.Tensor:
        ones = torch.ones(draft_sel.shape[:2], dtype=torch.bool, device=draft_sel.device)
        vocab = {} if self.draft_vocab is None else {"draft_vocab": self.draft_vocab}
        return masked_mean(self.loss_fn(draft_sel, target_sel, ones, **self.options, **vocab), ones)

    def loss(self, engine, item) -> tuple[torch.Tensor, int]:
        batch, reply = item
        draft_sel, target_sel, mask = self._draft_and_target(engine, batch, reply)
        return self._loss(draft_sel, target_sel), int(mask.sum())

    def evaluate(self, engine) -> dict[str, float]:
        sums: dict[str, float] = {}
        loss_total, n = 0.0, 0
        with torch.no_grad():
            batches = self._batches(self.holdout_shard, limit=self.d.train.eval_batches)
            for _, batch, reply in self.target.stream(batches):
                draft_sel, target_sel, mask = self._draft_and_target(engine, batch, reply)
                if not mask.any():
                    continue
                loss_total += float(self._loss(draft_sel, target_sel))
                n += 1
                sums_here = heldout_sums(draft_sel[0], _first_row(target_sel, self.vocab), mask.cpu(),
                                         self.d.eval_gamma, self.draft_vocab)
                for k, v in sums_here.items():
                    sums[k] = sums.get(k, 0.0) + v
        out = heldout_means(sums, self.d.eval_gamma)
        if n:
            out["holdout_loss"] = mean_across_workers(loss_total / n, engine.device)
        return out

    def extra_metrics(self) -> dict[str, float]:
        return self.target.stats.snapshot()

    def on_metrics(self, metrics: TrainReport) -> None:
        stats, tags = self.target.stats, {"stage": "distill", "loss": self.cfg.loss.label}
        record("draftalign_distill_loss", metrics.get("loss"), **tags)
        record("draftalign_distill_tokens_per_s", metrics.get("tokens_per_s"), **tags)
        record("draftalign_expected_acceptance", metrics.get("holdout_expected_acceptance"), **tags)
        record("draftalign_target_pool_queue_depth", stats.queue_depth, **tags)
        record("draftalign_trainer_wait_seconds_total", stats.wait_s - self.recorded["wait_s"], **tags)
        record("draftalign_target_tokens_total", stats.positions - self.recorded["positions"], **tags)
        self.recorded.update(wait_s=stats.wait_s, positions=stats.positions)


def start_model(cfg: DistillLoopConfig):
    """The drafter to train: the start's weights, its reduced head (distill.draft_vocab) and the
    parts distill.freeze keeps as they are."""
    model = load_draft_model(cfg.init_from)
    if cfg.draft_vocab is not None and draft_vocab_ids(model) is None:
        install_reduced_head(model, list(cfg.draft_vocab))
    frozen = set(cfg.distill.freeze)
    if "embeddings" in frozen:
        model.get_input_embeddings().weight.requires_grad_(False)
    if "head" in frozen:
        model.get_output_embeddings().weight.requires_grad_(False)
    return model


def distill_loop(cfg: DistillLoopConfig) -> None:
    import ray.train

    from draftalign.workers.target_pool import LocalTarget, TargetPool

    d = cfg.distill
    torch.manual_seed(d.train.seed)
    model = start_model(cfg)
    # A reduced head's support: the pool sends the target's log-probs on it alone (V/V' less).
    draft_vocab = draft_vocab_ids(model)
    support = None if draft_vocab is None else tuple(int(i) for i in draft_vocab)
    if d.target_pool.in_process:
        target = LocalTarget(cfg.target, d.target_pool, cfg.cache_dir, support)
    else:
        target = TargetPool(cfg.target, d.target_pool, cfg.death_marker, cfg.cache_dir, support)
    task = DistillTask(cfg, target, ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("holdout"),
                       model.config.vocab_size)
    task.draft_vocab = draft_vocab
    try:
        params = {"distill": d.model_dump(mode="json"), "loss": cfg.loss.model_dump(mode="json"),
                  "target": cfg.target, "init_from": cfg.init_from}
        Trainer(cfg.name, d.train, d.optim, model, task, tracking=cfg.tracking, params=params).fit()
    finally:
        target.shutdown()
