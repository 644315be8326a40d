"""Output folders of the training stages: refusal, reuse, and publishing that never half-writes."""

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from draftalign.errors import ConfigError
from draftalign.pipelines.outputs import MODEL_INFO, claim_output, publish_model, reusable


class _Checkpoint:
    def __init__(self, folder):
        self.folder = folder

    @contextmanager
    def as_directory(self):
        yield str(self.folder)


class _Tokenizer:
    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{}")


def test_a_folder_of_another_config_is_refused_unless_overwrite(tmp_path):
    job = tmp_path / "job"
    claim_output(job, "aaa", False, "distill.overwrite")
    (job / "ray").mkdir()
    claim_output(job, "aaa", False, "distill.overwrite")  # same config: fine, checkpoints kept
    assert (job / "ray").is_dir()
    with pytest.raises(ConfigError, match="distill.overwrite=true"):
        claim_output(job, "bbb", False, "distill.overwrite")
    assert (job / "ray").is_dir()  # refusing deletes nothing
    claim_output(job, "bbb", True, "distill.overwrite")
    assert not (job / "ray").exists() and json.loads((job / "job.json").read_text())["fingerprint"] == "bbb"


def test_an_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should go")
    with pytest.raises(OSError, match="cannot write to output folder"):
        claim_output(blocker / "job", "aaa", False, "x")
    assert blocker.read_text().startswith("a file")


def test_publish_swaps_in_a_whole_model_or_keeps_the_old_one(tmp_path):
    model = tmp_path / "job" / "model"
    ckpt = tmp_path / "ckpt"
    (ckpt / "hf").mkdir(parents=True)
    (ckpt / "hf" / "config.json").write_text("{}")
    publish_model(_Checkpoint(ckpt), model, _Tokenizer(), {"fingerprint": "f1"})
    assert reusable(model, "f1") and not reusable(model, "f2")
    assert (model / "tokenizer.json").is_file()
    broken = tmp_path / "broken"
    broken.mkdir()  # a checkpoint without its hf/ export
    with pytest.raises(OSError):
        publish_model(_Checkpoint(broken), model, _Tokenizer(), {"fingerprint": "f2"})
    assert json.loads((model / MODEL_INFO).read_text())["fingerprint"] == "f1"  # the old model is intact


def _disk_full(*_args):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_earlier_files_whole_and_leaves_no_temp_files(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from draftalign.util import atomicio

    manifest, part = tmp_path / "manifest.json", tmp_path / "data" / "part-0.parquet"
    atomicio.write_json_atomic(manifest, {"rows": 1})
    atomicio.write_parquet_atomic(pa.table({"x": [1]}), part)

    monkeypatch.setattr(os, "fsync", _disk_full)  # the bytes are written, then the disk is full
    with pytest.raises(OSError, match="No space left"):
        atomicio.write_json_atomic(manifest, {"rows": 2})
    with pytest.raises(OSError, match="No space left"):
        atomicio.write_parquet_atomic(pa.table({"x": [1, 2]}), part)

    assert json.loads(manifest.read_text()) == {"rows": 1}
    assert pq.read_table(part).column("x").to_pylist() == [1]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "manifest.json", "part-0.parquet"]


def test_a_recorded_step_is_running_then_done_or_failed_with_its_seconds(tmp_path):
    import json

    from draftalign.pipelines.rounds import RoundChain, RoundRun
    from draftalign.util.runinfo import recorded_step

    path = tmp_path / "chain.json"
    chain = RoundChain(drafter="d", fraction=0.5, start="s")
    seen = []
    for r, name in enumerate(("ok", "bad"), start=1):
        entry = RoundRun(round=r, generator=name, set="x")
        chain.rounds.append(entry)
        try:
            with recorded_step(lambda: chain.write(path), entry) as e:
                seen.append(json.loads(path.read_text())["rounds"][-1]["status"])  # on disk while it runs
                e.model = "m"
                if name == "bad":
                    raise KeyboardInterrupt  # a kill counts as a failure too, and is not swallowed
        except KeyboardInterrupt:
            pass
    rounds = json.loads(path.read_text())["rounds"]
    assert seen == ["running", "running"]
    assert [(s["generator"], s["status"], s["model"]) for s in rounds] == [("ok", "done", "m"), ("bad", "failed", "m")]
    assert all(s["seconds"] >= 0 for s in rounds)
    assert set(rounds[0]) == {"round", "generator", "set", "status", "model", "seconds"}
