"""Evaluation tasks: read a held-out set, map its fields, fill the task's prompt template.

Three kinds, after the paper's evaluation (paper-spec 6.1): open-ended answering (Dolly),
summarisation (CNN/DailyMail, XSum) and translation (WMT). A task reads the bundled set of
its kind by default, or a JSONL/Parquet file or a Hugging Face data set through a field
mapping. Unlike seeds, a bad row stops the run with its row number and field: a silently
thinned evaluation set would make drafters look better or worse than they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from draftalign.config import EvalTaskConfig
from draftalign.data.seeds import open_rows
from draftalign.errors import DraftalignError

__all__ = ["EvalDataError", "bundled_path", "task_rows", "build_prompts", "load_task_prompts", "prompt_seed"]

# Summaries and translations have nothing to work on without their input; a Dolly
# question often has no context.
_INPUT_REQUIRED = {"open_ended": False, "summarize": True, "translate": True}
_BUNDLED = Path(__file__).resolve().parent.parent.parent / "examples" / "data" / "eval"


def prompt_seed(seed: int, prompt_id: str, temperature: float) -> int:
    """The sampling seed of one prompt at one temperature, for both engines: a rerun samples the same answers.

    15 hex digits (60 bits) of sha256 of "seed/prompt id/temperature", as the reference engine
    has always seeded its generators (the vLLM engine used 12 digits before).
    """
    return int(hashlib.sha256(f"{seed}/{prompt_id}/{temperature}".encode()).hexdigest()[:15], 16)


class EvalDataError(DraftalignError, ValueError):
    """An evaluation set that cannot be read as configured; the message names task, row and field."""


def bundled_path(kind: str) -> Path:
    """The held-out set shipped for `kind` (examples/data/eval/KIND.jsonl)."""
    for base in (_BUNDLED, Path.cwd() / "examples" / "data" / "eval"):
        if (base / f"{kind}.jsonl").is_file():
            return base / f"{kind}.jsonl"
    raise EvalDataError(f"the bundled evaluation set for {kind!r} is not found under {_BUNDLED}; "
                        "set evaluate.tasks[].data to a file or data set")


def _source(task: EvalTaskConfig) -> str:
    return str(bundled_path(task.kind)) if task.data is None else task.data


def task_rows(task: EvalTaskConfig) -> Iterator[dict]:
    """Raw rows of the task's data set, streamed (a hub set is never downloaded whole)."""
    return open_rows(_source(task), task.hf_config, task.hf_split, f"evaluate task {task.kind!r} data")


def _field(row: dict, column: str) -> tuple[bool, Any]:
    """(present, value) of a column; "a.b" reads row["a"]["b"]."""
    node: Any = row
    for part in column.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _text(task: EvalTaskConfig, n: int, row: dict, column: str, required: bool) -> str | None:
    where = f"task {task.name!r} ({_source(task)}), row {n}"
    present, value = _field(row, column)
    if "__error__" in row:
        raise EvalDataError(f"{where}: {row['__error__']}")
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            state = "missing" if not present else "empty"
            raise EvalDataError(f"{where}: {state} field {column!r} (fields: {sorted(row)})")
        return None
    if not isinstance(value, str):
        raise EvalDataError(f"{where}: field {column!r} holds {type(value).__name__}, expected text")
    return value


def _row_id(task: EvalTaskConfig, n: int, row: dict, user: str) -> str:
    if task.fields.id is not None:
        present, value = _field(row, task.fields.id)
        if present and value is not None and str(value).strip():
            return str(value)
    return "p-" + hashlib.sha256(user.encode("utf-8")).hexdigest()[:16]


def build_prompts(task: EvalTaskConfig, rows: Iterator[dict] | list[dict], limit: int) -> list[dict]:
    """The first `limit` rows as {"id", "task", "kind", "instruction", "input", "user"}.

    `user` is the task's template filled with the row's instruction (or the task's fixed one)
    and input ("" when absent), stripped. Raises EvalDataError on a bad row or mapping.
    """
    f = task.fields
    if f.instruction is None and not task.instruction:
        raise EvalDataError(f"task {task.name!r}: fields.instruction is null, so set the task's "
                            "`instruction` text (e.g. 'Summarize the following article.')")
    out: list[dict] = []
    first_row: dict[str, int] = {}  # id -> row number: the baselines and rows are keyed by id
    for n, row in enumerate(rows, start=1):
        if len(out) >= limit:
            break
        if not isinstance(row, dict):
            raise EvalDataError(f"task {task.name!r}, row {n}: not an object but {type(row).__name__}")
        instruction = (_text(task, n, row, f.instruction, True) if f.instruction is not None
                       else task.instruction)
        context = _text(task, n, row, f.input, _INPUT_REQUIRED[task.kind]) if f.input is not None else None
        if f.input is None and _INPUT_REQUIRED[task.kind] and "{input}" in task.template:
            raise EvalDataError(f"task {task.name!r}: a {task.kind} task needs fields.input")
        try:
            user = task.template.format(instruction=instruction, input=context or "").strip()
        except (KeyError, IndexError, ValueError) as exc:
            raise EvalDataError(f"task {task.name!r}: bad template {task.template!r}: use only "
                                f"{{instruction}} and {{input}} ({type(exc).__name__}: {exc})") from None
        pid = _row_id(task, n, row, user)
        if pid in first_row:
            raise EvalDataError(f"task {task.name!r} ({_source(task)}), row {n}: duplicate id {pid!r} (also row "
                                f"{first_row[pid]}); the target-alone baseline is keyed by id, so make the ids "
                                "unique or set fields.id: null to derive them from the prompt text")
        first_row[pid] = n
        out.append({"id": pid, "task": task.name, "kind": task.kind,
                    "instruction": instruction, "input": context, "user": user})
    if not out:
        raise EvalDataError(f"task {task.name!r}: no rows in {_source(task)}")
    return out


def load_task_prompts(task: EvalTaskConfig, default_limit: int) -> list[dict]:
    return build_prompts(task, task_rows(task), task.max_prompts or default_limit)
