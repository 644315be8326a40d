"""Generated tokens/s: plain vLLM, the Ray Data + vLLM path of `draftalign generate`, and a plain
transformers loop, side by side at two or more model sizes, with the Ray Data path broken down.

Every path answers the same rendered seed prompts with the same model, dtype (float32), max new
tokens and per-request sampling settings (greedy and T=1.0 top-p 0.95, as `draftalign
generate` asks for them). vLLM gets the generate stage's engine kwargs (`engine_kwargs`) and
engine environment in both of its paths. Per model:

- render + tokenize: the driver turning seeds into token ids (the engines get ids, not text);
- transformers: batched `generate` with left padding, model load excluded;
- plain vLLM, in a process of its own: engine start (`vllm.LLM(...)`), then every request in one
  `LLM.generate` call, then again in waves of batch_size x max_concurrent_batches (the most the
  Ray Data path keeps in flight) one after the other;
- Ray Data + vLLM, engine only: one pass of the ray.data.llm processor over every request, then
  one over a quarter of them. Both pay the same start-up (actor, placement group, engine), so
  steady state = (tokens of the whole pass − tokens of the quarter) / (difference of their
  times): the rate a long run approaches. Time to the first block is printed too;
- Ray Data + vLLM + Parquet: the generate stage's own pass (the processor, then the chunk
  writer) over every request; its difference from the engine-only pass is the writer's cost.

Models: `--sizes` builds random-weight Llamas with the embedded 32k tokenizer (random weights
rarely pick EOS, so every path generates max_tokens per request and the counts match), `--model
DIR` benches a folder you have. The ratios are computed inside one run, on the same machine.

    .venv/bin/python bench/generate_throughput.py                         # toy (19.6M) and 134M
    .venv/bin/python bench/generate_throughput.py --sizes toy --model DIR --prompts 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import childproc

ROOT = Path(__file__).resolve().parent.parent
# Random-weight Llamas built for the benchmark: the embedded toy target's shape, and a
# GPT-2-small-like shape above 100M parameters (134M with the 32k vocabulary, untied).
SIZES: dict[str, dict[str, Any]] = {
    "toy": {"preset": "toy-target"},
    "134m": {"preset": None, "overrides": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                               num_attention_heads=12, num_key_value_heads=12,
                                               max_position_embeddings=1024)},
}


def build_random_llama(size: str, folder: Path) -> Path:
    """A random-weight Llama of SIZES[size] with the embedded tokenizer, saved once to `folder`."""
    import torch
    from transformers import LlamaForCausalLM

    from draftalign.data.tokenization import load_tokenizer, materialize_tokenizer
    from draftalign.models.arch import build_config

    if (folder / "config.json").is_file():
        return folder
    tok = load_tokenizer(materialize_tokenizer("embedded", folder))
    spec = SIZES[size]
    cfg = build_config(spec["preset"], spec.get("overrides"), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def requests_for(model: str, n: int, max_tokens: int) -> tuple[list[dict], float]:
    """(requests, seconds to render and tokenize them), as `draftalign generate` builds them."""
    from draftalign.config import SamplingSetting, SeedFields
    from draftalign.data.prompts import encode_prompt, render_prompt
    from draftalign.data.seeds import prepare_seeds, read_seed_file
    from draftalign.data.tokenization import LLAMA2_CHAT_TEMPLATE, load_tokenizer
    from draftalign.workers.generate_rows import expand_requests

    start = time.perf_counter()
    tok = load_tokenizer(model)
    tok.chat_template = tok.chat_template or LLAMA2_CHAT_TEMPLATE
    seeds, _ = prepare_seeds(read_seed_file(ROOT / "examples/data/seeds.jsonl"), SeedFields(id="id"), "bench", n)

    def render(messages):
        text = render_prompt(tok, messages)
        return text, encode_prompt(tok, text)

    settings = [SamplingSetting(name="greedy", temperature=0.0, max_tokens=max_tokens),
                SamplingSetting(name="t1.0", temperature=1.0, top_p=0.95, max_tokens=max_tokens, seed=0)]
    reqs = expand_requests(seeds, settings, render, max_model_len=10**6)[0]
    return reqs, time.perf_counter() - start


def bench_transformers(model: str, requests: list[dict], batch_size: int) -> dict[str, float]:
    """Batched `generate` calls, one sampling setting per batch: tokens and seconds."""
    import torch
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    eos, tokens = lm.config.eos_token_id, 0
    by_setting: dict[str, list[dict]] = {}
    for r in requests:
        by_setting.setdefault(r["sampling"]["name"], []).append(r)
    torch.manual_seed(0)
    start = time.perf_counter()
    for group in by_setting.values():
        s = group[0]["sampling"]
        sample = {"do_sample": True, "temperature": s["temperature"], "top_p": s["top_p"]} if s["temperature"] > 0 \
            else {"do_sample": False}
        for i in range(0, len(group), batch_size):
            prompts = [r["prompt_token_ids"] for r in group[i: i + batch_size]]
            width = max(map(len, prompts))
            # Left padding, so every answer starts at the same position.
            ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.no_grad():
                out = lm.generate(ids, attention_mask=mask, max_new_tokens=s["max_tokens"], eos_token_id=eos,
                                  pad_token_id=eos, **sample)
            for row in out[:, width:].tolist():
                tokens += row.index(eos) + 1 if eos in row else len(row)  # EOS counted, padding not
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


def plain_vllm(model: str, requests: list[dict], kwargs: dict[str, Any], env: dict[str, str],
               wave: int) -> dict[str, float]:
    """vllm.LLM in a child process of its own (its engine ends with it): start, all requests in
    one call, then in waves."""
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model": model, "requests": requests, "kwargs": kwargs, "wave": wave}))
        proc = subprocess.run([sys.executable, __file__, "--plain-vllm-job", str(job)], capture_output=True,
                              text=True, env={**os.environ, **env})
    result = childproc.receive(proc.stdout)
    if proc.returncode or result is None:
        raise RuntimeError(f"plain vLLM failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return result


def plain_vllm_job(path: str) -> NoReturn:
    """In the child: run the job plain_vllm wrote, send its timings and exit."""
    job = json.loads(Path(path).read_text())
    model, requests, wave = job["model"], job["requests"], job["wave"]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from draftalign.workers.generate_rows import vllm_sampling_params

    t0 = time.perf_counter()
    llm = LLM(model=model, **job["kwargs"])
    out: dict[str, float] = {"start_s": time.perf_counter() - t0}
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
    params = [SamplingParams(**vllm_sampling_params(r["sampling"], r["row_key"])) for r in requests]
    for name, size in (("all", len(requests)), ("waves", wave)):
        t0, tokens = time.perf_counter(), 0
        for i in range(0, len(requests), size):
            done = llm.generate(prompts[i: i + size], params[i: i + size], use_tqdm=False)
            tokens += sum(len(o.outputs[0].token_ids) for o in done)
        out[f"{name}_tokens"], out[f"{name}_s"] = tokens, time.perf_counter() - t0
    childproc.send(out, llm)


def _timed_blocks(batches, count) -> dict[str, float]:
    """Read a Ray Data pass block by block: tokens, seconds, and when the first block came."""
    start, tokens, first = time.perf_counter(), 0, float("nan")
    for batch in batches:
        tokens += count(batch)
        if first != first:  # NaN until the first block
            first = time.perf_counter() - start
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "first_s": first}


def steady_rate(whole: dict[str, float], part: dict[str, float]) -> float:
    """Tokens/s once started: two passes of different sizes pay the same start-up."""
    if whole["seconds"] <= part["seconds"]:
        return float("nan")
    return (whole["tokens"] - part["tokens"]) / (whole["seconds"] - part["seconds"])


def ray_engine_only(model: str, requests: list[dict], engine) -> dict[str, float]:
    """The ray.data.llm processor alone, its blocks read as they arrive."""
    import ray.data

    from draftalign.workers.generate_engine import ERROR_COLUMN, build_engine_stage

    blocks = max(1, -(-len(requests) // engine.batch_size))
    ds = build_engine_stage(model, engine)(ray.data.from_items(requests, override_num_blocks=blocks))

    def count(batch) -> int:
        errors = [e for e in batch.column(ERROR_COLUMN).to_pylist() if e]
        assert not errors, errors[0]
        return sum(len(ids) for ids in batch.column("response_token_ids").to_pylist())

    return _timed_blocks(ds.iter_batches(batch_size=None, batch_format="pyarrow"), count)


def ray_with_writer(model: str, requests: list[dict], engine, rows_per_file: int) -> dict[str, float]:
    """The generate stage's pass: the processor, then the Parquet chunk writer (a temporary folder)."""
    import ray.data

    from draftalign.workers.generate_engine import build_engine_stage, write_chunk

    blocks = max(1, -(-len(requests) // engine.batch_size))
    with tempfile.TemporaryDirectory() as out:
        ds = build_engine_stage(model, engine)(ray.data.from_items(requests, override_num_blocks=blocks))
        ds = ds.map_batches(write_chunk, batch_size=rows_per_file, batch_format="pyarrow", num_cpus=0.25,
                            fn_kwargs={"data_dir": out, "eos_token_id": None, "target_model": model,
                                       "target_hash": "bench", "template_hash": "bench"})

        def count(batch) -> int:
            errors = [e for e in batch.column("error").to_pylist() if e]
            assert not errors, errors[0]
            return sum(batch.column("num_generated_tokens").to_pylist())

        return _timed_blocks(ds.iter_batches(batch_size=None, batch_format="pyarrow"), count)


def bench_model(model: str, args, engine) -> dict[str, Any]:
    from draftalign.models.arch import count_parameters_of
    from draftalign.workers.generate_engine import engine_kwargs

    requests, render_s = requests_for(model, args.prompts, args.max_tokens)
    res: dict[str, Any] = {"model": model, "params_m": count_parameters_of(model) / 1e6, "render_s": render_s}
    print(f"\n== {model}: {res['params_m']:.1f}M parameters, {len(requests)} requests "
          f"({len(requests) // 2} prompts x greedy, T=1.0 top-p 0.95), max {args.max_tokens} new tokens", flush=True)
    res["hf"] = bench_transformers(model, requests, args.hf_batch_size)
    print(f"transformers: {res['hf']}", flush=True)
    res["vllm"] = plain_vllm(model, requests, engine_kwargs(engine), dict(engine.env),
                             engine.batch_size * engine.max_concurrent_batches)
    print(f"plain vLLM: {res['vllm']}", flush=True)
    res["ray"] = ray_engine_only(model, requests, engine)
    res["ray_quarter"] = ray_engine_only(model, requests[: len(requests) // 4], engine)
    res["ray"]["steady"] = steady_rate(res["ray"], res["ray_quarter"])
    print(f"Ray Data + vLLM: {res['ray']}; a quarter of the requests: {res['ray_quarter']}", flush=True)
    res["ray_parquet"] = ray_with_writer(model, requests, engine, args.rows_per_file)
    print(f"Ray Data + vLLM + Parquet: {res['ray_parquet']}", flush=True)
    return res


def report(results: list[dict[str, Any]]) -> None:
    """One row per model: tokens/s of each path, then the ratios and the Ray Data breakdown."""
    print("\n| model | params | transformers | plain vLLM | plain vLLM, waves | Ray Data steady | "
          "Ray/plain steady | Ray/plain end to end | plain vLLM/transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        hf = r["hf"]["tokens"] / r["hf"]["seconds"]
        v = r["vllm"]
        plain, waves = v["all_tokens"] / v["all_s"], v["waves_tokens"] / v["waves_s"]
        ray = r["ray"]["steady"]
        plain_e2e = v["all_tokens"] / (v["start_s"] + v["all_s"])
        ray_e2e = r["ray"]["tokens"] / r["ray"]["seconds"]
        print(f"| {Path(r['model']).name} | {r['params_m']:.1f}M | {hf:.0f} | {plain:.0f} | {waves:.0f} | {ray:.0f} | "
              f"{ray / plain:.2f} | {ray_e2e / plain_e2e:.2f} | {plain / hf:.2f} |")
    print("\nSeconds: | model | render + tokenize | plain vLLM start | plain vLLM generate | Ray Data pass | "
          "its first block | Ray Data pass, a quarter | Ray Data pass + Parquet |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {Path(r['model']).name} | {r['render_s']:.1f} | {r['vllm']['start_s']:.1f} | {r['vllm']['all_s']:.1f} | "
              f"{r['ray']['seconds']:.1f} | {r['ray']['first_s']:.1f} | {r['ray_quarter']['seconds']:.1f} | "
              f"{r['ray_parquet']['seconds']:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="toy,134m", help=f"random-weight Llamas to build: {', '.join(SIZES)}")
    p.add_argument("--model", action="append", default=[], help="a model folder to bench as well")
    p.add_argument("--models-dir", default=str(ROOT / "runs/bench-models"))
    p.add_argument("--prompts", type=int, default=128,
                   help="seeds, at most all of examples/data/seeds.jsonl; each is answered greedy and sampled")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-concurrent-batches", type=int, default=4)
    p.add_argument("--cpus-per-replica", type=float, default=0.5)
    p.add_argument("--rows-per-file", type=int, default=128)
    p.add_argument("--ray-cpus", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--kv-cache-mib", type=int, default=None,
                   help="vLLM's KV cache (default: the generate stage's CPU default, 256 MiB)")
    p.add_argument("--engine-env", action="append", default=["VLLM_CPU_NUM_OF_RESERVED_CPU=0"], metavar="KEY=VALUE",
                   help="engine environment, as generate.engine.env (default: the examples' setting)")
    p.add_argument("--plain-vllm-job", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_vllm_job:
        plain_vllm_job(args.plain_vllm_job)
    import ray

    from draftalign.config import EngineConfig

    engine = EngineConfig(batch_size=args.batch_size, cpus_per_replica=args.cpus_per_replica,
                          max_concurrent_batches=args.max_concurrent_batches, max_model_len=args.max_model_len,
                          env=dict(kv.split("=", 1) for kv in args.engine_env),
                          engine_kwargs={"kv_cache_memory_bytes": args.kv_cache_mib * 2**20} if args.kv_cache_mib else {})
    models = [str(build_random_llama(s, Path(args.models_dir) / s)) for s in filter(None, args.sizes.split(","))]
    # A Ray of its own, as `draftalign generate` starts: never a cluster left running.
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False)
    report([bench_model(m, args, engine) for m in [*models, *args.model]])


if __name__ == "__main__":  # vLLM starts engine processes with spawn
    main()
