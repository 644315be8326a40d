"""Evaluation cells written as they finish: a crash loses one cell, a rerun computes the rest."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from draftalign.evaluation.cells import CellStore
from draftalign.workers.evaluate_reference import ReferenceSweep, reference_rows

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"
SWEEP = ReferenceSweep(gammas=(1, 3), temperatures=(0.0, 1.0), top_p=1.0, max_new_tokens=3, eos=2, seed=0,
                       measure_ar=True, warmup_tokens=0, target_model="t")
PROMPTS = {"open_ended": [{"id": "a", "kind": "open_ended", "token_ids": [1, 5]},
                          {"id": "b", "kind": "open_ended", "token_ids": [1, 6]}]}
DRAFTERS = [{"name": "pretrained", "path": "p"}, {"name": "tvd++", "path": "q"}]


class FakeEngine:
    """The reference engine's interface with canned, deterministic results; it can die on a call."""

    device = torch.device("cpu")

    def __init__(self, die_at: int | None = None) -> None:
        self.spec_calls = self.ar_calls = 0
        self.die_at = die_at
        self.calls: list[tuple] = []  # ("ar", T) and ("spec", draft, γ, T), in the order made

    def load_drafter(self, d):
        return d["path"] or "n"  # the n-gram baseline has no path

    def autoregressive(self, ids, temperature, top_p, n, eos, gen):
        self.ar_calls += 1
        self.calls.append(("ar", temperature))
        return [ids[-1], 7, 8], 0.5

    def speculative(self, draft, ids, gamma, temperature, top_p, n, eos, gen):
        self.spec_calls += 1
        self.calls.append(("spec", draft, gamma, temperature))
        if self.spec_calls == self.die_at:
            raise RuntimeError("killed")
        stats = SimpleNamespace(num_drafts=2, num_draft_tokens=2 * gamma, num_accepted=gamma + len(draft),
                                accepted_per_pos=[1] * gamma, block_efficiency=1.5, acceptance_rate=0.5)
        return SimpleNamespace(tokens=[ids[-1], 7, 8], stats=stats), 0.25


def test_a_sweep_killed_midway_resumes_from_its_finished_cells(tmp_path):
    whole = reference_rows(FakeEngine(), DRAFTERS, PROMPTS, SWEEP, log=lambda m: None)
    # 8 cells of 2 prompts; the 11th speculative call dies inside the 6th cell.
    with pytest.raises(RuntimeError, match="killed"):
        reference_rows(FakeEngine(die_at=11), DRAFTERS, PROMPTS, SWEEP, lambda m: None, CellStore(tmp_path, "fp"))
    again = FakeEngine()
    resumed = reference_rows(again, DRAFTERS, PROMPTS, SWEEP, lambda m: None, CellStore(tmp_path, "fp"))
    assert resumed == whole
    assert again.spec_calls == 3 * 2 and again.ar_calls == 0  # the 3 unfinished cells; baselines were kept


def test_the_target_alone_is_timed_right_before_the_cells_it_is_the_baseline_of():
    engine = FakeEngine()
    reference_rows(engine, DRAFTERS, PROMPTS, SWEEP, log=lambda m: None)
    groups: list[list[tuple]] = []
    for call in engine.calls:  # a group per baseline: its 2 prompts, then the cells measured against it
        if call[0] == "ar" and (not groups or groups[-1][-1][0] != "ar"):
            groups.append([])
        groups[-1].append(call)
    assert [g[:2] for g in groups] == [[("ar", 0.0)] * 2, [("ar", 1.0)] * 2]
    for g in groups:
        temp = g[0][1]
        assert g[2:] == [("spec", d["path"], gamma, temp) for d in DRAFTERS for gamma in SWEEP.gammas for _ in "ab"]


def test_cells_of_another_config_are_dropped_not_mixed(tmp_path):
    reference_rows(FakeEngine(), DRAFTERS, PROMPTS, SWEEP, lambda m: None, CellStore(tmp_path, "fp"))
    other = FakeEngine()
    reference_rows(other, DRAFTERS, PROMPTS, SWEEP, lambda m: None, CellStore(tmp_path, "another"))
    assert other.spec_calls == 8 * 2 and other.ar_calls == 2 * 2


def test_a_drafter_added_to_the_comparison_computes_only_its_own_cells(tmp_path):
    first = [{**DRAFTERS[0], "identity": "p1"}]
    reference_rows(FakeEngine(), first, PROMPTS, SWEEP, lambda m: None, CellStore(tmp_path, "fp"))
    both = [*first, {**DRAFTERS[1], "identity": "q1"}]
    again = FakeEngine()
    rows = reference_rows(again, both, PROMPTS, SWEEP, lambda m: None, CellStore(tmp_path, "fp"))
    assert again.spec_calls == 4 * 2 and again.ar_calls == 0  # tvd++'s 4 cells; pretrained's were kept
    assert rows == reference_rows(FakeEngine(), both, PROMPTS, SWEEP, log=lambda m: None)


def test_a_drafter_exported_again_under_its_name_does_not_read_its_old_cells(tmp_path):
    reference_rows(FakeEngine(), [{**DRAFTERS[1], "identity": "q1"}], PROMPTS, SWEEP, lambda m: None,
                   CellStore(tmp_path, "fp"))
    again = FakeEngine()
    reference_rows(again, [{**DRAFTERS[1], "identity": "q2"}], PROMPTS, SWEEP, lambda m: None,
                   CellStore(tmp_path, "fp"))
    assert again.spec_calls == 4 * 2


def test_a_drafters_identity_follows_its_weights_and_name(tmp_path):
    from draftalign.pipelines.evaluate import _with_identities

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"one")
    d = {"name": "tvd++", "path": str(tmp_path)}
    [before] = _with_identities([d])
    assert _with_identities([d])[0]["identity"] == before["identity"]
    assert _with_identities([{**d, "name": "fkl"}])[0]["identity"] != before["identity"]
    (tmp_path / "model.safetensors").write_bytes(b"two")
    assert _with_identities([d])[0]["identity"] != before["identity"]


class FakeVllm:
    """VllmEngine's interface with canned results; counts the engines started and their calls."""

    started: list = []
    specs: list = []

    def __init__(self, speculative) -> None:
        self.draft = speculative.get("model", speculative["method"]) if speculative else None
        self.gamma = speculative["num_speculative_tokens"] if speculative else 0
        FakeVllm.started.append((self.draft, self.gamma))
        FakeVllm.specs.append(speculative)

    def generate(self, prompts, temperature, top_p, max_tokens, seed, warmup_tokens, batch_size):
        acc = 1 if self.draft else 0
        return [{"id": p["id"], "tokens": [7, 8, 9], "seconds": 0.5, "num_drafts": 2,
                 "num_draft_tokens": 2 * self.gamma, "num_accepted": acc, "accepted_per_pos": [acc] + [0] * (self.gamma - 1)}
                if self.draft else {"id": p["id"], "tokens": [7, 8, 9], "seconds": 1.0} for p in prompts]

    def close(self) -> None:
        pass


def _vllm_sweep(tmp_path, store: str, drafters: list[dict], fingerprint: str = "fp"):
    from draftalign.config import load_config
    from draftalign.pipelines.evaluate import VllmSweep

    ev = load_config(TINY, ["evaluate.engines=[vllm]", "evaluate.gammas=[1, 3]"]).evaluate
    FakeVllm.started, FakeVllm.specs = [], []
    sweep = VllmSweep(ev, "t", PROMPTS, CellStore(tmp_path / store, fingerprint), FakeVllm, lambda m: None)
    sweep.baselines()
    return [r for d in drafters for g in ev.gammas for r in sweep.drafter_rows(d, g)]


def test_vllm_cells_are_kept_so_a_drafter_added_later_starts_only_its_own_engines(tmp_path):
    first = [{**DRAFTERS[0], "identity": "p1"}]
    _vllm_sweep(tmp_path, "run", first)
    assert FakeVllm.started == [(None, 0), ("p", 1), ("p", 3)]  # the target alone, then one engine per γ
    both = [*first, {**DRAFTERS[1], "identity": "q1"}]
    rows = _vllm_sweep(tmp_path, "run", both)
    assert FakeVllm.started == [("q", 1), ("q", 3)]  # pretrained's cells and the baselines were kept
    fresh = _vllm_sweep(tmp_path, "fresh", both)
    assert rows == fresh and len(rows) == 2 * 2 * 2 * 2  # drafters x γ x T x prompts
    assert {r.ar_seconds for r in rows} == {1.0} and {r.matches_autoregressive for r in rows} == {True, None}
    _vllm_sweep(tmp_path, "run", both, fingerprint="another config")
    assert len(FakeVllm.started) == 5  # nothing of another config's cells is read


NGRAM = {"name": "ngram", "path": None, "exists": True, "method": "ngram", "prompt_lookup_min": 2,
         "prompt_lookup_max": 4}


def test_the_ngram_baselines_identity_is_its_window(tmp_path):
    from draftalign.pipelines.evaluate import _with_identities

    [one] = _with_identities([NGRAM])
    assert _with_identities([NGRAM])[0]["identity"] == one["identity"]
    assert _with_identities([{**NGRAM, "prompt_lookup_max": 3}])[0]["identity"] != one["identity"]
    # its cells are kept beside a model drafter's, and a new window recomputes its own only
    reference_rows(FakeEngine(), [one], PROMPTS, SWEEP, lambda m: None, CellStore(tmp_path, "fp"))
    again = FakeEngine()
    reference_rows(again, _with_identities([{**NGRAM, "prompt_lookup_max": 3}]), PROMPTS, SWEEP, lambda m: None,
                   CellStore(tmp_path, "fp"))
    assert again.spec_calls == 4 * 2


def test_the_ngram_baseline_runs_on_vllm_as_method_ngram_with_no_model(tmp_path):
    rows = _vllm_sweep(tmp_path, "run", [{**NGRAM, "identity": "n1"}])
    assert FakeVllm.specs == [None] + [{"method": "ngram", "num_speculative_tokens": g, "prompt_lookup_max": 4,
                                        "prompt_lookup_min": 2} for g in (1, 3)]
    assert {(r.drafter, r.drafter_path) for r in rows} == {("ngram", "")}


def test_a_vllm_engine_adds_draft_sampling_for_a_model_only(monkeypatch):
    """Standard speculative sampling asks a drafter model for its draft probabilities; the n-gram
    lookup has none (vLLM's rejection sampler takes its q one-hot)."""
    import sys

    from draftalign.config import VllmEvalConfig
    from draftalign.workers.evaluate_vllm import VllmEngine, speculative_config

    made: list[dict] = []
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=lambda model, **kwargs: made.append(kwargs)))
    extra = VllmEvalConfig(speculative_config={"rejection_sample_method": "standard"})
    VllmEngine("t", speculative_config({"name": "d", "path": "/nowhere/d"}, 3), extra)
    VllmEngine("t", speculative_config(NGRAM, 2), extra)
    assert [m["speculative_config"] for m in made] == [
        {"method": "draft_model", "model": "/nowhere/d", "num_speculative_tokens": 3,
         "draft_sample_method": "probabilistic", "rejection_sample_method": "standard"},
        {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
         "rejection_sample_method": "standard"}]
    with pytest.raises(ValueError, match="no speculative method 'medusa'"):
        speculative_config({**NGRAM, "method": "medusa"}, 2)
