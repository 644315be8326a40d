"""bench/chaos.py: its checks against the uninterrupted run, its choice of what to kill, its report."""

import json
import random
from collections import Counter

import pytest

from tests.benches import load_bench


@pytest.fixture(scope="module")
def chaos():
    return load_bench("chaos")


def _row(key, response=(5, 6, 2)):
    return {"row_key": key, "id": key.split("/")[0], "prompt_token_ids": [1, 9], "response_token_ids": list(response)}


def test_a_lost_a_duplicated_and_a_changed_row_are_each_found(chaos):
    ref = [_row("s0/greedy"), _row("s1/greedy"), _row("s2/t1.0")]
    got = [_row("s0/greedy"), _row("s0/greedy"), _row("s2/t1.0", (5, 7, 2)), _row("s3/greedy")]
    c = chaos.compare_rows(ref, got, lambda r: r["row_key"], ("id", "prompt_token_ids", "response_token_ids"))
    assert c["missing"] == ["s1/greedy"] and c["duplicated"] == ["s0/greedy"]
    assert c["differ"] == ["s2/t1.0"] and c["extra"] == ["s3/greedy"]
    same = chaos.compare_rows(ref, list(reversed(ref)), lambda r: r["row_key"], ("response_token_ids",))
    assert not any(same[k] for k in ("missing", "extra", "duplicated", "differ"))  # order does not matter


def _log(*lines):
    return "".join(f"(RayTrainWorker pid=7) {line}\n" for line in lines)


def test_a_restart_from_step_0_after_a_checkpoint_is_found_and_a_resume_is_not(chaos):
    before = _log("[distill tvd++] 1 worker(s), 1 torch threads each, ZeRO stage 0, fp32",
                  "[distill tvd++] before training: {}", "[distill tvd++] step 3/24 {}", "[distill tvd++] step 4/24 {}")
    kill = {"checkpoints": {"chaos-distill-tvdpp": 3}, "log_pos": len(before)}
    fresh = _log("[distill tvd++] 1 worker(s), 1 torch threads each", "[distill tvd++] before training: {}",
                 "[distill tvd++] step 1/24 {}")
    [r] = chaos.restarts(before + fresh, [kill])
    assert (r["verdict"], r["went_on_from"], r["checkpoint"]) == ("from_step_0", 0, 3)
    resumed = _log("[distill tvd++] 1 worker(s), 1 torch threads each",
                   "[distill tvd++] resumed from checkpoint at step 3", "[distill tvd++] step 4/24 {}")
    assert chaos.restarts(before + resumed, [kill])[0]["verdict"] == "resumed"
    older = resumed.replace("step 3\n", "step 0\n")
    assert chaos.restarts(before + older, [kill])[0]["verdict"] == "resumed_older"
    # A line the dead worker printed before the kill, forwarded after it, is no restart; nor is
    # another job's start.
    late = _log("[distill tvd++] step 5/24 {}", "[pretrain draft] 1 worker(s), 1 torch threads each")
    assert chaos.restarts(before + late, [kill])[0]["verdict"] == "not_restarted"


def test_problems_name_each_finding(chaos):
    ok = {"missing": [], "extra": [], "duplicated": [], "differ": []}
    check = {"set": {**ok, "duplicated": ["s0/greedy"]}, "eval": {**ok, "greedy_outputs_differ": []},
             "steps_short": ["distill/tvdpp"], "leftovers": ["generate/.draftalign.lock"], "stale": [],
             "restarts": [{"kill": 0, "job": "chaos-distill-tvdpp", "checkpoint": 3, "went_on_from": 0,
                           "verdict": "from_step_0"}]}
    found = chaos.problems(check)
    assert any("1 duplicated" in p for p in found) and any("distill/tvdpp not at" in p for p in found)
    assert any("went on from step 0" in p for p in found) and "left behind: generate/.draftalign.lock" in found
    clean = {**check, "set": ok, "steps_short": [], "leftovers": [], "restarts": []}
    assert chaos.problems(clean) == []


def test_leftovers_and_stale_inputs_in_a_run_folder(chaos, tmp_path):
    run = tmp_path / "run"
    (run / "generate" / "data").mkdir(parents=True)
    (run / "generate" / "data" / "part-a.parquet").write_bytes(b"x")
    (run / "generate" / "data" / ".part-b.parquet.1a2b.tmp").write_bytes(b"half")
    (run / "generate" / ".draftalign.lock").write_text("{}")
    (run / "distill" / "tvdpp" / "ray" / "x").mkdir(parents=True)
    (run / "distill" / "tvdpp" / "ray" / "x" / "state.tmp").write_text("Ray Train's own")
    assert chaos.leftovers(run) == ["generate/.draftalign.lock", "generate/data/.part-b.parquet.1a2b.tmp"]
    job = run / "distill" / "tvdpp"
    (job / "model").mkdir()
    (job / "job.json").write_text(json.dumps({"fingerprint": "f1"}))
    (job / "model" / "draftalign_model.json").write_text(json.dumps({"fingerprint": "f1"}))
    (job / "run_info.json").write_text(json.dumps(
        {"fingerprint": "f1", "data_files": [str(run / "generate" / "data" / "part-a.parquet")]}))
    assert chaos.stale_reads(run) == []
    (job / "run_info.json").write_text(json.dumps(
        {"fingerprint": "f0", "data_files": [str(run / "generate" / "data" / "part-old.parquet")]}))
    stale = chaos.stale_reads(run)
    assert len(stale) == 2 and "fingerprints differ" in stale[0] and "part-old" in stale[1]


def test_the_kind_aimed_at_is_the_least_killed_the_run_can_reach_and_an_absent_one_gives_way(chaos, tmp_path):
    r = chaos.ChaosRun(1, tmp_path, tmp_path, random.Random(0), Counter(driver=3, vllm=1, train_worker=1),
                       quota=1, opts=chaos.Options())
    assert r.aim("generate") == r.aim(None) == "target_actor"
    assert r.aim("evaluate") == "driver"  # nothing else lives there
    r.tally.update(target_actor=2)
    assert r.aim("pretrain") in ("vllm", "train_worker") and r.aim("distill") == "train_worker"
    assert r.choose("vllm", {"driver": [1], "vllm": [5]}) == "vllm"
    assert r.choose("target_actor", {"driver": [1], "vllm": [5]}) == "vllm"  # not present: the least killed alive


def test_totals_and_the_report(chaos):
    ok = {"missing": [], "extra": [], "duplicated": [], "differ": []}
    kill = {"kind": "driver", "aimed": "vllm", "stage": "generate", "orphans": 0}
    run = {"index": 1, "completed": True, "seconds": 60.0, "attempts": [{"rc": -9}, {"rc": 0}], "kills": [kill],
           "check": {"set": {**ok, "missing": ["s1/greedy"]}, "eval": ok, "leftovers": [], "stale": [],
                     "restarts": [{"verdict": "resumed"}]}, "problems": ["set: 1 missing (s1/greedy)"]}
    t = chaos.totals([run])
    assert t["kills_by_kind"] == {"driver": 1} and t["not_present"] == {"vllm": 1}
    assert t["rows_missing"] == 1 and t["attempts"] == 2 and t["restarts"] == {"resumed": 1}
    md = chaos.markdown({"command": "python bench/chaos.py", "commit": "abc", "date": "d", "machine": "m",
                         "wall_s": 60.0, "reference": {"seconds": 30, "rc": 0, "rows": 32, "eval_rows": 9},
                         "runs": [run], "totals": t})
    assert "| driver | 0 | 0 | 1 | 0 | 0 |" in md and "- set: 1 missing (s1/greedy)" in md


def _run_folder(root, rows, cells, step):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "generate" / "data").mkdir(parents=True)
    for i, chunk in enumerate(rows):  # chunks as a resumed generate writes them: any split
        pq.write_table(pa.Table.from_pylist(chunk), root / "generate" / "data" / f"part-{i}.parquet")
    (root / "evaluate").mkdir()
    pq.write_table(pa.Table.from_pylist(cells), root / "evaluate" / "rows.parquet")
    (root / "distill" / "tvdpp" / "model").mkdir(parents=True)
    (root / "distill" / "tvdpp" / "model" / "draftalign_model.json").write_text(json.dumps({"metrics": {"step": step}}))
    return root


def test_check_run_compares_two_run_folders(chaos, tmp_path):
    rows = [_row(f"s{i}/greedy") for i in range(4)]
    cell = {"drafter": "tvd++", "task": "translate", "engine": "reference", "gamma": 2, "temperature": 0.0,
            "prompt_id": "p0", "generated_token_ids": [4, 5]}
    ref = _run_folder(tmp_path / "ref", [rows], [cell], 24)
    same = _run_folder(tmp_path / "same", [rows[2:], rows[:2]], [cell], 24)
    check = chaos.check_run(ref, same, "", [])
    assert chaos.problems(check) == [] and check["set"]["rows"] == 4
    bad = _run_folder(tmp_path / "bad", [rows[1:], rows[3:]], [cell, {**cell, "generated_token_ids": [4, 6]}], 21)
    found = chaos.problems(chaos.check_run(ref, bad, "", []))
    assert "set: 1 missing (s0/greedy)" in found and "set: 1 duplicated (s3/greedy)" in found
    assert any(p.startswith("eval: 1 duplicated") for p in found)
    assert "training: distill/tvdpp not at the reference's last step" in found


def test_a_kill_waits_for_its_kind_and_is_re_aimed_once_the_run_is_past_it(chaos, tmp_path, monkeypatch):
    r = chaos.ChaosRun(1, tmp_path, tmp_path, random.Random(0), Counter(driver=1, train_worker=1, target_actor=1),
                       quota=1, opts=chaos.Options(gap=(0.0, 0.0)))
    stage, alive, killed = ["pretrain"], {"driver": [1]}, []
    monkeypatch.setattr(chaos, "running_stage", lambda run, since: stage[0])
    monkeypatch.setattr(chaos, "present", lambda pid: alive)
    monkeypatch.setattr(r, "kill", lambda proc, t0, log, aimed: killed.append(aimed))
    proc = type("P", (), {"pid": 1})()
    plan = r.schedule(None, proc, 0.0, tmp_path / "log")
    assert plan.aimed == "vllm" and plan.moment is None
    plan = r.schedule(plan, proc, 0.0, tmp_path / "log")
    assert plan.moment is None  # not alive yet: no moment drawn
    stage[0] = "distill"  # the run went past generate without a vLLM engine alive at a look
    plan = r.schedule(plan, proc, 0.0, tmp_path / "log")
    assert plan.aimed != "vllm"
    alive[plan.aimed] = [7]
    plan = r.schedule(r.schedule(plan, proc, 0.0, tmp_path / "log"), proc, 0.0, tmp_path / "log")
    assert plan is None and len(killed) == 1
