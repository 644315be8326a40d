"""Bad input gives one `draftalign: error: …` line naming the file, key or row; never a traceback."""

from pathlib import Path

import pytest

from draftalign.cli import main
from draftalign.config import ConfigError, load_config

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"


def _cli_error(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("draftalign: error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize(("override", "key"), [
    ("generate.sampling=[{name: a, temperature: .nan}]", "generate.sampling.0.temperature"),
    ("generate.sampling=[{name: a, temperature: .inf}]", "generate.sampling.0.temperature"),
    ("evaluate.temperatures=[0, .nan]", "evaluate.temperatures.1"),
    ("evaluate.temperatures=[0, -1]", "evaluate.temperatures.1"),
    ("evaluate.gammas=[1, 0]", "evaluate.gammas.1"),
    ("distill.optim.lr=.nan", "distill.optim.lr"),
    ("distill.optim.lr=.inf", "distill.optim.lr"),
    ("pretrain.jobs.draft.optim.lr=.nan", "pretrain.jobs.draft.optim.lr"),
    ("distill.optim.betas=[0.9, 1.0]", "distill.optim.betas.1"),
    ("distill.optim.betas=[-0.1, 0.9]", "distill.optim.betas.0"),
    ("ray.num_cpus=0", "ray.num_cpus"),
    ("ray.num_cpus=-2", "ray.num_cpus"),
    ("pretrain.corpus.max_documents=0", "pretrain.corpus.max_documents"),
    ("evaluate.drafters=[]", "evaluate.drafters"),
    ("run.output=123", "run.output"),
    ("run.output=null", "run.output"),
])
def test_bad_values_name_their_exact_key(capsys, override, key):
    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        load_config(TINY, [override])
    err = _cli_error(capsys, ["generate", str(TINY), override, "--plan"])
    assert key in err


def test_non_string_run_output_is_one_error_not_five(capsys):
    err = _cli_error(capsys, ["generate", str(TINY), "run.output=123"])
    assert err.count("config key") == 1 and "run.output" in err


def test_yaml_error_in_an_override_value(capsys):
    err = _cli_error(capsys, ["generate", str(TINY), "generate.seeds=[unclosed"])
    assert "generate.seeds=[unclosed" in err and "not valid YAML" in err


def test_config_file_that_is_not_utf8(capsys, tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    err = _cli_error(capsys, ["generate", str(bad), "--plan"])
    assert str(bad) in err and "UTF-8" in err
