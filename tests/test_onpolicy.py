"""On-policy data without Ray: the generator and on-policy config, the mixture plan, the sets'
fingerprints and checks, the rounds' derived configs and folders (the Ray run is in
tests/test_onpolicy_ray.py)."""

import ast
import json
from pathlib import Path

import pytest

from draftalign.config import ConfigError, load_config
from draftalign.training.mixture import ON_POLICY, TARGET, cut_for, mixture_counts, plan_mixture, row_rank
from tests.worlds import distill_set, stub_engine_passes, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny.yaml"


# ---- config -----------------------------------------------------------------------------------------

def test_the_generator_is_the_target_by_default_and_can_be_the_drafter_or_any_folder(tmp_path):
    cfg = load_config(TINY, [f"run.output={tmp_path}"])
    assert cfg.generate.generator == "target" and cfg.generator_path() == cfg.target_path()
    assert load_config(TINY, ["generate.generator=draft", "models.draft=/m/d"]).generator_path() == "/m/d"
    assert load_config(TINY, ["generate.generator=/some/folder"]).generator_path() == "/some/folder"
    with pytest.raises(ConfigError, match="generate.generator"):
        load_config(TINY, ["generate.generator="])


@pytest.mark.parametrize(("overrides", "named"), [
    (["distill.on_policy.fraction=0.5"], "distill.on_policy.fraction=0.5 needs distill.on_policy.data"),
    (["distill.on_policy.rounds=2"], "distill.on_policy.rounds=2 needs distill.on_policy.fraction > 0"),
    (["distill.on_policy.fraction=0.5", "distill.on_policy.rounds=1", "distill.on_policy.data=/x"],
     "distill.on_policy.data cannot be set with distill.on_policy.rounds"),
    (["distill.on_policy.data=/x"], "distill.on_policy.data is set but distill.on_policy.fraction is 0"),
    (["distill.on_policy.fraction=1", "distill.on_policy.data=/x",
      "distill.on_policy.sampling=[{name: g, temperature: 0}]"], "distill.on_policy.sampling applies to the rounds"),
    (["distill.on_policy.fraction=1", "distill.on_policy.rounds=1", "distill.on_policy.round=1"],
     "distill.on_policy.round is set by `draftalign run`"),
    (["distill.on_policy.fraction=1.5"], "distill.on_policy.fraction"),
    (["distill.on_policy.lmbda=0.5"], "unknown config key 'distill.on_policy.lmbda'"),
])
def test_bad_on_policy_combinations_are_refused_naming_the_keys(overrides, named):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert named in str(err.value)


def test_on_policy_drafters_are_named_and_placed_by_lambda_and_round(tmp_path):
    off = load_config(TINY, [f"run.output={tmp_path}"])
    loss = off.distill.losses[0]
    assert off.distill.drafter_label(loss) == "tvd++" and off.distilled_path(loss) == f"{tmp_path}/distill/tvdpp/model"
    assert off.round_paths(loss) == []
    one = load_config(TINY, [f"run.output={tmp_path}", "distill.on_policy.fraction=0.5", "distill.on_policy.data=/s"])
    assert one.distill.drafter_label(loss) == "tvd++-onpolicy0.5"
    assert one.distilled_path(loss) == f"{tmp_path}/distill/tvdpp-onpolicy0.5/model"
    rounds = load_config(TINY, [f"run.output={tmp_path}", "distill.on_policy.fraction=1", "distill.on_policy.rounds=2"])
    assert rounds.round_paths(loss) == [f"{tmp_path}/distill/rounds/round-{r}/tvdpp-onpolicy1/model" for r in (1, 2)]
    assert rounds.distilled_path(loss) == rounds.round_paths(loss)[-1]  # what evaluate and the API take


# ---- the mixture ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n_target", "n_on_policy", "fraction", "expected"), [
    (100, 100, 0.0, (100, 0)), (100, 100, 1.0, (0, 100)),
    (100, 100, 0.5, (100, 100)),  # equal sets: every row of both
    (100, 100, 0.25, (100, 33)),  # the target set is whole, a third as many on-policy rows
    (100, 100, 0.75, (33, 100)),
    (100, 10, 0.5, (10, 10)),  # a small on-policy set caps the mixture
    (10, 0, 0.5, (0, 0)),  # nothing to mix: the pipeline refuses it
    (7, 9, 0.3, (7, 3)),
])
def test_mixture_counts_are_the_largest_exact_mixture_without_repeats(n_target, n_on_policy, fraction, expected):
    k_target, k_on_policy = mixture_counts(n_target, n_on_policy, fraction)
    assert (k_target, k_on_policy) == expected
    assert k_target <= n_target and k_on_policy <= n_on_policy
    if k_target + k_on_policy:
        assert abs(k_on_policy / (k_target + k_on_policy) - fraction) <= 1 / (k_target + k_on_policy)


def test_the_plan_picks_exact_counts_by_seed_whatever_the_order_of_the_rows():
    target = [f"s{i}/greedy" for i in range(40)]
    on_policy = [f"s{i}/greedy" for i in range(30)]  # the same keys: ranked apart by their set
    plan = plan_mixture(target, on_policy, 0.25, seed=3)
    assert (plan.target.count, plan.on_policy.count) == (40, 13)
    kept = [k for k in on_policy if plan.on_policy.keeps(3, k)]
    assert len(kept) == 13 and all(plan.target.keeps(3, k) for k in target)
    again = plan_mixture(list(reversed(target)), list(reversed(on_policy)), 0.25, seed=3)
    assert [k for k in on_policy if again.on_policy.keeps(3, k)] == kept  # order-free: the same rows
    other = plan_mixture(target, on_policy, 0.25, seed=4)
    assert [k for k in on_policy if other.on_policy.keeps(4, k)] != kept  # another seed, other rows
    assert row_rank(3, TARGET, "s1/greedy") != row_rank(3, ON_POLICY, "s1/greedy")
    assert plan.summary()["on_policy_share"] == round(13 / 53, 4)


def test_a_cut_of_zero_keeps_nothing_and_a_whole_cut_keeps_everything():
    keys = [f"k{i}" for i in range(5)]
    assert not any(cut_for(keys, 0, TARGET, 0).keeps(0, k) for k in keys)
    assert all(cut_for(keys, 0, TARGET, 9).keeps(0, k) for k in keys) and cut_for(keys, 0, TARGET, 9).count == 5


# ---- generate: the generator in the rows and the set's fingerprint --------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy-models")
    tiny_llama(root / "target", seed=0, hidden=64)
    tiny_llama(root / "draft", seed=1, hidden=32)
    return root


@pytest.fixture
def generate(monkeypatch, tmp_path, models):
    """run_generate without Ray (the engine passes answer nothing); returns the set's fingerprint."""
    import draftalign.pipelines.generate as pg

    stub_engine_passes(monkeypatch)

    def run(*overrides: str) -> dict:
        pg.run_generate(load_config(TINY, [f"run.output={tmp_path}", f"models.target={models / 'target'}",
                                           f"models.draft={models / 'draft'}", "generate.max_seeds=2",
                                           "generate.engine.max_model_len=128", *overrides]))
        return json.loads((tmp_path / "generate" / "fingerprint.json").read_text())
    return run


def test_the_generator_is_in_the_fingerprint_and_a_set_never_mixes_two(generate, models):
    from draftalign.models.identity import target_identity

    made = generate()
    assert made["generator_hash"] == made["target_hash"] == target_identity(str(models / "target"))["target_hash"]
    with pytest.raises(ConfigError, match="generated otherwise.*generator .*draft") as err:
        generate("generate.generator=draft")
    assert "target '" not in str(err.value)  # the target did not change: only the generator is named
    mine = generate("generate.generator=draft", "generate.overwrite=true")
    assert mine["target_hash"] == made["target_hash"]  # the rows still name the target
    assert mine["generator_hash"] == target_identity(str(models / "draft"))["target_hash"] != made["target_hash"]
    assert mine["generator_model"] == str(models / "draft")


def test_a_set_fingerprinted_before_generators_counts_as_the_targets(generate, tmp_path):
    made = generate()
    path = tmp_path / "generate" / "fingerprint.json"
    path.write_text(json.dumps({k: v for k, v in made.items() if not k.startswith("generator")}))
    assert generate() == made  # accepted as the target's, and the file gains the generator
    with pytest.raises(ConfigError, match="generator"):
        path.write_text(json.dumps({k: v for k, v in made.items() if not k.startswith("generator")}))
        generate("generate.generator=draft")


def test_a_generator_that_cannot_answer_for_the_target_is_refused_before_ray(generate, tmp_path, models):
    with pytest.raises(ConfigError, match=r"generate.generator=.*does not exist"):
        generate(f"generate.generator={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match=r"generate.generator=draft: the model .*\(models.draft"):
        generate(f"models.draft={tmp_path / 'gone'}", "generate.generator=draft")
    with pytest.raises(ConfigError, match="generate.engine.max_model_len=512 exceeds the context"):
        generate("generate.generator=draft", "generate.engine.max_model_len=512")  # tiny_llama: 256 positions


def test_rows_name_the_target_and_their_generator():
    from draftalign.workers.generate_rows import distill_row

    req = {"id": "a", "row_key": "a/greedy", "source": "s", "instruction": "i", "input": None,
           "messages": [{"role": "user", "content": "i"}], "prompt_text": "p", "prompt_token_ids": [1, 5],
           "sampling": {"name": "greedy", "temperature": 0.0, "top_p": 1.0, "max_tokens": 4, "seed": None}}
    own = distill_row(req, [7, 2], "x", eos_token_id=2, target_model="T", target_hash="th", template_hash="c")
    assert (own["generator_model"], own["generator_hash"]) == ("T", "th")
    theirs = distill_row(req, [7, 2], "x", eos_token_id=2, target_model="T", target_hash="th", template_hash="c",
                         generator_model="D", generator_hash="dh")
    assert (theirs["target_hash"], theirs["generator_model"], theirs["generator_hash"]) == ("th", "D", "dh")


# ---- distill: the on-policy set's checks and the fingerprint -------------------------------------

@pytest.fixture
def distill_until_ray(monkeypatch, tmp_path, models):
    """run_distill up to where Ray would start; returns (cfg, inputs) of the first loss."""
    import draftalign.pipelines.distill as distill

    class Reached(Exception):
        pass

    seen = {}

    def fit(cfg, loss, inputs, job_dir):
        seen.update(cfg=cfg, inputs=inputs)
        raise Reached

    monkeypatch.setattr(distill, "_fit", fit)
    distill_set(tmp_path / "target-set", 30, target=models / "target")
    distill_set(tmp_path / "draft-set", 30, target=models / "target", generator=models / "draft", seed=1)

    def run(*overrides: str):
        cfg = load_config(TINY, [f"run.output={tmp_path / 'run'}", f"models.target={models / 'target'}",
                                 f"distill.init_from={models / 'draft'}", f"distill.data={tmp_path / 'target-set'}",
                                 *overrides])
        with pytest.raises(Reached):
            distill.run_distill(cfg)
        return seen["cfg"], seen["inputs"]
    return run


def test_distill_mixes_a_drafter_set_and_fingerprints_it(distill_until_ray, tmp_path, capsys):
    from draftalign.pipelines.distill import _fingerprint

    cfg, off = distill_until_ray()
    assert off.mixture is None and off.on_policy_files == ()
    on = [f"distill.on_policy.data={tmp_path / 'draft-set'}"]
    half_cfg, half = distill_until_ray("distill.on_policy.fraction=0.5", *on)
    assert "on-policy mixture λ=0.5" in capsys.readouterr().out
    assert half.mixture.on_policy.of == half.mixture.target.of  # the same seeds are held out of both
    assert half.mixture.on_policy.count == half.mixture.target.count == half.mixture.target.of
    all_cfg, everything = distill_until_ray("distill.on_policy.fraction=1", *on)
    assert (everything.mixture.target.count, everything.mixture.on_policy.count) == (0, everything.mixture.on_policy.of)
    loss = cfg.distill.losses[0]
    prints = {_fingerprint(c, loss, i) for c, i in ((cfg, off), (half_cfg, half), (all_cfg, everything))}
    assert len(prints) == 3
    # Off, the fingerprint is what it was before on-policy data existed: finished drafters are reused.
    from draftalign.util.runinfo import fingerprint

    # (draft_vocab and freeze, unset, are left out the same way: they came later still; so are the
    # feature drafter's training-time test and a loss's drafter_kind, for the standalone drafter;
    # and the custom Ray resources of the workers and target actors, always.)
    before = cfg.distill.model_dump(mode="json", exclude={
        "output": True, "overwrite": True, "losses": True, "on_policy": True, "draft_vocab": True, "freeze": True,
        "ttt_steps": True, "ttt_decay": True,
        "train": {"inject_failure_at_step", "max_failures", "resources"},
        "target_pool": {"inject_actor_death_at_request", "cache", "cache_dir", "resources"}})
    assert _fingerprint(cfg, loss, off) == fingerprint(
        before, loss.model_dump(mode="json", exclude={"eta", "seed", "drafter_kind"}), [(f.name, f.stat().st_size) for f in off.files],
        *off.identity)
    assert "on_policy" not in before and "cache_dir" not in before["target_pool"]


def test_distill_refuses_the_targets_own_answers_as_on_policy_data(distill_until_ray, tmp_path):
    with pytest.raises(ConfigError, match="holds the target's own answers"):
        distill_until_ray("distill.on_policy.fraction=0.5", f"distill.on_policy.data={tmp_path / 'target-set'}")
    with pytest.raises(ConfigError, match="no distillation set at .*distill.on_policy.data"):
        distill_until_ray("distill.on_policy.fraction=0.5", f"distill.on_policy.data={tmp_path / 'nothing'}")


def test_distill_refuses_rounds_which_need_the_run(tmp_path, capsys):
    from draftalign.cli import main

    rc = main(["distill", str(TINY), f"run.output={tmp_path}", "distill.on_policy.fraction=1",
               "distill.on_policy.rounds=2"])
    assert rc == 2 and "run in `draftalign run`" in capsys.readouterr().err
    assert not (tmp_path / "distill").exists()


# ---- the rounds -------------------------------------------------------------------------------------

def test_each_round_generates_with_the_last_drafter_and_keeps_its_own_folder(tmp_path):
    from draftalign.pipelines.rounds import round_config

    cfg = load_config(TINY, [f"run.output={tmp_path}", "distill.on_policy.fraction=0.5", "distill.on_policy.rounds=2",
                             "distill.on_policy.sampling=[{name: t1, temperature: 1.0, max_tokens: 16}]"])
    loss = cfg.distill.losses[0]
    r2 = round_config(cfg, loss, 2, "/drafters/round-1")
    folder = tmp_path / "distill" / "rounds" / "round-2" / "tvdpp-onpolicy0.5"
    assert r2.generate.generator == r2.generator_path() == "/drafters/round-1"
    assert r2.generate.output == str(folder / "set") and [s.name for s in r2.generate.sampling] == ["t1"]
    assert r2.distill.init_from == "/drafters/round-1" and r2.distill.losses == [loss]
    assert r2.distill_data_path() == cfg.distill_data_path() == f"{tmp_path}/generate/data"  # the target's set
    assert r2.distill.on_policy.data == str(folder / "set") and r2.distill.on_policy.rounds == 0
    assert r2.distilled_path(loss) == str(folder / "model") == cfg.round_paths(loss)[1]
    assert r2.distill.drafter_label(loss) == "tvd++-onpolicy0.5-round2"
    assert r2.distill.target_pool.cache_dir == f"{tmp_path}/distill/target_cache"  # shared by every round
    assert r2.generate.seeds == cfg.generate.seeds and r2.generate.engine == cfg.generate.engine


def test_the_run_and_evaluate_see_every_round(tmp_path):
    from draftalign.pipelines.evaluate import resolve_drafters
    from draftalign.pipelines.rounds import run_rounds
    from draftalign.pipelines.run import _stages

    cfg = load_config(TINY, [f"run.output={tmp_path}", "distill.on_policy.fraction=1", "distill.on_policy.rounds=2",
                             f"models.draft={tmp_path}"])
    assert [fn for name, fn, _ in _stages(cfg) if name == "distill"] == [run_rounds]
    names = [(d["name"], d["path"]) for d in resolve_drafters(cfg, strict=False)][1:]
    assert names == [(f"tvd++-onpolicy1-round{r}", p) for r, p in enumerate(cfg.round_paths(cfg.distill.losses[0]), 1)]


def test_stage_pipelines_never_import_each_other():
    # Shared logic lives in core modules; only run.py and rounds.py (which run.py calls) chain stages.
    stages = {"generate", "distill", "pretrain", "evaluate", "rounds", "run"}
    for stage in ("generate", "distill", "pretrain", "evaluate"):
        tree = ast.parse((ROOT / "draftalign" / "pipelines" / f"{stage}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        others = {f"draftalign.pipelines.{s}" for s in stages - {stage}}
        assert not imported & others, (stage, imported & others)


def test_the_example_config_extends_the_demo_with_two_half_and_half_rounds():
    cfg = load_config(ROOT / "examples" / "smollm2-onpolicy.yaml")
    demo = load_config(ROOT / "examples" / "smollm2.yaml")
    op = cfg.distill.on_policy
    assert (op.fraction, op.rounds, [s.name for s in op.sampling]) == (0.5, 2, ["greedy"])
    assert cfg.run.output == demo.run.output and cfg.generate == demo.generate  # reuses the demo's set
    # the demo's standalone drafter's loss (a feature drafter cannot generate its own answers)
    standalone = [loss for loss in demo.distill.losses if loss.drafter_kind == "draft"]
    assert cfg.distill.losses == standalone and cfg.evaluate.output != demo.evaluate.output


def test_the_comparisons_runs_share_one_evaluation_and_the_on_policy_example():
    # make compare's three runs add their drafters to one report: any difference in their evaluate
    # settings would change the cells' fingerprint and drop the cells of the runs before.
    compare, mixture, onpolicy = (load_config(ROOT / "examples" / f"smollm2-compare{s}.yaml")
                                  for s in ("", "-mixture", "-onpolicy"))
    assert compare.evaluate == mixture.evaluate == onpolicy.evaluate
    example = load_config(ROOT / "examples" / "smollm2-onpolicy.yaml").distill
    for cfg, fraction in ((mixture, 0.5), (onpolicy, 1.0)):
        d = cfg.distill
        assert (d.losses, d.train, d.on_policy.rounds, d.on_policy.sampling) == (
            example.losses, example.train, example.on_policy.rounds, example.on_policy.sampling)
        assert d.on_policy.fraction == fraction and cfg.run.output == compare.run.output
