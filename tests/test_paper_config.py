"""examples/paper.yaml: per-row sampling seeds, and sampled evaluation on the exact reference engine."""

from pathlib import Path

from draftalign.config import load_config
from draftalign.pipelines.evaluate import _vllm_sampled, describe_evaluate

PAPER = Path(__file__).resolve().parent.parent / "examples" / "paper.yaml"


def test_no_sampling_setting_fixes_one_seed_for_all_its_requests():
    # a fixed seed gives every request of a setting the same random stream; None derives it per row key
    sampled = [s for s in load_config(PAPER).generate.sampling if s.temperature > 0]
    assert sampled and all(s.seed is None for s in sampled), [(s.name, s.seed) for s in sampled]


def test_sampled_evaluation_runs_on_the_reference_engine_and_greedy_on_vllm():
    # vLLM's draft_model does not do standard speculative sampling at T > 0 (vllm-project/vllm#40149)
    ev = load_config(PAPER).evaluate
    assert set(ev.engines) == {"reference", "vllm"}
    assert ev.engine_temperatures("vllm") == [0.0]
    assert ev.engine_temperatures("reference") == [t for t in ev.temperatures if t > 0] == [1.0]
    assert not _vllm_sampled(ev)
    assert describe_evaluate(load_config(PAPER))["engine_temperatures"] == {"reference": [1.0], "vllm": [0.0]}


def test_engine_temperatures_default_to_evaluate_temperatures():
    ev = load_config(PAPER, ["evaluate.vllm.temperatures=null", "evaluate.reference.temperatures=null"]).evaluate
    assert ev.engine_temperatures("vllm") == ev.engine_temperatures("reference") == ev.temperatures
    assert _vllm_sampled(ev)
