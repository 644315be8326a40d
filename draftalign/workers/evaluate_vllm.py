"""The `vllm` evaluation engine: vLLM's own speculative decoding, read per request.

One engine per (drafter, γ), since vLLM fixes `speculative_config` at start-up, plus one
engine without speculation for the tokens/s baseline. A drafter names its vLLM speculative
method (`speculative_config` below): `draft_model` for a model folder, `ngram` for the n-gram
baseline, which has none. Each engine lives in a Ray actor, so
the driver never imports vLLM and a finished engine's memory goes away with its actor.
vLLM returns each finished request's speculative-decoding statistics
(`per_request_spec_decode_metrics`), so prompts can go `evaluate.vllm.batch_size` at a time;
the default, one at a time, is the batch-1 setting of the paper's speed-up.
"""

from __future__ import annotations

import time
from typing import Any

from draftalign.config import VllmEvalConfig
from draftalign.evaluation.tasks import prompt_seed
from draftalign.models.identity import absolute_model_path

__all__ = ["VllmEngine", "request_counts", "share_seconds", "speculative_config", "stop_engine"]

# Methods that draft without a model: no draft distribution, so no draft_sample_method (vLLM's
# rejection sampler treats their drafts as one-hot q).
MODEL_FREE_METHODS = frozenset({"ngram"})


def speculative_config(drafter: dict, gamma: int) -> dict[str, Any]:
    """vLLM's speculative_config for a resolved drafter ({"name", "path", "method"?, ...}) at γ,
    before evaluate.vllm.speculative_config's extra keys (VllmEngine adds those)."""
    method = drafter.get("method", "draft_model")
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": gamma,
                "prompt_lookup_max": drafter["prompt_lookup_max"], "prompt_lookup_min": drafter["prompt_lookup_min"]}
    # A drafter with a model folder: a standalone one (draft_model) or a feature drafter (eagle3,
    # vLLM's speculators format; it reads the target's hidden states at the layers its config names).
    if method in ("draft_model", "eagle3"):
        return {"method": method, "model": absolute_model_path(drafter["path"]), "num_speculative_tokens": gamma}
    raise ValueError(f"drafter {drafter['name']!r}: the vllm engine has no speculative method {method!r}")


def stop_engine(llm: Any) -> None:
    """Stop a vllm.LLM's engine-core process now rather than at interpreter exit (best effort)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def request_counts(metrics: Any, gamma: int, generated: int | None = None) -> dict[str, int | list[int]]:
    """One request's {"num_drafts", "num_draft_tokens", "num_accepted", "accepted_per_pos"} from
    vLLM's RequestSpecDecodeMetrics (`histogram[j]`: verify steps that accepted j drafts; None
    when the request never speculated). Position i was accepted in every step with j > i.

    vLLM counts only the steps that verified drafts. With `generated` (the request's tokens), the
    decode steps that had none (an n-gram lookup that found nothing) count as drafts that accepted
    nothing, as the reference engine counts them, so τ = 1 + accepted / drafts stays tokens per
    target call: the prefill emits one token and each decode step 1 + its accepted drafts, so
    generated - 1 - accepted steps ran (up to γ too few where the budget or an EOS cut the last
    block short). A drafter that drafts at every step, as a model does, gains none."""
    hist = list(metrics.histogram) if metrics is not None else [0]
    hist += [0] * (gamma + 1 - len(hist))
    accepted = sum(j * c for j, c in enumerate(hist))
    if generated is not None:
        hist[0] += max(0, generated - 1 - accepted - sum(hist))
    return {"num_drafts": sum(hist), "num_draft_tokens": int(metrics.num_draft_tokens) if metrics else 0,
            "num_accepted": accepted, "accepted_per_pos": [sum(hist[i + 1:]) for i in range(gamma)]}


def share_seconds(seconds: float, token_counts: list[int]) -> list[float]:
    """A batch's wall time split over its requests by generated tokens, so that a cell's
    Σ tokens / Σ seconds is the batch's throughput (batch 1: the request's own time)."""
    total = sum(token_counts)
    if total == 0:
        return [seconds / max(len(token_counts), 1)] * len(token_counts)
    return [seconds * n / total for n in token_counts]


class VllmEngine:
    """A vllm.LLM for `target`, speculating as `speculative` says (`speculative_config`: method,
    num_speculative_tokens = γ, ...); None: plain decoding."""

    def __init__(self, target: str, speculative: dict[str, Any] | None, vllm: VllmEvalConfig):
        from vllm import LLM

        from draftalign.workers.generate_engine import engine_kwargs

        self.gamma = speculative["num_speculative_tokens"] if speculative else 0
        kwargs = engine_kwargs(vllm)
        if speculative:
            # probabilistic: the drafter samples its proposals and the rejection sampler reads their
            # probabilities, i.e. standard speculative sampling (vLLM's default proposes the draft's
            # top token, which at T > 0 is another algorithm). On CPU it needs vllm_plugin.py.
            sampling = {} if speculative["method"] in MODEL_FREE_METHODS else {"draft_sample_method": "probabilistic"}
            kwargs["speculative_config"] = {**speculative, **sampling, **vllm.speculative_config}
            kwargs["per_request_spec_decode_metrics"] = "summary"  # each finished request's own histogram
        self.llm = LLM(model=target, **kwargs)

    def close(self) -> None:
        """Stop the engine's core process now, before the actor is killed."""
        stop_engine(self.llm)

    def generate(self, prompts: list[dict], temperature: float, top_p: float, max_tokens: int, seed: int,
                 warmup_tokens: int = 8, batch_size: int = 1) -> list[dict]:
        """[{"id", "tokens", "seconds", counts...}] for prompts [{"id", "token_ids"}], batch_size at a time."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        def run(batch: list[dict], n: int) -> tuple[list[Any], float]:
            params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=n,
                                     seed=None if temperature == 0 else prompt_seed(seed, p["id"], temperature))
                      for p in batch]
            t0 = time.perf_counter()
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p["token_ids"])) for p in batch], params,
                                     use_tqdm=False)
            return [o.outputs[0] for o in outs], time.perf_counter() - t0

        if warmup_tokens and prompts:
            run(prompts[:1], warmup_tokens)  # untimed: the first request pays one-off costs
        rows = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            outs, secs = run(batch, max_tokens)
            tokens = [list(o.token_ids) for o in outs]
            for p, o, toks, share in zip(batch, outs, tokens, share_seconds(secs, [len(t) for t in tokens]),
                                         strict=True):
                row = {"id": p["id"], "tokens": toks, "seconds": share}
                if self.gamma:
                    row.update(request_counts(o.spec_decode_metrics, self.gamma, len(toks)))
                rows.append(row)
        return rows
