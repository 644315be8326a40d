"""Speculative-decoding metric definitions (vLLM's), on hand-made cases."""

from __future__ import annotations

import random

import numpy as np
import pytest

from draftalign.evaluation.metrics import (
    SpecStats,
    acceptance_of_tested,
    acceptance_per_position,
    acceptance_rate,
    block_efficiency,
    implied_block_efficiency,
    mbsu,
)


def test_block_efficiency_and_acceptance_rate():
    # 10 drafts of gamma = 3: 18 of 30 draft tokens accepted -> tau = 1 + 18/10
    assert block_efficiency(18, 10) == pytest.approx(2.8)
    assert block_efficiency(18, 10, gamma=3) == pytest.approx(2.8)
    assert acceptance_rate(18, 30) == pytest.approx(0.6)
    assert block_efficiency(0, 0) == 1.0  # zero drafts: documented convention
    assert acceptance_rate(0, 0) == 0.0


def test_acceptance_per_position():
    assert acceptance_per_position([9, 6, 3], 10) == pytest.approx([0.9, 0.6, 0.3])
    assert acceptance_per_position([0, 0], 0) == [0.0, 0.0]


def test_mbsu_paper_values():
    assert mbsu(2.3, 3, 0.0164) == pytest.approx(2.19, abs=0.005)
    assert mbsu(2.3, 5, 0.0164) == pytest.approx(2.13, abs=0.005)
    assert mbsu(2.3, 3, 0.0) == pytest.approx(2.3)


def test_implied_block_efficiency():
    assert implied_block_efficiency(1.0, 3) == 4.0
    assert implied_block_efficiency(0.0, 3) == 1.0
    alpha, gamma = 0.6, 3
    assert implied_block_efficiency(alpha, gamma) == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha))
    assert implied_block_efficiency(1 - 1e-12, 5) == pytest.approx(6.0)


def test_tested_acceptance_counts_one_rejection_per_block_stopped_before_gamma():
    # 4 blocks at γ = 3 accepting 3, 1, 1, 0: 5 accepted, 3 rejections (blocks short of γ)
    assert acceptance_of_tested(5, 4, [3, 1, 1]) == pytest.approx(5 / 8)
    assert acceptance_of_tested(6, 2, [2, 2, 2]) == 1.0  # nothing rejected
    assert acceptance_of_tested(0, 0, [0, 0]) == 0.0
    with pytest.raises(ValueError):
        acceptance_of_tested(1, 1, [1, 1, 2])


def test_expected_acceptance_is_one_minus_tvd():
    import torch

    from draftalign.training.losses import expected_acceptance

    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(20)), rng.dirichlet(np.ones(20))
    beta = expected_acceptance(torch.from_numpy(p), torch.from_numpy(q))
    assert float(beta) == pytest.approx(1 - 0.5 * np.abs(p - q).sum())


@pytest.mark.parametrize(
    "call",
    [
        lambda: block_efficiency(-1, 3),
        lambda: block_efficiency(3, 0),
        lambda: block_efficiency(10, 3, gamma=3),
        lambda: block_efficiency(1.5, 3),
        lambda: acceptance_rate(5, 4),
        lambda: acceptance_rate(1, -1),
        lambda: acceptance_per_position([4, 2], 3),
        lambda: mbsu(5.0, 3, 0.01),
        lambda: mbsu(0.5, 3, 0.01),
        lambda: mbsu(2.0, 3, -0.1),
        lambda: implied_block_efficiency(1.5, 3),
        lambda: implied_block_efficiency(0.5, -1),
    ],
)
def test_invalid_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


def test_specstats_properties_and_merge():
    a = SpecStats(num_drafts=10, num_draft_tokens=30, num_accepted=18, accepted_per_pos=[9, 6, 3], gamma=3)
    assert a.num_emitted == 28 and a.accepted_per_pos == (9, 6, 3)
    assert a.block_efficiency == pytest.approx(2.8)
    assert a.acceptance_rate == pytest.approx(0.6)
    assert a.acceptance_per_position == pytest.approx([0.9, 0.6, 0.3])
    assert a.mbsu(0.0164) == pytest.approx(2.8 / (1 + 3 * 0.0164))
    b = SpecStats(5, 12, 3, (2, 1, 0), 7, 3)
    pooled = a + b
    # pooled over drafts, not a mean of the two per-prompt values
    assert pooled == SpecStats(15, 42, 21, (11, 7, 3), 35, 3)
    assert pooled.block_efficiency == pytest.approx(35 / 15)  # b ended on an accepted EOS: 7 tokens, not 8
    assert sum([a, b]) == pooled == a.merge(b)
    assert SpecStats.empty(3) + a == a
    assert SpecStats.empty(3).block_efficiency == 1.0 and SpecStats.empty(3).acceptance_rate == 0.0
    with pytest.raises(ValueError, match="gamma"):
        a + SpecStats.empty(2)


def test_specstats_from_iterations():
    s = SpecStats.from_iterations(3, [(3, 3, 4), (3, 1, 2), (3, 0, 1), (1, 1, 1)])
    assert s == SpecStats(4, 10, 5, (3, 1, 1), 8, 3)
    # the last one ended on an accepted EOS draft: no bonus token, so τ = 8 emitted / 4 calls, not 1 + 5/4
    assert s.block_efficiency == 2.0
    for impossible in [(4, 1, 2), (3, 2, 1), (3, 2, 4), (0, 0, 0)]:
        with pytest.raises(ValueError, match="impossible iteration"):
            SpecStats.from_iterations(3, [impossible])


@pytest.mark.parametrize(
    "kwargs",
    [
        # accepted > drafted; drafted > gamma * drafts
        dict(num_drafts=2, num_draft_tokens=6, num_accepted=7, accepted_per_pos=(2, 2, 3)),
        dict(num_drafts=2, num_draft_tokens=7, num_accepted=3, accepted_per_pos=(2, 1, 0)),
        dict(num_drafts=-1, num_draft_tokens=0, num_accepted=0, accepted_per_pos=(0,)),
        dict(num_drafts=2, num_draft_tokens=6, num_accepted=3, accepted_per_pos=(1, 2, 0)),  # not non-increasing
        dict(num_drafts=2, num_draft_tokens=6, num_accepted=4, accepted_per_pos=(2, 1, 0)),  # sum mismatch
        dict(num_drafts=2, num_draft_tokens=6, num_accepted=3, accepted_per_pos=(2, 1)),  # length != gamma
        dict(num_drafts=2, num_draft_tokens=6, num_accepted=3, accepted_per_pos=(2, 1, 0), num_emitted=6),
        dict(num_drafts=2, num_draft_tokens=6, num_accepted=3, accepted_per_pos=(3, 0, 0)),  # > num_drafts
        dict(num_drafts=0, num_draft_tokens=0, num_accepted=0, accepted_per_pos=(0, 0, 0), num_emitted=1),
    ],
)
def test_specstats_invalid(kwargs):
    kwargs.setdefault("gamma", 3)
    with pytest.raises(ValueError):
        SpecStats(**kwargs)


def test_tau_never_exceeds_gamma_plus_one():
    rng = random.Random(0)
    for _ in range(300):
        gamma = rng.randint(1, 8)
        iters = []
        for _ in range(rng.randint(0, 20)):
            drafted = rng.randint(0, gamma)
            accepted = rng.randint(0, drafted)
            iters.append((drafted, accepted, accepted + rng.choice([0, 1]) if accepted else 1))
        s = sum((SpecStats.from_iterations(gamma, [it]) for it in iters), SpecStats.empty(gamma))
        assert 1.0 <= s.block_efficiency <= gamma + 1
        assert s.block_efficiency <= block_efficiency(s.num_accepted, s.num_drafts, gamma) + 1e-12
        assert 0.0 <= s.acceptance_rate <= 1.0
        assert sum(s.acceptance_per_position) == pytest.approx(block_efficiency(s.num_accepted, s.num_drafts) - 1)
