"""The Ray Data side of `generate`: the ray.data.llm vLLM processor and the chunk writer.

Requests go to the engines as token ids (`tokenized_prompt`, tokenize stage off): the
rendered prompt already holds BOS, and letting the engine tokenize the text again would
add a second one. The writer runs as a Ray task and writes each chunk of answers
atomically to `data/`, so a kill loses at most the chunks in flight, never half a file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa

from draftalign.cluster.metrics import record
from draftalign.cluster.resources import replica_bundles
from draftalign.config import EngineConfig, VllmEvalConfig
from draftalign.data.schemas import DISTILL_SCHEMA, to_table
from draftalign.util.atomicio import write_parquet_atomic
from draftalign.workers.generate_rows import distill_row, vllm_sampling_params

# ray.data.llm marks a failed request with this column and hands the row back as the engine
# stage left it, skipping the postprocess; answered rows carry it empty.
ERROR_COLUMN = "__inference_error__"
_SUMMARY = pa.schema([("row_key", pa.string()), ("error", pa.string()),
                      ("num_generated_tokens", pa.int64()), ("file", pa.string())])
# An id no vocabulary has: the engine rejects the request, as a real engine failure would.
_POISON_TOKEN = 2**31 - 1
_IDS = "draftalign_prompt_ids"
# Ray Data restarts a dead map actor without limit, and ray.data.llm kills its own actor on a
# fatal engine error to get a fresh engine: an engine that crashes the same way every time
# (a bad engine kwarg, a model it cannot run) would restart forever. One restart absorbs a
# one-off death (an OOM kill); a second death fails the pass, and the driver decides.
ENGINE_MAX_RESTARTS = 1


def engine_kwargs(engine: EngineConfig | VllmEvalConfig) -> dict[str, Any]:
    """vllm.LLM kwargs: the config's, plus what the CPU backend needs unless overridden.

    The generate stage's engines and the evaluate stage's share these CPU defaults."""
    # safetensors only: vLLM's "auto" would fall back to unpickling *.bin files from elsewhere.
    kwargs: dict[str, Any] = {"max_model_len": engine.max_model_len,
                              "tensor_parallel_size": engine.tensor_parallel_size, "load_format": "safetensors"}
    if not engine.use_gpu:
        # An explicit KV-cache size: the CPU backend's gpu_memory_utilization is a share of RAM
        # minus the engine's own footprint, which comes out negative for small shares.
        kwargs.update(kv_cache_memory_bytes=256 * 2**20, enforce_eager=True, dtype="float32",
                      # A split prefill rewinds a seeded request's generator, which the CPU
                      # generator cannot do ("CPU Generator does not use offset"): prefill whole.
                      enable_chunked_prefill=False)
    return {**kwargs, **engine.engine_kwargs}


def engine_metrics(engine: EngineConfig) -> bool:
    """Whether vLLM logs its engine metrics: as configured, else with GPUs only (they need a
    Prometheus setup the CPU engine actor lacks)."""
    return engine.use_gpu if engine.engine_metrics is None else engine.engine_metrics


def _preprocess(row: dict[str, Any], fail_keys: frozenset[str] = frozenset()) -> dict[str, Any]:
    ids = [int(t) for t in row["prompt_token_ids"]]
    # The engine's output overwrites `prompt_token_ids` (with None for token prompts), so the
    # ids travel under a name of their own.
    params = vllm_sampling_params(row["sampling"], row["row_key"])
    # Self-instruct requests end at the user turn's end marker (generate.self_instruct).
    row = dict(row)
    stop, stop_ids = row.pop("stop", None), row.pop("stop_token_ids", None)
    if stop is not None and len(stop):
        params["stop"] = [str(x) for x in stop]
    if stop_ids is not None and len(stop_ids):
        params["stop_token_ids"] = [int(x) for x in stop_ids]
    out = {**row, _IDS: ids, "tokenized_prompt": [_POISON_TOKEN] if row["row_key"] in fail_keys else ids,
           "sampling_params": params}
    del out["prompt_token_ids"]
    return out


def _postprocess(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "row_key", "source", "instruction", "input", "messages", "prompt_text", "sampling")
    out = {k: row.get(k) for k in keep}
    out["prompt_token_ids"] = [int(t) for t in row[_IDS]]
    out["response_token_ids"] = [int(t) for t in (row.get("generated_tokens") or [])]
    out["response_text"] = row.get("generated_text") or ""
    return out


def build_engine_stage(model: str, engine: EngineConfig, fail_keys: frozenset[str] = frozenset()):
    """A ray.data.llm Processor: request rows in, request rows with answers (or `error`) out."""
    from functools import partial

    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=engine_kwargs(engine),
        batch_size=engine.batch_size,
        # A fixed pool of `replicas` engines: an int n is an autoscaling pool of 1 to n, which on a
        # small set never started the second replica (tests/test_two_nodes_ray.py).
        concurrency=(engine.replicas, engine.replicas),
        max_concurrent_batches=engine.max_concurrent_batches,
        placement_group_config={"bundles": replica_bundles(engine), "strategy": "PACK"},
        # Failed requests come back as rows with __inference_error__, so the driver can retry
        # exactly those instead of losing the batch.
        should_continue_on_error=True,
        log_engine_metrics=engine_metrics(engine),
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        runtime_env={"env_vars": dict(engine.env)} if engine.env else None,
    )
    small = {"num_cpus": 0.25}  # light row maps must not compete with the engines for whole CPUs
    processor = build_processor(config, preprocess=partial(_preprocess, fail_keys=fail_keys),
                                postprocess=_postprocess, preprocess_map_kwargs=small,
                                postprocess_map_kwargs=small)
    # map_batches takes max_restarts as a Ray actor option; the processor config has no field for
    # it. Set in place: assigning the field re-runs the stage's validator, which then asks for a GPU.
    processor.get_stage_by_name("vLLMEngineStage").map_batches_kwargs["max_restarts"] = ENGINE_MAX_RESTARTS
    return processor


def chunk_file(data_dir: str | Path, first_key: str) -> Path:
    """`part-<16 hex of sha256(first row_key)>.parquet`: a resumed run never starts a chunk
    with a key already written, so its names cannot clash with the files it keeps."""
    return Path(data_dir) / f"part-{hashlib.sha256(first_key.encode()).hexdigest()[:16]}.parquet"


def write_chunk(batch: pa.Table, data_dir: str, eos_token_id: int | None, target_model: str,
                target_hash: str, template_hash: str, generator_model: str | None = None,
                generator_hash: str | None = None) -> pa.Table:
    """Write the answered rows of a batch as one Parquet file; return one summary row per request.

    generator_*: the model the engine serves (generate.generator; default the target)."""
    rows = batch.to_pylist()
    for r in rows:
        r[ERROR_COLUMN] = r.get(ERROR_COLUMN) or ""
    good = [r for r in rows if not r[ERROR_COLUMN]]
    out = [distill_row(r, r["response_token_ids"], r["response_text"], eos_token_id=eos_token_id,
                       target_model=target_model, target_hash=target_hash, template_hash=template_hash,
                       generator_model=generator_model, generator_hash=generator_hash)
           for r in good]
    path = ""
    if out:
        path = str(write_parquet_atomic(to_table(out, DISTILL_SCHEMA), chunk_file(data_dir, out[0]["row_key"])))
        # Live progress on the dashboard while the pass runs (the manifest has the totals).
        record("draftalign_generated_rows_total", len(out), stage="generate")
        record("draftalign_generated_tokens_total", sum(r["num_generated_tokens"] for r in out), stage="generate")
    return pa.Table.from_pylist(
        [{"row_key": r["row_key"], "error": r[ERROR_COLUMN],
          "num_generated_tokens": len(r.get("response_token_ids") or []), "file": path if not r[ERROR_COLUMN] else ""}
         for r in rows], schema=_SUMMARY)


def run_pass(model: str, engine: EngineConfig, rows_per_file: int, requests: list[dict], data_dir: Path,
             ident: dict[str, str], eos: int | None, template_hash: str, fail_keys: frozenset[str]) -> list[dict]:
    """One Ray Data pass over `requests`: engine stage, then the chunk writer; its summary rows."""
    import ray.data

    blocks = max(1, min(len(requests), -(-len(requests) // engine.batch_size)))
    ds = ray.data.from_items(requests, override_num_blocks=blocks)
    ds = build_engine_stage(model, engine, fail_keys)(ds)
    ds = ds.map_batches(write_chunk, batch_size=rows_per_file, batch_format="pyarrow",
                        num_cpus=0.25, fn_kwargs={"data_dir": str(data_dir), "eos_token_id": eos,
                                                  "template_hash": template_hash, **ident})
    from draftalign.util.console import track

    return list(track(ds.iter_rows(), len(requests), "[generate]", "rows", tokens_key="num_generated_tokens"))
