"""Output folders shared by the training stages: claim one for a config, publish a model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from draftalign.errors import ConfigError
from draftalign.models.card import ModelInfo
from draftalign.training.plots import CURVE_FILES
from draftalign.util.atomicio import write_json_atomic

MODEL_INFO = "draftalign_model.json"  # written next to every exported model


def claim_output(job_dir: Path, fp: str, overwrite: bool, overwrite_key: str) -> None:
    """Refuse to mix checkpoints of another config into this folder; never delete silently."""
    marker = job_dir / "job.json"
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot write to output folder {str(job_dir)!r}: {exc.strerror or exc}") from exc
    if marker.is_file():
        old = json.loads(marker.read_text()).get("fingerprint")
        if old != fp and not overwrite:
            raise ConfigError(f"{job_dir} holds a run with another config ({old} != {fp}); "
                              f"choose another output folder or set {overwrite_key}=true")
        if old != fp:
            shutil.rmtree(job_dir / "ray", ignore_errors=True)
    write_json_atomic(marker, {"fingerprint": fp})


def reusable(model_dir: Path, fp: str) -> bool:
    """True when `model_dir` holds a finished export made from the same inputs and config."""
    info = model_dir / MODEL_INFO
    return info.is_file() and json.loads(info.read_text()).get("fingerprint") == fp


def publish_model(checkpoint, model_dir: Path, tokenizer, info: ModelInfo) -> Path:
    """Copy the final checkpoint's `hf/` export with the tokenizer and info, then swap it in;
    its training curves (draftalign.training.plots.CURVE_FILES) go beside the model folder.

    The folder appears whole or not at all: readers never see a half-written model.
    """
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / "hf", tmp)
        for name in CURVE_FILES:
            if (Path(d) / name).is_file():  # whole or not at all, like every file a stage writes
                shutil.copyfile(Path(d) / name, model_dir.parent / f".{name}.tmp")
                os.replace(model_dir.parent / f".{name}.tmp", model_dir.parent / name)
    tokenizer.save_pretrained(str(tmp))
    write_json_atomic(tmp / MODEL_INFO, info)
    # The old export is renamed aside, not deleted, until the new one is in place: a crash
    # between the two steps leaves `model.old`, never no model at all.
    old = model_dir.with_name(model_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if model_dir.exists():
        model_dir.rename(old)
    tmp.rename(model_dir)
    shutil.rmtree(old, ignore_errors=True)
    return model_dir
