"""What determines a distillation row, recorded next to the set so that a rerun never mixes sets.

Resume treats every `row_key` in `data/` as done. That is only right while the rows would come
out the same: the same target weights, chat template, system prompt, sampling settings and
seeds. `generate` writes those to `fingerprint.json` and, before it adds a row to a folder,
compares them with the current config; a difference is refused with what changed, unless
`generate.overwrite=true` discards the old set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from draftalign.atomicio import write_json_atomic
from draftalign.config import Config
from draftalign.errors import ConfigError
from draftalign.seeds import unreadable_parquet
from draftalign.workers.generate_rows import PART_RECOVERY

__all__ = ["FINGERPRINT", "row_determinants", "changes", "check_set", "write_fingerprint", "set_target_hashes",
           "SAME_NAME_HINT"]

FINGERPRINT = "fingerprint.json"
# A hub name hashes with the revision the hub resolves it to, or alone when the hub is unreachable.
SAME_NAME_HINT = (" (same name, other hash: the weights changed, or, for a hub name, its revision moved or the hub "
                  "was unreachable in one of the runs; a local snapshot in models.target pins it)")


def row_determinants(cfg: Config, ident: dict[str, str], template_hash: str) -> dict[str, Any]:
    gen = cfg.generate
    return {
        "target_model": ident["target_model"],  # shown in messages; the hash is what is compared
        "target_hash": ident["target_hash"], "chat_template_hash": template_hash,
        "system_prompt": gen.system_prompt,
        "sampling": {s.name: s.model_dump(mode="json") for s in gen.sampling},
        "seeds": {"seeds": gen.seeds, "hf_config": gen.hf_config, "hf_split": gen.hf_split,
                  "fields": gen.fields.model_dump(mode="json"), "source": gen.source},
    }


def _sampling_changes(old: dict[str, dict], new: dict[str, dict]) -> list[str]:
    out = []
    for name, before in old.items():
        after = new.get(name)
        if after is None:  # its rows would stay in data/ with no setting behind them
            out.append(f"sampling setting {name!r} is no longer configured")
            continue
        diffs = [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in sorted({*before, *after})
                 if before.get(k) != after.get(k)]
        if diffs:
            out.append(f"sampling {name!r}: {', '.join(diffs)}")
    return out  # a setting added since is fine: it only adds rows


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two row_determinants, in words; [] when rows would come out the same."""
    out = []
    if old.get("target_hash") != new["target_hash"]:
        hint = SAME_NAME_HINT if old.get("target_model") == new["target_model"] else ""
        out.append(f"target {old.get('target_model')!r} (hash {old.get('target_hash')}) -> "
                   f"{new['target_model']!r} (hash {new['target_hash']}){hint}")
    if old.get("chat_template_hash") != new["chat_template_hash"]:
        out.append(f"chat template hash {old.get('chat_template_hash')} -> {new['chat_template_hash']}")
    if "system_prompt" in old and old["system_prompt"] != new["system_prompt"]:
        out.append(f"generate.system_prompt {old['system_prompt']!r} -> {new['system_prompt']!r}")
    if "sampling" in old:
        out += _sampling_changes(old["sampling"], new["sampling"])
    for key, before in (old.get("seeds") or {}).items():
        if before != new["seeds"].get(key):
            out.append(f"generate.{key} {before!r} -> {new['seeds'].get(key)!r}")
    return out


def set_target_hashes(files: list[Path], recovery: str = "replace it with a good copy") -> dict[str, set[str]]:
    """{"target_model": {...}, "target_hash": {...}, "chat_template_hash": {...}} over the rows of `files`."""
    import pyarrow.parquet as pq

    found: dict[str, set[str]] = {"target_model": set(), "target_hash": set(), "chat_template_hash": set()}
    for f in files:
        try:
            table = pq.read_table(f, columns=list(found))
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(unreadable_parquet(f, exc, recovery)) from None
        for column in found:
            found[column].update(table.column(column).unique().to_pylist())
    return found


def _recorded(out: Path) -> dict[str, Any] | None:
    """The fingerprint of the set in `out`: its file, or what the rows of an older set carry."""
    path = out / FINGERPRINT
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{path} is not readable JSON ({exc}): delete it to check the set by its rows' "
                              "target and template instead") from None
    parts = sorted((out / "data").glob("*.parquet"))
    if not parts:
        return None
    # A set from before fingerprint.json: its rows still carry their target and template.
    return {k: ", ".join(sorted(v)) for k, v in set_target_hashes(parts, PART_RECOVERY).items()}


def check_set(out: Path, current: dict[str, Any], overwrite: bool) -> None:
    """Refuse to add rows to a set made otherwise; with overwrite, discard that set first."""
    old = _recorded(out)
    found = changes(old, current) if old is not None else []
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"{out} holds a distillation set generated otherwise ({'; '.join(found)}): its rows "
                          "would be kept as done and mixed with new ones; choose another generate.output, or "
                          "set generate.overwrite=true to discard that set and generate anew")
    print(f"[generate] generate.overwrite: discarding the set in {out} ({'; '.join(found)})", flush=True)
    for name in ("data", "errors"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (FINGERPRINT, "manifest.json"):
        (out / name).unlink(missing_ok=True)


def write_fingerprint(out: Path, current: dict[str, Any]) -> None:
    write_json_atomic(out / FINGERPRINT, current)
