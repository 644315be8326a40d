"""The pretraining loop that runs inside each Ray Train worker, with DeepSpeed.

Everything it needs arrives in `loop_config` (see pipelines/pretrain.py); it reads no
globals. Checkpoints hold DeepSpeed's sharded state plus `state.json` (step and the
position in the data), so a restarted worker group continues at the saved step.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from contextlib import nullcontext
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


def _mean_across_workers(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _evaluate(engine, shard, t: TrainConfig) -> float | None:
    """Mean next-token loss on the first `eval_batches` held-out batches (None if there are none).

    Every worker sees the whole held-out set, so all compute the same number.
    """
    engine.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=t.micro_batch_size, dtypes=torch.long,
                                              device=engine.device, drop_last=False):
            ids = batch["input_ids"]
            total += engine(input_ids=ids, labels=ids).loss.item()
            n += 1
            if n >= t.eval_batches:
                break
    engine.train()
    return total / n if n else None


def pretrain_loop(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

    job: PretrainJob = loop_config["job"]
    t, o = job.train, job.optim
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed)

    if job.arch.init_from:
        model = LlamaForCausalLM.from_pretrained(job.arch.init_from, torch_dtype=torch.float32)
    else:
        model = LlamaForCausalLM(LlamaConfig(**loop_config["model_config"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=t.max_steps, min_lr_rate=o.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(t, o, world))

    if rank == 0:
        print(f"[{loop_config['name']}] {world} worker(s), {torch.get_num_threads()} torch threads each, "
              f"ZeRO stage {t.zero_stage}, {t.dtype_name}", flush=True)
    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "resumed_from": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(str(Path(d) / "deepspeed"), tag="state")
            state = json.loads((Path(d) / "state.json").read_text())
        state["resumed_from"] = state["step"]
        if rank == 0:
            print(f"[{loop_config['name']}] resumed from checkpoint at step {state['step']}", flush=True)

    def save(metrics: dict[str, Any], export: bool = False) -> None:
        with tempfile.TemporaryDirectory() as d:
            if export:
                _export(engine, t, Path(d) / "hf", rank)
            else:
                engine.save_checkpoint(str(Path(d) / "deepspeed"), tag="state")
            if rank == 0:
                (Path(d) / "state.json").write_text(json.dumps(state))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    train_shard = ray.train.get_dataset_shard("train")
    holdout_shard = ray.train.get_dataset_shard("holdout")
    tokens_per_micro = t.micro_batch_size * t.seq_len
    window_loss, window_micro, window_start = 0.0, 0, time.perf_counter()
    last_report = 0.0
    metrics: dict[str, Any] = {}
    while state["step"] < t.max_steps:
        skip = state["micro_in_epoch"]  # resume mid-epoch: pass over what was already trained on
        seen_any = False
        for i, batch in enumerate(train_shard.iter_torch_batches(
                batch_size=t.micro_batch_size, dtypes=torch.long, device=engine.device, drop_last=True)):
            seen_any = True
            if i < skip:
                continue
            ids = batch["input_ids"]
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            state["micro_in_epoch"] = i + 1
            window_loss += loss.item()
            window_micro += 1
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
                    "loss": _mean_across_workers(window_loss / max(window_micro, 1), engine.device),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": window_micro * tokens_per_micro * world / max(elapsed, 1e-9),
                    "resumed_from_step": state["resumed_from"],
                }
                if (t.eval_every and step % t.eval_every == 0) or is_last:
                    held = _evaluate(engine, holdout_shard, t)
                    if held is not None:
                        metrics["holdout_loss"] = held
                        metrics["holdout_perplexity"] = math.exp(min(held, 50.0))
                if rank == 0:
                    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
                    print(f"[{loop_config['name']}] step {step}/{t.max_steps} {shown}", flush=True)
                if is_last:
                    break
                if step % t.checkpoint_every == 0:
                    save(metrics)
                    last_report = time.perf_counter()
                elif time.perf_counter() - last_report >= REPORT_INTERVAL_S:
                    ray.train.report(metrics)
                    last_report = time.perf_counter()
                # Evaluation and checkpoint time stay out of the next window's tokens/s.
                window_loss, window_micro, window_start = 0.0, 0, time.perf_counter()
        if not seen_any:
            raise RuntimeError("the training data set is empty: no packed sequence of train.seq_len tokens")
        if state["step"] < t.max_steps:
            state["epoch"] += 1
            state["micro_in_epoch"] = 0
    save(metrics, export=True)


def _export(engine, t: TrainConfig, dest: Path, rank: int) -> None:
    """Gather the full weights (ZeRO-3 shards them) and write a HF folder on rank 0."""
    import deepspeed

    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if t.zero_stage == 3 else nullcontext()
    with gather:
        if rank == 0:
            state_dict = {k: v.detach().to("cpu").clone() for k, v in engine.module.state_dict().items()}
            engine.module.save_pretrained(str(dest), state_dict=state_dict, safe_serialization=True)

