"""Instructions the target writes itself, the way Magpie does (Xu et al., 2024).

An aligned chat model given only its template's user-turn prefix (for ChatML
`<|im_start|>user\\n`) goes on to write a user request, because that is what follows the
prefix in its training data. Left alone, a small model asks mostly one kind of thing; so the
requests can be split into kinds (questions, code, summaries of a given text, rewriting,
translation), each started by an opener the target continues ("Write a Python function that")
and dealt out by share. The requests are cleaned, filtered (empty, too short, too long, not
ending the turn, copies of an evaluation prompt), de-duplicated (same normalised text, or a
near duplicate by word 3-grams: data/overlap.py), and become seed rows that the target then
answers like any other seed.

Pure logic only (no Ray, no vLLM): the generate pipeline runs the engine pass around it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import pyarrow as pa

from draftalign.data.overlap import HeldOutPrompts, NearDuplicates
from draftalign.data.schemas import Sampling
from draftalign.data.seeds import normalize_text
from draftalign.errors import ConfigError

__all__ = ["SENTINEL", "UserTurn", "user_turn", "clean_request", "drop_reason", "reason_kind", "select",
           "instruction_id", "as_seeds", "request_seed", "requests", "index_of", "summary", "INSTRUCTION_SCHEMA",
           "SAMPLING_NAME", "InstructionSummary", "Asking", "Filters", "schedule", "kind_source", "REASONS"]

# A text no template adds or changes: where it lands in the render, the user's words go.
SENTINEL = "draftalign-self-instruct-7c1e9b52"
REASONS = ("not ending the turn", "empty", "too short", "too long", "evaluation prompt", "duplicate",
           "near duplicate", "engine error")
SAMPLING_NAME = "self-instruct"  # the `sampling.name` of the raw request rows in instructions/data/

# instructions/instructions.parquet: every request asked, kept or not, with why not.
# Version 2 added `kind` (null without generate.self_instruct.kinds).
INSTRUCTION_SCHEMA = pa.schema(
    [pa.field("index", pa.int32(), False), pa.field("id", pa.string(), True), pa.field("source", pa.string(), False),
     pa.field("kind", pa.string(), True),
     pa.field("instruction", pa.string(), False), pa.field("raw_text", pa.string(), False),
     pa.field("ended", pa.bool_(), False), pa.field("kept", pa.bool_(), False),
     # reason: one of REASONS (counted by `draftalign inspect`); detail: the whole reason.
     pa.field("reason", pa.string(), True), pa.field("detail", pa.string(), True),
     pa.field("schema_version", pa.int32(), False)],
    metadata={"draftalign.schema": "instructions", "draftalign.schema_version": "2"})


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


def drop_reason(text: str, ended: bool, min_chars: int, max_chars: int, written: str | None = None) -> str | None:
    """Why a request is dropped by its form (reason_kind of it is one of REASONS), or None to keep it.

    written: what the target wrote after a kind's opener (default: the whole text); min_chars and
    "empty" count it, since an opener alone is no request. A request that did not end the turn was
    cut off by max_tokens: a fragment, not a request.
    """
    written = text if written is None else written
    if not ended:
        return "not ending the turn: hit max_tokens before the end of the user turn"
    if not text or not written:
        return "empty"
    if len(written) < min_chars:
        after = " after the opener" if written != text else ""
        return f"too short: {len(written)} characters{after} < min_chars {min_chars}"
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


def kind_source(source: str, kind: str | None) -> str:
    """The `source` of a request of `kind`: "self-instruct/code", so every row says its kind."""
    return f"{source}/{kind}" if kind else source


def schedule(shares: Sequence[float], count: int) -> list[int]:
    """Which kind (an index into `shares`) each of `count` requests asks for.

    Smooth weighted round-robin: every kind gets its share of any stretch of requests, not all
    of one kind first, and request i's kind does not depend on `count`, so asking for more later
    keeps the kinds of the requests already written.
    """
    total = float(sum(shares))
    credit = [0.0] * len(shares)
    out = []
    for _ in range(count):
        credit = [c + s for c, s in zip(credit, shares, strict=True)]
        pick = max(range(len(shares)), key=lambda k: credit[k])  # the first of equals: stable
        credit[pick] -= total
        out.append(pick)
    return out


@dataclass(frozen=True)
class Asking:
    """How one kind of request is asked: the `opener` the target continues, and the engine prompt
    (the user-turn prefix + the opener). `kind` is None without generate.self_instruct.kinds;
    `max_tokens` None: the sampling struct's."""

    kind: str | None
    opener: str
    share: float
    prompt_text: str
    prompt_ids: list[int]
    max_tokens: int | None = None


def requests(count: int, askings: Sequence[Asking], sampling: Sampling, end: str, end_ids: list[int]) -> list[dict]:
    """The engine requests asking for `count` user requests: generate's request rows (so the same
    engine pass, writer and resume serve them) with an empty conversation and the turn's stops.

    Request i asks with askings[schedule(...)[i]]; its `instruction` is the opener and its `source`
    names the kind. sampling: the `sampling` struct; its seed is made distinct per request (request_seed).
    """
    order = schedule([a.share for a in askings], count)
    out = []
    for i in range(count):
        rid, ask = f"q{i}", askings[order[i]]
        out.append({"id": rid, "row_key": f"{rid}/{SAMPLING_NAME}", "source": kind_source(SAMPLING_NAME, ask.kind),
                    "instruction": ask.opener, "input": None, "messages": [], "prompt_text": ask.prompt_text,
                    "prompt_token_ids": list(ask.prompt_ids),
                    "sampling": {**sampling, "name": SAMPLING_NAME, "seed": request_seed(sampling["seed"], i),
                                 "max_tokens": ask.max_tokens or sampling["max_tokens"]},
                    "stop": [end] if end else [], "stop_token_ids": list(end_ids)})
    return out


def index_of(request_id: str) -> int:
    """The index of a request from its id (`q17` -> 17)."""
    return int(request_id[1:])


@dataclass(frozen=True)
class Filters:
    """What a request must pass: its length, the evaluation prompts it must not copy (None: not
    checked) and the near-duplicate threshold (None: exact duplicates only)."""

    min_chars: int
    max_chars: int
    near_duplicate: float | None = None
    held_out: HeldOutPrompts | None = None


class _Seen:
    """The seeds and the requests kept so far: what a new request must not repeat."""

    def __init__(self, taken: Mapping[str, str], near_duplicate: float | None) -> None:
        self.exact: dict[str, str] = {}
        self.near = NearDuplicates(near_duplicate) if near_duplicate is not None else None
        for label, text in taken.items():
            self.add(label, text)

    def add(self, label: str, text: str, opener: str = "") -> None:
        self.exact.setdefault(normalize_text(text), label)
        if self.near is not None:
            self.near.add(label, text, opener)

    def repeat(self, text: str, opener: str) -> str | None:
        """Why `text` repeats what is kept (a duplicate reason), or None."""
        if (label := self.exact.get(normalize_text(text))) is not None:
            return f"duplicate: same normalised text as {label}"
        match = self.near.match(text, opener) if self.near is not None else None
        if match is not None:
            return (f"near duplicate: {match.score:.2f} of word 3-grams shared with {match.key} "
                    f"(near_duplicate {self.near.threshold})")
        return None


def select(raw: Iterable[dict], end: str, filters: Filters, source: str,
           taken: Mapping[str, str] | None = None) -> list[dict]:
    """One record per raw request, in index order, kept or dropped with its reason.

    raw: {"index": int, "text": str, "ended": bool, "kind": str | None, "opener": str} (text: what
    the target wrote; the request is the opener + text). taken: {label: text} of what is in the set
    already (the seeds), whose repeats are duplicates too. The first of equal requests is kept.
    Record: {"index", "id", "source", "kind", "instruction", "raw_text", "ended", "kept", "reason",
    "detail"} (reason: the kind of reason, one of REASONS; detail: the whole reason).
    """
    seen = _Seen(taken or {}, filters.near_duplicate)
    out = []
    for r in sorted(raw, key=lambda r: r["index"]):
        opener = r.get("opener") or ""
        text = clean_request(opener + r["text"], end)
        reason = drop_reason(text, bool(r["ended"]), filters.min_chars, filters.max_chars,
                             clean_request(r["text"], end) if opener else None)
        reason = (reason or (filters.held_out.reason(text) if filters.held_out is not None else None)
                  or seen.repeat(text, opener))
        if reason is None:
            seen.add(f"request {r['index']}", text, opener)
        out.append({"index": int(r["index"]), "id": instruction_id(text) if text else None,
                    "source": kind_source(source, r.get("kind")), "kind": r.get("kind"), "instruction": text,
                    "raw_text": r["text"], "ended": bool(r["ended"]), "kept": reason is None,
                    "reason": reason and reason_kind(reason), "detail": reason})
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
    asked_by_kind: dict[str, int]  # the mix: requests per kind, in config order ({} without kinds)
    kept_by_kind: dict[str, int]
    generated_now: int
    generate_s: float | None
    instructions_per_min: float | None


def summary(records: list[dict], generated: int, seconds: float | None, kinds: Sequence[str] = ()) -> InstructionSummary:
    """Asked, kept, dropped per reason, share kept, the mix per kind (`kinds`: the configured names,
    in order), and the rate of the `generated` requests this run asked the engine for in `seconds`
    (None when all came from an earlier run)."""
    kept = sum(r["kept"] for r in records)
    dropped = Counter(reason_kind(r["reason"]) for r in records if not r["kept"])
    return {"asked": len(records), "kept": kept, "dropped": sum(dropped.values()),
            "dropped_by_reason": {k: dropped[k] for k in REASONS if dropped[k]},
            "kept_share": round(kept / len(records), 4) if records else 0.0,
            "asked_by_kind": {k: sum(r.get("kind") == k for r in records) for k in kinds},
            "kept_by_kind": {k: sum(r.get("kind") == k and r["kept"] for r in records) for k in kinds},
            "generated_now": generated, "generate_s": round(seconds, 2) if seconds else None,
            "instructions_per_min": round(60 * generated / seconds, 1) if generated and seconds else None}
