"""The `vllm` evaluation engine: vLLM's own speculative decoding, read from its counters.

One engine per (drafter, γ), since vLLM fixes `speculative_config` at start-up, plus one
engine without speculation for the tokens/s baseline. Each engine lives in a Ray actor, so
the driver never imports vLLM and a finished engine's memory goes away with its actor.
Prompts are sent one at a time: that is the batch-1 setting of the paper's speed-up, and
reading the counters before and after each request gives per-prompt statistics.
"""

from __future__ import annotations

import time
from typing import Any

from draftalign.config import VllmEvalConfig
from draftalign.evaltasks import prompt_seed

__all__ = ["VllmEngine", "SPEC_COUNTERS", "counter_delta"]

SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def read_counters(metrics: list[Any], gamma: int) -> dict[str, Any]:
    """Spec-decode counters summed over label sets (one per engine), from `llm.get_metrics()`."""
    out: dict[str, Any] = {name: 0 for name in SPEC_COUNTERS}
    out[PER_POS] = [0] * gamma
    for m in metrics:
        if m.name in SPEC_COUNTERS:
            out[m.name] += int(m.value)
        elif m.name == PER_POS:
            for i, v in enumerate(list(m.values)[:gamma]):
                out[PER_POS][i] += int(v)
    return out


def counter_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What one request added: {"num_drafts", "num_draft_tokens", "num_accepted", "accepted_per_pos"}."""
    d = {name: after[name] - before[name] for name in SPEC_COUNTERS}
    return {"num_drafts": d[SPEC_COUNTERS[0]], "num_draft_tokens": d[SPEC_COUNTERS[1]],
            "num_accepted": d[SPEC_COUNTERS[2]],
            "accepted_per_pos": [a - b for a, b in zip(after[PER_POS], before[PER_POS], strict=True)]}


class VllmEngine:
    """A vllm.LLM for `target`, speculating with `draft` at `gamma` tokens (no draft: plain decoding)."""

    def __init__(self, target: str, draft: str | None, gamma: int, vllm: VllmEvalConfig):
        from vllm import LLM

        from draftalign.workers.generate_engine import engine_kwargs

        self.gamma = gamma if draft else 0
        kwargs = engine_kwargs(vllm)
        if draft:
            kwargs["speculative_config"] = {"method": "draft_model", "model": draft, "num_speculative_tokens": gamma,
                                            **vllm.speculative_config}
        # disable_log_stats=False: the spec-decode counters are stats, off by default in LLM
        self.llm = LLM(model=target, disable_log_stats=False, **kwargs)

    def close(self) -> None:
        """Stop the engine's core process now, before the actor is killed (best effort)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def _counters(self) -> dict[str, Any]:
        return read_counters(self.llm.get_metrics(), self.gamma)

    def generate(self, prompts: list[dict], temperature: float, top_p: float, max_tokens: int, seed: int,
                 warmup_tokens: int = 8) -> list[dict]:
        """[{"id", "tokens", "seconds", counters...}] for prompts [{"id", "token_ids"}], one at a time."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        def one(p: dict, n: int) -> tuple[list[int], float]:
            params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=n,
                                    seed=None if temperature == 0 else prompt_seed(seed, p["id"], temperature))
            t0 = time.perf_counter()
            out = self.llm.generate([TokensPrompt(prompt_token_ids=list(p["token_ids"]))], params, use_tqdm=False)
            return list(out[0].outputs[0].token_ids), time.perf_counter() - t0

        if warmup_tokens and prompts:
            one(prompts[0], warmup_tokens)  # untimed: the first request pays one-off costs
        rows = []
        for p in prompts:
            before = self._counters() if self.gamma else None
            tokens, secs = one(p, max_tokens)
            row = {"id": p["id"], "tokens": tokens, "seconds": secs}
            if self.gamma:
                row.update(counter_delta(before, self._counters()))
            rows.append(row)
        return rows
