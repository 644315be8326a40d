"""Finished evaluation cells on disk, so a crash in a long sweep loses one cell, not the sweep.

A cell is one (engine, drafter, task, γ, temperature): its per-prompt rows go to
`evaluate.output/cells/<name>.parquet` (EVAL_SCHEMA) the moment it is done; the target-alone
baseline of a (task, temperature) goes beside it as JSON. A rerun reads the cells that exist
and computes the rest. `cells/fingerprint.json` holds what determined them all (the evaluate
settings, the target, the prompts); when it differs, the old cells are dropped, so a changed
config never mixes with an earlier one's rows. Each drafter's export is in its cells' names
instead, so a comparison that gains a drafter computes that drafter's cells only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from draftalign.evaluation.rows import EvalRow, eval_table, read_eval_rows
from draftalign.util.atomicio import write_json_atomic, write_parquet_atomic

FINGERPRINT = "fingerprint.json"
# One prompt's target-alone (tokens, seconds); read back from JSON as a two-item list, unpacked alike.
Baseline = tuple[list[int], float]


class CellStore:
    def __init__(self, output: str | Path, fingerprint: str) -> None:
        self.folder = Path(output) / "cells"
        marker = self.folder / FINGERPRINT
        if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") != fingerprint:
            shutil.rmtree(self.folder)  # made under another config: never mixed with this one's
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, {"fingerprint": fingerprint})

    def _path(self, suffix: str, *key: Any) -> Path:
        name = "-".join(str(k) for k in key)
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]  # names may hold any character
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:80]
        return self.folder / f"{safe}-{digest}{suffix}"

    def rows(self, *key: Any) -> list[EvalRow] | None:
        """The rows of a finished cell, or None."""
        path = self._path(".parquet", *key)
        return read_eval_rows(path) if path.is_file() else None

    def put_rows(self, rows: list[EvalRow], *key: Any) -> None:
        write_parquet_atomic(eval_table(rows), self._path(".parquet", *key))

    def baseline(self, *key: Any) -> dict[str, Baseline] | None:
        """A finished target-alone baseline: prompt id -> (tokens, seconds), as put_baseline got it."""
        path = self._path(".json", *key)
        return json.loads(path.read_text()) if path.is_file() else None

    def put_baseline(self, value: dict[str, Baseline], *key: Any) -> None:
        write_json_atomic(self._path(".json", *key), value)
