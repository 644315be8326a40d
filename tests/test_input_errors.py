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


# ---- data files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from tests.worlds import tiny_llama

    folder = tmp_path_factory.mktemp("target") / "model"
    tiny_llama(folder, seed=0, hidden=32)
    return folder


def _truncated_parquet(path: Path) -> Path:
    from draftalign.data.schemas import DISTILL_SCHEMA, to_table
    from draftalign.util.atomicio import write_parquet_atomic

    whole = path.with_name("whole.parquet")
    write_parquet_atomic(to_table([], DISTILL_SCHEMA), whole)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(whole.read_bytes()[:-20])  # the footer gone, as after a cut copy
    whole.unlink()
    return path


def test_corrupt_parquet_seeds_name_the_file_and_write_nothing(capsys, tmp_path, target):
    seeds = _truncated_parquet(tmp_path / "seeds.parquet")
    err = _cli_error(capsys, ["generate", str(TINY), f"run.output={tmp_path / 'run'}",
                              f"models.target={target}", f"generate.seeds={seeds}"])
    assert str(seeds) in err and "not a readable Parquet file" in err and "good copy" in err
    assert not (tmp_path / "run").exists()


def test_corrupt_part_in_generates_own_data_is_named_with_how_to_recover(capsys, tmp_path, target):
    part = _truncated_parquet(tmp_path / "run" / "generate" / "data" / "part-00000.parquet")
    err = _cli_error(capsys, ["generate", str(TINY), f"run.output={tmp_path / 'run'}",
                              f"models.target={target}", "generate.max_seeds=2"])
    assert str(part) in err and "move it out of data/" in err
    assert sorted(p.name for p in (tmp_path / "run" / "generate").iterdir()) == ["data"]  # nothing new


def test_corrupt_parquet_evaluation_data_names_task_file(tmp_path):
    from draftalign.config import EvalTaskConfig
    from draftalign.evaluation.tasks import load_task_prompts

    data = _truncated_parquet(tmp_path / "eval.parquet")
    task = EvalTaskConfig(name="qa", kind="open_ended", data=str(data))
    with pytest.raises(ConfigError, match=r"eval\.parquet' is not a readable Parquet file"):
        load_task_prompts(task, 5)


def test_seed_file_with_unsupported_suffix(capsys, tmp_path, target):
    seeds = tmp_path / "seeds.json"
    seeds.write_text('[{"instruction": "hi"}]')
    err = _cli_error(capsys, ["generate", str(TINY), f"run.output={tmp_path / 'run'}",
                              f"models.target={target}", f"generate.seeds={seeds}"])
    assert str(seeds) in err and "unsupported suffix '.json'" in err and ".jsonl" in err
    assert not (tmp_path / "run").exists()


def test_a_bom_on_the_first_jsonl_line_is_accepted(tmp_path):
    from draftalign.config import SeedFields
    from draftalign.data.seeds import prepare_seeds, read_seed_file

    f = tmp_path / "s.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"instruction": "first"}\n{"instruction": "second"}\n')
    good, errors = prepare_seeds(read_seed_file(f), SeedFields(), "s")
    assert [g["instruction"] for g in good] == ["first", "second"] and errors == []


def test_a_huge_seed_field_is_an_error_row_naming_the_row(tmp_path, monkeypatch):
    import draftalign.data.seeds as seeds
    from draftalign.config import SeedFields

    monkeypatch.setattr(seeds, "MAX_FIELD_CHARS", 1000)
    monkeypatch.setattr(seeds, "MAX_LINE_BYTES", 5000)
    f = tmp_path / "s.jsonl"
    f.write_text('{"instruction": "ok"}\n' + '{"instruction": "' + "x" * 2000 + '"}\n'
                 + '{"instruction": "' + "y" * 9000 + '"}\n' + '{"instruction": "fine"}\n')
    good, errors = seeds.prepare_seeds(seeds.read_seed_file(f), SeedFields(), "s")
    assert [g["instruction"] for g in good] == ["ok", "fine"]
    assert errors[0]["reason"] == "row 2: field too long: 'instruction' holds 2,000 characters (limit 1,000)"
    assert errors[1]["reason"] == "line 3: line too long: 9,020 bytes (limit 5,000)"
    assert len(errors[0]["raw"]) <= seeds.RAW_LIMIT


def test_duplicate_ids_in_an_evaluation_set_are_refused_with_task_file_and_id(tmp_path):
    from draftalign.config import EvalTaskConfig
    from draftalign.evaluation.tasks import EvalDataError, load_task_prompts

    data = tmp_path / "qa.jsonl"
    data.write_text('{"id": "q1", "instruction": "a?"}\n{"id": "q2", "instruction": "b?"}\n'
                    '{"id": "q1", "instruction": "c?"}\n')
    task = EvalTaskConfig(name="qa", kind="open_ended", data=str(data))
    with pytest.raises(EvalDataError, match=r"task 'qa' \(.*qa\.jsonl\), row 3: duplicate id 'q1' \(also row 1\)"):
        load_task_prompts(task, 10)
    # without an id column the ids come from the prompt text, so the same rows load
    no_ids = task.model_copy(update={"fields": task.fields.model_copy(update={"id": None})})
    assert len(load_task_prompts(no_ids, 10)) == 3


@pytest.mark.parametrize("stage", ["generate", "distill", "evaluate"])
def test_a_target_without_safetensors_is_refused_before_ray(capsys, tmp_path, target, stage):
    import shutil
    import sys

    pickled = tmp_path / "pickled"
    shutil.copytree(target, pickled)
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    argv = [stage, str(TINY), f"run.output={tmp_path / 'run'}", f"models.target={pickled}",
            f"models.draft={target}"]
    if stage == "distill":
        from tests.worlds import distill_set

        distill_set(tmp_path / "run" / "generate", 4)
    err = _cli_error(capsys, argv)
    assert str(pickled) in err and "no *.safetensors" in err and "pytorch_model.bin" in err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "run" / stage / "config.yaml").exists()
