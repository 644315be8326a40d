"""Seed instructions: read, validate, de-duplicate and shape them into chat messages.

A seed file is any table of instructions; `SeedFields` maps its columns, so the bundled
seeds (`id`/`instruction`/`input`), Dolly (`instruction`/`context`), OIG-like dumps and
OpenAssistant-style message lists all load with a mapping change only.

`prepare_seeds` never raises on a bad row: each becomes an error row instead, so one
broken line in a million-row file costs that line, not the run.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from draftalign.config import SeedFields
from draftalign.errors import ConfigError

__all__ = ["normalize_text", "seed_id", "prepare_seeds", "open_rows", "read_seed_file",
           "SUPPORTED_SUFFIXES", "MAX_FIELD_CHARS", "unreadable_parquet"]

SUPPORTED_SUFFIXES = (".jsonl", ".parquet")
RAW_LIMIT = 2000  # chars of the original row kept in an error row: enough to find it, not a copy
# No prompt fits a context of a million characters; a field beyond that is a broken export, and
# tokenizing or copying it would cost minutes and gigabytes before the context check refuses it.
MAX_FIELD_CHARS = 1_000_000
MAX_LINE_BYTES = 16 * MAX_FIELD_CHARS  # a JSONL line past this is refused unparsed, never held whole
ERROR_KEY = "__error__"  # read_seed_file marks an unreadable line with this key
RAW_KEY = "__raw__"

# Other chat dumps name roles differently; the Llama 2 template knows only these three.
_ROLE_ALIASES = {"prompter": "user", "human": "user", "gpt": "assistant", "bot": "assistant"}
_ROLES = ("system", "user", "assistant")


class _Bad(Exception):
    """A row-level problem; its message is the error row's reason."""


class _TooLong(_Bad):
    """A field over MAX_FIELD_CHARS; the reason gets the row number, as the raw text is cut."""


def normalize_text(s: str) -> str:
    """NFKC, lowercase, whitespace runs collapsed to one space, stripped: the dedup key."""
    return " ".join(unicodedata.normalize("NFKC", s).lower().split())


def seed_id(text: str) -> str:
    """`s-` + 16 hex chars of sha256 of the normalised text: same text, same id, any run."""
    return "s-" + hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()[:16]


def _text(value: Any, name: str, *, allow_empty: bool = False) -> str:
    """A str field checked for type, encoding and emptiness; bytes are decoded as UTF-8."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Bad(f"invalid UTF-8 in field {name!r}: {exc}") from None
    if not isinstance(value, str):
        raise _Bad(f"not text: field {name!r} holds {type(value).__name__}, expected a string")
    if len(value) > MAX_FIELD_CHARS:
        raise _TooLong(f"field too long: {name!r} holds {len(value):,} characters (limit {MAX_FIELD_CHARS:,})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON "\ud800" escapes decode to lone surrogates, which no UTF-8 writer accepts.
        raise _Bad(f"invalid UTF-8 in field {name!r}: lone surrogate at index {exc.start}") from None
    if not allow_empty and not value.strip():
        raise _Bad(f"empty text in field {name!r}")
    return value


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _Bad(f"malformed messages: field {name!r} must be a non-empty list of {{role, content}}")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise _Bad(f"malformed messages: turn {i} is {type(turn).__name__}, expected an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or _ROLE_ALIASES.get(role, role) not in _ROLES:
            raise _Bad(f"malformed messages: turn {i} has role {role!r}, expected one of {_ROLES}")
        if content is None:
            raise _Bad(f"malformed messages: turn {i} has no content")
        out.append({"role": _ROLE_ALIASES.get(role, role), "content": _text(content, f"{name}[{i}].content")})
    chat = out[1:] if out[0]["role"] == "system" else out
    expected = ["user", "assistant"] * len(chat)
    if not chat or [t["role"] for t in chat] != expected[: len(chat)] or chat[-1]["role"] != "user":
        roles = "/".join(t["role"] for t in out)
        raise _Bad(
            f"malformed messages: roles {roles} must alternate user/assistant "
            "after an optional system turn and end with user"
        )
    return out


def _get(row: dict, column: str) -> Any:
    if row.get(column) is None:  # a null cell (Parquet, JSON null) is as absent as a missing key
        raise _Bad(f"missing field {column!r}" + ("" if column not in row else " (null)"))
    return row[column]


def _raw(row: dict) -> str:
    # ensure_ascii escapes lone surrogates, so even the worst row serialises.
    text = row[RAW_KEY] if isinstance(row, dict) and RAW_KEY in row else json.dumps(row, ensure_ascii=True, default=repr)
    return str(text)[:RAW_LIMIT]


def _conversation(row: dict, fields: SeedFields) -> tuple[str, str | None, list[dict[str, str]], str]:
    """(instruction, input, messages, the text that identifies the seed) of one seed row."""
    if fields.messages is not None:
        messages = _messages(_get(row, fields.messages), fields.messages)
        instruction = next(t["content"] for t in reversed(messages) if t["role"] == "user")
        return instruction, None, messages, "\n".join(f"{t['role']}: {t['content']}" for t in messages)
    instruction = _text(_get(row, fields.instruction), fields.instruction)
    context = None
    if fields.input is not None and row.get(fields.input) is not None:
        context = _text(row[fields.input], fields.input, allow_empty=True)
        context = context if context.strip() else None
    user = instruction if context is None else f"{instruction}\n\n{context}"
    return instruction, context, [{"role": "user", "content": user}], user


def prepare_seeds(
    rows: Iterable[dict], fields: SeedFields, source: str, max_seeds: int | None = None
) -> tuple[list[dict], list[dict]]:
    """Validate and shape seed rows, in order; return (good rows, error rows).

    Good row: {"id": str, "source": str, "instruction": str, "input": str | None,
    "messages": [{"role": str, "content": str}, ...]}. Without a messages column the
    messages are one user turn, instruction + "\\n\\n" + input. With one, `instruction` is
    the last user turn and `input` is None. An empty input counts as no input (Dolly).
    Error row: {"id": str | None, "source": str, "reason": str, "raw": JSON str (≤ 2000 chars)}.
    Duplicates (same normalised text) keep the first occurrence. Reading stops once
    `max_seeds` good rows are collected, so later rows are neither kept nor reported.
    """
    good: list[dict] = []
    errors: list[dict] = []
    kept_by_text: dict[str, str] = {}  # normalised text -> id of the seed that kept it
    text_by_id: dict[str, str] = {}
    for n, row in enumerate(rows, start=1):
        if max_seeds is not None and len(good) >= max_seeds:
            break
        row_id: str | None = None
        row_source = source
        try:
            if not isinstance(row, dict):
                raise _Bad(f"not an object: row is {type(row).__name__}")
            if ERROR_KEY in row:
                raise _Bad(str(row[ERROR_KEY]))
            if fields.source is not None and row.get(fields.source) is not None:
                row_source = _text(row[fields.source], fields.source)
            if fields.id is not None:
                raw_id = _get(row, fields.id)
                # Integer ids (common in exports) are fine; they become strings.
                row_id = str(raw_id) if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
                row_id = row_id or _text(raw_id, fields.id).strip()
            instruction, context, messages, key_text = _conversation(row, fields)
            key = normalize_text(key_text)
            row_id = row_id or seed_id(key_text)
            if key in kept_by_text:
                raise _Bad(f"duplicate of an earlier seed: same normalised text as kept id {kept_by_text[key]!r}")
            if row_id in text_by_id:
                raise _Bad(f"duplicate id {row_id!r}: an earlier seed with different text has it")
        except _Bad as exc:
            reason = f"row {n}: {exc}" if isinstance(exc, _TooLong) else str(exc)
            errors.append({"id": row_id, "source": row_source, "reason": reason, "raw": _raw(row)})
            continue
        kept_by_text[key] = row_id
        text_by_id[row_id] = key
        good.append(
            {"id": row_id, "source": row_source, "instruction": instruction, "input": context, "messages": messages}
        )
    return good, errors


def open_rows(source: str, hf_config: str | None, hf_split: str, what: str) -> Iterator[dict]:
    """Rows of `source`, streamed: a .jsonl/.parquet file (read_seed_file), else a Hugging Face
    data set, i.e. a local folder (a cloned hub repo of data files, or `save_to_disk` output:
    how an offline cluster holds Dolly or CNN/DailyMail) or a hub name. `what` names the config
    key in errors.
    """
    path = Path(source).expanduser()
    if path.suffix in SUPPORTED_SUFFIXES or path.is_file():
        return read_seed_file(path)
    import datasets

    try:
        return iter(datasets.load_dataset(str(path) if path.is_dir() else source, hf_config,
                                          split=hf_split, streaming=True))
    except Exception as exc:  # hub unreachable, no such set or split, unreadable folder: one message
        kind = "local folder" if path.is_dir() else "Hugging Face data set"
        raise ConfigError(f"{what} {source!r} (split {hf_split!r}): cannot load it as a {kind}: "
                          f"{type(exc).__name__}: {exc}") from exc


def read_seed_file(path: str | Path) -> Iterator[dict]:
    """Stream rows from .jsonl or .parquet; an unreadable JSONL line yields {"__error__": reason}."""
    path = Path(path).expanduser()
    if path.suffix not in SUPPORTED_SUFFIXES:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise ConfigError(f"data file {str(path)!r}: unsupported suffix {path.suffix!r}; supported: {supported} "
                          "(a JSON array converts with `jq -c '.[]' FILE.json > FILE.jsonl`)")
    if not path.is_file():
        raise FileNotFoundError(f"seed file {str(path)!r} does not exist")
    return _read_jsonl(path) if path.suffix == ".jsonl" else _read_parquet(path)


def _lines(f) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes, length) per line; bytes is None for a line over MAX_LINE_BYTES, which
    is skipped in chunks so that a runaway line never sits in memory whole."""
    n = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        n += 1
        if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
            yield n, raw, len(raw)
            continue
        size = len(raw)
        while not raw.endswith(b"\n") and (raw := f.readline(MAX_LINE_BYTES)):
            size += len(raw)
        yield n, None, size


def _read_jsonl(path: Path) -> Iterator[dict]:
    with path.open("rb") as f:  # bytes, so one bad line is reported instead of failing the file
        for n, raw, size in _lines(f):
            if raw is None:
                yield {ERROR_KEY: f"line {n}: line too long: {size:,} bytes (limit {MAX_LINE_BYTES:,})",
                       RAW_KEY: f"<{size:,} bytes not read>"}
                continue
            if not raw.strip():
                continue
            try:
                # A BOM that Windows editors put before the first line is not part of the JSON.
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield {ERROR_KEY: f"line {n}: invalid UTF-8: {exc}", RAW_KEY: raw.decode("utf-8", "replace")}
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield {ERROR_KEY: f"line {n}: not valid JSON: {exc}", RAW_KEY: line.rstrip("\n")}
                continue
            if not isinstance(obj, dict):
                yield {ERROR_KEY: f"line {n}: not a JSON object but {type(obj).__name__}", RAW_KEY: line.rstrip("\n")}
                continue
            yield obj


def _read_parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        for batch in batches:
            yield from batch.to_pylist()
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise ConfigError(unreadable_parquet(path, exc, "replace it with a good copy (a truncated "
                                             "download or copy is the usual cause)")) from None


def unreadable_parquet(path: str | Path, exc: BaseException, recovery: str) -> str:
    """One line for a truncated or corrupt Parquet file: which file, why, what to do."""
    detail = " ".join(str(exc).split())[:300]
    return f"{str(path)!r} is not a readable Parquet file ({type(exc).__name__}: {detail}); {recovery}"
