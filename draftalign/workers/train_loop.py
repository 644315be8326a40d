"""The training loop that runs inside each Ray Train worker, with DeepSpeed.

`run_training` is shared by pretraining and distillation (they differ in `LoopHooks`).
Everything arrives in `loop_config` (see pipelines/); nothing reads
globals. Checkpoints hold DeepSpeed's sharded state plus `state.json` (step and the
position in the data), so a restarted worker group continues at the saved step.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from draftalign.config import OptimConfig, PretrainJob, TrainConfig

# Ray Train v2 hands each report to its controller, which polls every couple of seconds; a
# report made sooner than that blocks the step. Progress is printed at every log step anyway.
REPORT_INTERVAL_S = 5.0


def deepspeed_config(t: TrainConfig, o: OptimConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config for a torch optimizer (its fused CPU Adam needs compiled ops)."""
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.dtype_name == "bf16"},
        "steps_per_print": 10**9,  # progress is reported through Ray Train instead
        "wall_clock_breakdown": False,
    }


def mean_across_workers(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@dataclass
class LoopHooks:
    """What differs between pretraining and distillation; the loop around it is shared.

    micro_batches(skip): this epoch's micro-batches after the first `skip` (those were trained
        before a restart), as (index in epoch, item); skipping happens before any work is done.
    step(engine, item) -> (loss to backpropagate, tokens trained).
    evaluate(engine) -> held-out metrics (the same on every worker).
    extra_metrics() -> more numbers for each report (e.g. the target pool's).
    """

    micro_batches: Callable[[int], Iterator[tuple[int, Any]]]
    step: Callable[[Any, Any], tuple[torch.Tensor, int]]
    evaluate: Callable[[Any], dict[str, float]]
    extra_metrics: Callable[[], dict[str, Any]] = dict
    on_metrics: Callable[[dict[str, Any]], None] = lambda metrics: None  # e.g. dashboard gauges
    eval_at_start: bool = False  # record the starting model's held-out metrics as initial_*


def _evaluate_lm(engine, shard, t: TrainConfig) -> dict[str, float]:
    """Mean next-token loss on the first `eval_batches` held-out batches ({} if there are none).

    Every worker sees the whole held-out set, so all compute the same number.
    """
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=t.micro_batch_size, dtypes=torch.long,
                                              device=engine.device, drop_last=False):
            ids = batch["input_ids"]
            total += engine(input_ids=ids, labels=ids).loss.item()
            n += 1
            if n >= t.eval_batches:
                break
    if not n:
        return {}
    held = total / n
    return {"holdout_loss": held, "holdout_perplexity": math.exp(min(held, 50.0))}


def pretrain_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    from transformers import LlamaConfig, LlamaForCausalLM

    job: PretrainJob = loop_config["job"]
    t = job.train
    torch.manual_seed(t.seed)
    if job.arch.init_from:
        model = LlamaForCausalLM.from_pretrained(job.arch.init_from, dtype=torch.float32,
                                                 use_safetensors=True)
    else:
        model = LlamaForCausalLM(LlamaConfig(**loop_config["model_config"]))
    train_shard = ray.train.get_dataset_shard("train")
    holdout_shard = ray.train.get_dataset_shard("holdout")
    device_holder: dict[str, Any] = {}

    def micro_batches(skip: int) -> Iterator[tuple[int, Any]]:
        batches = train_shard.iter_torch_batches(batch_size=t.micro_batch_size, dtypes=torch.long,
                                                 device=device_holder["device"], drop_last=True)
        for i, batch in enumerate(batches):
            if i >= skip:
                yield i, batch["input_ids"]

    def step(engine, ids) -> tuple[torch.Tensor, int]:
        return engine(input_ids=ids, labels=ids).loss, ids.numel()

    hooks = LoopHooks(micro_batches=micro_batches, step=step,
                      evaluate=lambda engine: _evaluate_lm(engine, holdout_shard, t))
    run_training(loop_config["name"], t, job.optim, model, hooks, device_holder)


def run_training(name: str, t: TrainConfig, o: OptimConfig, model, hooks: LoopHooks,
                 device_holder: dict[str, Any] | None = None) -> dict[str, Any]:
    """DeepSpeed around `model`, resume from Ray Train's checkpoint, train, report, export.

    The last report carries the export (`hf/` in its checkpoint). Returns the final metrics.
    """
    import deepspeed
    import ray.train
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=t.max_steps, min_lr_rate=o.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(t, o, world))
    if device_holder is not None:
        device_holder["device"] = engine.device

    def log(msg: str) -> None:
        if rank == 0:
            # To the process's own stdout: Ray Train's patched print() would both write the line
            # and log it to the console, so every progress line reached the driver twice.
            print(f"[{name}] {msg}", file=sys.__stdout__, flush=True)

    log(f"{world} worker(s), {torch.get_num_threads()} torch threads each, ZeRO stage {t.zero_stage}, "
        f"{t.dtype_name}")
    state: dict[str, Any] = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "resumed_from": None, "initial": {}}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(str(Path(d) / "deepspeed"), tag="state")
            state = {**state, **json.loads((Path(d) / "state.json").read_text())}
        state["resumed_from"] = state["step"]
        log(f"resumed from checkpoint at step {state['step']}")

    def evaluate() -> dict[str, float]:
        engine.eval()
        try:
            return hooks.evaluate(engine)
        finally:
            engine.train()

    if hooks.eval_at_start and not state["initial"]:
        state["initial"] = {f"initial_{k}": v for k, v in evaluate().items()}
        log(f"before training: {_rounded(state['initial'])}")

    def save(metrics: dict[str, Any], export: bool = False) -> None:
        with tempfile.TemporaryDirectory() as d:
            if export:
                _export(engine, t, Path(d) / "hf", rank)
            else:
                engine.save_checkpoint(str(Path(d) / "deepspeed"), tag="state")
            if rank == 0:
                (Path(d) / "state.json").write_text(json.dumps(state))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    last_report = 0.0
    metrics: dict[str, Any] = {}
    while state["step"] < t.max_steps:
        seen_any = state["micro_in_epoch"] > 0
        for i, item in hooks.micro_batches(state["micro_in_epoch"]):
            seen_any = True
            loss, tokens = hooks.step(engine, item)
            engine.backward(loss)
            engine.step()
            state["micro_in_epoch"] = i + 1
            window_loss += loss.item()
            window_micro += 1
            window_tokens += tokens
            if not engine.is_gradient_accumulation_boundary():
                continue
            state["step"] += 1
            step = state["step"]
            if step == t.inject_failure_at_step and state["resumed_from"] is None:
                raise RuntimeError(f"injected failure at step {step} (train.inject_failure_at_step)")
            is_last = step >= t.max_steps
            if step % t.log_every == 0 or is_last or step % t.checkpoint_every == 0:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "step": step, "epoch": state["epoch"],
                    "loss": mean_across_workers(window_loss / max(window_micro, 1), engine.device),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": mean_across_workers(window_tokens / max(elapsed, 1e-9), engine.device) * world,
                    "resumed_from_step": state["resumed_from"], **state["initial"],
                }
                if (t.eval_every and step % t.eval_every == 0) or is_last:
                    metrics.update(evaluate())
                metrics.update(hooks.extra_metrics())  # after evaluation, so the counts include it
                hooks.on_metrics(metrics)
                log(f"step {step}/{t.max_steps} {_rounded(metrics)}")
                if is_last:
                    break
                if step % t.checkpoint_every == 0:
                    save(metrics)
                    last_report = time.perf_counter()
                elif time.perf_counter() - last_report >= REPORT_INTERVAL_S:
                    ray.train.report(metrics)
                    last_report = time.perf_counter()
                # Evaluation and checkpoint time stay out of the next window's tokens/s.
                window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        if not seen_any:
            raise RuntimeError("the training data set is empty: no batch of train.micro_batch_size rows")
        if state["step"] < t.max_steps:
            state["epoch"] += 1
            state["micro_in_epoch"] = 0
    save(metrics, export=True)
    return metrics


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}


def _export(engine, t: TrainConfig, dest: Path, rank: int) -> None:
    """Gather the full weights (ZeRO-3 shards them) and write a HF folder on rank 0."""
    import deepspeed

    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if t.zero_stage == 3 else nullcontext()
    with gather:
        if rank == 0:
            state_dict = {k: v.detach().to("cpu").clone() for k, v in engine.module.state_dict().items()}
            engine.module.save_pretrained(str(dest), state_dict=state_dict, safe_serialization=True)

