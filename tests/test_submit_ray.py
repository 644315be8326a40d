"""`draftalign submit` against a real local Ray head (loopback only), and the project's metrics on
its Prometheus endpoint (slow: starts a Ray head and runs a smoke-sized pipeline as a job)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.worlds import tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token: authentication is on, as it should be)
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # Every port this head opens is a free one, so another Ray on the machine cannot collide.
    ports = {k: _free_port() for k in ("gcs", "dashboard", "metrics", "agent", "runtime_env", "client")}
    # The job's `python` is whatever the head's PATH finds first: this test's interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"], env=env,
                   capture_output=True, timeout=60)
    # --block keeps the head in this process group, so the test stops exactly this cluster.
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={ports['gcs']}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
         f"--metrics-export-port={ports['metrics']}", f"--dashboard-agent-listen-port={ports['agent']}",
         f"--runtime-env-agent-port={ports['runtime_env']}", f"--ray-client-server-port={ports['client']}",
         "--num-cpus=3", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{ports['dashboard']}"
        _wait_http(f"{address}/api/version", 180)
        yield {"address": address, "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics", "env": env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "draftalign", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)


def test_submit_runs_the_whole_pipeline_as_a_ray_job_and_its_metrics_reach_prometheus(head, tmp_path):
    tiny_llama(tmp_path / "target", seed=0, hidden=64)
    tiny_llama(tmp_path / "draft", seed=1, hidden=32)
    run = tmp_path / "run"
    # A smoke-sized `draftalign run` without pretraining: generate 8 seeds x 2 settings with vLLM,
    # distill 3 steps, evaluate both drafters on one prompt per task.
    overrides = [f"run.output={run}", "pretrain.jobs={}", f"models.target={tmp_path / 'target'}",
                 f"models.draft={tmp_path / 'draft'}", "generate.max_seeds=8",
                 "generate.sampling=[{name: greedy, temperature: 0, max_tokens: 8}, "
                 "{name: t1.0, temperature: 1.0, top_p: 0.95, max_tokens: 8}]",
                 "generate.engine.max_model_len=256", "generate.engine.batch_size=4",
                 "distill.holdout_fraction=0.3", "distill.train.max_steps=3", "distill.train.seq_len=48",
                 "distill.train.micro_batch_size=4", "distill.train.log_every=1", "distill.train.eval_batches=1",
                 "distill.target_pool.cpus_per_actor=0.5", "evaluate.gammas=[2]", "evaluate.temperatures=[0.0]",
                 "evaluate.max_prompts=1", "evaluate.max_new_tokens=8", "ray.address=auto"]
    bad = _cli("submit", "examples/tiny.yaml", "distill.no_such_key=1", "--address", head["address"],
               env=head["env"])
    assert bad.returncode == 2 and "unknown config key 'distill.no_such_key'" in bad.stderr

    sub = _cli("submit", "examples/tiny.yaml", *overrides, "--address", head["address"], env=head["env"])
    assert sub.returncode == 0, sub.stderr[-3000:]
    job_id = sub.stdout.split("job ", 1)[1].split()[0]
    assert head["address"] in sub.stdout

    logs = _cli("job", "logs", job_id, "--follow", "--address", head["address"], env=head["env"])
    status = _cli("job", "status", job_id, "--address", head["address"], env=head["env"])
    assert "SUCCEEDED" in status.stdout, logs.stdout[-4000:] + status.stdout
    manifest = json.loads((run / "run_manifest.json").read_text())
    assert [(s["stage"], s["status"]) for s in manifest["stages"]] == [
        ("generate", "done"), ("distill", "done"), ("evaluate", "done")]
    summary = json.loads((run / "evaluate" / "summary.json").read_text())
    assert {(r["drafter"], r["task"]) for r in summary} == {
        (d, t) for d in ("pretrained", "tvd++", "ngram") for t in ("open_ended", "summarize", "translate")}
    for r in summary:
        assert r["engine"] == "reference" and r["gamma"] == 2 and r["num_prompts"] == 1
        assert 1.0 <= r["block_efficiency"] <= 3.0 and 0.0 <= r["draft_acceptance_rate"] <= 1.0 and r["mbsu"] > 0
    # The run ends by printing the drafters' τ side by side (every cell is in report.md).
    assert "| task | engine | γ | T | pretrained | tvd++ | ngram | verdict |" in logs.stdout
    assert "| translate | reference | 2 |" in logs.stdout

    names = ("draftalign_generated_tokens_total", "draftalign_distill_loss", "draftalign_target_tokens_total",
             "draftalign_trainer_wait_seconds_total", "draftalign_eval_block_efficiency")
    deadline, text = time.time() + 120, ""
    while time.time() < deadline:  # Ray exports custom metrics every few seconds
        text = urllib.request.urlopen(head["metrics"], timeout=10).read().decode()
        if all(f"ray_{n}" in text for n in names):
            break
        time.sleep(5)
    for name in names:
        assert f"ray_{name}" in text, f"{name} not on {head['metrics']}"
