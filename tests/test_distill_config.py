"""Distill config combinations that would silently change the training objective are refused."""

from pathlib import Path

import pytest

from draftalign.config import ConfigError, load_config

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"


@pytest.mark.parametrize("variant", ["vocab", "exact", "sampled"])
def test_tvdpp_with_a_topk_target_is_refused_naming_both_keys(variant):
    # with the tail filled flat the vocab variant's gradient had cosine 0.014 with the full-vocabulary
    # gradient at k = 20: another objective, not an approximation
    overrides = [f"distill.losses=[{{name: tvd, variant: vocab}}, {{name: tvd++, variant: {variant}}}]",
                 "distill.target_pool.top_k=20"]
    with pytest.raises(ConfigError, match=r"distill\.target_pool\.top_k.*distill\.losses"):
        load_config(TINY, overrides)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "tvd"])
def test_other_losses_accept_a_topk_target(loss):
    cfg = load_config(TINY, [f"distill.losses=[{{name: {loss}}}]", "distill.target_pool.top_k=20"])
    assert cfg.distill.target_pool.top_k == 20 and [x.name for x in cfg.distill.losses] == [loss]


def test_tvdpp_with_the_full_vocabulary_is_fine():
    assert load_config(TINY, ["distill.losses=[{name: tvd++}]"]).distill.target_pool.top_k is None


def test_a_variant_is_refused_for_a_loss_that_has_none():
    # LossConfig.variant only means something to tvd++; elsewhere it was silently ignored
    with pytest.raises(ConfigError, match="variant=exact applies to tvd\\+\\+ only"):
        load_config(TINY, ["distill.losses=[{name: tvd, variant: exact}]"])


def test_each_loss_trains_into_its_own_folder_and_a_repeat_is_refused():
    cfg = load_config(TINY, ["distill.losses=[{name: tvd++}, {name: tvd++, variant: sampled}, {name: forward_kl}]"])
    assert [cfg.distilled_path(x).split("/")[-2] for x in cfg.distill.losses] == ["tvdpp", "tvdpp-sampled",
                                                                                  "forward_kl"]
    with pytest.raises(ConfigError, match="lists a loss twice"):
        load_config(TINY, ["distill.losses=[{name: tvd}, {name: tvd}]"])


def test_an_unknown_loss_is_refused_naming_the_registered_ones():
    # the names come from losses.LOSSES alone: registering a loss there is all the config needs
    with pytest.raises(ConfigError, match=r"distill\.losses\.0\.name.*unknown loss 'kl'; known: forward_kl, "
                                          r"lk, lk_hybrid, reverse_kl, tvd, tvd\+\+"):
        load_config(TINY, ["distill.losses=[{name: kl}]"])


def test_eta_belongs_to_lk_hybrid_and_names_its_folder_when_not_the_default():
    cfg = load_config(TINY, ["distill.losses=[{name: lk_hybrid}, {name: lk_hybrid, eta: 1.5}, {name: lk}]"])
    assert [(loss.label, loss.folder) for loss in cfg.distill.losses] == [
        ("lk_hybrid", "lk_hybrid"), ("lk_hybrid-eta1.5", "lk_hybrid-eta1.5"), ("lk", "lk")]
    with pytest.raises(ConfigError, match="eta=1.5 applies to lk_hybrid only, not to tvd"):
        load_config(TINY, ["distill.losses=[{name: tvd, eta: 1.5}]"])
