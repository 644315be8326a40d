"""Pretraining through Ray Data + Ray Train + DeepSpeed, end to end on CPU (slow: starts Ray)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import scripts
from tests.benches import load_bench

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"
SMALL_ARCH = ("{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, "
              "num_attention_heads: 2, num_key_value_heads: 2}")


def _job(name: str, **train) -> list[str]:
    base = {"num_workers": 1, "cpus_per_worker": 1, "max_steps": 2, "checkpoint_every": 2, "log_every": 1,
            "micro_batch_size": 2, "seq_len": 64, "eval_batches": 2}
    base.update(train)
    return [f"pretrain.jobs.{name}.train.{k}={v}" for k, v in base.items()] + [
        f"pretrain.jobs.{name}.arch.overrides={SMALL_ARCH}", f"pretrain.jobs.{name}.optim.warmup_steps=1"]


# Two CPU workers, ZeRO-2, a checkpoint at step 2 and a crash at step 3: Ray Train must restart
# the worker group from the checkpoint and finish at step 4.
SMOKE = ["pretrain.only=target", "pretrain.corpus.max_documents=40", "pretrain.corpus.holdout_fraction=0.2",
         *_job("target", num_workers=2, zero_stage=2, max_steps=4, inject_failure_at_step=3)]


def _draftalign(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "draftalign", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    proc = _draftalign("pretrain", str(TINY), f"run.output={out}", *SMOKE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_zero2_two_workers_survive_a_crash_and_export(target_run):
    out, proc = target_run
    model_dir = out / "pretrain" / "target" / "model"
    info = json.loads((model_dir / "draftalign_model.json").read_text())
    m = info["metrics"]
    assert m["step"] == 4
    assert m["resumed_from_step"] == 2  # restarted from the step-2 checkpoint, not from scratch
    # The worker's traceback is Ray's output: the quiet terminal leaves it to RUN/logs/draftalign.log
    assert "injected failure at step 3" in (out / "logs" / "draftalign.log").read_text()
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


def test_same_command_reuses_and_other_config_is_refused(target_run):
    out, _ = target_run
    again = _draftalign("pretrain", str(TINY), f"run.output={out}", *SMOKE, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reusing" in again.stdout
    other = _draftalign("pretrain", str(TINY), f"run.output={out}", *SMOKE,
                        "pretrain.jobs.target.train.max_steps=5", timeout=120)
    assert other.returncode == 2 and "another config" in other.stderr
    assert (out / "pretrain" / "target" / "model" / "model.safetensors").is_file()  # nothing lost


@pytest.mark.heavy
def test_a_rerun_after_model_was_deleted_publishes_the_finished_run_again(target_run):
    # Ray Train hands a rerun its latest checkpoint, the final export, which holds no DeepSpeed
    # state: before, every such rerun died in DeepSpeed's loader with a bare AssertionError.
    out, _ = target_run
    model_dir = out / "pretrain" / "target" / "model"
    before = (model_dir / "model.safetensors").read_bytes()
    shutil.rmtree(model_dir)
    again = _draftalign("pretrain", str(TINY), f"run.output={out}", *SMOKE, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the run finished earlier (step 4): publishing its export again" in again.stdout + again.stderr
    assert (model_dir / "model.safetensors").read_bytes() == before
    assert json.loads((model_dir / "draftalign_model.json").read_text())["metrics"]["step"] == 4


@pytest.mark.heavy
def test_draft_from_jsonl_and_text_files_takes_the_targets_vocabulary(target_run, tmp_path):
    out, _ = target_run
    target_dir = out / "pretrain" / "target" / "model"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    source = Path(json.__file__).with_name("decoder.py").read_text()
    paragraphs = [p for p in source.split("\n\n") if p.strip()]
    (corpus / "rows.jsonl").write_text("".join(json.dumps({"body": p}) + "\n" for p in paragraphs))
    (corpus / "doc.txt").write_text(source)
    common = ["pretrain.only=draft", f"models.target={target_dir}", "pretrain.corpus.kind=files",
              f"pretrain.corpus.paths=[{corpus}]", "pretrain.corpus.holdout_fraction=0.0", *_job("draft")]
    bad = _draftalign("pretrain", str(TINY), f"run.output={tmp_path / 'bad'}", *common, timeout=300)
    assert bad.returncode == 2 and "no column 'text'" in bad.stderr, bad.stderr[-2000:]

    proc = _draftalign("pretrain", str(TINY), f"run.output={tmp_path / 'd'}", *common,
                       "pretrain.corpus.text_field=body")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "held-out perplexity n/a" in proc.stdout
    from transformers import AutoConfig

    draft = AutoConfig.from_pretrained(tmp_path / "d" / "pretrain" / "draft" / "model")
    target = AutoConfig.from_pretrained(target_dir)
    assert (draft.vocab_size, draft.max_position_embeddings, draft.eos_token_id) == (
        target.vocab_size, target.max_position_embeddings, target.eos_token_id)


def test_export_loads_in_vllm_with_the_same_log_probs(target_run, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model_dir = target_run[0] / "pretrain" / "target" / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("def add(a, b):\n    return a + b\n")["input_ids"]
    proc = subprocess.run(scripts.command("vllm_prompt_logprobs", model_dir, json.dumps(ids)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    vllm_lps = load_bench("childproc").receive(proc.stdout)[1:]
    model = LlamaForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    hf_lps = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert len(vllm_lps) == len(hf_lps)
    assert max(abs(a - b) for a, b in zip(vllm_lps, hf_lps, strict=True)) < 1e-3
