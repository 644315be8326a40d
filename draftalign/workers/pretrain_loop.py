"""The pretraining task inside each Ray Train worker: next-token loss on packed corpus rows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from draftalign.config import PretrainJob
from draftalign.training.tracking import TrackingRun
from draftalign.training.trainreport import TrainReport
from draftalign.workers.trainer import Trainer, evaluate_lm


@dataclass(frozen=True)
class PretrainLoopConfig:
    """What a pretraining worker needs; built by pipelines/pretrain.py."""

    name: str  # the progress lines' tag
    job: PretrainJob
    model_config: dict[str, Any]  # the model's config fields (a plain dict: transformers' config pickles poorly)
    target: str | None = None  # the target folder, for arch.init_embeddings=target or arch.target_layers
    tracking: TrackingRun | None = None  # experiment tracking, on rank 0


class PretrainTask:
    eval_at_start = False
    select_metric = None  # pretraining exports its last step

    def __init__(self, train_shard, holdout_shard, job: PretrainJob) -> None:
        self.train_shard, self.holdout_shard, self.t = train_shard, holdout_shard, job.train

    def micro_batches(self, skip: int, device: torch.device) -> Iterator[tuple[int, Any]]:
        batches = self.train_shard.iter_torch_batches(batch_size=self.t.micro_batch_size, dtypes=torch.long,
                                                      device=device, drop_last=True)
        for i, batch in enumerate(batches):
            if i >= skip:
                yield i, batch["input_ids"]

    def loss(self, engine, ids) -> tuple[torch.Tensor, int]:
        return engine(input_ids=ids, labels=ids).loss, ids.numel()

    def evaluate(self, engine) -> dict[str, float]:
        return evaluate_lm(engine, self.holdout_shard, self.t)

    def extra_metrics(self) -> dict[str, float]:
        return {}

    def on_metrics(self, metrics: TrainReport) -> None:
        pass


def build_model(cfg: PretrainLoopConfig):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    arch = cfg.job.arch
    if arch.init_from:  # any family: a drafter cut from a Qwen target is a Qwen model
        return AutoModelForCausalLM.from_pretrained(arch.init_from, dtype=torch.float32, use_safetensors=True)
    if arch.target_layers is not None:  # cut from the target, then pretrained further on the corpus
        from draftalign.models.arch import draft_from_target

        target = AutoModelForCausalLM.from_pretrained(cfg.target, dtype=torch.float32, use_safetensors=True)
        return draft_from_target(target, arch.target_layers).train()
    model = LlamaForCausalLM(LlamaConfig(**cfg.model_config))  # a preset: the paper's Llama drafter
    if arch.init_embeddings == "target":
        from draftalign.models.arch import init_embeddings_from

        init_embeddings_from(model, cfg.target)
    return model


def pretrain_loop(cfg: PretrainLoopConfig) -> None:
    import ray.train

    torch.manual_seed(cfg.job.train.seed)
    model = build_model(cfg)
    task = PretrainTask(ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("holdout"), cfg.job)
    params = {"job": cfg.job.model_dump(mode="json"), "model": cfg.model_config}
    Trainer(cfg.name, cfg.job.train, cfg.job.optim, model, task, tracking=cfg.tracking, params=params).fit()
