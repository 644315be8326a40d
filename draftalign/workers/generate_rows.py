"""Row logic of the generate stage: requests in, distillation and error rows out.

Pure functions (no Ray, no vLLM) so the driver, the Ray tasks and the unit tests share
them. A *request* is one (seed, sampling setting) pair, keyed by `row_key`; it carries
every seed column the distillation row repeats, plus the prompt and the setting.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from draftalign.config import SamplingSetting
from draftalign.data.schemas import DistillRow, ErrorRow, Sampling, row_key
from draftalign.data.seeds import RAW_LIMIT

# (messages) -> (prompt_text, prompt_token_ids): the target's chat template and tokenizer.
Render = Callable[[list[dict[str, str]]], tuple[str, list[int]]]


def sampling_struct(s: SamplingSetting) -> Sampling:
    """The `sampling` column of a distillation row."""
    return {"name": s.name, "temperature": float(s.temperature), "top_p": float(s.top_p),
            "max_tokens": int(s.max_tokens), "seed": s.seed}


def _seed(sampling: Sampling) -> int | None:
    """The struct's seed, or None: a null seed can come out of Ray Data as a float NaN."""
    seed = sampling.get("seed")
    return None if seed is None or seed != seed else int(seed)  # seed != seed: NaN


def clean_sampling(sampling: Sampling) -> Sampling:
    """A `sampling` struct back in its schema types after a trip through Ray Data, where a
    nullable integer can come back as a float (NaN for null)."""
    seed = _seed(sampling)
    return {"name": str(sampling["name"]), "temperature": float(sampling["temperature"]),
            "top_p": float(sampling["top_p"]), "max_tokens": int(sampling["max_tokens"]), "seed": seed}


def vllm_sampling_params(sampling: Sampling, key: str) -> dict[str, float | int]:
    """vLLM SamplingParams kwargs for a request's `sampling` struct (temperature 0 is greedy).

    Every request gets an integer seed: the setting's, else one derived from its row key.
    So a rerun reproduces its sampled answers, and the column stays integer through Ray
    (a struct field mixing ints and nulls comes out of Ray Data as float, which vLLM refuses).
    """
    seed = _seed(sampling)
    if seed is None:
        seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    # Plain Python numbers: Ray hands struct fields over as numpy scalars.
    return {"temperature": float(sampling["temperature"]), "top_p": float(sampling["top_p"]),
            "max_tokens": int(sampling["max_tokens"]), "seed": int(seed)}


def context_error(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> str | None:
    """Why a request cannot fit the engine's context, or None when it fits.

    Checked before the engine, because vLLM would otherwise fail the whole batch or
    silently cut the answer short.
    """
    if num_prompt_tokens + max_tokens > max_model_len:
        return (f"too long for the engine's context: {num_prompt_tokens} prompt tokens + "
                f"max_tokens {max_tokens} > max_model_len {max_model_len}")
    return None


def error_row(stage: str, reason: str, *, id: str | None, source: str, raw: Any,
              key: str | None = None) -> ErrorRow:
    """An ERROR_SCHEMA row; `raw` is kept as JSON text, cut to RAW_LIMIT characters."""
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=True, default=repr)
    return {"id": id, "row_key": key, "source": source, "stage": stage, "reason": reason,
            "raw": text[:RAW_LIMIT]}


def expand_requests(seeds: Iterable[dict], settings: Sequence[SamplingSetting], render: Render,
                    max_model_len: int) -> tuple[list[dict], list[dict]]:
    """One request per (seed, setting), in seed order; (requests, error rows).

    A seed is rendered and tokenized once for all its settings. A seed the template
    cannot render fails as a whole; a too-long one fails per setting, since max_tokens
    differs between settings.
    """
    requests: list[dict] = []
    errors: list[dict] = []
    for seed in seeds:
        try:
            text, ids = render(seed["messages"])
        except Exception as exc:  # a template error must cost this seed, not the run
            errors.append(error_row("seeds", f"chat template failed: {type(exc).__name__}: {exc}",
                                    id=seed["id"], source=seed["source"], raw=seed))
            continue
        for s in settings:
            key = row_key(seed["id"], s.name)
            if reason := context_error(len(ids), s.max_tokens, max_model_len):
                errors.append(error_row("seeds", reason, id=seed["id"], source=seed["source"],
                                        raw=seed, key=key))
                continue
            requests.append({**seed, "row_key": key, "prompt_text": text, "prompt_token_ids": list(ids),
                             "sampling": sampling_struct(s)})
    return requests, errors


def pending(requests: Iterable[dict], done: set[str]) -> list[dict]:
    """The requests whose row_key is not written yet: what a resumed run still owes."""
    return [r for r in requests if r["row_key"] not in done]


PART_RECOVERY = "move it out of data/ (or delete it) and rerun: the rows it held are generated again"


def read_part(f: Path, columns: list[str] | None = None) -> Any:
    """One part file of `data/` as a pyarrow table (`columns` only); an unreadable file is a ConfigError."""
    import pyarrow.parquet as pq

    from draftalign.data.seeds import unreadable_parquet
    from draftalign.errors import ConfigError

    try:
        return pq.read_table(f, columns=columns)
    except (OSError, ValueError, KeyError) as exc:  # truncated, corrupt, or no row_key column
        raise ConfigError(unreadable_parquet(f, exc, PART_RECOVERY)) from None


def read_parts(data_dir: Path, columns: list[str]) -> Iterator[dict[str, list]]:
    """`columns` of each part file in `data/`, file by file; an unreadable file is a ConfigError."""
    for f in sorted(Path(data_dir).glob("*.parquet")):  # hidden .tmp files of a killed writer do not match
        yield read_part(f, columns).to_pydict()


def row_key_counts(data_dir: Path) -> Counter:
    """How often each row key occurs in `data/`: the files there are the record of what is done."""
    counts: Counter = Counter()
    for part in read_parts(data_dir, ["row_key"]):
        counts.update(part["row_key"])
    return counts


def drop_rows(data_dir: Path, ids: set[str]) -> int:
    """Remove the rows whose `id` is in `ids` from the parts in `data/`; returns how many.

    A part holding any is rewritten whole without them (atomically: a kill leaves the old part
    or the new), or deleted when nothing is left. The other parts are only read for their ids.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from draftalign.util.atomicio import write_parquet_atomic

    if not ids:
        return 0
    removed, value_set = 0, pa.array(sorted(ids), type=pa.string())
    for f in sorted(Path(data_dir).glob("*.parquet")):
        if not set(read_part(f, ["id"]).column("id").to_pylist()) & ids:
            continue
        table = read_part(f)
        keep = pc.invert(pc.is_in(table["id"], value_set=value_set))
        removed += table.num_rows - pc.sum(keep).as_py()
        if pc.any(keep).as_py():
            write_parquet_atomic(table.filter(keep), f)
        else:
            f.unlink()
    return removed


def finish_reason(token_ids: Sequence[int], max_tokens: int, eos_token_id: int | None) -> str:
    """"stop" when the answer ends with EOS, "length" when it hit max_tokens, else "stop".

    ray.data.llm's output carries no finish reason, so it is inferred from the tokens; the
    last case is a stop string, the only other way vLLM ends a request early.
    """
    if token_ids and eos_token_id is not None and token_ids[-1] == eos_token_id:
        return "stop"
    return "length" if len(token_ids) >= max_tokens else "stop"


DISTILL_SEED_COLUMNS = ("id", "row_key", "source", "instruction", "input", "messages",
                        "prompt_text", "prompt_token_ids", "sampling")


def distill_row(request: dict, response_ids: Sequence[int], response_text: str, *,
                eos_token_id: int | None, target_model: str, target_hash: str, template_hash: str,
                generator_model: str | None = None, generator_hash: str | None = None) -> DistillRow:
    """A DISTILL_SCHEMA row from a request and the engine's answer.

    generator_*: the model that answered (default: the target). The target_* columns name the
    target even for a drafter's answers: distillation scores every row with the target.
    """
    row = {k: request[k] for k in DISTILL_SEED_COLUMNS}
    row["sampling"] = clean_sampling(row["sampling"])
    row["input"] = row["input"] if isinstance(row["input"], str) else None
    row["messages"] = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    row["prompt_token_ids"] = [int(t) for t in row["prompt_token_ids"]]
    ids = [int(t) for t in response_ids]
    row.update(response_text=response_text, response_token_ids=ids,
               finish_reason=finish_reason(ids, int(request["sampling"]["max_tokens"]), eos_token_id),
               num_input_tokens=len(row["prompt_token_ids"]), num_generated_tokens=len(ids),
               target_model=target_model, target_hash=target_hash, chat_template_hash=template_hash,
               generator_model=generator_model or target_model, generator_hash=generator_hash or target_hash)
    return row
