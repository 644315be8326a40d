"""Secrets in a config never reach the files a run writes, its printed plan, or a job's command line."""

import json
import sys
from pathlib import Path

import pytest

from draftalign.cli import main
from draftalign.config import load_config
from draftalign.util.redact import REDACTED, SECRET_OVERRIDES_ENV, redact, redact_argv

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"
PAPER = TINY.with_name("paper.yaml")
SECRET = "hf_s3cr3tVALUE"
OVERRIDES = [f"generate.engine.env.HF_TOKEN={SECRET}",
             f"generate.engine.engine_kwargs={{api_key: {SECRET}, enforce_eager: true}}"]


def _files_text(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()
                     and p.suffix in (".yaml", ".json", ".md", ".csv", ".log"))


@pytest.mark.parametrize("config", [TINY, PAPER])
def test_the_shipped_configs_have_nothing_redacted(config):
    data = load_config(config).model_dump(mode="json")
    assert redact(data) == data  # no false positives: max_tokens, tokenizer, row keys stay


def test_secret_keys_and_engine_env_values_are_redacted_tuning_knobs_kept():
    cfg = load_config(TINY, [*OVERRIDES, "generate.engine.env.VLLM_CPU_KVCACHE_SPACE='4'",
                             "generate.engine.env.VLLM_API_KEY=k", "generate.engine.env.WANDB_X=w"])
    data = redact(cfg.model_dump(mode="json"))
    env = data["generate"]["engine"]["env"]
    assert env == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_TOKEN": REDACTED, "VLLM_CPU_KVCACHE_SPACE": "4",
                   "VLLM_API_KEY": REDACTED, "WANDB_X": REDACTED}
    assert data["generate"]["engine"]["engine_kwargs"] == {"api_key": REDACTED, "enforce_eager": True}
    assert redact_argv(["generate", "c.yaml", *OVERRIDES, "distill.optim.lr=0.1"]) == [
        "generate", "c.yaml", f"generate.engine.env.HF_TOKEN={REDACTED}",
        f"generate.engine.engine_kwargs={{api_key: {REDACTED}, enforce_eager: true}}", "distill.optim.lr=0.1"]


def test_plan_output_is_redacted(capsys):
    assert main(["generate", str(TINY), *OVERRIDES, "--plan"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and f"HF_TOKEN: {REDACTED}" in out


def test_generate_outputs_hold_no_secret(tmp_path, monkeypatch):
    """config.yaml, run_info.json (argv included) and manifest.json of a real generate run."""
    from draftalign.pipelines.generate import run_generate
    from tests.worlds import stub_engine_passes, tiny_llama

    tiny_llama(tmp_path / "target", seed=0, hidden=32)
    argv = ["draftalign", "generate", str(TINY), f"run.output={tmp_path / 'run'}",
            f"models.target={tmp_path / 'target'}", "generate.max_seeds=2", *OVERRIDES]
    monkeypatch.setattr(sys, "argv", argv)
    stub_engine_passes(monkeypatch)
    cfg = load_config(TINY, argv[3:])
    assert cfg.generate.engine.env["HF_TOKEN"] == SECRET  # the engine actors still get it
    run_generate(cfg)
    out = tmp_path / "run" / "generate"
    assert {"config.yaml", "run_info.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    text = _files_text(out)
    assert SECRET not in text and REDACTED in text
    assert json.loads((out / "manifest.json").read_text())["config"]["generate"]["engine"]["env"]["HF_TOKEN"] == REDACTED


def test_the_evaluate_report_command_line_is_redacted(monkeypatch):
    from draftalign.pipelines.evaluate import _header

    monkeypatch.setattr(sys, "argv", ["draftalign", "evaluate", str(TINY), *OVERRIDES])
    header = _header(load_config(TINY), "t", [{"name": "d", "path": "p"}], {"d": 1}, 2)
    assert SECRET not in header and f"HF_TOKEN={REDACTED}" in header


def test_submit_keeps_secret_overrides_off_the_entrypoint_and_the_job_gets_them(monkeypatch, capsys):
    from draftalign.cluster import jobs

    sent = {}

    class FakeClient:
        def submit_job(self, **kwargs):
            sent.update(kwargs)
            return "raysubmit_1"

    monkeypatch.setattr(jobs, "client", lambda address: FakeClient())
    root = TINY.parent.parent
    monkeypatch.chdir(root)
    assert main(["submit", str(TINY), *OVERRIDES, "distill.optim.lr=0.1", "--address", "http://x:8265"]) == 0
    assert SECRET not in sent["entrypoint"] and "distill.optim.lr=0.1" in sent["entrypoint"]
    assert SECRET not in json.dumps(sent["metadata"]) and SECRET not in capsys.readouterr().out
    secret = sent["runtime_env"]["env_vars"][SECRET_OVERRIDES_ENV]
    assert json.loads(secret) == OVERRIDES
    # inside the job: the CLI reads them back, so the engines get the token
    monkeypatch.setenv(SECRET_OVERRIDES_ENV, secret)
    assert main(["generate", "examples/tiny.yaml", "--plan"]) == 0
    assert f"HF_TOKEN: {REDACTED}" in capsys.readouterr().out
