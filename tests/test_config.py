from pathlib import Path

import pytest
from pydantic import ValidationError

from draftalign.cli import main
from draftalign.config import ConfigError, load_config, parse_overrides

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"
PAPER = TINY.with_name("paper.yaml")


def test_tiny_loads_and_outputs_default_under_run_output():
    cfg = load_config(TINY)
    assert cfg.pretrain.output == "runs/tiny/pretrain"
    assert cfg.target_path() == "runs/tiny/pretrain/target/model"
    assert set(cfg.pretrain.jobs) == {"target", "draft"}


def test_overrides_are_typed_and_nested():
    cfg = load_config(TINY, ["run.output=/tmp/x", "pretrain.jobs.draft.train.max_steps=7",
                             "pretrain.jobs.draft.optim.betas=[0.8, 0.9]", "ray.address=null"])
    assert cfg.pretrain.output == "/tmp/x/pretrain"
    assert cfg.pretrain.jobs["draft"].train.max_steps == 7
    assert cfg.pretrain.jobs["draft"].optim.betas == (0.8, 0.9)
    assert cfg.ray.address is None


def test_an_empty_mapping_override_empties_it_and_a_partial_one_merges():
    assert load_config(TINY, ["pretrain.jobs={}"]).pretrain.jobs == {}
    cfg = load_config(TINY, ["pretrain.jobs={draft: {train: {max_steps: 5}}}"])
    assert set(cfg.pretrain.jobs) == {"target", "draft"} and cfg.pretrain.jobs["draft"].train.max_steps == 5
    assert cfg.pretrain.jobs["draft"].train.seq_len == load_config(TINY).pretrain.jobs["draft"].train.seq_len


def test_unknown_key_names_its_dotted_path():
    with pytest.raises(ConfigError, match=r"unknown config key 'pretrain\.jobs\.target\.train\.stpes'"):
        load_config(TINY, ["pretrain.jobs.target.train.stpes=3"])


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match=r"pretrain\.jobs\.draft\.train\.zero_stage"):
        load_config(TINY, ["pretrain.jobs.draft.train.zero_stage=5"])


def test_config_is_frozen():
    cfg = load_config(TINY)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.run.seed = 3


@pytest.mark.parametrize("bad", ["novalue", "=3", ""])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="a.b=value"):
        parse_overrides([bad])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_cli_unknown_key_exits_nonzero_before_work(capsys):
    rc = main(["pretrain", str(TINY), "pretrain.corpus.knd=files", "--plan"])
    assert rc == 2
    assert "pretrain.corpus.knd" in capsys.readouterr().err


def test_cli_plan_tiny(capsys):
    assert main(["pretrain", str(TINY), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "job: target" in out and "job: draft" in out
    assert "vocab_size: 32000" in out  # the embedded SentencePiece tokenizer


def test_cli_plan_paper_drafter_is_115m(capsys):
    # The paper's target lives on the hub; the plan still shows the drafter and its resources.
    assert main(["pretrain", str(PAPER), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "ray_train_workers: 32" in out and "GPU: 32" in out
    assert "parameters: 1169" in out  # 116.9M


def test_target_and_target_job_conflict(capsys):
    rc = main(["pretrain", str(TINY), "models.target=/some/model", "--plan"])
    assert rc == 2
    assert "models.target" in capsys.readouterr().err


def test_a_config_extends_another_and_states_only_what_it_changes(tmp_path):
    from draftalign.config import ConfigError, load_config

    base = tmp_path / "base.yaml"
    base.write_text("run: {name: base, output: runs/base}\ndistill:\n  losses: [{name: tvd++}]\n"
                    "  train: {max_steps: 7}\n")
    (tmp_path / "variant.yaml").write_text("extends: base.yaml\nrun: {name: variant}\n"
                                           "distill:\n  losses: [{name: tvd}, {name: forward_kl}]\n")
    cfg = load_config(tmp_path / "variant.yaml")
    assert (cfg.run.name, cfg.run.output) == ("variant", "runs/base")  # mappings merge key by key
    assert [x.name for x in cfg.distill.losses] == ["tvd", "forward_kl"] and cfg.distill.train.max_steps == 7
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml.*does not exist"):
        load_config(tmp_path / "missing.yaml")
