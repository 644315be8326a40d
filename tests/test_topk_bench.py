"""bench/topk_tail_error.py: its gradient comparison and its message for a missing world."""

import pytest
import torch

from tests.benches import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("topk_tail_error")


def test_a_missing_world_is_named_before_any_work(bench, tmp_path):
    with pytest.raises(SystemExit, match=r"no toy world in .*pretrain/target/model.*make demo-toy"):
        bench.main(["--run", str(tmp_path)])


def test_gradient_cosines_are_one_for_the_full_target_and_flag_tvdpp_under_topk(bench):
    from draftalign.training.losses import densify_topk, sparsify_topk

    g = torch.Generator().manual_seed(0)
    vocab = 500
    # a heavy-tailed target, as the toy target's: most mass outside the top 20
    full = torch.log_softmax(torch.randn(64, vocab, generator=g), -1)
    draft = torch.randn(64, vocab, generator=g)
    same = bench.gradient_cosines(draft, full, full)
    assert set(same) == {"forward_kl", "reverse_kl", "tvd", "tvd++ vocab", "tvd++ exact"}
    assert all(c == pytest.approx(1.0, abs=1e-5) for c in same.values())
    topk = bench.gradient_cosines(draft, full, densify_topk(sparsify_topk(full, 20), vocab))
    assert all(-1.0 <= c <= 1.0 for c in topk.values())
    assert topk["tvd++ vocab"] < 0.9 * topk["forward_kl"], topk
