"""Secrets never reach an output file, a report, a printed plan or a job's command line.

A config can carry credentials: an engine actor's environment (`generate.engine.env`) is where
an `HF_TOKEN` for a gated target goes, and an `engine_kwargs` entry may hold an API key. Every
file the stages write next to their outputs (config.yaml, manifest.json, run_info.json,
report.md) is shared, copied and committed far more freely than the shell that ran them, so
such values are written as REDACTED there. Keys stay, so the provenance still says that a
value was set.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from draftalign.config import Config

__all__ = ["REDACTED", "looks_secret", "redact", "dump_config", "redact_argv", "split_secret_overrides", "SECRET_OVERRIDES_ENV",
           "secret_overrides_from_env"]

REDACTED = "<redacted>"
# Names that hold credentials by the usual conventions (HF_TOKEN, AWS_SECRET_ACCESS_KEY,
# WANDB_API_KEY, db_password, ...), without catching `max_tokens` or `tokenizer`.
_SECRET = re.compile(r"secret|passw|credential|private|api_?key|access_?key|auth|(^|[_.-])(token|key|pat)$",
                     re.IGNORECASE)
# An engine environment holds secrets and tuning knobs alike; only the knobs of these families
# are shown, and only when the name does not look secret itself (VLLM_API_KEY stays hidden).
_TUNING_PREFIXES = ("VLLM_", "OMP_", "MKL_", "CUDA_", "NCCL_", "PYTORCH_", "TORCH_", "TOKENIZERS_",
                    "OPENBLAS_", "KMP_")
_ENV_PATHS = {("generate", "engine", "env")}  # mappings whose every value counts as a secret


def looks_secret(name: str) -> bool:
    return bool(_SECRET.search(str(name)))


def _hidden(path: tuple[str, ...], key: str) -> bool:
    if looks_secret(key):
        return True
    return path in _ENV_PATHS and not str(key).upper().startswith(_TUNING_PREFIXES)


def redact(data: Any, path: tuple[str, ...] = ()) -> Any:
    """A copy of `data` (JSON-like) with secret string values replaced by REDACTED."""
    if isinstance(data, dict):
        return {k: (REDACTED if isinstance(v, str) and v and _hidden(path, k) else redact(v, (*path, str(k))))
                for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact(v, path) for v in data]
    return data


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, secrets redacted: what config.yaml and --plan show."""
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)


def _secret_override(item: str) -> tuple[str, Any] | None:
    """(key, redacted value) when the `a.b=value` override sets a secret, else None."""
    from draftalign.config import parse_overrides  # config imports this module's users, not it

    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        return None
    try:
        nested = parse_overrides([item])
    except ValueError:
        return None
    hidden = redact(nested)
    if hidden == nested:
        return None
    node = hidden
    for part in key.strip().split("."):
        node = node[part]
    return key.strip(), node


def redact_argv(argv: Sequence[str]) -> list[str]:
    """The command line with the values of secret overrides replaced (see `redact`)."""
    out = []
    for arg in argv:
        found = _secret_override(arg)
        if found is None:
            out.append(arg)
            continue
        key, value = found
        shown = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**6)
        out.append(f"{key}={shown.strip()}")
    return out


def split_secret_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(public, secret) overrides: `submit` keeps the secret ones off the job's command line."""
    public, secret = [], []
    for item in overrides:
        (secret if _secret_override(item) is not None else public).append(item)
    return public, secret


# `submit` passes secret overrides to the job in this environment variable (a JSON list) instead
# of on its command line, which the dashboard, `ray job list` and the job's logs all show.
SECRET_OVERRIDES_ENV = "DRAFTALIGN_SECRET_OVERRIDES"


def secret_overrides_from_env() -> list[str]:
    import json
    import os

    raw = os.environ.get(SECRET_OVERRIDES_ENV)
    if not raw:
        return []
    items = json.loads(raw)
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        from draftalign.errors import ConfigError

        raise ConfigError(f"{SECRET_OVERRIDES_ENV} must hold a JSON list of a.b=value strings")
    return items
