"""Ray Jobs API: submit a stage (or the whole run) to a cluster, follow and stop it.

The job runs `python -m draftalign STAGE CONFIG overrides...` in the cluster, with this
repository as its working directory (cluster/runtime_env.yaml says what stays behind). The
config is validated here first, so a typo fails on the laptop, not after an upload.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from draftalign.cluster.upload import stage_upload
from draftalign.config import Config
from draftalign.errors import ConfigError
from draftalign.util.redact import SECRET_OVERRIDES_ENV, split_secret_overrides

DEFAULT_RUNTIME_ENV = Path(__file__).resolve().parents[2] / "cluster" / "runtime_env.yaml"
AGENT_WAIT_S = 120  # how long to wait for a freshly started head's job agent


def runtime_env(path: str | Path | None, root: Path) -> dict[str, Any]:
    """The job's runtime env from a YAML file; a relative working_dir is taken from `root`."""
    p = Path(path) if path else DEFAULT_RUNTIME_ENV
    if not p.is_file():
        raise ConfigError(f"runtime env file {str(p)!r} does not exist")
    env = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(env, dict):
        raise ConfigError(f"runtime env file {str(p)!r} must hold a mapping")
    wd = env.get("working_dir")
    if wd and not str(wd).startswith(("s3://", "gs://", "http://", "https://")):
        env["working_dir"] = str((root / wd).resolve())
    return env


def entrypoint(stage: str, config: str, overrides: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["python", "-m", "draftalign", stage, config, *overrides])


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    # Ray 2.60 clusters require a token by default; send the local one when there is one.
    if (Path.home() / ".ray" / "auth_token").is_file() or os.environ.get("RAY_AUTH_TOKEN"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray job server at {address}: {exc}") from None


def submit(address: str, stage: str, config: str, overrides: list[str], env_file: str | None,
           root: Path, cfg: Config) -> str:
    rel = Path(config).resolve()
    try:
        config_in_job = str(rel.relative_to(root.resolve()))
    except ValueError:
        raise ConfigError(f"config {config!r} is outside the working directory {root}: the job could "
                          "not read it; move it into the repository") from None
    env = runtime_env(env_file, root)
    public, secret = split_secret_overrides(overrides)
    if secret:  # off the command line, which the dashboard, `ray job list` and the logs show
        env["env_vars"] = {**(env.get("env_vars") or {}), SECRET_OVERRIDES_ENV: json.dumps(secret)}
    c = client(address)
    with tempfile.TemporaryDirectory(prefix="draftalign-upload-") as staging:
        wd = env.get("working_dir")
        if wd and Path(wd).is_dir():  # a local folder: upload its allow-list, not the folder
            files = stage_upload(Path(wd), rel, cfg, Path(staging))
            print(f"uploading {len(files)} files from {wd} (draftalign/cluster/upload.py says which)")
            env["working_dir"] = staging
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:  # the package is uploaded here, before the staging folder goes
                return c.submit_job(entrypoint=entrypoint(stage, config_in_job, public), runtime_env=env,
                                    metadata={"draftalign_stage": stage, "config": config_in_job})
            except RuntimeError as exc:
                # A head that has just started answers before its job agent is up; that passes.
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(3)
