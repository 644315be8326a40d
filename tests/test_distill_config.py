"""Distill config combinations that would silently change the training objective are refused."""

from pathlib import Path

import pytest

from draftalign.config import ConfigError, load_config

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"


@pytest.mark.parametrize("variant", ["vocab", "exact", "sampled"])
def test_tvdpp_with_a_topk_target_is_refused_naming_both_keys(variant):
    # with the tail filled flat the vocab variant's gradient had cosine 0.014 with the full-vocabulary
    # gradient at k = 20: another objective, not an approximation
    overrides = ["distill.loss.name=tvd++", f"distill.loss.variant={variant}", "distill.target_pool.top_k=20"]
    with pytest.raises(ConfigError, match=r"distill\.target_pool\.top_k.*distill\.loss"):
        load_config(TINY, overrides)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "tvd"])
def test_other_losses_accept_a_topk_target(loss):
    cfg = load_config(TINY, [f"distill.loss.name={loss}", "distill.target_pool.top_k=20"])
    assert cfg.distill.target_pool.top_k == 20 and cfg.distill._loss_names() == [loss]


def test_tvdpp_with_the_full_vocabulary_is_fine():
    assert load_config(TINY, ["distill.loss.name=tvd++"]).distill.target_pool.top_k is None
