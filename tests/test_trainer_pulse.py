"""Pulse tests of the training loops, in-process and without Ray: two steps of the real
Trainer (DeepSpeed included) on a tiny model, with pinned losses, so that a change to a loop
fails `make test-fast` and not only the slow Ray tests (as torchtune's recipe tests do)."""

import socket

import pytest
import torch

from draftalign.config import DistillConfig, LossConfig, OptimConfig, PretrainJob, TrainConfig

VOCAB = 256


class FakeShard:
    """Ray Data's iter_torch_batches over fixed batches."""

    def __init__(self, rows: dict[str, torch.Tensor]) -> None:
        self.rows = rows

    def iter_torch_batches(self, batch_size, dtypes=None, device=None, drop_last=False):
        n = len(next(iter(self.rows.values())))
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.rows.items()}


class FakeSession:
    """Ray Train's side of the loop: one worker, no checkpoint to resume, reports kept."""

    rank, world = 0, 1

    def __init__(self) -> None:
        self.reports: list[tuple[dict, list[str]]] = []

    def get_checkpoint(self):
        return None

    def report(self, metrics, folder=None):
        from pathlib import Path

        files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")) if folder else []
        self.reports.append((dict(metrics), files))


@pytest.fixture(scope="module", autouse=True)
def single_process_group():
    # DeepSpeed wants a launcher's LOCAL_RANK and a process group: a one-process gloo group on
    # a free loopback port.
    import os

    import torch.distributed as dist

    had = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    if had is None:
        os.environ.pop("LOCAL_RANK")


def _llama(seed: int, hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64, bos_token_id=1, eos_token_id=2))


def _train(max_steps: int = 2) -> TrainConfig:
    return TrainConfig(seq_len=16, micro_batch_size=4, max_steps=max_steps, checkpoint_every=1, log_every=1,
                       eval_batches=1)


def _rows(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, 16), generator=g)
    mask = torch.zeros(n, 16, dtype=torch.long)
    mask[:, 6:15] = 1  # "response" positions
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask}


def test_pretraining_pulse_two_steps_with_pinned_losses():
    from draftalign.workers.pretrain_loop import PretrainTask
    from draftalign.workers.trainer import Trainer

    torch.set_num_threads(1)
    job = PretrainJob(arch={"preset": None}, train=_train(), optim=OptimConfig(lr=1e-2, warmup_steps=0))
    rows = _rows(8, 0)
    task = PretrainTask(FakeShard({"input_ids": rows["input_ids"]}), FakeShard({"input_ids": rows["input_ids"]}),
                        job)
    session = FakeSession()
    final = Trainer("pulse pretrain", job.train, job.optim, _llama(0, 32), task, session).fit()
    losses = [m["loss"] for m, _ in session.reports]
    # Step 1 checkpoints (DeepSpeed state + state.json); the last report carries the HF export.
    assert any(f.startswith("deepspeed") for f in session.reports[0][1]) and "state.json" in session.reports[0][1]
    assert "hf/model.safetensors" in session.reports[-1][1]
    assert final["step"] == 2 and "holdout_perplexity" in final
    assert losses == pytest.approx([5.5428, 5.5660], rel=1e-4)


def _distill_task(tmp_path, loss: LossConfig, max_steps: int = 2, eval_every: int = 0):
    from draftalign.workers.distill_loop import DistillLoopConfig, DistillTask
    from draftalign.workers.target_pool import LocalTarget

    target_dir = tmp_path / "target"
    _llama(1, 64).save_pretrained(target_dir)
    d = DistillConfig(output=str(tmp_path), losses=[loss], optim=OptimConfig(lr=1e-2, warmup_steps=0),
                      train=_train(max_steps).model_copy(update={"eval_every": eval_every}))
    cfg = DistillLoopConfig(name="pulse", distill=d, loss=loss, target=str(target_dir), init_from="unused")
    target = LocalTarget(str(target_dir), d.target_pool, str(tmp_path / "cache"))
    return DistillTask(cfg, target, FakeShard(_rows(8, 0)), FakeShard(_rows(4, 1)), VOCAB), d


@pytest.mark.parametrize("loss,pinned", [
    (LossConfig(name="tvd++"), [0.05054, 0.04526]),
    (LossConfig(name="forward_kl"), [0.01890, 0.01768]),
])
def test_distillation_pulse_two_steps_with_pinned_losses(tmp_path, loss, pinned):
    from draftalign.workers.trainer import Trainer

    torch.set_num_threads(1)
    task, d = _distill_task(tmp_path, loss)
    session = FakeSession()
    final = Trainer("pulse distill", d.train, d.optim, _llama(2, 32), task, session).fit()
    assert [m["loss"] for m, _ in session.reports] == pytest.approx(pinned, rel=1e-3)
    assert final["initial_holdout_expected_acceptance"] < final["holdout_expected_acceptance"]
    # 1 held-out batch before, 2 steps, 1 after; the second held-out read is served from the cache
    assert final["pool_requests"] == 4 and final["pool_cached_rows"] == 4


def test_the_export_is_the_best_held_out_evaluation_not_the_last(tmp_path):
    from draftalign.workers.trainer import Trainer

    torch.set_num_threads(1)
    # A learning rate that ruins the drafter after its first evaluation: the export must be the
    # weights of the evaluation that scored best, and the metrics must say which step that was.
    task, d = _distill_task(tmp_path, LossConfig(name="forward_kl"), max_steps=4, eval_every=1)
    d = d.model_copy(update={"optim": OptimConfig(lr=3.0, warmup_steps=0, min_lr_ratio=1.0)})
    session = FakeSession()
    trainer = Trainer("pulse best", d.train, d.optim, _llama(2, 32), task, session)
    final = trainer.fit()
    taus = {m["step"]: m["holdout_tau_gamma3"] for m, _ in session.reports if "holdout_tau_gamma3" in m}
    best = max(taus, key=taus.get)
    assert final["export_step"] == best and final["export_holdout_tau_gamma3"] == pytest.approx(taus[best])
    assert best != 4, taus  # otherwise this test shows nothing
    assert task.evaluate(trainer.engine)["holdout_tau_gamma3"] == pytest.approx(taus[best], abs=1e-6)


class FinishedCheckpoint:
    """Ray Train's latest checkpoint of a run that finished: the export, no DeepSpeed state."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def as_directory(self):
        from contextlib import nullcontext

        return nullcontext(str(self.folder))


def test_a_rerun_after_the_final_checkpoint_publishes_it_again_instead_of_resuming(tmp_path):
    import json

    from draftalign.workers.pretrain_loop import PretrainTask
    from draftalign.workers.trainer import FINAL_METRICS, Trainer

    # Before: the rerun handed the export checkpoint to DeepSpeed's loader, which failed with a bare
    # AssertionError on every later try (a model/ folder deleted to retrain could never be rebuilt).
    job = PretrainJob(arch={"preset": None}, train=_train(), optim=OptimConfig(lr=1e-2, warmup_steps=0))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / FINAL_METRICS).write_text(json.dumps({"step": 2, "loss": 5.0}))
    session = FakeSession()
    session.get_checkpoint = lambda: FinishedCheckpoint(tmp_path)
    rows = _rows(8, 0)["input_ids"]
    task = PretrainTask(FakeShard({"input_ids": rows}), FakeShard({"input_ids": rows}), job)
    final = Trainer("pulse rerun", job.train, job.optim, _llama(0, 32), task, session).fit()
    assert final == {"step": 2, "loss": 5.0}
    assert session.reports == [({"step": 2, "loss": 5.0}, ["hf", "hf/model.safetensors", FINAL_METRICS])]


class KeepingSession(FakeSession):
    """FakeSession that keeps a copy of the last folder reported (the export)."""

    def __init__(self, keep) -> None:
        super().__init__()
        self.keep = keep

    def report(self, metrics, folder=None):
        import shutil

        super().report(metrics, folder)
        if folder:
            shutil.rmtree(self.keep, ignore_errors=True)
            shutil.copytree(folder, self.keep)


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_a_tracked_run_logs_every_log_step_and_draws_its_curves(tmp_path, backend):
    import json

    from draftalign.training.plots import CURVES_FILE, HISTORY_FILE
    from draftalign.training.tracking import TrackingRun
    from draftalign.workers.trainer import Trainer
    from tests.trackread import mlflow_runs, tensorboard_scalars

    torch.set_num_threads(1)
    task, d = _distill_task(tmp_path, LossConfig(name="forward_kl"), max_steps=2, eval_every=1)
    uri = str(tmp_path / "tb") if backend == "tensorboard" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = TrackingRun(backend, uri, "pulse-exp", "pulse-distill")
    session = KeepingSession(tmp_path / "export")
    Trainer("pulse tracked", d.train, d.optim, _llama(2, 32), task, session, tracking=tracking,
            params={"distill": d.model_dump(mode="json")}).fit()
    reported = {m["step"]: m for m, _ in session.reports}
    if backend == "tensorboard":
        logged = tensorboard_scalars(tmp_path / "tb")
    else:
        run = mlflow_runs(uri, "pulse-exp")["pulse-distill"]
        assert run["params"]["distill.optim.lr"] == "0.01"
        logged = run["metrics"]
    # Every log step's metrics, the held-out ones from the evaluation before training on (step 0).
    assert [s for s, _ in logged["loss"]] == [1, 2]
    assert [v for _, v in logged["loss"]] == pytest.approx([reported[1]["loss"], reported[2]["loss"]], rel=1e-6)
    assert [s for s, _ in logged["holdout_expected_acceptance"]] == [0, 1, 2]
    assert logged["holdout_expected_acceptance"][-1][1] == pytest.approx(
        reported[2]["holdout_expected_acceptance"], rel=1e-6)
    assert {"lr", "tokens_per_s", "pool_queue_depth"} <= set(logged)
    assert not any(k.startswith("initial_") for k in logged)
    # The export carries the curves: the history (steps 0, 1, 2) and its plot.
    history = json.loads((tmp_path / "export" / HISTORY_FILE).read_text())["points"]
    assert [p["step"] for p in history] == [0, 1, 2] and "loss" not in history[0]
    assert (tmp_path / "export" / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("free_mib,named", [(10, True), (50_000, False)])
def test_a_checkpoint_that_fails_on_a_nearly_full_disk_says_so(monkeypatch, free_mib, named):
    # torch reports a full disk as "unexpected pos ..."; the run must name the disk and what to do.
    import shutil
    from collections import namedtuple

    from draftalign.workers.pretrain_loop import PretrainTask
    from draftalign.workers.trainer import Trainer

    job = PretrainJob(arch={"preset": None}, train=_train(), optim=OptimConfig(lr=1e-2, warmup_steps=0))
    rows = _rows(8, 0)
    task = PretrainTask(FakeShard({"input_ids": rows["input_ids"]}), FakeShard({"input_ids": rows["input_ids"]}), job)
    trainer = Trainer("pulse disk", job.train, job.optim, _llama(0, 32), task, FakeSession())

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 141574592 vs 141574480")

    monkeypatch.setattr(trainer.engine, "save_checkpoint", full)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, free_mib << 20))
    with pytest.raises((OSError, RuntimeError)) as err:
        trainer.save({"step": 1})
    text = str(err.value)
    assert ("the disk is nearly full" in text and f"{free_mib} MiB free" in text) == named
    assert "unexpected pos" in text
