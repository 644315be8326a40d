"""The one training loop, run inside each Ray Train worker with DeepSpeed.

Pretraining and distillation drive the same `Trainer`; each contributes a `TrainTask` (its
batches, its loss, its held-out evaluation). Checkpoints hold DeepSpeed's sharded state plus
`state.json` (step, position in the data, the best evaluation so far), so a restarted worker
group continues at the saved step. The Ray Train calls go through `session`, so the loop also
runs in-process (tests/test_trainer_pulse.py) with a stand-in.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from draftalign.config import OptimConfig, TrainConfig
from draftalign.models.draftvocab import draft_vocab_ids, export_state_dict, write_draft_vocab
from draftalign.training.plots import curve_point, write_curves
from draftalign.training.tracking import TrackingRun, open_tracker
from draftalign.training.trainreport import Metrics, Scalar, TrainReport
from draftalign.util.atomicio import explain_write_error

# Ray Train v2 hands each report to its controller, which polls every couple of seconds; a
# report made sooner than that blocks the step. Progress is printed at every log step anyway.
REPORT_INTERVAL_S = 5.0
BEST_WEIGHTS = "best_weights.pt"  # in a checkpoint: the weights of the best evaluation so far
FINAL_METRICS = "metrics.json"  # in the final checkpoint, beside the export: its last report


def deepspeed_config(train: TrainConfig, optim: OptimConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config for a torch optimizer (its fused CPU Adam needs compiled ops)."""
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.dtype_name == "bf16"},
        "steps_per_print": 10**9,  # progress is reported through Ray Train instead
        "wall_clock_breakdown": False,
    }


def _distributed():
    """torch.distributed when this process is one of several data-parallel workers, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def sum_across_workers(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums over the data-parallel workers, the same on every rank (the values
    themselves on one worker). Figures made from totals, not from each rank's means, do not
    depend on how the rows were split between the ranks."""
    dist = _distributed()
    if dist is None:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_across_workers(value: float, device: torch.device) -> float:
    dist = _distributed()
    return sum_across_workers([value], device)[0] / (dist.get_world_size() if dist else 1)


def same_on_every_worker(value: float, device: torch.device) -> bool:
    """Whether every rank holds this value (e.g. the step it exports)."""
    dist = _distributed()
    if dist is None:
        return True
    t = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item() == value == -t[1].item()


class TrainTask(Protocol):
    """What differs between pretraining and distillation."""

    eval_at_start: bool  # record the starting model's held-out metrics as initial_*
    select_metric: str | None  # export the weights that scored highest on it (None: the last)

    def micro_batches(self, skip: int, device: torch.device) -> Iterator[tuple[int, Any]]:
        """This epoch's (index, item) after the first `skip` (trained before a restart)."""

    def loss(self, engine, item: Any) -> tuple[torch.Tensor, int]:
        """(loss to backpropagate, tokens trained)."""

    def evaluate(self, engine) -> dict[str, float]:
        """Held-out metrics, the same on every worker."""

    def extra_metrics(self) -> dict[str, float]:
        """More numbers for each report (e.g. the target pool's)."""

    def on_metrics(self, metrics: TrainReport) -> None:
        """Called with each logged report (e.g. dashboard gauges)."""


class RayTrainSession:
    """The Ray Train calls the trainer makes, in one place."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def get_checkpoint(self):
        return self._train.get_checkpoint()

    def report(self, metrics: Metrics, folder: str | None = None) -> None:
        ckpt = self._train.Checkpoint.from_directory(folder) if folder else None
        self._train.report(metrics, checkpoint=ckpt)


@dataclass
class TrainState:
    """What a checkpoint carries besides DeepSpeed's state (state.json)."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    resumed_from: int | None = None
    initial: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    best_value: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # a curve point per log step


class Window:
    """Running totals between two log steps: mean loss and tokens/s."""

    def __init__(self) -> None:
        self.loss, self.micro, self.tokens, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.loss, self.micro, self.tokens = self.loss + loss, self.micro + 1, self.tokens + tokens

    def rates(self) -> tuple[float, float]:
        return self.loss / max(self.micro, 1), self.tokens / max(time.perf_counter() - self.start, 1e-9)


class Trainer:
    """DeepSpeed around `model`; resume, step, log and report, evaluate, checkpoint, export."""

    def __init__(self, name: str, t: TrainConfig, o: OptimConfig, model, task: TrainTask, session=None,
                 tracking: TrackingRun | None = None, params: Mapping[str, object] | None = None) -> None:
        import deepspeed
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        self.name, self.t, self.task = name, t, task
        self.session = session or RayTrainSession()
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=t.max_steps,
            min_lr_rate=o.min_lr_ratio)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self.scheduler,
            config=deepspeed_config(t, o, self.session.world))
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.last_report = 0.0
        self.window = Window()
        # Rank 0 only; `params`, the job's resolved config, become the tracked run's parameters.
        self.tracker = open_tracker(tracking, params or {}, self.session.rank)

    def log(self, msg: str) -> None:
        if self.session.rank == 0:
            # To the process's own stdout: Ray Train's patched print() would both write the line
            # and log it to the console, so every progress line reached the driver twice.
            print(f"[{self.name}] {msg}", file=sys.__stdout__, flush=True)

    def fit(self) -> Metrics:
        """Train to t.max_steps; the last report carries the export (`hf/`). Returns its metrics."""
        try:
            return self._fit()
        finally:
            self.tracker.close()

    def _fit(self) -> Metrics:
        self.log(f"{self.session.world} worker(s), {torch.get_num_threads()} torch threads each, "
                 f"ZeRO stage {self.t.zero_stage}, {self.t.dtype_name}")
        finished = self.finished_export()
        if finished is not None:
            return finished
        self.resume()
        if self.task.eval_at_start and not self.state.initial:
            before = self.evaluate()
            self.state.initial = {f"initial_{k}": v for k, v in before.items()}
            self.state.history.append(curve_point({"step": 0, **before}))
            self.tracker.log_metrics(before, 0)
            self.log(f"before training: {_rounded(self.state.initial)}")
        report: TrainReport | None = None
        while self.state.step < self.t.max_steps:
            report = self.epoch() or report
        metrics = self.select_export(report).to_dict() if report else {}
        self.save(metrics, export=True)
        return metrics

    def finished_export(self) -> Metrics | None:
        """When Ray Train's latest checkpoint is the final export (the run finished, but its model
        folder was deleted or never published), report it again instead of resuming: it holds
        no DeepSpeed state to resume from. Returns its metrics, or None."""
        checkpoint = self.session.get_checkpoint()
        if not checkpoint:
            return None
        with checkpoint.as_directory() as d:
            if not (Path(d) / "hf").is_dir():
                return None
            metrics = json.loads((Path(d) / FINAL_METRICS).read_text())
            self.log(f"the run finished earlier (step {metrics.get('step')}): publishing its export again")
            self.session.report(metrics, d)
        return metrics

    def resume(self) -> None:
        checkpoint = self.session.get_checkpoint()
        if not checkpoint:
            return
        with checkpoint.as_directory() as d:
            self.engine.load_checkpoint(str(Path(d) / "deepspeed"), tag="state")
            self.state = TrainState(**json.loads((Path(d) / "state.json").read_text()))
            if (Path(d) / BEST_WEIGHTS).is_file():
                self.best_weights = torch.load(Path(d) / BEST_WEIGHTS, weights_only=True)
        self.state.resumed_from = self.state.step
        self.log(f"resumed from checkpoint at step {self.state.step}")

    def epoch(self) -> TrainReport | None:
        """Micro-batches until the epoch or the step budget ends; the last logged metrics."""
        st, metrics = self.state, None
        seen_any = st.micro_in_epoch > 0
        for i, item in self.task.micro_batches(st.micro_in_epoch, self.engine.device):
            seen_any = True
            loss, tokens = self.task.loss(self.engine, item)
            self.engine.backward(loss)
            self.engine.step()
            st.micro_in_epoch = i + 1
            self.window.add(loss.item(), tokens)
            if not self.engine.is_gradient_accumulation_boundary():
                continue
            st.step += 1
            if st.step == self.t.inject_failure_at_step and st.resumed_from is None:
                raise RuntimeError(f"injected failure at step {st.step} (train.inject_failure_at_step)")
            if self.due(st.step):
                metrics = self.log_step(self.window)
                if st.step >= self.t.max_steps:
                    return metrics
                self.checkpoint_or_report(metrics)
                self.window = Window()  # evaluation and checkpoint time stay out of the next tokens/s
        if not seen_any:
            raise RuntimeError("the training data set is empty: no batch of train.micro_batch_size rows")
        st.epoch, st.micro_in_epoch = st.epoch + 1, 0
        return metrics

    def due(self, step: int) -> bool:
        t = self.t
        return step % t.log_every == 0 or step >= t.max_steps or step % t.checkpoint_every == 0

    def log_step(self, window: Window) -> TrainReport:
        st, device = self.state, self.engine.device
        loss, tokens_per_s = window.rates()
        report = TrainReport(
            step=st.step, epoch=st.epoch, loss=mean_across_workers(loss, device),
            lr=self.scheduler.get_last_lr()[0],
            tokens_per_s=mean_across_workers(tokens_per_s, device) * self.session.world,
            resumed_from_step=st.resumed_from, values=dict(st.initial))
        if (self.t.eval_every and st.step % self.t.eval_every == 0) or st.step >= self.t.max_steps:
            report = report.with_values(self.evaluate())
            self.keep_if_best(report)
        report = report.with_values(self.task.extra_metrics())  # after evaluation, so the counts include it
        self.task.on_metrics(report)
        metrics = report.to_dict()
        # initial_* repeat the step-0 evaluation on every line; the tracker has them at step 0.
        self.tracker.log_metrics({k: v for k, v in metrics.items() if not k.startswith("initial_")}, st.step)
        self.state.history.append(curve_point(metrics))
        self.log(f"step {st.step}/{self.t.max_steps} {_rounded(metrics)}")
        return report

    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        try:
            return self.task.evaluate(self.engine)
        finally:
            self.engine.train()

    def keep_if_best(self, report: TrainReport) -> None:
        """Remember the weights of the best evaluation of `task.select_metric` (higher is better)."""
        key, st = self.task.select_metric, self.state
        value = report.get(key) if key is not None else None
        if value is None:
            return
        if st.best_value is None or value > st.best_value:
            st.best_step, st.best_value = st.step, float(value)
            self.best_weights = self.full_state_dict() if st.step < self.t.max_steps else None

    def select_export(self, report: TrainReport) -> TrainReport:
        """Load the best weights when an earlier evaluation beat the last one."""
        st, key = self.state, self.task.select_metric
        if key is None:
            return report
        # Every rank loads the weights it picked and rank 0 writes them: a rank that picked
        # another step would leave its optimizer state and the export out of step.
        if not same_on_every_worker(-1 if st.best_step is None else st.best_step, self.engine.device):
            raise RuntimeError(f"the train workers picked different steps to export (rank {self.session.rank}: "
                               f"{st.best_step}); their held-out figures must be the same on every rank")
        if st.best_step is None:
            return report
        if st.best_step != st.step and self.best_weights is not None:
            self.engine.module.load_state_dict(self.best_weights)
            last = report.to_dict().get(key, float("nan"))
            self.log(f"exporting the weights of step {st.best_step} "
                     f"({key} {st.best_value:.4f}; the last step scored {last:.4f})")
        return report.with_values({"export_step": st.best_step, f"export_{key}": st.best_value})

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU (ZeRO-3 shards them: gather first)."""
        import deepspeed

        params = list(self.engine.module.parameters())
        gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                  if self.t.zero_stage == 3 else nullcontext())
        with gather:
            return {k: v.detach().to("cpu").clone() for k, v in self.engine.module.state_dict().items()}

    def checkpoint_or_report(self, report: TrainReport) -> None:
        if self.state.step % self.t.checkpoint_every == 0:
            self.save(report.to_dict())
        elif time.perf_counter() - self.last_report >= REPORT_INTERVAL_S:
            self.session.report(report.to_dict())
        else:
            return
        self.last_report = time.perf_counter()

    def save(self, metrics: Metrics, export: bool = False) -> None:
        try:
            self._save(metrics, export)
        except (OSError, RuntimeError) as exc:
            err = explain_write_error(exc, f"the checkpoint of step {self.state.step}", tempfile.gettempdir())
            if err is exc:
                raise
            raise err from exc

    def _save(self, metrics: Metrics, export: bool) -> None:
        with tempfile.TemporaryDirectory() as d:
            if export:
                self.export(Path(d) / "hf")
                if self.session.rank == 0:
                    (Path(d) / FINAL_METRICS).write_text(json.dumps(metrics))
                    write_curves(self.state.history, Path(d), self.name)
            else:
                self.engine.save_checkpoint(str(Path(d) / "deepspeed"), tag="state")
                if self.session.rank == 0 and self.best_weights is not None:
                    torch.save(self.best_weights, Path(d) / BEST_WEIGHTS)
            if self.session.rank == 0:
                (Path(d) / "state.json").write_text(json.dumps(self.state.__dict__))
            self.session.report(metrics, d)

    def export(self, dest: Path) -> None:
        """A HF folder (safetensors) of the full weights, written on rank 0."""
        state_dict = export_state_dict(self.engine.module, self.full_state_dict())
        if self.session.rank == 0:
            self.engine.module.save_pretrained(str(dest), state_dict=state_dict, safe_serialization=True)
            ids = draft_vocab_ids(self.engine.module)
            if ids is not None:  # a full-vocabulary folder for vLLM, plus the subset for draftalign
                write_draft_vocab(dest, ids.tolist())


def evaluate_lm(engine, shard, t: TrainConfig) -> dict[str, float]:
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


def _rounded(metrics: Metrics) -> dict[str, Scalar]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
