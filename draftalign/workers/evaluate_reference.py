"""The `reference` evaluation engine: draftalign.evaluation.specdecode at batch 1, timed against plain decoding.

The target is loaded once, each drafter at its first cell (a model folder, or the n-gram
baseline's proposer, which has none). Plain autoregressive decoding of
the target is timed once per (task, temperature, prompt), right before that pair's cells, and
shared by every drafter and γ, since it does not depend on them. Wall-clock figures are
tokens/s of each run, so sampled runs of different lengths still compare. An untimed warm-up
run keeps one-off start-up costs (kernel selection, allocator growth) out of the first
measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from draftalign.evaluation.cells import Baseline, CellStore
from draftalign.evaluation.featurespec import FeatureProposer
from draftalign.evaluation.ngram import NgramProposer
from draftalign.evaluation.rows import EvalRow
from draftalign.evaluation.specdecode import autoregressive_generate, speculative_generate
from draftalign.evaluation.tasks import prompt_seed
from draftalign.evaluation.verifycost import VerifyCost, measure_verify_cost
from draftalign.models.draftvocab import load_draft_model
from draftalign.models.feature import FeatureDrafter, load_feature_drafter

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

    def load_drafter(self, d: dict) -> Any:
        """What `speculative` drafts with for drafter `d` ({"name", "path", "method"?, ...}), every
        prompt: a model (specdecode wraps it in a fresh ModelProposer each time) or a stateless
        Proposer. A proposer with per-generation state (caches) needs a fresh one per prompt:
        another method would make `speculative` build it from what this returns."""
        method = d.get("method", "draft_model")
        if method == "ngram":
            vocab = self.target.config.get_text_config().vocab_size
            return NgramProposer(vocab, d["prompt_lookup_min"], d["prompt_lookup_max"], self.device)
        if method == "draft_model":
            return self.load_draft(d["path"])
        if method == "eagle3":  # a feature drafter; `speculative` gives each prompt a fresh FeatureProposer
            return load_feature_drafter(d["path"], torch.float32).to(self.device).eval()
        raise ValueError(f"drafter {d['name']!r}: the reference engine has no proposer for method {method!r}")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def verify_cost(self, context: list[int], gammas: Iterable[int]) -> VerifyCost:
        """This machine's t_target, t_verify(γ + 1) and r for the loaded target, with this engine's
        device and threads: what each speed-up of the run is to be read with."""
        threads = torch.get_num_threads()
        where = f"the reference engine's target (PyTorch, {self.device.type}" + (
            f", {threads} thread{'s' * (threads != 1)})" if self.device.type == "cpu" else ")")
        return measure_verify_cost(self.target, context, gammas, where, sync=self._sync)

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
        # A feature drafter's proposer holds one generation's cache: a fresh one per prompt.
        drafter = FeatureProposer(draft) if isinstance(draft, FeatureDrafter) else draft
        res = speculative_generate(self.target, drafter, ids, gamma, max_new_tokens, temperature, top_p, eos, generator)
        self._sync()
        return res, time.perf_counter() - t0


def reference_rows(engine: ReferenceEngine, drafters: list[dict], prompts: dict[str, list[dict]],
                   s: ReferenceSweep, log: Callable[[str], None] = print, cells: CellStore | None = None) -> list[EvalRow]:
    """Per-prompt rows (EVAL_SCHEMA) for every task x temperature x drafter x γ.

    drafters: [{"name", "path", "identity"?, "method"?, ...}] (`ReferenceEngine.load_drafter`);
    prompts: task name -> [{"id", "kind", "token_ids"}].
    The target alone on a (task, temperature) is timed right before that pair's cells, so the
    load of a shared machine, which drifts over a sweep, weighs on a speed-up's two sides alike.
    With `cells`, each finished cell is written at once and a cell written earlier is read back;
    a cell's key holds the drafter's `identity` (its export's digest), so another export of the
    same name never reads it.
    """
    runner = _CellRunner(engine, prompts, s, log, cells)
    runner.warm_up()
    out: list[EvalRow] = []
    for task, rows in prompts.items():
        for temp in s.temperatures:
            ar = runner.baseline(task, rows, temp) if s.measure_ar else {}
            for d in drafters:
                for gamma in s.gammas:
                    out.extend(runner.cell(d, task, rows, gamma, temp, ar))
    return out


class _CellRunner:
    """reference_rows' steps: the target alone on a (task, T), and one drafter's cell."""

    def __init__(self, engine: ReferenceEngine, prompts: dict[str, list[dict]], s: ReferenceSweep,
                 log: Callable[[str], None], cells: CellStore | None) -> None:
        self.engine, self.s, self.log, self.cells = engine, s, log, cells
        self.first = next(iter(prompts.values()))[0]["token_ids"]
        # Each drafter is loaded at its first computed cell and kept: the cells of a (task, T)
        # take every drafter in turn. Small next to the target.
        self.drafts: dict[str, Any] = {}

    def gen(self, pid: str, temp: float) -> torch.Generator:
        return prompt_generator(self.s.seed, pid, temp, self.engine.device)

    def warm_up(self) -> None:
        if self.s.warmup_tokens:
            self.engine.autoregressive(self.first, 0.0, 1.0, self.s.warmup_tokens, None, self.gen("warmup", 0.0))

    def baseline(self, task: str, rows: list[dict], temp: float) -> dict[tuple[str, float, str], tuple[list[int], float]]:
        """The target alone on every prompt of (task, temp), or its timing written earlier."""
        s, cells = self.s, self.cells
        done = cells.baseline("autoregressive", task, temp) if cells else None
        t0 = time.time()
        got: dict[str, Baseline] = done or {p["id"]: self.engine.autoregressive(
            p["token_ids"], temp, s.top_p, s.max_new_tokens, s.eos, self.gen(p["id"], temp)) for p in rows}
        if cells and done is None:
            cells.put_baseline(got, "autoregressive", task, temp)
        n, secs = sum(len(t) for t, _ in got.values()), sum(x for _, x in got.values())
        self.log(f"[evaluate] reference autoregressive / {task} T={temp:g}: {n / secs:.1f} tokens/s "
                 f"({len(rows)} prompts, {time.time() - t0:.1f} s)" + (" (written earlier)" if done else ""))
        return {(task, temp, pid): (list(tokens), x) for pid, (tokens, x) in got.items()}

    def draft(self, d: dict) -> Any:
        if d["name"] not in self.drafts:
            draft = self.drafts[d["name"]] = self.engine.load_drafter(d)
            if self.s.warmup_tokens:
                self.engine.speculative(draft, self.first, 2, 0.0, 1.0, self.s.warmup_tokens, None,
                                        self.gen("warmup", 0.0))
        return self.drafts[d["name"]]

    def cell(self, d: dict, task: str, rows: list[dict], gamma: int, temp: float, ar: dict) -> list[EvalRow]:
        """One drafter's rows on (task, γ, temp): computed and written, or read back."""
        key = ("reference", d["name"], d.get("identity", ""), task, gamma, temp)
        done = self.cells.rows(*key) if self.cells else None
        if done is not None:
            self.log(progress_line("reference", d["name"], task, gamma, temp, done, 0.0) + " (written earlier)")
            return done
        s, draft, t0 = self.s, self.draft(d), time.time()
        batch = [_row(d, task, p, gamma, temp, s, ar, *self.engine.speculative(
            draft, p["token_ids"], gamma, temp, s.top_p, s.max_new_tokens, s.eos, self.gen(p["id"], temp)))
            for p in rows]
        if self.cells:
            self.cells.put_rows(batch, *key)
        self.log(progress_line("reference", d["name"], task, gamma, temp, batch, time.time() - t0))
        return batch


def _row(d: dict, task: str, p: dict, gamma: int, temp: float, s: ReferenceSweep, ar: dict, res,
         secs: float) -> EvalRow:
    base = ar.get((task, temp, p["id"]))
    st = res.stats
    return EvalRow(
        drafter=d["name"], drafter_path=d["path"] or "", task=task, task_kind=p["kind"],
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
