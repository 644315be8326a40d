"""The machine's verify cost: what one target forward over k new tokens costs against one over a single token.

Speculative decoding pays off when verifying γ + 1 tokens costs about one target step (r ≈ 1),
as on a GPU, where decoding a small batch is bound by reading the weights. On a CPU a small model
is bound by compute per token, and r = t_verify(γ+1) / t_target was 1.2–1.6 on one 2-core
machine and 2.0–2.6 on another: the same τ then gives a different speed-up. A speed-up figure
is therefore stated with the r of the machine that measured it.

t_target and t_verify(k) are medians of timed forwards with a KV cache holding a prompt-sized
context (the cache is cropped back after each call, outside the timing), as evaluate and
bench/spec_time_split.py measure them; bench/llamacpp_target.py reuses the arithmetic.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypedDict

__all__ = ["REPEATS", "VerifyCost", "forward_ms", "measure_verify_cost", "median_seconds", "prompt_sized_context",
           "verify_cost_line", "verify_ratios"]

# Timed forwards per figure: 10 keep a median steady on a shared machine and the whole measurement
# a few seconds for a 135M target on 2 cores (k up to 6 for γ up to 5).
REPEATS = 10
WARMUP = 2  # untimed calls first: kernel selection and allocator growth stay out of the median


class VerifyCost(TypedDict):
    """One measurement: t_target, t_verify(k) for k = γ + 1 of each γ, r_k = t_verify(k) / t_target."""

    t_target_ms: float
    t_verify_ms: dict[int, float]  # k -> ms
    r: dict[int, float]  # k -> t_verify(k) / t_target
    context_tokens: int
    repeats: int
    measured_on: str  # what ran the forwards, e.g. "the reference engine's target (PyTorch, cpu, 2 threads)"


def median_seconds(call: Callable[[], Any], repeats: int, warmup: int = WARMUP,
                   reset: Callable[[], Any] | None = None) -> float:
    """Median wall time of `call` over `repeats` timed runs after `warmup` untimed ones; `reset`
    (e.g. cropping a KV cache back) runs after every call, outside the timing."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        call()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if reset is not None:
            reset()
    return statistics.median(times)


def forward_ms(model: Any, context: Sequence[int], k: int, repeats: int = REPEATS,
               sync: Callable[[], Any] | None = None) -> float:
    """ms of one forward over k new tokens after a KV cache holding `context`. `sync` (CUDA's
    synchronize) ends each timed call: without it a GPU forward is timed as its launch."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        if hasattr(cache, "activate_past_recording"):  # sliding-window layers (Gemma 3) crop only when recording
            cache.activate_past_recording()
        model(input_ids=torch.tensor([list(context)], device=device), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        new = torch.tensor([list(context[:k])], device=device)

        def call() -> None:
            # logits for all k positions: a verify step needs each one's distribution
            model(input_ids=new, past_key_values=cache, use_cache=True, logits_to_keep=k)
            if sync is not None:
                sync()

        return 1000.0 * median_seconds(call, repeats, reset=lambda: cache.crop(-k))


def verify_ratios(t_1: float, t_k: Mapping[int, float]) -> dict[int, float]:
    """r_k = t(k tokens in one forward) / t(one token), for each k."""
    return {k: t / t_1 for k, t in sorted(t_k.items())} if t_1 > 0 else {k: float("nan") for k in sorted(t_k)}


def prompt_sized_context(prompts: Iterable[Sequence[int]]) -> list[int]:
    """The prompt of median length (the longer of the two middle ones): the KV cache a verify step
    of a typical prompt's first tokens sees."""
    ordered = sorted((list(p) for p in prompts), key=len)
    if not ordered:
        raise ValueError("no prompt to time the target's forwards after")
    return ordered[len(ordered) // 2]


def measure_verify_cost(model: Any, context: Sequence[int], gammas: Iterable[int], measured_on: str,
                        repeats: int = REPEATS, sync: Callable[[], Any] | None = None) -> VerifyCost:
    """t_target, t_verify(γ + 1) for each γ, and their ratios, of `model` on this machine."""
    t_target = forward_ms(model, context, 1, repeats, sync)
    t_verify = {g + 1: forward_ms(model, context, g + 1, repeats, sync) for g in sorted(set(gammas))}
    return {"t_target_ms": t_target, "t_verify_ms": t_verify, "r": verify_ratios(t_target, t_verify),
            "context_tokens": len(context), "repeats": repeats, "measured_on": measured_on}


def verify_cost_line(cost: Mapping[str, Any] | None) -> str:
    """One line for the log and the report: r per γ with the timings behind it, or why there is none.
    Reads a cost written to JSON too (its k keys are strings there)."""
    if cost is None:
        return ("verify cost r = t_verify(γ+1) / t_target: not measured (the target was not loaded in PyTorch: "
                "only vLLM ran and evaluate.export_check was off)")
    rs = ", ".join(f"γ={int(k) - 1}: {r:.2f}" for k, r in sorted(cost["r"].items(), key=lambda kv: int(kv[0])))
    ts = ", ".join(f"k={int(k)}: {t:.2f}" for k, t in sorted(cost["t_verify_ms"].items(), key=lambda kv: int(kv[0])))
    return (f"verify cost r = t_verify(γ+1) / t_target: {rs} (t_target {cost['t_target_ms']:.2f} ms, "
            f"t_verify(k) {ts} ms; {cost['measured_on']}, median of {cost['repeats']} forwards after a "
            f"{cost['context_tokens']}-token context)")
