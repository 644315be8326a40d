"""`draftalign generate`: the target answers seed instructions; the answers become the distillation set.

The driver reads and validates the seeds, renders every (seed, sampling setting) request
with the target's chat template, skips the row keys already in `data/` (resume), and hands
the rest to Ray Data: vLLM engine replicas answer them and Ray tasks write the answers
atomically in chunks. Requests the engine failed on are retried in further passes; what
still fails, and every rejected seed, lands in `errors/`.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from draftalign.cluster.metrics import record
from draftalign.config import Config, ConfigError, GenerateConfig
from draftalign.modelid import check_target_folder, target_identity
from draftalign.pipelines.locks import locked_output
from draftalign.pipelines.setprint import check_set, row_determinants, write_fingerprint
from draftalign.prompts import chat_template_hash, encode_prompt, render_prompt
from draftalign.redact import redact
from draftalign.runinfo import write_json_atomic, write_run_info
from draftalign.schemas import ERROR_SCHEMA, to_table, write_parquet_atomic
from draftalign.seeds import open_rows, prepare_seeds
from draftalign.workers.generate_engine import engine_kwargs, replica_bundles
from draftalign.workers.generate_rows import error_row, expand_requests, pending, row_key_counts


def target_tokenizer(cfg: Config, target: str):
    """The target's own tokenizer; Llama 2's chat template when it has none or config asks."""
    from draftalign.tokenization import ensure_chat_template, load_tokenizer

    return ensure_chat_template(load_tokenizer(target), cfg.tokenizer.chat_template)


def seed_rows(gen: GenerateConfig) -> tuple[Any, str]:
    """(row iterator, source name) for a seed file or a Hugging Face data set."""
    if gen.seeds is None:
        raise ConfigError("generate.seeds is not set: give a .jsonl/.parquet file or a Hugging Face data set")
    local = Path(gen.seeds).expanduser()
    name = local.name if local.exists() else gen.seeds  # a hub name stays whole: org/set
    return open_rows(gen.seeds, gen.hf_config, gen.hf_split, "generate.seeds"), gen.source or name


def existing_row_keys(data_dir: Path) -> set[str]:
    return set(row_key_counts(data_dir))


def reason_kind(reason: str) -> str:
    """The reason without its details, for counts: "missing field 'instruction'", "too long ..."."""
    return re.sub(r"^(line|row) \d+: ", "", reason).split(":")[0].strip()


def describe_generate(cfg: Config) -> dict[str, Any]:
    """The --plan view: what would be read and written, and what Ray would be asked for."""
    gen, eng = cfg.generate, cfg.generate.engine
    per_replica = Counter()
    for bundle in replica_bundles(eng):
        per_replica.update(bundle)
    return {
        "target": cfg.target_path(), "seeds": gen.seeds, "max_seeds": gen.max_seeds,
        "output": gen.output, "sampling": [s.name for s in gen.sampling],
        "rows": f"{gen.max_seeds or 'all'} seeds x {len(gen.sampling)} sampling settings",
        "resources": {
            "engine_replicas": eng.replicas, "tensor_parallel_size": eng.tensor_parallel_size,
            "per_replica": dict(per_replica),
            "total": {k: v * eng.replicas for k, v in per_replica.items()},
            "batch_size": eng.batch_size, "max_concurrent_batches": eng.max_concurrent_batches,
            "engine_kwargs": engine_kwargs(eng),
        },
    }


def _prepare(cfg: Config, target: str) -> dict[str, Any]:
    """Seeds -> requests and seed errors, all in the driver and before Ray starts."""
    gen = cfg.generate
    rows, source = seed_rows(gen)
    tok = target_tokenizer(cfg, target)
    seeds, bad = prepare_seeds(rows, gen.fields, source, gen.max_seeds)
    errors = [error_row("seeds", e["reason"], id=e["id"], source=e["source"], raw=e["raw"]) for e in bad]

    def render(messages):
        text = render_prompt(tok, messages, gen.system_prompt)
        return text, encode_prompt(tok, text)

    requests, too_long = expand_requests(seeds, gen.sampling, render, gen.engine.max_model_len)
    return {"seeds": seeds, "requests": requests, "errors": errors + too_long, "source": source,
            "eos": tok.eos_token_id, "template_hash": chat_template_hash(tok)}


def _write_errors(path: Path, rows: list[dict]) -> None:
    if rows:
        write_parquet_atomic(to_table(rows, ERROR_SCHEMA), path)
    else:
        path.unlink(missing_ok=True)  # a rerun that fixed them must not leave stale errors behind


@locked_output("generate", lambda cfg: cfg.generate.output)
def run_generate(cfg: Config) -> dict[str, Any]:
    """Generate (or complete) the distillation set under generate.output; returns the manifest."""
    from draftalign.workers.generate_engine import run_passes

    gen = cfg.generate
    out = Path(gen.output).resolve()
    data_dir, err_dir = out / "data", out / "errors"
    target = cfg.target_path()
    looks_local = target.startswith(("/", ".", "~")) or target.count("/") > 1  # hub names are org/name
    if looks_local and not Path(target).expanduser().is_dir():
        raise ConfigError(f"target model {target!r} does not exist: run the pretrain stage or set models.target")
    start = time.time()
    ident = target_identity(target)
    prep = _prepare(cfg, target)
    if Path(target).expanduser().is_dir():
        check_target_folder(Path(target).expanduser())
    current = row_determinants(cfg, ident, prep["template_hash"])
    check_set(out, current, gen.overwrite)  # rows made otherwise are never kept as "done"
    done = existing_row_keys(data_dir)  # a corrupt part is refused before anything is written
    write_run_info(out, cfg, "generate", ident)
    write_fingerprint(out, current)
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob(".*.tmp"):  # what a killed writer left; never a visible file
        stale.unlink(missing_ok=True)
    todo = pending(prep["requests"], done)
    _write_errors(err_dir / "seeds.parquet", prep["errors"])
    print(f"[generate] {len(prep['seeds'])} seeds, {len(prep['requests'])} requests, "
          f"{len(prep['requests']) - len(todo)} already written, {len(todo)} to generate", flush=True)
    result = run_passes(cfg, todo, data_dir, ident, prep["eos"], prep["template_hash"])
    engine_errors = [error_row("engine", reason, id=r["id"], source=r["source"], raw=r, key=r["row_key"])
                     for r, reason in result["failed"]]
    _write_errors(err_dir / "engine.parquet", engine_errors)
    elapsed = time.time() - start
    final = row_key_counts(data_dir)
    all_errors = prep["errors"] + engine_errors
    manifest = {
        "config": redact(cfg.model_dump(mode="json")), **ident, "chat_template_hash": prep["template_hash"],
        "source": prep["source"],
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
    write_json_atomic(out / "manifest.json", manifest)
    record("draftalign_generation_tokens_per_s", manifest["tokens_per_s"], stage="generate")
    c = manifest["counts"]
    print(f"[generate] done: {c['rows_in_data']} rows in {data_dir} ({c['rows_written']} new, "
          f"{c['rows_skipped_present']} already present), {c['errors']} errors "
          f"({c['seed_errors']} seeds, {c['engine_errors']} engine) {c['errors_by_reason']}, "
          f"{c['tokens_generated']} tokens generated, {manifest['tokens_per_s']} tokens/s, "
          f"{elapsed:.0f}s", flush=True)
    return manifest
