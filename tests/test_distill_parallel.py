"""Data-parallel distillation without Ray: W ranks at micro-batch m train and evaluate as one rank
at W·m (the Ray Train run of both is in tests/test_distill_ray.py). Ranks here are task objects
in one process; the one all-reduce the loss makes (the global position count) is played by hand."""

from types import SimpleNamespace

import pytest
import torch

from draftalign.config import DistillConfig, LossConfig, OptimConfig, TrainConfig
from tests.test_trainer_pulse import FakeShard

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, SEQ = 256, 16


def _llama(seed: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64, bos_token_id=1, eos_token_id=2))


def _rows(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Rows of different lengths and response starts: the ranks' halves hold different position
    counts, so a mean of the ranks' means would differ from the global mean."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    attn, mask = torch.zeros(n, SEQ, dtype=torch.long), torch.zeros(n, SEQ, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(8, SEQ + 1, (1,), generator=g))
        start = int(torch.randint(2, length - 3, (1,), generator=g))
        attn[i, :length] = 1
        mask[i, start - 1:length - 1] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 4-layer target on disk (the feature drafter reads three of its layers) and both drafters."""
    from draftalign.models.feature import feature_from_target, feature_spec

    root = tmp_path_factory.mktemp("dp")
    target = _llama(0, 64, 4)
    target.save_pretrained(root / "target")
    feature = feature_from_target(target, feature_spec(target.config, [0, 2, 3]))
    return {"root": root, "draft": _llama(1, 32, 1), "feature": feature}


def _task(world, feature: bool, micro: int, rank: int = 0, ranks: int = 1, eval_batches: int = 3):
    from draftalign.workers.distill_loop import DistillLoopConfig, DistillTask, FeatureDistillTask
    from draftalign.workers.target_pool import LocalTarget

    loss = LossConfig(name="tvd++", drafter_kind="feature" if feature else "draft")
    train = TrainConfig(seq_len=SEQ, micro_batch_size=micro, eval_batches=eval_batches, num_workers=ranks)
    d = DistillConfig(output=str(world["root"]), losses=[loss], optim=OptimConfig(), train=train, ttt_steps=2)
    cfg = DistillLoopConfig(name="dp", distill=d, loss=loss, target=str(world["root"] / "target"), init_from="-")
    layers = tuple(world["feature"].spec.target_layers) if feature else None
    target = LocalTarget(cfg.target, d.target_pool, None, None, layers)
    kind = FeatureDistillTask if feature else DistillTask
    # 10 held-out rows: three global batches of 4, the last one only reaches rank 0 of two.
    return kind(cfg, target, FakeShard(_rows(8, 0)), FakeShard(_rows(10, 1)), VOCAB, rank=rank, world=ranks)


def _engine(world, feature: bool):
    return SimpleNamespace(module=world["feature" if feature else "draft"], device=torch.device("cpu"))


@pytest.mark.parametrize("feature", [False, True], ids=["draft", "feature"])
def test_two_ranks_score_the_held_out_rows_of_one_rank_at_twice_the_micro_batch(world, feature):
    engine = _engine(world, feature)
    one = _task(world, feature, micro=4)
    ranks = [_task(world, feature, micro=2, rank=r, ranks=2) for r in (0, 1)]
    rows = lambda task: sorted(tuple(r.tolist()) for _, b in task.holdout_batches() for r in b["input_ids"])  # noqa: E731
    assert sorted(rows(ranks[0]) + rows(ranks[1])) == rows(one) and len(rows(one)) == 10
    assert not set(rows(ranks[0])) & set(rows(ranks[1]))  # each row scored once
    totals = [task.heldout_totals(engine) for task in ranks]
    summed = {k: totals[0][k] + totals[1][k] for k in totals[0]}
    alone = one.heldout_totals(engine)
    assert summed == pytest.approx(alone, rel=1e-5)
    # Every figure, the held-out loss included, comes from those totals: the same as one rank's.
    assert ranks[0].figures(summed) == pytest.approx(one.evaluate(engine), rel=1e-5)
    assert {"holdout_loss", "holdout_tau_gamma3", "holdout_expected_acceptance"} <= set(one.evaluate(engine))


def _two_rank_loss(tasks, items, engine) -> torch.Tensor:
    """The ranks' losses averaged as DeepSpeed averages their gradients; each rank's global
    position counts are what sum_across_workers would have returned."""
    local: list[list[int]] = []
    for task, item in zip(tasks, items, strict=True):
        task._global_counts = lambda counts, device: (local.append(counts), [float(c) for c in counts])[1]
        task.loss(engine, item)
    total = [float(sum(c)) for c in zip(*local, strict=True)]
    for task in tasks:
        task._global_counts = lambda counts, device: total
    return sum(task.loss(engine, item)[0] for task, item in zip(tasks, items, strict=True)) / len(tasks)


@pytest.mark.parametrize("feature", [False, True], ids=["draft", "feature"])
def test_two_ranks_step_on_the_gradient_of_one_rank_at_twice_the_micro_batch(world, feature):
    engine = _engine(world, feature)
    one = _task(world, feature, micro=4)
    ranks = [_task(world, feature, micro=2, rank=r, ranks=2) for r in (0, 1)]
    batch = {k: v[:4] for k, v in _rows(8, 0).items()}
    halves = [{k: v[2 * r:2 * r + 2] for k, v in batch.items()} for r in (0, 1)]
    assert halves[0]["loss_mask"].sum() != halves[1]["loss_mask"].sum()  # else a mean of means would pass too
    params = [p for p in engine.module.parameters() if p.requires_grad]

    def loss_and_grads(loss):
        engine.module.zero_grad()
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in params if p.grad is not None]

    alone, g_alone = loss_and_grads(one.loss(engine, (batch, one.target.compute(batch)))[0])
    items = [(h, one.target.compute(h)) for h in halves]
    both, g_both = loss_and_grads(_two_rank_loss(ranks, items, engine))
    assert both == pytest.approx(alone, rel=1e-5)
    assert len(g_both) == len(g_alone) > 0
    for a, b in zip(g_both, g_alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
