"""The evaluate stage's per-prompt row (EVAL_SCHEMA) as a typed record, and its one Parquet form.

Both engines build `EvalRow`s, the cell store and rows.parquet write them through `eval_table`,
and the report reads their fields; the column contract itself stays in draftalign.data.schemas.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa

from draftalign.data.schemas import EVAL_SCHEMA, to_table

__all__ = ["EvalRow", "eval_table", "read_eval_rows"]


@dataclass(frozen=True)
class EvalRow:
    """One (drafter, task, prompt, engine, γ, temperature); the fields are EVAL_SCHEMA's columns,
    in its order (documented there), less the `schema_version` the table stamps on."""

    drafter: str
    drafter_path: str
    task: str
    task_kind: str
    prompt_id: str
    engine: str
    gamma: int
    temperature: float
    top_p: float
    num_input_tokens: int
    num_generated_tokens: int
    num_drafts: int
    num_draft_tokens: int
    num_accepted: int
    accepted_per_pos: list[int]
    block_efficiency: float
    acceptance_rate: float
    spec_seconds: float
    ar_seconds: float | None
    ar_generated_tokens: int | None
    matches_autoregressive: bool | None
    generated_token_ids: list[int]
    target_model: str

    @classmethod
    def from_columns(cls, values: dict[str, object]) -> EvalRow:
        """A row from a table's columns; `schema_version` and any column a newer file adds are dropped."""
        return cls(**{f.name: values[f.name] for f in fields(cls)})  # type: ignore[arg-type]


def eval_table(rows: list[EvalRow]) -> pa.Table:
    """The rows as an EVAL_SCHEMA table (ValueError naming the row and column of a bad value)."""
    return to_table([asdict(r) for r in rows], EVAL_SCHEMA)


def read_eval_rows(path: str | Path) -> list[EvalRow]:
    import pyarrow.parquet as pq

    return [EvalRow.from_columns(r) for r in pq.read_table(path).to_pylist()]
