"""The `reference` evaluation engine: draftalign.evaluation.specdecode at batch 1, timed against plain decoding.

The target is loaded once; each drafter in turn. Plain autoregressive decoding of the target
is timed once per (task, temperature, prompt) and shared by every drafter and γ, since it
does not depend on them. Wall-clock figures are tokens/s of each run, so sampled runs of
different lengths still compare. An untimed warm-up run keeps one-off start-up costs (kernel
selection, allocator growth) out of the first measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from draftalign.evaluation.cells import Baseline, CellStore
from draftalign.evaluation.rows import EvalRow
from draftalign.evaluation.specdecode import autoregressive_generate, speculative_generate
from draftalign.evaluation.tasks import prompt_seed
from draftalign.models.draftvocab import load_draft_model

__all__ = ["ReferenceEngine", "ReferenceSweep", "progress_line", "prompt_generator", "reference_rows"]


@dataclass(frozen=True)
class ReferenceSweep:
    """What `reference_rows` sweeps and how: the evaluate config's reference settings, resolved."""

    gammas: tuple[int, ...]
    temperatures: tuple[float, ...]  # this engine's (evaluate.reference.temperatures or evaluate.temperatures)
    top_p: float
    max_new_tokens: int
    eos: Any  # the tokenizer's eos_token_id
    seed: int
    measure_ar: bool  # also time plain target decoding, the speed-up baseline
    warmup_tokens: int
    target_model: str


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def prompt_generator(seed: int, prompt_id: str, temperature: float, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, prompt, temperature): a rerun samples the same answers."""
    g = torch.Generator(device=device)
    g.manual_seed(prompt_seed(seed, prompt_id, temperature))
    return g


class ReferenceEngine:
    """A target held in memory, plus timed speculative and plain decoding of one prompt at a time."""

    def __init__(self, target: str, device: str = "auto", trust_remote_code: bool = False,
                 threads: int | None = None):
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.device = _device(device)
        self.trust_remote_code = trust_remote_code
        # float32: the exact acceptance test compares p and q; half precision would add ties
        self.target = AutoModelForCausalLM.from_pretrained(
            target, dtype=torch.float32, trust_remote_code=trust_remote_code,
            use_safetensors=True).to(self.device).eval()

    def load_draft(self, path: str) -> Any:
        # With its reduced head where the folder has a draft_vocab.json (q = 0 outside it)
        return load_draft_model(path, torch.float32, self.trust_remote_code).to(self.device).eval()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autoregressive(self, ids: list[int], temperature: float, top_p: float, max_new_tokens: int,
                       eos: Any, generator: torch.Generator) -> tuple[list[int], float]:
        self._sync()
        t0 = time.perf_counter()
        out = autoregressive_generate(self.target, ids, max_new_tokens, temperature, top_p, eos, generator)
        self._sync()
        return out, time.perf_counter() - t0

    def speculative(self, draft: Any, ids: list[int], gamma: int, temperature: float, top_p: float,
                    max_new_tokens: int, eos: Any, generator: torch.Generator):
        self._sync()
        t0 = time.perf_counter()
        res = speculative_generate(self.target, draft, ids, gamma, max_new_tokens, temperature, top_p, eos, generator)
        self._sync()
        return res, time.perf_counter() - t0


def reference_rows(engine: ReferenceEngine, drafters: list[dict], prompts: dict[str, list[dict]],
                   s: ReferenceSweep, log: Callable[[str], None] = print, cells: CellStore | None = None) -> list[EvalRow]:
    """Per-prompt rows (EVAL_SCHEMA) for every drafter x task x γ x temperature.

    drafters: [{"name", "path", "identity"?}]; prompts: task name -> [{"id", "kind", "token_ids"}].
    With `cells`, each finished cell is written at once and a cell written earlier is read back;
    a cell's key holds the drafter's `identity` (its export's digest), so another export of the
    same name never reads it.
    """
    gen = lambda pid, temp: prompt_generator(s.seed, pid, temp, engine.device)  # noqa: E731
    first = next(iter(prompts.values()))[0]["token_ids"]
    if s.warmup_tokens:
        engine.autoregressive(first, 0.0, 1.0, s.warmup_tokens, None, gen("warmup", 0.0))
    ar = _baselines(engine, prompts, s, gen, log, cells) if s.measure_ar else {}
    out: list[EvalRow] = []
    for d in drafters:
        draft = None  # loaded on the first cell that has to be computed
        for task, rows in prompts.items():
            for gamma in s.gammas:
                for temp in s.temperatures:
                    key = ("reference", d["name"], d.get("identity", ""), task, gamma, temp)
                    done = cells.rows(*key) if cells else None
                    if done is not None:
                        out.extend(done)
                        log(progress_line("reference", d["name"], task, gamma, temp, done, 0.0) + " (written earlier)")
                        continue
                    if draft is None:
                        draft = engine.load_draft(d["path"])
                        if s.warmup_tokens:
                            engine.speculative(draft, first, 2, 0.0, 1.0, s.warmup_tokens, None, gen("warmup", 0.0))
                    t0 = time.time()
                    batch = [_row(d, task, p, gamma, temp, s, ar, *engine.speculative(
                        draft, p["token_ids"], gamma, temp, s.top_p, s.max_new_tokens, s.eos, gen(p["id"], temp)))
                        for p in rows]
                    if cells:
                        cells.put_rows(batch, *key)
                    out.extend(batch)
                    log(progress_line("reference", d["name"], task, gamma, temp, batch, time.time() - t0))
        del draft
    return out


def _baselines(engine: ReferenceEngine, prompts: dict[str, list[dict]], s: ReferenceSweep, gen, log,
               cells: CellStore | None) -> dict[tuple[str, float, str], tuple[list[int], float]]:
    """The target alone on every prompt, once per (task, temperature): the speed-up baseline."""
    ar: dict[tuple[str, float, str], tuple[list[int], float]] = {}
    for task, rows in prompts.items():
        for temp in s.temperatures:
            done = cells.baseline("autoregressive", task, temp) if cells else None
            t0 = time.time()
            got: dict[str, Baseline] = done or {p["id"]: engine.autoregressive(p["token_ids"], temp, s.top_p, s.max_new_tokens, s.eos,
                                                          gen(p["id"], temp)) for p in rows}
            if cells and done is None:
                cells.put_baseline(got, "autoregressive", task, temp)
            ar.update({(task, temp, pid): (list(tokens), secs) for pid, (tokens, secs) in got.items()})
            n, secs = sum(len(t) for t, _ in got.values()), sum(x for _, x in got.values())
            log(f"[evaluate] reference autoregressive / {task} T={temp:g}: {n / secs:.1f} tokens/s "
                f"({len(rows)} prompts, {time.time() - t0:.1f} s)" + (" (written earlier)" if done else ""))
    return ar


def _row(d: dict, task: str, p: dict, gamma: int, temp: float, s: ReferenceSweep, ar: dict, res,
         secs: float) -> EvalRow:
    base = ar.get((task, temp, p["id"]))
    st = res.stats
    return EvalRow(
        drafter=d["name"], drafter_path=d["path"], task=task, task_kind=p["kind"],
        prompt_id=p["id"], engine="reference", gamma=gamma, temperature=float(temp),
        top_p=float(s.top_p), num_input_tokens=len(p["token_ids"]),
        num_generated_tokens=len(res.tokens), num_drafts=st.num_drafts,
        num_draft_tokens=st.num_draft_tokens, num_accepted=st.num_accepted,
        accepted_per_pos=list(st.accepted_per_pos),
        block_efficiency=st.block_efficiency, acceptance_rate=st.acceptance_rate,
        spec_seconds=secs, ar_seconds=base[1] if base else None,
        ar_generated_tokens=len(base[0]) if base else None,
        matches_autoregressive=(res.tokens == base[0]) if base and temp == 0 else None,
        generated_token_ids=list(res.tokens), target_model=s.target_model,
    )


def progress_line(engine_name: str, drafter: str, task: str, gamma: int, temperature: float, rows: list[EvalRow],
                  secs: float) -> str:
    """One log line per sweep cell: τ and draft acceptance pooled over its rows, as the report pools them."""
    from draftalign.evaluation.metrics import acceptance_rate
    from draftalign.evaluation.report import pooled_block_efficiency

    tau = pooled_block_efficiency(rows)
    alpha = acceptance_rate(sum(r.num_accepted for r in rows), sum(r.num_draft_tokens for r in rows))
    return (f"[evaluate] {engine_name} {drafter} / {task} γ={gamma} T={temperature:g}: τ={tau:.2f} "
            f"draft_acceptance={alpha:.2f} ({len(rows)} prompts, {secs:.1f} s)")
