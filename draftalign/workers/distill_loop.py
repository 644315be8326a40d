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
from draftalign.models.feature import FeatureDrafter, is_feature_drafter, load_feature_drafter, restrict_head
from draftalign.training.distillation import (
    heldout_means,
    heldout_sums,
    masked_logits,
    position_acceptance,
    trim_padding,
    unrolled_block_efficiency,
)
from draftalign.training.losses import (
    SparseTargetLogprobs,
    SupportTargetLogprobs,
    densify_topk,
    get_loss,
    loss_options,
)
from draftalign.training.tracking import TrackingRun
from draftalign.training.trainreport import TrainReport
from draftalign.workers.target_pool import Reply
from draftalign.workers.trainer import Trainer, sum_across_workers


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
    """A standalone drafter's distillation. With several data-parallel workers every figure is a
    total over the global micro-batch, not a mean of each rank's means, so W workers at micro-batch
    m train and evaluate as one worker at W·m: the loss of a micro-batch is its summed per-position
    loss over the positions of all ranks (DeepSpeed then averages the ranks' gradients), and the
    held-out sums are added up across ranks before any mean is taken."""

    eval_at_start = True

    def __init__(self, cfg: DistillLoopConfig, target, train_shard, holdout_shard, vocab: int,
                 rank: int = 0, world: int = 1) -> None:
        self.cfg, self.d, self.target = cfg, cfg.distill, target
        self.train_shard, self.holdout_shard, self.vocab = train_shard, holdout_shard, vocab
        self.rank, self.world = rank, world  # Ray Train's: this worker's share of each global batch
        self.loss_fn = get_loss(cfg.loss.name)
        self.options = loss_options(cfg.loss)
        self.draft_vocab: torch.Tensor | None = None  # set by distill_loop for a reduced head
        # The paper picks its checkpoint by validation block efficiency; this is its held-out proxy.
        self.select_metric = f"holdout_tau_gamma{self.d.eval_gamma}"
        self.recorded = {"wait_s": 0.0, "positions": 0}

    def micro_batches(self, skip: int, device: torch.device) -> Iterator[tuple[int, Any]]:
        # This rank's split of the training rows (Ray Train's streaming split). Skipped batches
        # (trained before a restart) never reach the pool.
        it = self.train_shard.iter_torch_batches(batch_size=self.d.train.micro_batch_size, dtypes=torch.long,
                                                 drop_last=True)
        batches = ((i, batch) for i, batch in enumerate(it) if i >= skip)
        for i, batch, reply in self.target.stream(batches):
            yield i, (batch, reply)

    def holdout_batches(self) -> Iterator[tuple[int, dict]]:
        """This rank's rows of the first train.eval_batches held-out batches of micro_batch_size ×
        world rows: rows [rank·m, (rank + 1)·m) of each. Every rank reads the held-out set whole
        (it is not split), so W workers at micro-batch m score exactly the rows one worker at W·m
        scores, each row once, whatever the world size."""
        m = self.d.train.micro_batch_size
        it = self.holdout_shard.iter_torch_batches(batch_size=m * self.world, dtypes=torch.long, drop_last=False)
        for i, batch in enumerate(it):
            if i >= self.d.train.eval_batches:
                return
            part = {k: v[self.rank * m:(self.rank + 1) * m] for k, v in batch.items()}
            if len(part["input_ids"]):  # the last batch may not reach this rank
                yield i, part

    def _draft_and_target(self, engine, batch, reply):
        batch = trim_padding(batch)
        mask = batch["loss_mask"].to(engine.device).bool()
        # The DeepSpeed engine's module, called by part (its hooks sit on the submodules).
        logits = masked_logits(engine.module, batch["input_ids"].to(engine.device),
                               batch["attention_mask"].to(engine.device), mask)
        return logits[None], _target_tensor(reply, engine.device), mask

    def _loss_sum(self, draft_sel, target_sel) -> torch.Tensor:
        """The loss summed over the selected positions (draft_sel [1, N, V'])."""
        ones = torch.ones(draft_sel.shape[:2], dtype=torch.bool, device=draft_sel.device)
        vocab = {} if self.draft_vocab is None else {"draft_vocab": self.draft_vocab}
        return self.loss_fn(draft_sel, target_sel, ones, **self.options, **vocab).sum()

    def _global_counts(self, counts: list[int], device) -> list[float]:
        """Positions of this micro-batch on all ranks together (every rank steps in lockstep)."""
        return sum_across_workers(counts, device) if self.world > 1 else [float(c) for c in counts]

    def loss(self, engine, item) -> tuple[torch.Tensor, int]:
        batch, reply = item
        draft_sel, target_sel, mask = self._draft_and_target(engine, batch, reply)
        n = int(mask.sum())
        total = self._global_counts([n], engine.device)[0]
        # × world: DeepSpeed averages the ranks' gradients, so their sum is the global mean's.
        return self._loss_sum(draft_sel, target_sel) / max(total, 1.0) * self.world, n

    def sum_keys(self) -> list[str]:
        """The held-out sums every rank adds up, in one order, whether or not it scored a position."""
        keys = ["positions", "tvd", "acceptance", "forward_kl", "blocks", "tau", "loss"]
        return keys + (["support_mass"] if self.draft_vocab is not None else [])

    def batch_sums(self, engine, batch, reply) -> dict[str, float]:
        draft_sel, target_sel, mask = self._draft_and_target(engine, batch, reply)
        if not mask.any():
            return {}
        sums = heldout_sums(draft_sel[0], _first_row(target_sel, self.vocab), mask.cpu(), self.d.eval_gamma,
                            self.draft_vocab)
        return {**sums, "loss": float(self._loss_sum(draft_sel, target_sel))}

    def heldout_totals(self, engine) -> dict[str, float]:
        """This rank's held-out sums (every key of sum_keys)."""
        local = dict.fromkeys(self.sum_keys(), 0.0)
        with torch.no_grad():
            for _, batch, reply in self.target.stream(self.holdout_batches()):
                for k, v in self.batch_sums(engine, batch, reply).items():
                    local[k] += v
        return local

    def evaluate(self, engine) -> dict[str, float]:
        local = self.heldout_totals(engine)
        # Totals, the same on every rank, before any mean: so every rank reports, and selects the
        # export by, the same figures.
        keys = list(local)
        return self.figures(dict(zip(keys, sum_across_workers([local[k] for k in keys], engine.device), strict=True)))

    def figures(self, sums: dict[str, float]) -> dict[str, float]:
        out = heldout_means(sums, self.d.eval_gamma)
        if sums["positions"]:
            out["holdout_loss"] = sums["loss"] / sums["positions"]  # per position, as training weighs it
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


def _target_rows(target_sel, rows: torch.Tensor):
    """The [1, N, ...] target of _target_tensor at `rows` [M] of its N positions: [1, M, ...]."""
    if isinstance(target_sel, SupportTargetLogprobs):
        return SupportTargetLogprobs(target_sel.logprobs[:, rows])
    if isinstance(target_sel, SparseTargetLogprobs):
        return SparseTargetLogprobs(indices=target_sel.indices[:, rows], logprobs=target_sel.logprobs[:, rows])
    return target_sel[:, rows]


class FeatureDistillTask(DistillTask):
    """A feature drafter's distillation: it reads the target's features (the pool's ``features``),
    and is unrolled on its own outputs for distill.ttt_steps drafts (training-time test), each
    draft's loss against the target's distribution at the position it predicts.

    Loss: Σ_j w_j L_j / Σ_j w_j with w_j = ttt_decay^(j-1), L_j the loss's mean over draft j's
    scored positions on all ranks (draft index t is scored by the target's row at t + 1, from
    anchor t − j + 1 >= 0), drafts with no scored position on any rank left out.
    """

    def unrolled(self, engine, batch, reply, steps: int) -> list[tuple[Any, Any, torch.Tensor]]:
        """[(draft logits [1, N_j, V'], target [1, N_j, ...], scored [B, T − 1])] for drafts 1..steps."""
        from draftalign.models.feature import unrolled_logits

        batch = trim_padding(batch)
        dev = engine.device
        ids = batch["input_ids"].to(dev)
        attn, mask = batch["attention_mask"].to(dev).bool(), batch["loss_mask"].to(dev).bool()
        raw = torch.from_numpy(np.asarray(reply["features"])).to(dev)
        features = raw.new_zeros((*ids.shape, raw.shape[-1]))
        features[attn] = raw
        row = torch.full(mask.shape, -1, dtype=torch.long, device=dev)
        row[mask] = torch.arange(int(mask.sum()), device=dev)
        target = _target_tensor(reply, dev)
        out = []
        for j, logits in enumerate(unrolled_logits(engine.module, features, ids, steps), start=1):
            nxt = row[:, 1:]  # draft index t predicts the token the target's row at t + 1 scores
            scored = nxt >= 0
            scored[:, :j - 1] = False  # no anchor before position 0
            out.append((logits[:, :-1][scored][None], _target_rows(target, nxt[scored]), scored))
        return out

    def _weighted(self, sums: list, counts: list[float]):
        """Σ_j w_j sums_j / counts_j / Σ_j w_j over the drafts with counts_j > 0 (None: none has)."""
        total, weights = None, 0.0
        for j, (s, n) in enumerate(zip(sums, counts, strict=True)):
            if n:
                w = self.d.ttt_decay ** j
                total, weights = (w * s / n if total is None else total + w * s / n), weights + w
        return None if total is None else total / weights

    def loss(self, engine, item) -> tuple[torch.Tensor, int]:
        batch, reply = item
        steps = self.unrolled(engine, batch, reply, self.d.ttt_steps)
        counts = self._global_counts([int(ok.sum()) for _, _, ok in steps], engine.device)
        # A draft this rank did not score adds 0; its weight still counts if another rank scored it.
        sums = [self._loss_sum(d, t) if d.shape[1] else d.sum() * 0.0 for d, t, _ in steps]
        loss = self._weighted(sums, counts)
        if loss is None:  # no scored position in this micro-batch: a zero still tied to the graph for backward
            loss = steps[0][0].sum() * 0.0
        return loss * self.world, int(steps[0][2].sum())

    def sum_keys(self) -> list[str]:
        drafts = range(1, max(self.d.ttt_steps, self.d.eval_gamma) + 1)
        return [*super().sum_keys(), *(f"{k}_draft{j}" for j in drafts for k in ("acceptance", "positions", "loss"))]

    def batch_sums(self, engine, batch, reply) -> dict[str, float]:
        """Draft 1's held-out sums (as the cut's), with τ from the unrolled drafts, and each draft's
        acceptance and loss."""
        gamma = self.d.eval_gamma
        steps = self.unrolled(engine, batch, reply, max(self.d.ttt_steps, gamma))
        first, target_first, scored = steps[0]
        if not scored.any():
            return {}
        out: dict[str, float] = {}
        dense_alphas, valid = [], []
        for j, (draft_sel, target_sel, ok) in enumerate(steps, start=1):
            alpha = position_acceptance(draft_sel[0], _first_row(target_sel, self.vocab), self.draft_vocab)
            out[f"acceptance_draft{j}"], out[f"positions_draft{j}"] = float(alpha.sum()), float(ok.sum())
            out[f"loss_draft{j}"] = float(self._loss_sum(draft_sel, target_sel)) if draft_sel.shape[1] else 0.0
            dense = torch.zeros(ok.shape, dtype=alpha.dtype, device=alpha.device)
            dense[ok] = alpha
            dense_alphas.append(dense.cpu())
            valid.append(ok.cpu())
        out.update(heldout_sums(first[0], _first_row(target_first, self.vocab), scored.cpu(), gamma,
                                self.draft_vocab, alpha=dense_alphas[0][valid[0]]))
        out["tau"], out["blocks"] = unrolled_block_efficiency(dense_alphas, valid, gamma)
        return out

    def figures(self, sums: dict[str, float]) -> dict[str, float]:
        out = heldout_means(sums, self.d.eval_gamma)
        for j in range(1, max(self.d.ttt_steps, self.d.eval_gamma) + 1):
            if sums[f"positions_draft{j}"]:
                out[f"holdout_expected_acceptance_draft{j}"] = sums[f"acceptance_draft{j}"] / sums[f"positions_draft{j}"]
        drafts = range(1, self.d.ttt_steps + 1)
        loss = self._weighted([sums[f"loss_draft{j}"] for j in drafts], [sums[f"positions_draft{j}"] for j in drafts])
        if loss is not None:
            out["holdout_loss"] = loss
        return out


def start_feature_model(cfg: DistillLoopConfig) -> FeatureDrafter:
    """A feature drafter to train: its head cut to the draft vocabulary, its embeddings frozen."""
    model = load_feature_drafter(cfg.init_from)
    if cfg.draft_vocab is not None and len(model.draft_ids) == model.spec.vocab_size:
        restrict_head(model, list(cfg.draft_vocab))
    model.embed_tokens.weight.requires_grad_(False)  # the target's own table, as EAGLE-3 keeps it
    if "head" in cfg.distill.freeze:
        model.lm_head.weight.requires_grad_(False)
    return model


def start_model(cfg: DistillLoopConfig):
    """The drafter to train: the start's weights, its reduced head (distill.draft_vocab) and the
    parts distill.freeze keeps as they are."""
    if is_feature_drafter(cfg.init_from):
        return start_feature_model(cfg)
    model = load_draft_model(cfg.init_from)
    if cfg.draft_vocab is not None and draft_vocab_ids(model) is None:
        install_reduced_head(model, list(cfg.draft_vocab))
    frozen = set(cfg.distill.freeze)
    if "embeddings" in frozen:
        model.get_input_embeddings().weight.requires_grad_(False)
    if "head" in frozen:
        model.get_output_embeddings().weight.requires_grad_(False)
    return model


def _draft_support(model) -> torch.Tensor | None:
    """The draft vocabulary's target ids [V'] (None: the full vocabulary)."""
    if isinstance(model, FeatureDrafter):
        ids = model.draft_ids
        return None if len(ids) == model.spec.vocab_size else ids
    return draft_vocab_ids(model)


def distill_loop(cfg: DistillLoopConfig) -> None:
    import ray.train

    from draftalign.workers.target_pool import LocalTarget, TargetPool

    d = cfg.distill
    torch.manual_seed(d.train.seed)
    model = start_model(cfg)
    feature = isinstance(model, FeatureDrafter)
    # A reduced head's support: the pool sends the target's log-probs on it alone (V/V' less).
    draft_vocab = _draft_support(model)
    support = None if draft_vocab is None else tuple(int(i) for i in draft_vocab)
    layers = tuple(model.spec.target_layers) if feature else None  # the features the pool sends too
    if d.target_pool.in_process:
        target = LocalTarget(cfg.target, d.target_pool, cfg.cache_dir, support, layers)
    else:
        target = TargetPool(cfg.target, d.target_pool, cfg.death_marker, cfg.cache_dir, support, layers)
    ctx = ray.train.get_context()
    task = (FeatureDistillTask if feature else DistillTask)(
        cfg, target, ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("holdout"),
        model.config.vocab_size, rank=ctx.get_world_rank(), world=ctx.get_world_size())
    task.draft_vocab = draft_vocab
    try:
        params = {"distill": d.model_dump(mode="json"), "loss": cfg.loss.model_dump(mode="json"),
                  "target": cfg.target, "init_from": cfg.init_from}
        Trainer(cfg.name, d.train, d.optim, model, task, tracking=cfg.tracking, params=params).fit()
    finally:
        target.shutdown()
