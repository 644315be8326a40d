"""`draftalign submit` uploads an allow-list: the package Ray builds holds no planted secret."""

import zipfile
from pathlib import Path

import pytest
import yaml

from draftalign.cli import main
from draftalign.cluster import jobs
from draftalign.cluster.upload import ALLOW, DENY

ROOT = Path(__file__).resolve().parent.parent
PLANTED = [".env", ".env.local", ".envrc", ".netrc", ".git-credentials", "id_rsa", "id_rsa.pub", "server.pem",
           "tls.key", ".aws/credentials", ".huggingface/token", ".ray/auth_token", ".git/config", "model.pt",
           "w.pth", "pytorch_model.bin", "outputs/result.txt", "runs/tiny/config.yaml", "notes.txt",
           "examples/.env", "examples/data/weights.safetensors", "examples/id_ed25519",
           "draftalign/__pycache__/cli.cpython-311.pyc", "draftalign/.netrc", "cluster/secret.yaml",
           "data/.hidden/x.jsonl", ".secrets/other.yaml"]
WANTED = ["README.md", "pyproject.toml", "draftalign/__init__.py", "draftalign/cli.py", "examples/tiny.yaml",
          "examples/data/seeds.jsonl", "configs/mine.yaml", "data/extra.jsonl", "data/eval/qa.jsonl"]


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    for rel in PLANTED + WANTED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("SECRET" if rel in PLANTED else "x")
    (root / "configs" / "mine.yaml").write_text(yaml.safe_dump({
        "generate": {"seeds": "data/extra.jsonl"},
        "evaluate": {"tasks": [{"name": "qa", "kind": "open_ended", "data": "data/eval/qa.jsonl"},
                               {"name": "hub", "kind": "summarize", "data": "org/some-set"}]}}))
    return root


def _submit(monkeypatch, root: Path, config: str) -> tuple[dict, list[str]]:
    """Run `draftalign submit` against a fake job server; build the package Ray would upload."""
    from ray._private.runtime_env.packaging import create_package

    sent: dict = {}

    class FakeClient:
        def submit_job(self, **kwargs):
            env = kwargs["runtime_env"]
            package = root.parent / "package.zip"
            create_package(env["working_dir"], package, include_gitignore=True, excludes=env.get("excludes", []))
            sent.update(kwargs, names=sorted(n for n in zipfile.ZipFile(package).namelist() if not n.endswith("/")))
            return "raysubmit_1"

    monkeypatch.setattr(jobs, "client", lambda address: FakeClient())
    monkeypatch.chdir(root)
    assert main(["submit", config, "--address", "http://127.0.0.1:8265"]) == 0
    return sent, sent["names"]


def test_the_upload_is_the_allow_list_and_no_planted_secret(monkeypatch, repo):
    sent, names = _submit(monkeypatch, repo, "configs/mine.yaml")
    assert names == sorted(WANTED)
    assert sent["entrypoint"] == "python -m draftalign run configs/mine.yaml"
    assert not Path(sent["runtime_env"]["working_dir"]).exists()  # the staging folder is gone afterwards


def test_the_real_repository_uploads_only_the_package_examples_and_project_files(monkeypatch):
    _, names = _submit(monkeypatch, ROOT, "examples/tiny.yaml")
    assert {n.split("/")[0] for n in names} == set(ALLOW)
    assert "draftalign/cli.py" in names and "examples/data/seeds.jsonl" in names
    assert not any(part.startswith(".") or part == "__pycache__" for n in names for part in n.split("/"))


def test_the_cluster_files_use_the_same_lists():
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert env["excludes"] == list(DENY)
    cluster = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    assert cluster["rsync_exclude"] == list(DENY)
    mounts = {f"/home/ray/draftalign/{a}": f"./{a}" for a in ALLOW}
    assert cluster["file_mounts"] == {**mounts, "/home/ray/.ray/auth_token": "~/.ray/auth_token"}
