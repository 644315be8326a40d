"""The deployment files in cluster/ against the paper's plan: every stage's actors fit the nodes
they describe, and the job runs the project's own command and config."""

from pathlib import Path

import pytest
import yaml

from draftalign.cluster.resources import train_resources
from draftalign.config import load_config
from draftalign.pipelines.distill import describe_distill
from draftalign.pipelines.evaluate import describe_evaluate
from draftalign.pipelines.generate import describe_generate

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "examples" / "paper.yaml"


def _stage_bundles(cfg) -> dict[str, list[dict[str, float]]]:
    """Per stage, the resource bundles its --plan asks Ray for at once (one per actor or worker)."""
    stages = {}
    for name, job in cfg.pretrain.jobs.items():
        r = train_resources(job)
        stages[f"pretrain {name}"] = [r["per_worker"]] * r["ray_train_workers"]
    g = describe_generate(cfg)["resources"]  # a replica's tensor-parallel bundles go on one node (PACK)
    stages["generate"] = [g["per_replica"]] * g["engine_replicas"]
    d = describe_distill(cfg)["resources"]
    stages["distill"] = [d["per_worker"]] * d["ray_train_workers"] + [d["per_target_actor"]] * d["target_actors"]
    stages["evaluate"] = [describe_evaluate(cfg)["vllm"]["per_engine"]]  # one engine at a time
    return stages


def _fits(bundles: list[dict[str, float]], nodes: int, cpu: float, gpu: float) -> bool:
    """First-fit decreasing packing of the bundles onto `nodes` nodes of (cpu, gpu)."""
    free = [[cpu, gpu] for _ in range(nodes)]
    for b in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True):
        for node in free:
            if node[0] >= b.get("CPU", 0) and node[1] >= b.get("GPU", 0):
                node[0] -= b.get("CPU", 0)
                node[1] -= b.get("GPU", 0)
                break
        else:
            return False
    return True


def test_the_packing_check_can_fail():
    assert _fits([{"CPU": 8, "GPU": 1}] * 8, 1, 64, 8)
    assert not _fits([{"CPU": 8, "GPU": 1}] * 8, 1, 48, 8)
    assert not _fits([{"CPU": 1, "GPU": 1}] * 9, 1, 96, 8)


@pytest.fixture(scope="module")
def paper():
    return load_config(PAPER)


def test_the_kuberay_job_runs_the_paper_config_and_every_stage_fits_its_pods(paper):
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["spec"]["entrypoint"].split()[-3:] == ["draftalign", "run", "examples/paper.yaml"]
    assert "working_dir" in yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0"  # no actor lands on the head
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu, gpu = float(limits["cpu"]), float(limits["nvidia.com/gpu"])
    for stage, bundles in _stage_bundles(paper).items():
        assert _fits(bundles, group["replicas"], cpu, gpu), f"{stage} does not fit {group['replicas']} pods"


def test_the_launcher_cluster_fits_every_stage_and_keeps_the_dashboard_on_loopback(paper):
    cluster = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    assert cluster["available_node_types"][cluster["head_node_type"]]["resources"] == {"CPU": 0}
    (gpu_type,) = [t for n, t in cluster["available_node_types"].items() if n != cluster["head_node_type"]]
    res = gpu_type["resources"]
    for stage, bundles in _stage_bundles(paper).items():
        assert _fits(bundles, gpu_type["max_workers"], res["CPU"], res["GPU"]), stage
    (head_start,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_both_cluster_files_start_ray_with_token_authentication():
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())["spec"]
    spec = job["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"]),
            job["submitterPodTemplate"]]
    secret = {"secretKeyRef": {"name": "draftalign-ray-token", "key": "auth_token"}}
    for pod in pods:
        for container in pod["spec"]["containers"]:
            env = _env(container)
            assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == secret, container["name"]

    cluster = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    starts = [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    token_path = "/home/ray/.ray/auth_token"
    assert f"--env RAY_AUTH_TOKEN_PATH={token_path}" in cluster["docker"]["run_options"]
    assert cluster["file_mounts"][token_path] == "~/.ray/auth_token"


def test_custom_resources_reach_every_bundle_and_the_plan_counts_each_workers_target_actors():
    from draftalign.cluster.resources import distill_resources, replica_bundles
    from draftalign.config import ConfigError

    # How a config places actors on chosen nodes (docs/cluster.md; tests/test_two_nodes_ray.py).
    cfg = load_config(ROOT / "examples" / "tiny.yaml", [
        "distill.train.num_workers=2", "distill.target_pool.actors=2", "distill.train.resources={draftalign_slot: 1}",
        "distill.target_pool.resources={pool: 0.5}", "generate.engine.resources={draftalign_slot: 1}"])
    d = distill_resources(cfg.distill)
    assert (d["target_actors_per_worker"], d["target_actors"]) == (2, 4)
    assert d["per_worker"] == {"CPU": 1.0, "draftalign_slot": 1.0} and d["per_target_actor"] == {"CPU": 1.0, "pool": 0.5}
    assert d["total"] == {"CPU": 6.0, "draftalign_slot": 2.0, "pool": 2.0}
    assert replica_bundles(cfg.generate.engine) == [{"CPU": 0.5, "draftalign_slot": 1.0}]
    in_process = load_config(ROOT / "examples" / "tiny.yaml", ["distill.target_pool.in_process=true"])
    assert distill_resources(in_process.distill)["target_actors_per_worker"] == 0
    with pytest.raises(ConfigError, match="custom resources only"):
        load_config(ROOT / "examples" / "tiny.yaml", ["generate.engine.resources={GPU: 1}"])
