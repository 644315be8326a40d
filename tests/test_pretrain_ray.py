"""Pretraining through Ray Data + Ray Train + DeepSpeed, end to end on CPU (slow: starts Ray)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"

# Two CPU workers, ZeRO-2, a checkpoint at step 2 and a crash at step 3: Ray Train must restart
# the worker group from the checkpoint and finish at step 4.
SMOKE = [
    "pretrain.only=target", "pretrain.corpus.max_documents=40", "pretrain.corpus.holdout_fraction=0.2",
    "pretrain.jobs.target.arch.overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, "
    "num_attention_heads: 2, num_key_value_heads: 2}",
    "pretrain.jobs.target.train.num_workers=2", "pretrain.jobs.target.train.cpus_per_worker=1",
    "pretrain.jobs.target.train.zero_stage=2", "pretrain.jobs.target.train.max_steps=4",
    "pretrain.jobs.target.train.checkpoint_every=2", "pretrain.jobs.target.train.log_every=1",
    "pretrain.jobs.target.train.micro_batch_size=2", "pretrain.jobs.target.train.seq_len=64",
    "pretrain.jobs.target.train.eval_batches=2", "pretrain.jobs.target.train.inject_failure_at_step=3",
    "pretrain.jobs.target.optim.warmup_steps=1",
]


def _draftalign(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "draftalign", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pretrain_zero2_two_workers_survives_a_crash_and_exports(tmp_path):
    out = tmp_path / "run"
    proc = _draftalign("pretrain", str(TINY), f"run.output={out}", *SMOKE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    model_dir = out / "pretrain" / "target" / "model"
    info = json.loads((model_dir / "draftalign_model.json").read_text())
    m = info["metrics"]
    assert m["step"] == 4
    assert m["resumed_from_step"] == 2  # restarted from the step-2 checkpoint, not from scratch
    assert "injected failure at step 3" in proc.stdout + proc.stderr
    assert m["holdout_perplexity"] > 1.0

    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tok) == 32000
    assert model.config.hidden_size == 64 and model.num_parameters() == info["parameters"]
    assert (model_dir / "model.safetensors").is_file()
    # Provenance next to the outputs.
    run_info = json.loads((out / "pretrain" / "target" / "run_info.json").read_text())
    assert run_info["versions"]["ray"] and run_info["fingerprint"] == info["fingerprint"]
    assert "inject_failure_at_step: 3" in (out / "pretrain" / "target" / "config.yaml").read_text()

    # The same command again reuses the export instead of retraining.
    again = _draftalign("pretrain", str(TINY), f"run.output={out}", *SMOKE, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reusing" in again.stdout

    # Another config in the same folder is refused, and nothing is deleted.
    other = _draftalign("pretrain", str(TINY), f"run.output={out}", *SMOKE,
                        "pretrain.jobs.target.train.max_steps=5", timeout=120)
    assert other.returncode == 2 and "another config" in other.stderr
    assert (model_dir / "model.safetensors").is_file()
