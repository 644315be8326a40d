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


def test_a_loss_seed_names_its_drafter_and_folder():
    cfg = load_config(TINY, ["distill.losses=[{name: tvd++}, {name: tvd++, seed: 1}, "
                             "{name: tvd++, variant: exact, seed: 2}]"])
    assert [(loss.label, loss.folder) for loss in cfg.distill.losses] == [
        ("tvd++", "tvdpp"), ("tvd++-seed1", "tvdpp-seed1"), ("tvd++-exact-seed2", "tvdpp-exact-seed2")]
    with pytest.raises(ConfigError, match="lists a loss twice"):
        load_config(TINY, ["distill.losses=[{name: tvd, seed: 1}, {name: tvd, seed: 1}]"])


@pytest.mark.parametrize("seed", [None, 3])
def test_a_loss_seed_reaches_the_trainer_and_the_fingerprint(monkeypatch, tmp_path, seed):
    # The sensitivity runs train one loss under several seeds: each must shuffle and train with its
    # own, and must not reuse another seed's drafter.
    from types import SimpleNamespace

    import draftalign.cluster.session as session
    import draftalign.pipelines.distill as distill

    cfg = load_config(TINY, [f"run.output={tmp_path}", "distill.train.seed=7"])
    loss = cfg.distill.losses[0].model_copy(update={"seed": seed})
    seen = {}
    monkeypatch.setattr(session, "init_ray", lambda ray_cfg: None)
    monkeypatch.setattr(distill, "_split", lambda inputs, d, pad_id: (seen.setdefault("split", d.train.seed), None))
    monkeypatch.setattr(distill, "fit", lambda loop, loop_config, train, *rest: loop_config)
    inputs = SimpleNamespace(target="t", init_from="d", draft_vocab=None, pad_id=0, identity=("a", "b"),
                             files=[], on_policy_files=())
    loop_config = distill._fit(cfg, loss, inputs, tmp_path)
    assert seen["split"] == loop_config.distill.train.seed == (7 if seed is None else seed)
    unseeded = cfg.distill.losses[0]
    assert (distill._fingerprint(cfg, loss, inputs) == distill._fingerprint(cfg, unseeded, inputs)) == (seed is None)


def test_a_feature_drafter_is_its_own_job_and_its_losses_are_named_after_it():
    cfg = load_config(TINY, ['pretrain.jobs.feature={arch: {feature: {layers: [1, 2, 3]}}, train: null}',
                             "distill.losses=[{name: forward_kl, drafter_kind: feature}, {name: forward_kl}]"])
    feature, draft = cfg.distill.losses
    assert (feature.label, feature.folder, draft.label) == ("feature-forward_kl", "feature-forward_kl", "forward_kl")
    assert cfg.start_path(feature).endswith("pretrain/feature/model") and cfg.start_path(draft) == cfg.draft_path()
    assert (cfg.distill.ttt_steps, cfg.distill.ttt_decay) == (3, 0.8)  # EAGLE-3's unroll, SpecForge's weights


@pytest.mark.parametrize(("overrides", "message"), [
    (['pretrain.jobs.draft={arch: {feature: {}}, train: null}'], r"arch\.feature builds .*; remove preset"),
    (['pretrain.jobs.feature={arch: {preset: toy-drafter}}'], r"pretrain\.jobs\.feature needs arch\.feature"),
    (['pretrain.jobs.feature={arch: {feature: {}}}'], r"set train: null"),
    (['pretrain.jobs.feature={arch: {feature: {}, target_layers: [0]}, train: null}'], r"keep one"),
    (["distill.losses=[{name: forward_kl, drafter_kind: feature}]", "distill.on_policy.fraction=0.5",
      "distill.on_policy.rounds=1"], r"feature drafter cannot answer alone"),
    (["distill.ttt_steps=0"], r"distill\.ttt_steps"),
])
def test_feature_drafter_settings_that_cannot_work_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_only_the_feature_job_builds_a_feature_drafter():
    with pytest.raises(ConfigError, match=r"pretrain\.jobs\.feature, and only it"):
        load_config(None, ['pretrain.jobs.draft={arch: {feature: {}}, train: null}'])
