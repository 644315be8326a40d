"""Generated tokens/s: the Ray Data + vLLM path of `draftalign generate` against a plain transformers loop.

Both answer the same rendered seed prompts greedily with the same model and max new tokens,
so both do the same work; the ratio is printed at the end. The Ray path is timed end to
end (engine load included) and in steady state (the difference between a full and a
quarter-size pass), since start-up is a fixed cost that a long run amortises.

    .venv/bin/python bench/generate_throughput.py                      # the embedded toy target
    .venv/bin/python bench/generate_throughput.py --model DIR --prompts 256 --replicas 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _requests(model: str, n: int, max_tokens: int) -> list[dict]:
    from draftalign.prompts import SamplingSetting, encode_prompt, render_prompt
    from draftalign.seeds import SeedFields, prepare_seeds, read_seed_file
    from draftalign.tokenization import LLAMA2_CHAT_TEMPLATE, load_tokenizer
    from draftalign.workers.generate_rows import expand_requests

    tok = load_tokenizer(model)
    tok.chat_template = tok.chat_template or LLAMA2_CHAT_TEMPLATE
    seeds, _ = prepare_seeds(read_seed_file(ROOT / "examples/data/seeds.jsonl"), SeedFields(id="id"), "bench", n)

    def render(messages):
        text = render_prompt(tok, messages)
        return text, encode_prompt(tok, text)

    greedy = [SamplingSetting(name="greedy", temperature=0.0, max_tokens=max_tokens)]
    return expand_requests(seeds, greedy, render, max_model_len=10**6)[0]


def bench_transformers(model: str, requests: list[dict], max_tokens: int, batch_size: int) -> tuple[int, float]:
    import torch
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    eos, tokens = lm.config.eos_token_id, 0
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        prompts = [r["prompt_token_ids"] for r in requests[i: i + batch_size]]
        width = max(map(len, prompts))
        # Left padding, so every answer starts at the same position.
        ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = lm.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos)
        for row in out[:, width:].tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)  # EOS counted, padding not
    return tokens, time.perf_counter() - start


def bench_ray_vllm(model: str, requests: list[dict], args) -> tuple[int, float]:
    """(tokens, seconds) of one Ray Data pass over `requests`, engine start-up included."""
    import ray.data

    from draftalign.config import EngineConfig
    from draftalign.workers.generate_engine import build_engine_stage

    engine = EngineConfig(replicas=args.replicas, batch_size=args.batch_size, cpus_per_replica=args.cpus_per_replica,
                          max_model_len=args.max_model_len)
    start = time.perf_counter()
    blocks = max(1, len(requests) // args.batch_size)
    ds = build_engine_stage(model, engine)(ray.data.from_items(requests, override_num_blocks=blocks))
    tokens = 0
    for row in ds.iter_rows():
        assert not row.get("__inference_error__"), row["__inference_error__"]
        tokens += len(row["response_token_ids"])
    return tokens, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "runs/tiny/pretrain/target/model"))
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpus-per-replica", type=float, default=0.5)
    p.add_argument("--ray-cpus", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=512)
    args = p.parse_args()
    requests = _requests(args.model, args.prompts, args.max_tokens)
    print(f"{len(requests)} prompts, greedy, max {args.max_tokens} new tokens, model {args.model}", flush=True)
    hf_tokens, hf_s = bench_transformers(args.model, requests, args.max_tokens, args.hf_batch_size)
    hf_rate = hf_tokens / hf_s
    print(f"transformers generate (batch {args.hf_batch_size}): {hf_tokens} tokens in {hf_s:.1f}s = "
          f"{hf_rate:.0f} tokens/s", flush=True)
    import ray

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False)
    # Two passes, the second on a quarter of the prompts: both pay the same engine start-up, so
    # the difference is the steady-state rate a long run approaches.
    rv_tokens, rv_s = bench_ray_vllm(args.model, requests, args)
    small_tokens, small_s = bench_ray_vllm(args.model, requests[: max(1, len(requests) // 4)], args)
    steady = (rv_tokens - small_tokens) / (rv_s - small_s) if rv_s > small_s else float("nan")
    print(f"Ray Data + vLLM ({args.replicas} replica(s), batch {args.batch_size}): {rv_tokens} tokens in "
          f"{rv_s:.1f}s = {rv_tokens / rv_s:.0f} tokens/s end to end; a quarter of the prompts took "
          f"{small_s:.1f}s, so {steady:.0f} tokens/s steady state (start-up excluded)")
    print(f"ratio Ray Data + vLLM / transformers: {rv_tokens / rv_s / hf_rate:.2f}x end to end, "
          f"{steady / hf_rate:.2f}x steady state")


if __name__ == "__main__":  # vLLM starts engine processes with spawn
    main()
