"""Seeds and evaluation sets from Hugging Face data sets held locally, as an offline cluster has
them: a clone of the hub repo (data files in a folder) or `save_to_disk` output. No network."""

import json
import os
import subprocess

import pytest

from draftalign.config import EvalFields, EvalTaskConfig, GenerateConfig, SeedFields
from draftalign.data.seeds import prepare_seeds, seed_id
from draftalign.evaluation.tasks import load_task_prompts
from draftalign.pipelines.generate import seed_rows
from tests import scripts

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def test_a_cloned_dolly_repo_folder_streams_through_the_dolly_mapping(tmp_path):
    folder = tmp_path / "databricks-dolly-15k"
    folder.mkdir()
    rows = [{"instruction": "Name a prime.", "context": "", "response": "7", "category": "open_qa"},
            {"instruction": "Summarize this.", "context": "A passage.", "response": "x", "category": "summarization"},
            {"instruction": "Name a prime.", "context": "", "response": "2", "category": "open_qa"}]  # duplicate
    (folder / "databricks-dolly-15k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = GenerateConfig(output=str(tmp_path / "out"), seeds=str(folder),
                         fields=SeedFields(instruction="instruction", input="context", source="category"))
    stream, source = seed_rows(gen)
    good, errors = prepare_seeds(stream, gen.fields, source)
    assert source == "databricks-dolly-15k"
    assert [g["source"] for g in good] == ["open_qa", "summarization"]
    assert good[1]["messages"][0]["content"] == "Summarize this.\n\nA passage."
    assert good[1]["id"] == seed_id("Summarize this.\n\nA passage.")
    assert len(errors) == 1 and "duplicate" in errors[0]["reason"]


def test_a_saved_cnn_dailymail_set_loads_as_a_summarize_task(tmp_path):
    import datasets

    folder = tmp_path / "cnn_dailymail"
    datasets.DatasetDict({
        "test": datasets.Dataset.from_dict({"id": ["a1", "a2", "a3"], "article": ["One.", "Two.", "Three."],
                                            "highlights": ["1", "2", "3"]}),
        "train": datasets.Dataset.from_dict({"id": ["t"], "article": ["Train."], "highlights": ["t"]}),
    }).save_to_disk(str(folder))
    task = EvalTaskConfig(name="cnn", kind="summarize", data=str(folder), hf_split="test",
                          fields=EvalFields(instruction=None, input="article", id="id"),
                          instruction="Summarize the following article.")
    prompts = load_task_prompts(task, default_limit=2)
    assert [p["id"] for p in prompts] == ["a1", "a2"]  # the test split, in order, capped
    assert prompts[0]["input"] == "One." and "Summarize the following article." in prompts[0]["user"]


def test_an_unreachable_hub_set_is_a_config_error_naming_the_key(tmp_path):
    # A fresh process: `datasets` reads the offline switches when first imported.
    proc = subprocess.run(scripts.command("open_hub_set"), capture_output=True, text=True, timeout=120,
                          env={**os.environ, **OFFLINE}, cwd=tmp_path)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("draftalign.errors.ConfigError: generate.seeds 'nobody-here/no-such-set' "
                           "(split 'train'): cannot load it as a Hugging Face data set"), last
