"""Model cards and Hub push on a fake run folder (no Ray, no torch, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from draftalign.cli import main
from draftalign.errors import ConfigError
from draftalign.models.card import gather, parse_card_table, table_rows, write_card
from draftalign.models.hub import model_files, push

MODEL_FILES = ["README.md", "chat_template.jinja", "config.json", "draftalign_model.json",
               "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def _record(drafter: str, path: str, task: str, gamma: int, t: float, tau: float) -> dict:
    return {"drafter": drafter, "drafter_path": path, "task": task, "engine": "reference", "gamma": gamma,
            "temperature": t, "block_efficiency": tau, "draft_acceptance_rate": tau / (gamma + 1),
            "mbsu": tau / (1 + gamma * 0.1), "num_prompts": 4}


@pytest.fixture
def run(tmp_path: Path, monkeypatch) -> Path:
    """runs/demo with a generate manifest, a distilled drafter (plus junk) and an evaluation summary."""
    monkeypatch.chdir(tmp_path)
    root = Path("runs/demo")
    job = root / "distill" / "tvdpp"
    model = job / "model"
    model.mkdir(parents=True)
    for name in MODEL_FILES[1:]:
        (model / name).write_text("{}" if name.endswith(".json") else "x")
    (model / "draftalign_model.json").write_text(json.dumps({
        "fingerprint": "abc123", "role": "distilled", "drafter": "tvd++",
        "loss": {"name": "tvd++", "variant": "vocab"}, "metrics": {"step": 120, "holdout_expected_acceptance": 0.61},
        "initialised_from": "/abs/runs/demo/pretrain/draft/model", "parameters": 14288128}))
    (model / "ray").mkdir()
    (model / "ray" / "checkpoint_000001.pt").write_text("state")
    (model / "optimizer.pt").write_text("pickle")
    (model / ".cache").mkdir()
    (model / ".cache" / "x.safetensors").write_text("cached")
    (model / ".hidden.safetensors").write_text("x")
    cfg = {"run": {"output": "runs/demo"}, "models": {"target": "HuggingFaceTB/SmolLM2-135M-Instruct"},
           "generate": {"output": "runs/demo/generate", "seeds": "examples/data/seeds.jsonl"},
           "distill": {"output": "runs/demo/distill", "data": None,
                       "train": {"seq_len": 192, "micro_batch_size": 8, "grad_accum": 1, "num_workers": 1}},
           "evaluate": {"output": "runs/demo/evaluate"}}
    (job / "config.yaml").write_text(yaml.safe_dump(cfg))
    gen = root / "generate"
    (gen / "data").mkdir(parents=True)
    (gen / "manifest.json").write_text(json.dumps({
        "target_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "target_hash": "deadbeefcafe0123",
        "counts": {"rows_in_data": 1041, "seeds_good": 347, "tokens_generated": 99000},
        "config": {"generate": {"seeds": "examples/data/seeds.jsonl", "system_prompt": None,
                                "sampling": [{"name": "greedy", "temperature": 0.0, "top_p": 1.0, "max_tokens": 256},
                                             {"name": "t1", "temperature": 1.0, "top_p": 0.95, "max_tokens": 256}]}}}))
    ev = root / "evaluate"
    ev.mkdir()
    summary = [_record("pretrained", "runs/demo/pretrain/draft/model", "open", 3, 0.0, 1.5)]
    summary += [_record("tvd++", str(model), task, g, t, 1.7 + g / 10 + t)
                for task in ("open", "summ") for g in (1, 3) for t in (0.0, 1.0)]
    (ev / "summary.json").write_text(json.dumps(summary))
    return model


def test_card_table_equals_summary_rows(run: Path) -> None:
    path = write_card(run)
    text = path.read_text()
    summary = json.loads(Path("runs/demo/evaluate/summary.json").read_text())
    mine = [r for r in summary if r["drafter"] == "tvd++"]
    assert len(mine) == 8
    assert parse_card_table(text) == table_rows(mine)
    rows = parse_card_table(text)
    assert [(r[0], r[2], r[3]) for r in rows] == [(m["task"], str(m["gamma"]), f"{m['temperature']:g}") for m in mine]
    assert [float(r[4]) for r in rows] == [round(m["block_efficiency"], 3) for m in mine]
    assert [float(r[6]) for r in rows] == [round(m["mbsu"], 3) for m in mine]


def test_card_says_what_the_run_knows(run: Path) -> None:
    text = write_card(run).read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "deadbeefcafe0123" in text  # target hash from generate's manifest
    assert "`tvd++`, variant `vocab`" in text
    assert "1041 rows" in text and "347 seed instructions" in text and "T = 1, top-p 0.95" in text
    assert "Training steps: 120" in text and f"{120 * 8 * 192:,} token slots" in text
    assert '"method": "draft_model"' in text and '"num_speculative_tokens": 3' in text
    assert str(run) in text
    assert "inherits that model's license" in text
    assert "On-policy data" not in text  # the target's answers only


def test_card_of_an_on_policy_round_says_its_mixture(run: Path) -> None:
    info = json.loads((run / "draftalign_model.json").read_text())
    info["mixture"] = {"on_policy_fraction": 0.5, "target_rows": 160, "on_policy_rows": 160}
    (run / "draftalign_model.json").write_text(json.dumps(info))
    cfg = yaml.safe_load((run.parent / "config.yaml").read_text())
    cfg["generate"]["generator"] = "/abs/runs/demo/pretrain/draft/model"
    cfg["distill"]["on_policy"] = {"fraction": 0.5, "rounds": 0, "round": 2}
    (run.parent / "config.yaml").write_text(yaml.safe_dump(cfg))
    text = write_card(run).read_text()
    assert ("- On-policy data: λ = 0.5; 160 training rows of the drafter's own answers (round 2, answers of "
            "`/abs/runs/demo/pretrain/draft/model`, scored by the target) and 160 of the target's") in text


def test_card_with_explicit_summary_and_without_any(run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps([_record("tvd++", "/elsewhere", "x", 5, 0.0, 2.0)]))  # matched by name
    assert parse_card_table(write_card(run, other).read_text()) == [["x", "reference", "5", "0", "2.000",
                                                                     "0.333", "1.333"]]
    Path("runs/demo/evaluate/summary.json").unlink()
    assert "Not evaluated yet" in write_card(run).read_text()
    with pytest.raises(ConfigError):
        gather(run, tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="draftalign_model.json"):
        gather(tmp_path)


def test_card_command(run: Path, capsys) -> None:
    assert main(["card", str(run)]) == 0
    assert (run / "README.md").is_file()
    assert "model card" in capsys.readouterr().out
    assert main(["card", "runs/demo"]) == 2  # not a drafter folder: one error line


def test_dry_run_lists_exactly_the_model_files(run: Path, capsys) -> None:
    assert main(["push", str(run), "me/drafter", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert listed == MODEL_FILES  # README.md would be written first
    assert not (run / "README.md").exists()  # a dry run writes nothing
    write_card(run)
    assert [p.name for p in model_files(run)] == MODEL_FILES


class FakeApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def create_commit(self, **kw):
        self.calls.append(("create_commit", kw))


def test_push_uploads_the_same_list_and_never_prints_the_token(run: Path, monkeypatch, capsys) -> None:
    secret = "hf_SECRETsecretSECRET1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    api = FakeApi()
    names = push(run, "me/drafter", private=True, api=api)
    assert names == MODEL_FILES
    (create, kw_repo), (commit, kw_commit) = api.calls
    assert create == "create_repo" and kw_repo["private"] is True and kw_repo["repo_id"] == "me/drafter"
    assert commit == "create_commit"
    ops = kw_commit["operations"]
    assert [op.path_in_repo for op in ops] == MODEL_FILES
    assert all(Path(op.path_or_fileobj).parent == run for op in ops)
    out = capsys.readouterr()
    assert secret not in out.out + out.err


def test_push_command_with_mocked_hfapi(run: Path, monkeypatch, capsys) -> None:
    import huggingface_hub

    secret = "hf_ANOTHERsecret0987654321"
    monkeypatch.setenv("HF_TOKEN", secret)
    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: api)
    assert main(["push", str(run), "me/drafter"]) == 0
    assert [op.path_in_repo for op in api.calls[1][1]["operations"]] == MODEL_FILES
    out = capsys.readouterr()
    assert secret not in out.out + out.err


def test_push_refuses_a_folder_without_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an exported model"):
        push(tmp_path, "me/x", dry_run=True)


def test_evaluate_writes_a_card_into_every_exported_drafter(run: Path, tmp_path: Path) -> None:
    from draftalign.pipelines.evaluate import _write_cards

    hub = {"name": "hub", "path": "org/some-model"}  # not ours: no card
    plain = tmp_path / "plain"
    plain.mkdir()  # a folder draftalign did not export: no card
    records = json.loads(Path("runs/demo/evaluate/summary.json").read_text())
    logged: list[str] = []
    _write_cards([{"name": "tvd++", "path": str(run)}, hub, {"name": "plain", "path": str(plain)}], records,
                 logged.append)
    assert (run / "README.md").is_file() and not (plain / "README.md").exists()
    assert len(logged) == 1
    assert parse_card_table((run / "README.md").read_text()) == table_rows(
        [r for r in records if r["drafter"] == "tvd++"])
