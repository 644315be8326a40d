"""examples/paper.yaml: per-row sampling seeds, and sampled evaluation on the exact reference engine."""

from pathlib import Path

from draftalign.config import load_config
from draftalign.pipelines.evaluate import _vllm_sampled, describe_evaluate

PAPER = Path(__file__).resolve().parent.parent / "examples" / "paper.yaml"


def test_no_sampling_setting_fixes_one_seed_for_all_its_requests():
    # a fixed seed gives every request of a setting the same random stream; None derives it per row key
    sampled = [s for s in load_config(PAPER).generate.sampling if s.temperature > 0]
    assert sampled and all(s.seed is None for s in sampled), [(s.name, s.seed) for s in sampled]


def test_both_temperatures_run_on_vllm_with_standard_speculative_sampling():
    ev = load_config(PAPER).evaluate
    assert ev.engines == ["vllm"] and ev.engine_temperatures("vllm") == ev.temperatures == [0.0, 1.0]
    assert "draft_sample_method" not in ev.vllm.speculative_config  # the engine's probabilistic default
    assert not _vllm_sampled(ev)
    assert describe_evaluate(load_config(PAPER))["engine_temperatures"] == {"vllm": [0.0, 1.0]}


def test_engine_temperatures_default_to_evaluate_temperatures():
    ev = load_config(PAPER, ["evaluate.vllm.temperatures=null", "evaluate.reference.temperatures=null"]).evaluate
    assert ev.engine_temperatures("vllm") == ev.engine_temperatures("reference") == ev.temperatures
    greedy = load_config(PAPER, ["evaluate.vllm.speculative_config={draft_sample_method: greedy}"]).evaluate
    assert _vllm_sampled(greedy) and not _vllm_sampled(ev)
