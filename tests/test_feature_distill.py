"""The feature drafter's distillation step without Ray: the training-time-test loss of every loss
function, weighted by draft, against the target's distribution where each draft lands."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from draftalign.config import DistillConfig, LossConfig
from draftalign.models.feature import feature_from_target, feature_spec, restrict_head, unrolled_logits
from draftalign.training.losses import SupportTargetLogprobs, get_loss, loss_options
from draftalign.workers.distill_loop import DistillLoopConfig, FeatureDistillTask
from tests.test_specdecode import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")
V = 64
SUPPORT = list(range(0, V, 2))


@pytest.fixture(scope="module")
def world():
    target = tiny_llama(0, vocab=V, hidden=64, layers=4, heads=2, lm_scale=4.0)
    ids = torch.tensor([[5, 9, 2, 7, 3, 8, 1, 0, 0], [3, 14, 15, 9, 26, 5, 35, 8, 9]])
    attn = (torch.arange(9)[None] < torch.tensor([[7], [9]])).long()
    loss_mask = attn.clone()
    loss_mask[:, 0] = 0
    loss_mask[0, 6:] = 0  # the last real position predicts nothing
    loss_mask[1, 8] = 0
    with torch.no_grad():
        out = target(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    spec = feature_spec(target.config)
    features = torch.cat([out.hidden_states[i] for i in spec.target_layers], -1)
    logp = torch.log_softmax(out.logits, -1)[..., SUPPORT]
    reply = {"support_logprobs": logp[loss_mask.bool()].numpy(), "features": features[attn.bool()].numpy()}
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}
    return SimpleNamespace(target=target, spec=spec, batch=batch, reply=reply, logp=logp, features=features)


def _task(world, loss: LossConfig, steps: int):
    d = DistillConfig(output="x", ttt_steps=steps, ttt_decay=0.5)
    task = FeatureDistillTask(DistillLoopConfig(name="t", distill=d, loss=loss, target="t", init_from="i"),
                              None, None, None, V)
    task.draft_vocab = torch.tensor(SUPPORT)
    draft = feature_from_target(world.target, world.spec)
    restrict_head(draft, SUPPORT)
    draft.embed_tokens.weight.requires_grad_(False)
    return task, SimpleNamespace(module=draft.train(), device=torch.device("cpu"))


def _by_hand(world, draft, loss: LossConfig, steps: int, decay: float) -> torch.Tensor:
    """Σ_j w_j mean_j / Σ_j w_j, draft j at position t scored by the target's row at t + 1 (anchor t − j + 1)."""
    mask = world.batch["loss_mask"].bool()
    fn, total, weights = get_loss(loss.name), 0.0, 0.0
    logits = unrolled_logits(draft, world.features, world.batch["input_ids"], steps)
    for j, lg in enumerate(logits, start=1):
        terms = []
        for b in range(2):
            for t in range(j - 1, 8):
                if mask[b, t + 1]:
                    target = SupportTargetLogprobs(world.logp[b, t + 1][None, None])
                    one = torch.ones(1, 1, dtype=torch.bool)
                    terms.append(fn(lg[b, t][None, None], target, one, draft_vocab=torch.tensor(SUPPORT),
                                    **loss_options(loss))[0, 0])
        total, weights = total + decay ** (j - 1) * torch.stack(terms).mean(), weights + decay ** (j - 1)
    return total / weights


@pytest.mark.parametrize("name", ["forward_kl", "tvd++", "lk", "reverse_kl"])
def test_the_unrolled_loss_weighs_each_draft_at_the_position_it_predicts(world, name):
    loss = LossConfig(name=name, drafter_kind="feature")
    task, engine = _task(world, loss, steps=3)
    torch.manual_seed(0)  # tvd++'s sampled variant is not used; nothing else draws
    got, tokens = task.loss(engine, (world.batch, world.reply))
    want = _by_hand(world, engine.module, loss, 3, 0.5)
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-5)
    assert tokens == int(world.batch["loss_mask"][:, 1:].sum())  # draft 1 is scored wherever the next row is
    got.backward()
    draft = engine.module
    assert draft.fc.weight.grad is not None and draft.fc.weight.grad.abs().sum() > 0
    assert draft.lm_head.weight.grad.abs().sum() > 0 and draft.embed_tokens.weight.grad is None


def test_held_out_figures_chain_the_unrolled_drafts(world):
    task, engine = _task(world, LossConfig(name="forward_kl", drafter_kind="feature"), steps=2)
    task.target = SimpleNamespace(stream=lambda items: ((i, b, world.reply) for i, b in items))
    task.holdout_batches = lambda: iter([(0, world.batch)])
    with torch.no_grad():
        figures = task.evaluate(engine)
    # eval_gamma 3 unrolls a third draft beyond the two trained ones
    for j in (1, 2, 3):
        assert 0.0 < figures[f"holdout_expected_acceptance_draft{j}"] < 1.0
    assert figures["holdout_expected_acceptance"] == pytest.approx(figures["holdout_expected_acceptance_draft1"])
    assert 1.0 <= figures["holdout_tau_gamma3"] <= 1.0 + 3 * figures["holdout_expected_acceptance_draft1"]
    assert np.isfinite(figures["holdout_loss"])
