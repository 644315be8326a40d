"""Instructions the target writes itself, the way Magpie does (Xu et al., 2024).

An aligned chat model given only its template's user-turn prefix (for ChatML
`<|im_start|>user\\n`) goes on to write a user request, because that is what follows the
prefix in its training data. The requests are cleaned, filtered (empty, too short, too long,
not ending the turn), de-duplicated by normalised text, and become seed rows that the target
then answers like any other seed.

Pure logic only (no Ray, no vLLM): the generate pipeline runs the engine pass around it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypedDict

import pyarrow as pa

from draftalign.data.schemas import Sampling
from draftalign.data.seeds import normalize_text
from draftalign.errors import ConfigError

__all__ = ["SENTINEL", "UserTurn", "user_turn", "clean_request", "drop_reason", "reason_kind", "select",
           "instruction_id", "as_seeds", "request_seed", "requests", "index_of", "summary", "INSTRUCTION_SCHEMA",
           "SAMPLING_NAME", "InstructionSummary"]

# A text no template adds or changes: where it lands in the render, the user's words go.
SENTINEL = "draftalign-self-instruct-7c1e9b52"
REASONS = ("not ending the turn", "empty", "too short", "too long", "duplicate", "engine error")
SAMPLING_NAME = "self-instruct"  # the `sampling.name` of the raw request rows in instructions/data/

# instructions/instructions.parquet: every request asked, kept or not, with why not.
INSTRUCTION_SCHEMA = pa.schema(
    [pa.field("index", pa.int32(), False), pa.field("id", pa.string(), True), pa.field("source", pa.string(), False),
     pa.field("instruction", pa.string(), False), pa.field("raw_text", pa.string(), False),
     pa.field("ended", pa.bool_(), False), pa.field("kept", pa.bool_(), False),
     # reason: one of REASONS (counted by `draftalign inspect`); detail: the whole reason.
     pa.field("reason", pa.string(), True), pa.field("detail", pa.string(), True),
     pa.field("schema_version", pa.int32(), False)],
    metadata={"draftalign.schema": "instructions", "draftalign.schema_version": "1"})


@dataclass(frozen=True)
class UserTurn:
    """The text before a user's words (`prefix`) and the marker that ends the turn (`end`, "" if none)."""

    prefix: str
    end: str


def user_turn(tokenizer: Any, name: str, system_prompt: str | None = None) -> UserTurn:
    """Split the chat template's render of one user turn around the user's words.

    add_generation_prompt=False: the prefix must end where the user writes, not where the
    assistant does. A template without a user turn (or without any template) cannot prompt
    the target for a request: a ConfigError naming the tokenizer says so.
    """
    template = getattr(tokenizer, "chat_template", None)
    turns = [{"role": "user", "content": SENTINEL}]
    if system_prompt:
        turns.insert(0, {"role": "system", "content": system_prompt})
    text = ""
    if template:
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False)
        except Exception:  # a template that refuses a lone user turn has none to offer either
            text = ""
        text = text if isinstance(text, str) else text[0]
    if SENTINEL not in text:
        what = "has no chat template" if not template else "has a chat template with no user turn"
        raise ConfigError(f"generate.self_instruct: the tokenizer {name!r} {what}: a user message does not "
                          "appear in its render, so there is no user-turn prefix to prompt the target with; "
                          "set tokenizer.chat_template or use generate.seeds")
    prefix, _, rest = text.partition(SENTINEL)
    # The marker that closes the turn, without the newline after it: ChatML `<|im_end|>`, Llama 2 `[/INST]`.
    end = rest.strip().splitlines()[0].strip() if rest.strip() else ""
    return UserTurn(prefix=prefix, end=end)


def clean_request(text: str, end: str = "") -> str:
    """The request without surrounding whitespace or a trailing end marker the engine kept."""
    text = text.strip()
    if end and text.endswith(end):
        text = text[: -len(end)].rstrip()
    return text


def drop_reason(text: str, ended: bool, min_chars: int, max_chars: int) -> str | None:
    """Why a request is dropped (reason_kind of it is one of REASONS), or None to keep it.

    A request that did not end the turn was cut off by max_tokens: a fragment, not a request.
    """
    if not ended:
        return "not ending the turn: hit max_tokens before the end of the user turn"
    if not text:
        return "empty"
    if len(text) < min_chars:
        return f"too short: {len(text)} characters < min_chars {min_chars}"
    if len(text) > max_chars:
        return f"too long: {len(text)} characters > max_chars {max_chars}"
    return None


def reason_kind(reason: str) -> str:
    """The reason without its details: "too short", "duplicate", ..."""
    return reason.split(":")[0].strip()


def instruction_id(text: str) -> str:
    """`si-` + 16 hex chars of sha256 of the normalised text: the same request, the same id."""
    return "si-" + hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()[:16]


def request_seed(seed: int | None, index: int) -> int | None:
    """The sampling seed of request `index`: distinct per request (one seed for all would ask the
    same question `count` times); None leaves it to the row key, which is distinct too."""
    if seed is None:
        return None
    return int(hashlib.sha256(f"{seed}/{index}".encode()).hexdigest()[:8], 16)


def requests(count: int, prompt_text: str, prompt_ids: list[int], sampling: Sampling, end: str,
             end_ids: list[int]) -> list[dict]:
    """The engine requests asking for `count` user requests: generate's request rows (so the same
    engine pass, writer and resume serve them) with an empty conversation and the turn's stops.

    sampling: the `sampling` struct; its seed is made distinct per request (request_seed).
    """
    out = []
    for i in range(count):
        rid = f"q{i}"
        out.append({"id": rid, "row_key": f"{rid}/{SAMPLING_NAME}", "source": SAMPLING_NAME, "instruction": "",
                    "input": None, "messages": [], "prompt_text": prompt_text, "prompt_token_ids": list(prompt_ids),
                    "sampling": {**sampling, "name": SAMPLING_NAME, "seed": request_seed(sampling["seed"], i)},
                    "stop": [end] if end else [], "stop_token_ids": list(end_ids)})
    return out


def index_of(request_id: str) -> int:
    """The index of a request from its id (`q17` -> 17)."""
    return int(request_id[1:])


def select(raw: Iterable[dict], end: str, min_chars: int, max_chars: int, source: str,
           taken: Iterable[str] = ()) -> list[dict]:
    """One record per raw request, in index order, kept or dropped with its reason.

    raw: {"index": int, "text": str, "ended": bool}. taken: normalised texts already in the
    set (the seeds), whose repeats are duplicates too. The first of equal requests is kept.
    Record: {"index", "id", "source", "instruction", "raw_text", "ended", "kept", "reason", "detail"}
    (reason: the kind, one of REASONS; detail: the whole reason).
    """
    seen: dict[str, str] = {t: "a seed" for t in taken}
    out = []
    for r in sorted(raw, key=lambda r: r["index"]):
        text = clean_request(r["text"], end)
        reason = drop_reason(text, bool(r["ended"]), min_chars, max_chars)
        key = normalize_text(text)
        if reason is None and key in seen:
            reason = f"duplicate: same normalised text as {seen[key]}"
        if reason is None:
            seen[key] = f"request {r['index']}"
        out.append({"index": int(r["index"]), "id": instruction_id(text) if text else None, "source": source,
                    "instruction": text, "raw_text": r["text"], "ended": bool(r["ended"]),
                    "kept": reason is None, "reason": reason and reason_kind(reason), "detail": reason})
    return out


def as_seeds(records: Iterable[dict]) -> list[dict]:
    """The kept records as seed rows (prepare_seeds' shape): one user turn each."""
    return [{"id": r["id"], "source": r["source"], "instruction": r["instruction"], "input": None,
             "messages": [{"role": "user", "content": r["instruction"]}]} for r in records if r["kept"]]


class InstructionSummary(TypedDict):
    """What self-instruct asked and kept (the generate manifest's `self_instruct`)."""

    asked: int
    kept: int
    dropped: int
    dropped_by_reason: dict[str, int]  # REASONS order, only those that dropped something
    kept_share: float
    generated_now: int
    generate_s: float | None
    instructions_per_min: float | None


def summary(records: list[dict], generated: int, seconds: float | None) -> InstructionSummary:
    """Asked, kept, dropped per reason, share kept, and the rate of the `generated` requests this
    run asked the engine for in `seconds` (None when all came from an earlier run)."""
    kept = sum(r["kept"] for r in records)
    dropped = Counter(reason_kind(r["reason"]) for r in records if not r["kept"])
    return {"asked": len(records), "kept": kept, "dropped": sum(dropped.values()),
            "dropped_by_reason": {k: dropped[k] for k in REASONS if dropped[k]},
            "kept_share": round(kept / len(records), 4) if records else 0.0,
            "generated_now": generated, "generate_s": round(seconds, 2) if seconds else None,
            "instructions_per_min": round(60 * generated / seconds, 1) if generated and seconds else None}
