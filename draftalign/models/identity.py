"""Which target model a run used: a fingerprint of its weights, and a load check of a local folder.

Every stage that reads the target (generate, distill, evaluate) names it the same way, so
rows and models made from different weights are told apart.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from draftalign.errors import ConfigError

__all__ = ["looks_local", "absolute_model_path", "target_identity", "check_target_folder"]

_HASH_WHOLE_FILES_BELOW = 256 * 2**20  # small weights are hashed byte for byte; big ones by name and size


def looks_local(name: str) -> bool:
    """Whether a model name means a local path: hub names are "org/name"; anything else that is
    path-like (or exists here) must be a folder here."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def absolute_model_path(name: str) -> str:
    """An existing local path made absolute (Ray actors may not share the driver's working
    folder); a hub name, or a path that is not there, unchanged."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def target_identity(target: str) -> dict[str, str]:
    """{"target_model", "target_hash"}: the name as configured and a fingerprint of the weights.

    A local folder hashes config.json plus every weights file (contents when the folder is
    small, else names and sizes, which change with any re-export). A hub name hashes the
    name and, where the hub answers, the commit it resolves to.
    """
    h = hashlib.sha256()
    folder = Path(target).expanduser()
    if folder.is_dir():
        weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        whole = sum(p.stat().st_size for p in weights) < _HASH_WHOLE_FILES_BELOW
        for p in [folder / "config.json", *weights]:
            if not p.is_file():
                continue
            h.update(p.name.encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
            if whole or p.name == "config.json":
                h.update(p.read_bytes())
    else:
        h.update(target.encode())
        try:
            from huggingface_hub import HfApi

            h.update((HfApi().model_info(target).sha or "").encode())
        except Exception:  # offline or private: the name alone still tells targets apart
            pass
    return {"target_model": target, "target_hash": h.hexdigest()[:16]}


# A feature drafter's folder is in vLLM's eagle3 (speculators) format: config.json says so.
FEATURE_FORMAT = "eagle3"


def is_feature_drafter(path: str | Path) -> bool:
    """Whether `path` is a folder holding a feature drafter (models/feature.py), without loading it."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("speculators_model_type") == FEATURE_FORMAT
    except ValueError:
        return False


def check_target_folder(folder: Path) -> None:
    """Refuse a local target that vLLM could not load, before Ray and the engines start.

    Reading config.json and every safetensors header costs milliseconds; finding out from a
    dead engine actor costs an engine start-up and buries the cause in the engine's log.
    """
    config = folder / "config.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"target model {str(folder)!r}: config.json is missing or unreadable ({exc})") from None
    from safetensors import safe_open

    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        # Every loader here is safetensors-only; finding out from a dead Ray actor costs minutes.
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ConfigError(f"target model {str(folder)!r} holds no *.safetensors weights"
                          + (f" (only {', '.join(others)}, which would need unpickling)" if others else "")
                          + "; re-save it with save_pretrained(folder, safe_serialization=True)")
    for f in weights:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError: either way vLLM cannot load it
            raise ConfigError(f"target model {str(folder)!r}: {f.name} is not a readable safetensors file "
                              f"({type(exc).__name__}: {exc}); re-export the model") from None
