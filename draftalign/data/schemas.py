"""Versioned Parquet row contracts of the `generate` and `evaluate` stages.

Every file carries a `schema_version` column (and the version in its metadata); readers call
`check_table` first, so a file written by another version fails with the columns that differ,
not deep in training. The distillation set is at version 2 (`DISTILL_SCHEMA_VERSION`: version 1
had no generator columns, and `distill_schema_for` still reads it, its generator being the
target); the other tables are at version 1.

Distillation set (`DISTILL_SCHEMA`), one row per (seed, sampling setting):

- `id` (string): the seed id, from the seed file's id column or `s-` + sha256 of its text.
- `row_key` (string): `"{id}/{sampling.name}"`, unique per row; resume skips keys already written.
- `source` (string): where the seed came from (file or data set name; `self-instruct/KIND` for
  a self-instructed request of a kind, generate.self_instruct.kinds).
- `instruction` (string): the seed instruction (the last user turn for message seeds).
- `input` (string, nullable): the seed's optional context, appended to the instruction.
- `messages` (list<struct<role: string, content: string>>): the conversation sent to the target.
- `prompt_text` (string): `messages` rendered by the target's chat template, BOS included.
- `prompt_token_ids` (list<int32>): the target tokenizer's ids of `prompt_text`.
- `response_text` (string): the target's answer.
- `response_token_ids` (list<int32>): the ids the target generated, EOS included if emitted.
- `finish_reason` (string): `"stop"` (EOS or a stop string), `"length"` (hit
  `max_tokens`), or another engine reason.
- `sampling` (struct<name: string, temperature: float32, top_p: float32, max_tokens:
  int32, seed: int64 nullable>): the setting that produced the answer; temperature 0 = greedy.
- `num_input_tokens` (int32): `len(prompt_token_ids)`.
- `num_generated_tokens` (int32): `len(response_token_ids)`.
- `target_model` (string): the target's name or path as configured.
- `target_hash` (string): fingerprint of the target's weights and config.
- `chat_template_hash` (string): 16 hex chars of sha256 of the chat template used.
- `generator_model` (string): the model that wrote the response (`generate.generator`): the
  target's name for the target's own answers, a drafter's folder for on-policy rows.
- `generator_hash` (string): its fingerprint, as `target_hash` (equal to it when the target
  answered). `target_*` always name the target, which scores every row in distillation.
- `schema_version` (int32): 2 (version 1: the same without the two generator columns).

Errors (`ERROR_SCHEMA`), one row per seed or request that produced no distillation row:

- `id` (string, nullable): the seed id, when known.
- `row_key` (string, nullable): the failed request's row key, for engine errors.
- `source` (string): as above.
- `stage` (string): where it failed: `"seeds"` (reading/validating) or `"engine"` (generation).
- `reason` (string): what went wrong, in words.
- `raw` (string): the offending input as JSON, at most 2000 characters.
- `schema_version` (int32): 1.

Prepared seeds (`SEED_SCHEMA`): `id`, `source`, `instruction`, `input`, `messages` and
`schema_version`, typed as in the distillation set.

Evaluation rows (`EVAL_SCHEMA`), one per (drafter, task, prompt, engine, γ, temperature):
their columns are listed where it is defined, below the other three.
"""

from __future__ import annotations

import numbers
from typing import Any, TypedDict

import pyarrow as pa

__all__ = [
    "SCHEMA_VERSION", "DISTILL_SCHEMA_VERSION", "DISTILL_SCHEMA", "DISTILL_SCHEMA_V1", "ERROR_SCHEMA",
    "SEED_SCHEMA", "EVAL_SCHEMA", "row_key", "to_table", "check_table", "schema_version_of",
    "distill_schema_for", "Sampling", "DistillRow", "ErrorRow",
]

SCHEMA_VERSION = 1  # errors, seeds, evaluation rows
DISTILL_SCHEMA_VERSION = 2  # the distillation set: version 2 added the generator columns

_MESSAGES = pa.list_(pa.struct([pa.field("role", pa.string(), False), pa.field("content", pa.string(), False)]))
_SAMPLING = pa.struct(
    [
        pa.field("name", pa.string(), False),
        pa.field("temperature", pa.float32(), False),
        pa.field("top_p", pa.float32(), False),
        pa.field("max_tokens", pa.int32(), False),
        pa.field("seed", pa.int64(), True),
    ]
)


class Sampling(TypedDict):
    """A row's `sampling` struct (`_SAMPLING`), as Python values."""

    name: str
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None


def _schema(name: str, fields: list[pa.Field], version: int = SCHEMA_VERSION) -> pa.Schema:
    meta = {"draftalign.schema": name, "draftalign.schema_version": str(version)}
    return pa.schema([*fields, pa.field("schema_version", pa.int32(), False)], metadata=meta)


def schema_version_of(schema: pa.Schema) -> int | None:
    """The version a schema (ours, or a file's) declares in its metadata; None when it declares none."""
    raw = (schema.metadata or {}).get(b"draftalign.schema_version")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable)


_SEED_FIELDS = [
    _f("id", pa.string()),
    _f("source", pa.string()),
    _f("instruction", pa.string()),
    _f("input", pa.string(), True),
    _f("messages", _MESSAGES),
]
SEED_SCHEMA = _schema("seeds", _SEED_FIELDS)
_DISTILL_V1_FIELDS = [
    *_SEED_FIELDS[:1],
    _f("row_key", pa.string()),
    *_SEED_FIELDS[1:],
    _f("prompt_text", pa.string()),
    _f("prompt_token_ids", pa.list_(pa.int32())),
    _f("response_text", pa.string()),
    _f("response_token_ids", pa.list_(pa.int32())),
    _f("finish_reason", pa.string()),
    _f("sampling", _SAMPLING),
    _f("num_input_tokens", pa.int32()),
    _f("num_generated_tokens", pa.int32()),
    _f("target_model", pa.string()),
    _f("target_hash", pa.string()),
    _f("chat_template_hash", pa.string()),
]
DISTILL_SCHEMA_V1 = _schema("distill", _DISTILL_V1_FIELDS, 1)
DISTILL_SCHEMA = _schema("distill", [*_DISTILL_V1_FIELDS, _f("generator_model", pa.string()),
                                     _f("generator_hash", pa.string())], DISTILL_SCHEMA_VERSION)


class DistillRow(TypedDict):
    """A DISTILL_SCHEMA row, as Python values (schema_version is added by to_table)."""

    id: str
    row_key: str
    source: str
    instruction: str
    input: str | None
    messages: list[dict[str, str]]
    prompt_text: str
    prompt_token_ids: list[int]
    sampling: Sampling
    response_text: str
    response_token_ids: list[int]
    finish_reason: str
    num_input_tokens: int
    num_generated_tokens: int
    target_model: str
    target_hash: str
    chat_template_hash: str
    generator_model: str
    generator_hash: str


class ErrorRow(TypedDict):
    """An ERROR_SCHEMA row: a seed or request that did not become a distillation row."""

    id: str | None
    row_key: str | None
    source: str
    stage: str
    reason: str
    raw: str


ERROR_SCHEMA = _schema(
    "errors",
    [
        _f("id", pa.string(), True),
        _f("row_key", pa.string(), True),
        _f("source", pa.string()),
        _f("stage", pa.string()),
        _f("reason", pa.string()),
        _f("raw", pa.string()),
    ],
)


# Per-prompt rows of the `evaluate` stage (EVAL_SCHEMA, schema_version 1), one per
# (drafter, task, prompt, engine, γ, temperature):
#
# - `drafter` (string), `drafter_path` (string): the drafter's report name and its folder or hub name
#   ("" for the n-gram baseline `ngram`, which has no model).
# - `task` (string), `task_kind` (string): the task name and its kind (open_ended, summarize, translate).
# - `prompt_id` (string): the evaluation row's id.
# - `engine` (string): "reference" (draftalign.evaluation.specdecode) or "vllm".
# - `gamma` (int32), `temperature` (float32), `top_p` (float32): the decoding setting.
# - `num_input_tokens` (int32), `num_generated_tokens` (int32): prompt and answer lengths.
# - `num_drafts` (int32): speculative iterations (target calls that verified drafts).
# - `num_draft_tokens` (int32), `num_accepted` (int32): draft tokens proposed and accepted.
# - `accepted_per_pos` (list<int32>, length γ): drafts whose position i was accepted.
# - `block_efficiency` (float64), `acceptance_rate` (float64): this prompt's τ (reference: emitted
#   tokens / target calls; vllm: 1 + accepted / drafts) and draft acceptance rate accepted / drafted
#   tokens (summary.json's `draft_acceptance_rate`; not Σ min(p, q)). The summary pools counts over
#   prompts instead of averaging these.
# - `spec_seconds` (float64): wall-clock seconds of the speculative generation.
# - `ar_seconds` (float64, nullable), `ar_generated_tokens` (int32, nullable): the same prompt
#   decoded by the target alone, when measured.
# - `matches_autoregressive` (bool, nullable): greedy only: the speculative tokens equal the
#   target's own greedy tokens (losslessness, up to floating-point ties).
# - `generated_token_ids` (list<int32>): the speculative answer.
# - `target_model` (string): the target's name or path.
# - `schema_version` (int32): 1.
EVAL_SCHEMA = _schema(
    "evaluate",
    [
        _f("drafter", pa.string()),
        _f("drafter_path", pa.string()),
        _f("task", pa.string()),
        _f("task_kind", pa.string()),
        _f("prompt_id", pa.string()),
        _f("engine", pa.string()),
        _f("gamma", pa.int32()),
        _f("temperature", pa.float32()),
        _f("top_p", pa.float32()),
        _f("num_input_tokens", pa.int32()),
        _f("num_generated_tokens", pa.int32()),
        _f("num_drafts", pa.int32()),
        _f("num_draft_tokens", pa.int32()),
        _f("num_accepted", pa.int32()),
        _f("accepted_per_pos", pa.list_(pa.int32())),
        _f("block_efficiency", pa.float64()),
        _f("acceptance_rate", pa.float64()),
        _f("spec_seconds", pa.float64()),
        _f("ar_seconds", pa.float64(), True),
        _f("ar_generated_tokens", pa.int32(), True),
        _f("matches_autoregressive", pa.bool_(), True),
        _f("generated_token_ids", pa.list_(pa.int32())),
        _f("target_model", pa.string()),
    ],
)


def row_key(seed_id: str, sampling_name: str) -> str:
    return f"{seed_id}/{sampling_name}"


def _check(value: Any, type_: pa.DataType, nullable: bool, where: str) -> None:
    """Raise ValueError(where: ...) unless `value` fits `type_` exactly (no silent casts)."""
    if value is None:
        if not nullable:
            raise ValueError(f"{where}: is missing or null but required")
        return
    if pa.types.is_string(type_):
        ok = isinstance(value, str)
    elif pa.types.is_integer(type_):
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif pa.types.is_floating(type_):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    elif pa.types.is_list(type_):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list for {type_}, got {type(value).__name__}")
        item = type_.value_field
        if pa.types.is_integer(item.type):  # token ids: a fast pass, the slow one only on failure
            if set(map(type, value)) <= {int}:  # C-speed exact check; bool or floats take the slow path
                return
        for i, v in enumerate(value):
            _check(v, item.type, item.nullable, f"{where}[{i}]")
        return
    elif pa.types.is_struct(type_):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object for {type_}, got {type(value).__name__}")
        names = {type_.field(i).name for i in range(type_.num_fields)}
        if extra := sorted(set(value) - names):
            raise ValueError(f"{where}: unexpected keys {extra}")
        for i in range(type_.num_fields):
            f = type_.field(i)
            _check(value.get(f.name), f.type, f.nullable, f"{where}.{f.name}")
        return
    else:
        ok = True  # no other types are used; pyarrow converts them
    if not ok:
        raise ValueError(f"{where}: expected {type_}, got {type(value).__name__} {value!r:.80}")


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows as a table of exactly `schema`, or ValueError naming the row index and column.

    Nullable columns may be left out (they become null); `schema_version` may be left out
    (it is filled with the schema's own version). Extra keys and values of the wrong type are errors.
    """
    version = schema_version_of(schema)
    names = set(schema.names)
    filled = []
    for i, row in enumerate(rows):
        if extra := sorted(set(row) - names):
            raise ValueError(f"row {i}: unexpected columns {extra} (schema has {schema.names})")
        row = {"schema_version": version, **row}
        if row["schema_version"] != version:
            raise ValueError(f"row {i}, column 'schema_version': {row['schema_version']!r} != {version}")
        for field in schema:
            _check(row.get(field.name), field.type, field.nullable, f"row {i}, column {field.name!r}")
        filled.append(row)
    columns = []
    for field in schema:
        values = [row.get(field.name) for row in filled]
        try:
            columns.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:  # e.g. an int32 overflow
            for i, v in enumerate(values):
                try:
                    pa.array([v], type=field.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError) as row_exc:
                    raise ValueError(f"row {i}, column {field.name!r}: {row_exc}") from None
            raise ValueError(f"column {field.name!r}: {exc}") from None
    return pa.Table.from_arrays(columns, schema=schema)


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Type equality that ignores nullability and list item names, which writers differ on."""
    if pa.types.is_list(a) or pa.types.is_large_list(a):
        return type(a) is type(b) and _same_type(a.value_type, b.value_type)
    if pa.types.is_struct(a):
        if not pa.types.is_struct(b) or a.num_fields != b.num_fields:
            return False
        pairs = [(a.field(i), b.field(i)) for i in range(a.num_fields)]
        return all(x.name == y.name and _same_type(x.type, y.type) for x, y in pairs)
    return a.equals(b)


def check_table(table_or_schema: pa.Table | pa.Schema, schema: pa.Schema) -> None:
    """Raise ValueError naming every missing or mistyped column; extra columns are allowed."""
    have = table_or_schema if isinstance(table_or_schema, pa.Schema) else table_or_schema.schema
    problems = [f"missing column {f.name!r} ({f.type})" for f in schema if f.name not in have.names]
    for f in schema:
        if f.name in have.names and not _same_type(have.field(f.name).type, f.type):
            problems.append(f"column {f.name!r} is {have.field(f.name).type}, expected {f.type}")
    if problems:
        found = (have.metadata or {}).get(b"draftalign.schema_version", b"unknown").decode()
        raise ValueError(
            f"table does not match schema_version {schema_version_of(schema)} (file says schema_version {found}): "
            + "; ".join(problems)
        )


def distill_schema_for(have: pa.Schema) -> pa.Schema:
    """The distillation-set schema a file's metadata declares: version 1 (no generator columns,
    the target answered every row) or the current one. A file that declares none is held to the
    current one; a version this draftalign does not know is a ValueError naming it."""
    version = schema_version_of(have)
    if version is None or version == DISTILL_SCHEMA_VERSION:
        return DISTILL_SCHEMA
    if version == 1:
        return DISTILL_SCHEMA_V1
    raise ValueError(f"schema_version {version} is not one this draftalign reads (1 or {DISTILL_SCHEMA_VERSION}): "
                     "the file was written by a newer draftalign")
