"""A real two-node Ray cluster on one machine: a head and a second node started with `ray start`
(token authentication on, loopback, free ports), each with its own custom resource
`draftalign_slot: 1`. A smoke-sized `draftalign run` submitted with `draftalign submit` asks for one
slot per generation replica and per distillation worker, so two of each can only run one per
node; Ray's state API then says where every actor ran (slow: two Ray nodes, vLLM and training)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_submit_ray import _free_port, _wait_http
from tests.worlds import tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
SLOT = "draftalign_slot"
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _ray_start(env: dict, temp_dir: str, *args: str) -> subprocess.Popen:
    """`ray start --block` with every port it opens free and loopback only, a small object store
    (two nodes share this machine's memory), in a process group of its own to stop it whole."""
    ports = {k: _free_port() for k in ("metrics", "agent", "runtime_env", "node_manager", "object_manager")}
    return subprocess.Popen(
        [*RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--num-cpus=2",
         f"--resources={json.dumps({SLOT: 1})}", "--object-store-memory=400000000",
         f"--metrics-export-port={ports['metrics']}", f"--dashboard-agent-listen-port={ports['agent']}",
         f"--runtime-env-agent-port={ports['runtime_env']}", f"--node-manager-port={ports['node_manager']}",
         f"--object-manager-port={ports['object_manager']}", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


# Run in a child with the cluster's environment (RAY_AUTH_MODE=token), so this test process
# keeps its own: the state API through the authenticated dashboard.
STATE = """
import json, sys
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
nodes = [{"node_id": n.node_id, "is_head": n.is_head_node, "state": n.state, "resources": n.resources_total}
         for n in list_nodes(address=address)]
actors = [{"class_name": a.class_name, "repr_name": a.repr_name, "node_id": a.node_id, "state": a.state,
           "job_id": a.job_id, "required_resources": a.required_resources}
          for a in list_actors(address=address, limit=10000, detail=True, raise_on_missing_output=False)]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def _state(cluster: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", STATE, cluster["address"]], capture_output=True, text=True,
                          timeout=120, env=cluster["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster():
    gcs, dashboard = _free_port(), _free_port()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # The job's driver inherits the head's environment. Ray Data then starts the generation stage
    # once both engine replicas are up: else the first one ready answers the 16 requests alone
    # while the other is still loading, and is removed unfinished, before Ray records its node.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600"}
    subprocess.run([*RAY, "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60)
    # Short private temp dirs (Ray's socket paths must stay under the OS limit), one per node, as
    # on two machines: sharing one, the second node's runtime-env agent deleted the job's
    # working_dir (its cwd on the head) once its own workers were done with it, and both nodes'
    # log monitors forwarded every line of the job's workers, twice.
    temp_dirs = [tempfile.mkdtemp(prefix="rt", dir="/tmp") for _ in range(2)]
    head = _ray_start(env, temp_dirs[0], "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={dashboard}", f"--ray-client-server-port={_free_port()}",
                      "--include-dashboard=true")
    nodes: list[subprocess.Popen] = [head]
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_http(f"{address}/api/version", 180)
        nodes.append(_ray_start(env, temp_dirs[1], f"--address=127.0.0.1:{gcs}"))
        c = {"address": address, "env": env}
        deadline = time.time() + 180
        while sum(n["state"] == "ALIVE" for n in _state(c)["nodes"]) < 2:
            assert time.time() < deadline, "the second node did not join within 180 s"
            time.sleep(3)
        yield c
    finally:
        for node in reversed(nodes):
            _stop(node)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def _cli(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "draftalign", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _overrides(tmp_path: Path, run: Path) -> list[str]:
    """A smoke-sized run without pretraining; two generation replicas and two distillation workers,
    each asking for one `draftalign_slot`, of which each node has one."""
    slot = f"{{{SLOT}: 1}}"
    return [f"run.output={run}", "pretrain.jobs={}", f"models.target={tmp_path / 'target'}",
            f"models.draft={tmp_path / 'draft'}", "generate.max_seeds=8",
            "generate.sampling=[{name: greedy, temperature: 0, max_tokens: 8}, "
            "{name: t1.0, temperature: 1.0, top_p: 0.95, max_tokens: 8}]",
            "generate.engine.max_model_len=256", "generate.engine.batch_size=4", "generate.engine.replicas=2",
            f"generate.engine.resources={slot}",
            "distill.holdout_fraction=0.3", "distill.train.max_steps=3", "distill.train.seq_len=48",
            "distill.train.num_workers=2", "distill.train.micro_batch_size=2", "distill.train.cpus_per_worker=0.5",
            f"distill.train.resources={slot}", "distill.train.log_every=1", "distill.train.eval_batches=1",
            "distill.target_pool.cpus_per_actor=0.5", "evaluate.gammas=[2]", "evaluate.temperatures=[0.0]",
            "evaluate.max_prompts=1", "evaluate.max_new_tokens=8", "ray.address=auto"]


def _nodes_of(actors: list[dict], job_id: str, class_name: str) -> list[str]:
    return sorted(a["node_id"] or "-" for a in actors if a["job_id"] == job_id and a["class_name"] == class_name)


def _engine_nodes(actors: list[dict], job_id: str) -> list[str]:
    """The nodes of the vLLM engine replicas: Ray Data's map workers of the engine stage, each
    holding a slot (for a one-bundle replica ray.data.llm makes the bundle the actor's own
    resources; with tensor parallelism a placement group holds them, `draftalign_slot_group_…`)."""
    return sorted(a["node_id"] or "-" for a in actors if a["job_id"] == job_id and "vLLMEngineStage" in a["class_name"]
                  and any(k.startswith(SLOT) for k in a["required_resources"] or {}))


def test_a_run_submitted_to_two_nodes_places_replicas_and_workers_on_both(cluster, tmp_path):
    tiny_llama(tmp_path / "target", seed=0, hidden=64)
    tiny_llama(tmp_path / "draft", seed=1, hidden=32)
    run = tmp_path / "run"  # on storage both nodes see, as /mnt/cluster_storage on a real cluster
    sub = _cli("submit", "examples/tiny.yaml", *_overrides(tmp_path, run), "--address", cluster["address"],
               env=cluster["env"])
    assert sub.returncode == 0, sub.stderr[-3000:]
    job_id = sub.stdout.split("job ", 1)[1].split()[0]
    logs = _cli("job", "logs", job_id, "--follow", "--address", cluster["address"], env=cluster["env"], timeout=1200)
    status = _cli("job", "status", job_id, "--address", cluster["address"], env=cluster["env"])
    assert "SUCCEEDED" in status.stdout, logs.stdout[-5000:] + status.stdout

    state = _state(cluster)
    (tmp_path / "ray_state.json").write_text(json.dumps(state, indent=1))  # kept for a failure's reader
    nodes = {n["node_id"] for n in state["nodes"] if n["state"] == "ALIVE"}
    assert len(nodes) == 2 and all(n["resources"].get(SLOT) == 1 for n in state["nodes"] if n["state"] == "ALIVE")
    # The Ray job's actors carry the driver's job id (hex), not the submission id `raysubmit_…`.
    jobs = {a["job_id"] for a in state["actors"] if a["class_name"] == "RayTrainWorker"}
    assert len(jobs) == 1, state["actors"]
    job = jobs.pop()
    actors = [a for a in state["actors"] if a["job_id"] == job]
    seen = [(a["class_name"], a["repr_name"], (a["node_id"] or "-")[:8], a["required_resources"]) for a in actors]
    engines = _engine_nodes(actors, job)
    assert len(engines) == 2 and set(engines) == nodes, seen  # one replica per node
    train = _nodes_of(actors, job, "RayTrainWorker")
    assert len(train) == 2 and set(train) == nodes, seen  # one worker per node
    # Each worker's target pool (one actor) beside it: the log-probs stay on the node.
    assert _nodes_of(actors, job, "TargetActor") == train, seen

    manifest = json.loads((run / "run_manifest.json").read_text())
    assert [(s["stage"], s["status"]) for s in manifest["stages"]] == [
        ("generate", "done"), ("distill", "done"), ("evaluate", "done")]
    counts = json.loads((run / "generate" / "manifest.json").read_text())["counts"]
    assert counts["rows_in_data"] > 0 and counts["duplicate_rows"] == 0
    assert counts["rows_in_data"] + counts["engine_errors"] == counts["requests"], counts
    info = json.loads((run / "distill" / "tvdpp" / "model" / "draftalign_model.json").read_text())
    assert info["metrics"]["step"] == 3 and info["metrics"]["export_step"] == 3
    summary = json.loads((run / "evaluate" / "summary.json").read_text())
    assert {(r["drafter"], r["task"]) for r in summary} == {
        (d, t) for d in ("pretrained", "tvd++", "ngram") for t in ("open_ended", "summarize", "translate")}
