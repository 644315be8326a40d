"""Generated tokens/s: the Ray Data + vLLM path of `draftalign generate` against a plain transformers loop.

Both answer the same rendered seed prompts with the same model, dtype (float32) and max new
tokens, once greedily and once sampled (T=1.0, top-p 0.95), as `draftalign generate` does.
The transformers loop is batched with left padding and timed after its model load; the Ray
path is timed from the Ray Data pass's start, so its engine start-up counts. The Ray path
is reported two ways:

- end to end: all tokens / (time to the last row), start-up included;
- steady state: a second pass over a quarter of the prompts pays the same start-up, so
  (tokens of the full pass - tokens of the quarter) / (difference of their times) is the
  rate a long run approaches once the engine is up.

Time to the first block is printed too: Ray actor start + vLLM engine start + the first
wave of batches (batch_size x max_concurrent_batches requests decode together).

    .venv/bin/python bench/generate_throughput.py                      # the embedded toy target
    .venv/bin/python bench/generate_throughput.py --model DIR --prompts 256 --replicas 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _requests(model: str, n: int, max_tokens: int) -> list[dict]:
    from draftalign.config import SamplingSetting, SeedFields
    from draftalign.prompts import encode_prompt, render_prompt
    from draftalign.seeds import prepare_seeds, read_seed_file
    from draftalign.tokenization import LLAMA2_CHAT_TEMPLATE, load_tokenizer
    from draftalign.workers.generate_rows import expand_requests

    tok = load_tokenizer(model)
    tok.chat_template = tok.chat_template or LLAMA2_CHAT_TEMPLATE
    seeds, _ = prepare_seeds(read_seed_file(ROOT / "examples/data/seeds.jsonl"), SeedFields(id="id"), "bench", n)

    def render(messages):
        text = render_prompt(tok, messages)
        return text, encode_prompt(tok, text)

    settings = [SamplingSetting(name="greedy", temperature=0.0, max_tokens=max_tokens),
                SamplingSetting(name="t1.0", temperature=1.0, top_p=0.95, max_tokens=max_tokens, seed=0)]
    return expand_requests(seeds, settings, render, max_model_len=10**6)[0]


def bench_transformers(model: str, requests: list[dict], batch_size: int) -> tuple[int, float]:
    """(tokens, seconds) of batched `generate` calls, one sampling setting per batch."""
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
    return tokens, time.perf_counter() - start


def bench_ray_vllm(model: str, requests: list[dict], args) -> dict[str, float]:
    """One Ray Data pass over `requests`, engine start-up included: tokens, seconds, first block."""
    import ray.data

    from draftalign.config import EngineConfig
    from draftalign.workers.generate_engine import build_engine_stage

    engine = EngineConfig(replicas=args.replicas, batch_size=args.batch_size, cpus_per_replica=args.cpus_per_replica,
                          max_concurrent_batches=args.max_concurrent_batches, max_model_len=args.max_model_len,
                          env=dict(kv.split("=", 1) for kv in args.engine_env))
    start = time.perf_counter()
    blocks = max(1, len(requests) // args.batch_size)
    ds = build_engine_stage(model, engine)(ray.data.from_items(requests, override_num_blocks=blocks))
    tokens, first_at = 0, None
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # blocks, as they arrive
        errors = [e for e in batch.column("__inference_error__").to_pylist() if e]
        assert not errors, errors[0]
        tokens += sum(len(ids) for ids in batch.column("response_token_ids").to_pylist())
        if first_at is None:
            first_at = time.perf_counter() - start
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "first_s": first_at}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "runs/tiny/pretrain/target/model"))
    p.add_argument("--prompts", type=int, default=128, help="seeds; each is answered greedy and sampled")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-concurrent-batches", type=int, default=4)
    p.add_argument("--cpus-per-replica", type=float, default=0.5)
    p.add_argument("--ray-cpus", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE",
                   help="engine actor environment, as generate.engine.env (e.g. VLLM_CPU_NUM_OF_RESERVED_CPU=0)")
    args = p.parse_args()
    requests = _requests(args.model, args.prompts, args.max_tokens)
    print(f"{len(requests)} requests ({args.prompts} prompts x greedy, T=1.0 top-p 0.95), max {args.max_tokens} "
          f"new tokens, float32, model {args.model}", flush=True)
    hf_tokens, hf_s = bench_transformers(args.model, requests, args.hf_batch_size)
    hf_rate = hf_tokens / hf_s
    print(f"transformers generate (batch {args.hf_batch_size}, left padding): {hf_tokens} tokens in {hf_s:.1f}s = "
          f"{hf_rate:.0f} tokens/s (model load excluded)", flush=True)
    import ray

    t0 = time.perf_counter()
    # A Ray of its own, as `draftalign generate` starts: never a cluster left running (or a stale
    # /tmp/ray/ray_current_cluster) that would refuse num_cpus.
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False)
    ray_init_s = time.perf_counter() - t0
    r = bench_ray_vllm(args.model, requests, args)
    q = bench_ray_vllm(args.model, requests[: max(1, len(requests) // 4)], args)
    end_to_end = r["tokens"] / r["seconds"]
    steady = (r["tokens"] - q["tokens"]) / (r["seconds"] - q["seconds"]) if r["seconds"] > q["seconds"] \
        else float("nan")
    print(f"Ray Data + vLLM ({args.replicas} replica(s), batch {args.batch_size} x {args.max_concurrent_batches} "
          f"in flight): {r['tokens']} tokens in {r['seconds']:.1f}s, first block after {r['first_s']:.1f}s "
          f"(ray.init {ray_init_s:.1f}s before that, not counted); a quarter of the requests took "
          f"{q['seconds']:.1f}s ({q['tokens']} tokens, first block after {q['first_s']:.1f}s)")
    print(f"tokens/s  transformers {hf_rate:.0f} | Ray Data + vLLM end to end {end_to_end:.0f}, "
          f"steady state {steady:.0f}")
    print(f"ratio Ray Data + vLLM / transformers: {end_to_end / hf_rate:.2f}x end to end, "
          f"{steady / hf_rate:.2f}x steady state")


if __name__ == "__main__":  # vLLM starts engine processes with spawn
    main()
