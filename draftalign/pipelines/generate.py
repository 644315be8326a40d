"""`draftalign generate`: the target answers seed instructions; the answers become the distillation set.

`generate.generator` may put another model in the target's place (a drafter, for on-policy data):
prompts are still rendered with the target's tokenizer and chat template, and the rows still name
the target, which scores them in distillation; `generator_*` name the model that answered.

The driver reads and validates the seeds, renders every (seed, sampling setting) request
with the target's chat template, skips the row keys already in `data/` (resume), and hands
the rest to Ray Data: vLLM engine replicas answer them and Ray tasks write the answers
atomically in chunks. Requests the engine failed on are retried in further passes; what
still fails, and every rejected seed, lands in `errors/`.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

from draftalign.cluster.metrics import record
from draftalign.cluster.resources import GenerateResources, generate_resources
from draftalign.config import Config, ConfigError, GenerateConfig
from draftalign.data.overlap import HeldOutPrompt, HeldOutPrompts
from draftalign.data.prompts import chat_template_hash, encode_prompt, render_prompt
from draftalign.data.schemas import ERROR_SCHEMA, ErrorRow, to_table
from draftalign.data.seeds import open_rows, prepare_seeds
from draftalign.data.selfinstruct import (
    INSTRUCTION_SCHEMA,
    Asking,
    Filters,
    InstructionSummary,
    UserTurn,
    as_seeds,
    index_of,
    kind_source,
    schedule,
    select,
    summary,
    user_turn,
)
from draftalign.data.selfinstruct import requests as instruction_requests
from draftalign.errors import DraftalignError
from draftalign.evaluation.tasks import build_prompts, task_rows
from draftalign.models.identity import absolute_model_path, check_target_folder, looks_local, target_identity
from draftalign.pipelines.locks import locked_output
from draftalign.pipelines.setprint import check_set, row_determinants, write_fingerprint
from draftalign.util.atomicio import write_json_atomic, write_parquet_atomic
from draftalign.util.redact import redact
from draftalign.util.runinfo import write_run_info
from draftalign.workers.generate_engine import ENGINE_MAX_RESTARTS, engine_kwargs
from draftalign.workers.generate_rows import (
    Render,
    context_error,
    drop_rows,
    error_row,
    expand_requests,
    pending,
    read_parts,
    row_key_counts,
)


def target_tokenizer(cfg: Config, target: str):
    """The target's own tokenizer; Llama 2's chat template when it has none or config asks."""
    from draftalign.data.tokenization import ensure_chat_template, load_tokenizer

    return ensure_chat_template(load_tokenizer(target), cfg.tokenizer.chat_template)


NO_INSTRUCTIONS = ("neither generate.seeds nor generate.self_instruct is set: give generate.seeds (a .jsonl/.parquet "
                   "file or a Hugging Face data set), or let the target write its own instructions with "
                   "generate.self_instruct.count=N, or both")


def check_instruction_source(gen: GenerateConfig) -> None:
    if gen.seeds is None and gen.self_instruct is None:
        raise ConfigError(NO_INSTRUCTIONS)


def seed_rows(gen: GenerateConfig) -> tuple[Any, str]:
    """(row iterator, source name) for a seed file or a Hugging Face data set."""
    if gen.seeds is None:
        raise ConfigError(NO_INSTRUCTIONS)
    local = Path(gen.seeds).expanduser()
    name = local.name if local.exists() else gen.seeds  # a hub name stays whole: org/set
    return open_rows(gen.seeds, gen.hf_config, gen.hf_split, "generate.seeds"), gen.source or name


def existing_row_keys(data_dir: Path) -> set[str]:
    return set(row_key_counts(data_dir))


def reason_kind(reason: str) -> str:
    """The reason without its details, for counts: "missing field 'instruction'", "too long ..."."""
    return re.sub(r"^(line|row) \d+: ", "", reason).split(":")[0].strip()


class GeneratePlanResources(GenerateResources):
    engine_kwargs: dict[str, Any]  # what vLLM's engine is given, the user's engine_kwargs included


class GeneratePlan(TypedDict):
    """The generate stage in the --plan view."""

    target: str
    generator: str
    seeds: str | None
    max_seeds: int | None
    self_instruct: dict[str, Any] | None  # generate.self_instruct as configured
    output: str
    sampling: list[str]
    rows: str
    resources: GeneratePlanResources


def describe_generate(cfg: Config) -> GeneratePlan:
    """The --plan view: what would be read and written, and what Ray would be asked for."""
    gen, eng = cfg.generate, cfg.generate.engine
    check_instruction_source(gen)
    si = gen.self_instruct
    seeds = f"{gen.max_seeds or 'all'} seeds" if gen.seeds is not None else "no seed file"
    seeds += f" + up to {si.count} self-instructed" if si else ""
    return {
        "target": cfg.target_path(), "generator": cfg.generator_path(), "seeds": gen.seeds, "max_seeds": gen.max_seeds,
        "self_instruct": si.model_dump(mode="json") if si else None,
        "output": gen.output, "sampling": [s.name for s in gen.sampling],
        "rows": f"{seeds} x {len(gen.sampling)} sampling settings",
        "resources": {**generate_resources(eng), "engine_kwargs": engine_kwargs(eng)},
    }


def held_out_prompts(cfg: Config) -> HeldOutPrompts | None:
    """The prompts of evaluate.tasks that must stay out of the set (generate.exclude_eval), or None.

    Each task's first generate.exclude_eval.max_prompts rows, and at least those the evaluate
    stage reads. An evaluation set that cannot be read stops the run: a check skipped in silence
    would let its prompts leak into the set.
    """
    ex = cfg.generate.exclude_eval
    if not ex.enabled:
        return None
    prompts = []
    for task in cfg.evaluate.tasks:
        limit = max(ex.max_prompts, task.max_prompts or cfg.evaluate.max_prompts)
        try:
            rows = build_prompts(task, task_rows(task), limit)
        except (DraftalignError, OSError) as exc:
            raise ConfigError(f"generate.exclude_eval: cannot read the prompts of evaluation task {task.name!r} to "
                              f"keep them out of the distillation set: {exc} (generate.exclude_eval.enabled=false "
                              "skips the check)") from exc
        prompts += [HeldOutPrompt(f"{task.name}/{p['id']}", p["user"], p["input"]) for p in rows]
    return HeldOutPrompts(prompts, ex.threshold)


def seed_text(seed: dict) -> str:
    """Everything a seed says to the target: its turns' contents, one per line."""
    return "\n".join(t["content"] for t in seed["messages"])


def drop_held_out(seeds: list[dict], held_out: HeldOutPrompts | None) -> tuple[list[dict], list[ErrorRow]]:
    """(the seeds that copy no evaluation prompt, an error row for each that does)."""
    if held_out is None:
        return seeds, []
    kept, errors = [], []
    for s in seeds:
        if (reason := held_out.reason(seed_text(s))) is None:
            kept.append(s)
        else:
            errors.append(error_row("seeds", reason, id=s["id"], source=s["source"], raw=s))
    return kept, errors


class Prepared(TypedDict):
    """What the driver prepares before Ray starts: requests from the seeds (self-instructed ones
    are added later), the rejected seeds, and what renders and ends a prompt."""

    seeds: list[dict]  # prepare_seeds' rows, less those that copy an evaluation prompt
    held_out: HeldOutPrompts | None  # the evaluation prompts kept out (generate.exclude_eval)
    held_out_seeds: int  # seeds dropped as copies of one
    requests: list[dict]  # expand_requests': one per (seed, sampling setting)
    errors: list[ErrorRow]
    source: str | None  # the seed file's or data set's name
    eos: int | None
    template_hash: str
    tokenizer: Any  # the target's transformers tokenizer
    render: Render


def _prepare(cfg: Config, target: str) -> Prepared:
    """Seeds -> requests and seed errors, all in the driver and before Ray starts."""
    gen = cfg.generate
    check_instruction_source(gen)
    tok = target_tokenizer(cfg, target)
    seeds, errors, source = [], [], None
    if gen.seeds is not None:
        rows, source = seed_rows(gen)
        seeds, bad = prepare_seeds(rows, gen.fields, source, gen.max_seeds)
        errors = [error_row("seeds", e["reason"], id=e["id"], source=e["source"], raw=e["raw"]) for e in bad]
    held_out = held_out_prompts(cfg)
    seeds, copies = drop_held_out(seeds, held_out)
    if gen.self_instruct is not None:
        user_turn(tok, target, gen.system_prompt)  # a template without a user turn fails here, before Ray

    def render(messages):
        text = render_prompt(tok, messages, gen.system_prompt)
        return text, encode_prompt(tok, text)

    requests, too_long = expand_requests(seeds, gen.sampling, render, gen.engine.max_model_len)
    return {"seeds": seeds, "held_out": held_out, "held_out_seeds": len(copies),
            "requests": requests, "errors": errors + copies + too_long, "source": source,
            "eos": tok.eos_token_id, "template_hash": chat_template_hash(tok), "tokenizer": tok, "render": render}


def _write_errors(path: Path, rows: list[dict]) -> None:
    if rows:
        write_parquet_atomic(to_table(rows, ERROR_SCHEMA), path)
    else:
        path.unlink(missing_ok=True)  # a rerun that fixed them must not leave stale errors behind


class EngineError(DraftalignError, RuntimeError):
    """The vLLM engine could not start or keeps dying: no retry will fix it."""


def _one_pass(cfg: Config, requests: list[dict], data_dir: Path, ident: dict[str, str], eos: int | None,
              template_hash: str, fail_keys: frozenset[str]) -> list[dict]:
    from draftalign.workers.generate_engine import run_pass

    return run_pass(absolute_model_path(cfg.generator_path()), cfg.generate.engine, cfg.generate.rows_per_file, requests, data_dir, ident, eos,
                    template_hash, fail_keys)


def _engine_died(exc: BaseException) -> bool:
    """Whether a pass died because an engine actor did: it failed to start, or kept dying."""
    from ray.exceptions import RayActorError

    for _ in range(10):  # the chain of causes, bounded
        if exc is None or isinstance(exc, RayActorError):
            return exc is not None
        exc = exc.__cause__ or exc.__context__
    return False


def _root_cause(exc: BaseException) -> str:
    """The line of a Ray error that says what went wrong, not the wrapper's preamble."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # vLLM's config checks are pydantic errors: the reason is the "Value error, ..." line.
    picks = [ln for ln in lines if ln.startswith("Value error,")]
    picks = picks or [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception): ", ln)
                      and not re.match(r"^(ray\.exceptions\.)?(ActorDiedError|RayTaskError)", ln)]
    if picks:
        return picks[-1][:600]
    if "creation task" in str(exc):
        return "the engine failed while starting (see the engine's log above)"
    return (f"an engine replica died {ENGINE_MAX_RESTARTS + 1} times in a row (see the EngineCore "
            f"error in the log above)")


def engine_error(exc: BaseException, model: str, kwargs: Mapping[str, object]) -> EngineError:
    return EngineError(f"the vLLM engine for {model} failed: {_root_cause(exc)}. Nothing was generated in "
                       f"this pass and a retry would fail the same way; check generate.engine.engine_kwargs "
                       f"(the engine got {kwargs}) and the model folder. Rows already in data/ are kept.")


def _landed(data_dir: Path, before: set[str]) -> dict[str, int]:
    """{row_key: generated tokens} of the rows written to data/ since `before` was taken."""
    out: dict[str, int] = {}
    for part in read_parts(data_dir, ["row_key", "num_generated_tokens"]):
        out.update({k: n for k, n in zip(part["row_key"], part["num_generated_tokens"], strict=True)
                    if k not in before})
    return out


class PassResult(TypedDict):
    """What the engine passes over a list of requests did."""

    rows_written: int
    tokens: int
    passes: int
    seconds: float
    failed: list[tuple[dict, str]]  # (request, reason) of those no pass answered


def run_passes(cfg: Config, todo: list[dict], data_dir: Path, ident: dict, eos: int | None,
               template_hash: str) -> PassResult:
    """Answer `todo` in up to 1 + max_retries passes; each retry pass takes only what failed.

    Returns {"rows_written", "tokens", "passes", "seconds", "failed": [(request, reason)]}.
    A pass that dies because its engine did (it cannot start, or dies again after its
    restart) before writing a single row raises EngineError at once: that is the engine's
    fault, not a row's, and another pass would only repeat it. Any other dead pass counts
    as a failure of the rows it did not write (the chunks it wrote stay and count as done);
    if no pass ever completes, the last error is raised.
    """
    from draftalign.cluster.session import init_ray

    reasons: dict[str, str] = {}
    written = tokens = passes = 0
    remaining, seconds, last_exc, completed = list(todo), 0.0, None, False
    for attempt in range(cfg.generate.max_retries + 1):
        if not remaining:
            break
        init_ray(cfg.ray)
        passes += 1
        fail = frozenset(cfg.generate.inject_failure_row_keys) if attempt == 0 else frozenset()
        before = set(row_key_counts(data_dir))
        t0 = time.time()
        try:
            summary = _one_pass(cfg, remaining, data_dir, ident, eos, template_hash, fail)
            completed = True
        except Exception as exc:  # the rows stay pending; files written before the failure stay
            landed = _landed(data_dir, before)
            if _engine_died(exc) and not landed:
                raise engine_error(exc, cfg.generator_path(), engine_kwargs(cfg.generate.engine)) from exc
            last_exc = exc
            summary = [{"row_key": k, "error": "", "num_generated_tokens": n} for k, n in landed.items()]
            reasons.update({r["row_key"]: f"engine pass failed: {type(exc).__name__}: {_root_cause(exc)}"
                            for r in remaining})
            print(f"[generate] pass {passes} failed after writing {len(landed)} rows: {type(exc).__name__}: "
                  f"{_root_cause(exc)}", flush=True)
        seconds += time.time() - t0
        ok = [s for s in summary if not s["error"]]
        written += len(ok)
        tokens += sum(s["num_generated_tokens"] for s in ok)
        reasons.update({s["row_key"]: s["error"] for s in summary if s["error"]})
        done = {s["row_key"] for s in ok}
        remaining = [r for r in remaining if r["row_key"] not in done]
        if remaining and attempt < cfg.generate.max_retries:
            print(f"[generate] pass {passes}: {len(remaining)} requests failed, retrying", flush=True)
    if remaining and not completed and last_exc is not None:
        raise last_exc
    return {"rows_written": written, "tokens": tokens, "passes": passes, "seconds": seconds,
            "failed": [(r, reasons.get(r["row_key"], "unknown engine failure")) for r in remaining]}


def generator_identity(cfg: Config, target_ident: dict[str, str]) -> dict[str, str]:
    """{"generator_model", "generator_hash"} of generate.generator, checked before Ray starts:
    a drafter must exist, load, share the target's vocabulary (the prompts are the target's
    token ids) and hold the engine's context."""
    gen, key = cfg.generator_path(), f"generate.generator={cfg.generate.generator}"
    if gen == cfg.target_path():
        return {"generator_model": target_ident["target_model"], "generator_hash": target_ident["target_hash"]}
    folder = Path(gen).expanduser()
    if looks_local(gen) and not folder.is_dir():
        hint = " (models.draft, else the pretrain stage's drafter)" if cfg.generate.generator == "draft" else ""
        raise ConfigError(f"{key}: the model {gen!r}{hint} does not exist: run the pretrain stage or "
                          "set generate.generator to a model folder")
    from draftalign.models.arch import check_compatible, load_model_config

    try:
        if folder.is_dir():
            check_target_folder(folder)  # the same safetensors-only load vLLM will do
        gen_cfg = load_model_config(gen, cfg.models.trust_remote_code)
        check_compatible(load_model_config(cfg.target_path(), cfg.models.trust_remote_code), gen_cfg)
    except (OSError, ValueError) as exc:  # ConfigError and VocabMismatchError are ValueErrors
        raise ConfigError(f"{key}: {gen!r} cannot answer for the target: {exc}") from None
    context = getattr(gen_cfg, "max_position_embeddings", None)
    if context is not None and context < cfg.generate.engine.max_model_len:
        raise ConfigError(f"generate.engine.max_model_len={cfg.generate.engine.max_model_len} exceeds the "
                          f"context of the generator {gen!r} ({context}): lower it")
    ident = target_identity(gen)
    return {"generator_model": ident["target_model"], "generator_hash": ident["target_hash"]}


def _end_token_ids(tok, end: str) -> list[int]:
    """The end marker's id when it is one token of its own (ChatML `<|im_end|>`): vLLM does not see
    special tokens in the text it matches stop strings against."""
    ids = tok.convert_tokens_to_ids([end]) if end else []
    return [ids[0]] if ids and ids[0] is not None and ids[0] != tok.unk_token_id else []


class InstructionFingerprint(TypedDict):
    """instructions/fingerprint.json: what makes the raw requests (not count nor the filters)."""

    generator_hash: str
    chat_template_hash: str
    prefix: str
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    kinds: list[dict[str, Any]] | None  # generate.self_instruct.kinds: which request asks with which opener


def _instruction_fingerprint(cfg: Config, ident: dict[str, str], template_hash: str,
                             prefix: str) -> InstructionFingerprint:
    """What makes the raw requests in instructions/data/: not count (more only adds requests) nor the filters."""
    si = cfg.generate.self_instruct
    return {"generator_hash": ident["generator_hash"], "chat_template_hash": template_hash, "prefix": prefix,
            **si.model_dump(mode="json", include={"temperature", "top_p", "max_tokens", "seed", "kinds"})}


def _check_instructions(folder: Path, current: InstructionFingerprint, overwrite: bool) -> None:
    path = folder / "fingerprint.json"
    old = json.loads(path.read_text()) if path.is_file() else None
    found = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in current.items() if old is not None and old.get(k) != v]
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"{folder} holds instructions asked for otherwise ({'; '.join(found)}): they would be "
                          "mixed with new ones; choose another generate.output, or set generate.overwrite=true")
    shutil.rmtree(folder / "data", ignore_errors=True)


def _askings(cfg: Config, tok: Any, turn: UserTurn) -> list[Asking]:
    """One engine prompt per kind of request (the user-turn prefix + the kind's opener); one plain
    prompt without generate.self_instruct.kinds. A prompt that leaves no room for max_tokens is refused."""
    si, max_len = cfg.generate.self_instruct, cfg.generate.engine.max_model_len
    kinds = [(k.name, k.opener, k.share, k.max_tokens) for k in si.kinds] if si.kinds else [(None, "", 1.0, None)]
    out = []
    for name, opener, share, max_tokens in kinds:
        ids = encode_prompt(tok, turn.prefix + opener)
        if reason := context_error(len(ids), max_tokens or si.max_tokens, max_len):
            what = f"kind {name!r}: the user-turn prefix and opener" if name else "the user-turn prefix"
            raise ConfigError(f"generate.self_instruct: {what} is {reason}")
        out.append(Asking(name, opener, share, turn.prefix + opener, ids, max_tokens))
    return out


def _raw_requests(data_dir: Path, asked: list[dict], ask_of: list[Asking]) -> list[dict]:
    """What the engine wrote for the `asked` requests ({index, text, ended, kind, opener}; ask_of[i]:
    how request i was asked); a smaller count than an earlier run's leaves the later requests out."""
    wanted = {r["row_key"] for r in asked}
    raw = []
    for part in read_parts(data_dir, ["id", "row_key", "response_text", "finish_reason"]):
        for i, k, t, f in zip(part["id"], part["row_key"], part["response_text"], part["finish_reason"], strict=True):
            if k in wanted:
                ask = ask_of[index_of(i)]
                raw.append({"index": index_of(i), "text": t, "ended": f == "stop", "kind": ask.kind,
                            "opener": ask.opener})
    return raw


def _failed(failed: list[tuple[dict, str]], ask_of: list[Asking], source: str) -> list[dict]:
    """Records of the requests no engine pass answered."""
    return [{"index": index_of(r["id"]), "id": None, "source": kind_source(source, ask_of[index_of(r["id"])].kind),
             "kind": ask_of[index_of(r["id"])].kind, "instruction": "", "raw_text": "", "ended": False,
             "kept": False, "reason": "engine error", "detail": f"engine error: {reason}"} for r, reason in failed]


class SelfInstructed(TypedDict):
    seeds: list[dict]  # the kept requests as seed rows
    summary: InstructionSummary
    held_out_ids: list[str]  # ids of the requests dropped as copies of an evaluation prompt


def _mix(stats: InstructionSummary) -> str:
    """The log's view of the mix: kept/asked per kind."""
    if not stats["asked_by_kind"]:
        return ""
    return "; kept by kind " + ", ".join(f"{k} {stats['kept_by_kind'][k]}/{n}" for k, n in stats["asked_by_kind"].items())


def self_instruct(cfg: Config, out: Path, ident: dict[str, str], prep: Prepared) -> SelfInstructed:
    """The target writes `count` user requests from its user-turn prefix (and each kind's opener;
    resumable, in instructions/); returns the kept ones as seed rows, the counts and rate, and the
    ids of those that copied an evaluation prompt.

    The requests go through the same engine passes as the answers; the model that answers
    (generate.generator, default the target) writes them.
    """
    gen, si = cfg.generate, cfg.generate.self_instruct
    folder, tok = out / "instructions", prep["tokenizer"]
    turn = user_turn(tok, cfg.target_path(), gen.system_prompt)
    askings = _askings(cfg, tok, turn)
    current = _instruction_fingerprint(cfg, ident, prep["template_hash"], turn.prefix)
    _check_instructions(folder, current, gen.overwrite)
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "fingerprint.json", current)
    sampling = {"name": "", "temperature": si.temperature, "top_p": si.top_p, "max_tokens": si.max_tokens,
                "seed": si.seed}
    asked = instruction_requests(si.count, askings, sampling, turn.end, _end_token_ids(tok, turn.end))
    todo = pending(asked, existing_row_keys(data_dir))
    print(f"[generate] self-instruct: {si.count} requests, {si.count - len(todo)} already written, "
          f"{len(todo)} to generate (prefix {turn.prefix!r}, end {turn.end!r}"
          f"{', kinds ' + ', '.join(a.kind for a in askings) if si.kinds else ''})", flush=True)
    result = run_passes(cfg, todo, data_dir, ident, prep["eos"], prep["template_hash"]) if todo else None
    filters = Filters(si.min_chars, si.max_chars, si.near_duplicate, prep["held_out"])
    taken = {f"seed {s['id']}": seed_text(s) for s in prep["seeds"]}
    ask_of = [askings[k] for k in schedule([a.share for a in askings], si.count)]
    records = select(_raw_requests(data_dir, asked, ask_of), turn.end, filters, si.source, taken)
    records += _failed((result or {}).get("failed", []), ask_of, si.source)
    write_parquet_atomic(to_table(sorted(records, key=lambda r: r["index"]), INSTRUCTION_SCHEMA),
                         folder / "instructions.parquet")
    stats = summary(records, len(todo), result["seconds"] if result else None, [a.kind for a in askings if a.kind])
    rate = f", {stats['instructions_per_min']} instructions/min" if stats["instructions_per_min"] else ""
    print(f"[generate] self-instruct: {stats['asked']} asked, {stats['kept']} kept ({stats['kept_share']:.0%}), "
          f"dropped {stats['dropped_by_reason']}{rate}{_mix(stats)}", flush=True)
    return {"seeds": as_seeds(records), "summary": stats,
            "held_out_ids": [r["id"] for r in records if r["reason"] == "evaluation prompt"]}


class GenerateCounts(TypedDict):
    seeds_read: int
    seeds_good: int
    requests: int
    rows_skipped_present: int
    rows_written: int
    rows_in_data: int
    duplicate_rows: int
    errors: int
    seed_errors: int
    engine_errors: int
    errors_by_reason: dict[str, int]
    tokens_generated: int
    engine_passes: int


class HeldOutCounts(TypedDict):
    """What generate.exclude_eval kept out (the manifest's `exclude_eval`)."""

    tasks: list[str]
    prompts: int  # evaluation prompts checked against
    threshold: float
    seeds_dropped: int
    self_instruct_dropped: int
    rows_removed: int  # rows of such requests an earlier run had written to data/, removed


class GenerateManifest(TypedDict):
    """manifest.json of a generate run; the identity keys are target_identity's and generator_identity's."""

    config: dict[str, Any]  # the run's config, dumped and redacted: whatever the config holds
    target_model: str
    target_hash: str
    generator_model: str
    generator_hash: str
    chat_template_hash: str
    source: str
    self_instruct: InstructionSummary | None
    exclude_eval: HeldOutCounts | None  # None: generate.exclude_eval.enabled is false
    counts: GenerateCounts
    elapsed_s: float
    generate_s: float
    tokens_per_s: float


def held_out_counts(cfg: Config, prep: Prepared, si: SelfInstructed | None, removed: int) -> HeldOutCounts | None:
    """The manifest's `exclude_eval`: None when the check is off."""
    if prep["held_out"] is None:
        return None
    return {"tasks": [t.name for t in cfg.evaluate.tasks], "prompts": len(prep["held_out"]),
            "threshold": prep["held_out"].threshold, "seeds_dropped": prep["held_out_seeds"],
            "self_instruct_dropped": len(si["held_out_ids"]) if si is not None else 0, "rows_removed": removed}


def _manifest(cfg: Config, prep: Prepared, ident: dict[str, str], si: SelfInstructed | None,
              held_out: HeldOutCounts | None, todo: list[dict], result: PassResult, engine_errors: list[ErrorRow],
              final: dict[str, int], elapsed: float) -> GenerateManifest:
    """What a generate run did (manifest.json): its identity, counts, errors and rates."""
    gen = cfg.generate
    all_errors = prep["errors"] + engine_errors
    return {
        "config": redact(cfg.model_dump(mode="json")), **ident, "chat_template_hash": prep["template_hash"],
        "source": " + ".join(x for x in (prep["source"], gen.self_instruct and gen.self_instruct.source) if x),
        "self_instruct": si["summary"] if si is not None else None, "exclude_eval": held_out,
        "counts": {
            "seeds_read": len(prep["seeds"]) + sum(e["stage"] == "seeds" and e["row_key"] is None
                                                   for e in prep["errors"]),
            # Valid seeds that fit the context for at least one setting.
            "seeds_good": len({r["id"] for r in prep["requests"]}), "requests": len(prep["requests"]),
            "rows_skipped_present": len(prep["requests"]) - len(todo),
            "rows_written": result["rows_written"], "rows_in_data": len(final),
            "duplicate_rows": sum(n - 1 for n in final.values()),  # 0 unless a writer misbehaved
            "errors": len(all_errors), "seed_errors": len(prep["errors"]), "engine_errors": len(engine_errors),
            "errors_by_reason": dict(Counter(reason_kind(e["reason"]) for e in all_errors)),
            "tokens_generated": result["tokens"], "engine_passes": result["passes"],
        },
        "elapsed_s": round(elapsed, 2), "generate_s": round(result["seconds"], 2),
        "tokens_per_s": round(result["tokens"] / result["seconds"], 2) if result["seconds"] else 0.0,
    }


def _keep_out(cfg: Config, prep: Prepared, si: SelfInstructed | None, data_dir: Path) -> HeldOutCounts | None:
    """Remove from data/ the rows of requests that copy an evaluation prompt (written by a run before
    the check, or with other evaluation tasks or threshold), and say what was kept out."""
    if prep["held_out"] is None:
        return None
    ids = {e["id"] for e in prep["errors"] if e["reason"].startswith("evaluation prompt:")}
    removed = drop_rows(data_dir, ids | set(si["held_out_ids"] if si is not None else ()))
    counts = held_out_counts(cfg, prep, si, removed)
    print(f"[generate] evaluation prompts kept out: {counts['prompts']} of {', '.join(counts['tasks'])}; dropped as "
          f"copies: {counts['seeds_dropped']} seeds, {counts['self_instruct_dropped']} self-instruct requests; "
          f"{removed} rows of such requests removed from data/", flush=True)
    return counts


@locked_output("generate", lambda cfg: cfg.generate.output)
def run_generate(cfg: Config) -> GenerateManifest:
    """Generate (or complete) the distillation set under generate.output; returns the manifest."""
    gen = cfg.generate
    out = Path(gen.output).resolve()
    data_dir, err_dir = out / "data", out / "errors"
    target = cfg.target_path()
    if looks_local(target) and not Path(target).expanduser().is_dir():
        raise ConfigError(f"target model {target!r} does not exist: run the pretrain stage or set models.target")
    start = time.time()
    ident = target_identity(target)
    prep = _prepare(cfg, target)
    if Path(target).expanduser().is_dir():
        check_target_folder(Path(target).expanduser())
    ident.update(generator_identity(cfg, ident))
    current = row_determinants(cfg, ident, prep["template_hash"])
    check_set(out, current, gen.overwrite)  # rows made otherwise are never kept as "done"
    done = existing_row_keys(data_dir)  # a corrupt part is refused before anything is written
    write_run_info(out, cfg, "generate", ident)
    write_fingerprint(out, current)
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob(".*.tmp"):  # what a killed writer left; never a visible file
        stale.unlink(missing_ok=True)
    si = self_instruct(cfg, out, ident, prep) if gen.self_instruct is not None else None
    if si is not None:  # the kept requests are answered like seeds, with every sampling setting
        extra, too_long = expand_requests(si["seeds"], gen.sampling, prep["render"], gen.engine.max_model_len)
        prep["requests"] += extra
        prep["errors"] += too_long
    held_out = _keep_out(cfg, prep, si, data_dir)
    todo = pending(prep["requests"], done)
    _write_errors(err_dir / "seeds.parquet", prep["errors"])
    if ident["generator_hash"] != ident["target_hash"]:
        print(f"[generate] generator: {ident['generator_model']} (generate.generator={gen.generator}), "
              f"prompts and rows for the target {target}", flush=True)
    kept = f" + {len(si['seeds'])} self-instructed" if si is not None else ""
    print(f"[generate] {len(prep['seeds'])} seeds{kept}, {len(prep['requests'])} requests, "
          f"{len(prep['requests']) - len(todo)} already written, {len(todo)} to generate", flush=True)
    result = run_passes(cfg, todo, data_dir, ident, prep["eos"], prep["template_hash"])
    engine_errors = [error_row("engine", reason, id=r["id"], source=r["source"], raw=r, key=r["row_key"])
                     for r, reason in result["failed"]]
    _write_errors(err_dir / "engine.parquet", engine_errors)
    manifest = _manifest(cfg, prep, ident, si, held_out, todo, result, engine_errors, row_key_counts(data_dir),
                         time.time() - start)
    write_json_atomic(out / "manifest.json", manifest)
    record("draftalign_generation_tokens_per_s", manifest["tokens_per_s"], stage="generate")
    c = manifest["counts"]
    print(f"[generate] done: {c['rows_in_data']} rows in {data_dir} ({c['rows_written']} new, "
          f"{c['rows_skipped_present']} already present), {c['errors']} errors "
          f"({c['seed_errors']} seeds, {c['engine_errors']} engine) {c['errors_by_reason']}, "
          f"{c['tokens_generated']} tokens generated, {manifest['tokens_per_s']} tokens/s, "
          f"{manifest['elapsed_s']:.0f}s", flush=True)
    return manifest
