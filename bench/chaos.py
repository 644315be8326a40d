"""Chaos: whole `draftalign run`s under random kill -9s, checked against an uninterrupted run.

The world is the project's smallest whole pipeline (the one `tests/test_submit_ray.py` submits,
plus a corpus-pretrained drafter so that the build stage trains too): a random one-layer Llama
target made here, `pretrain` of a small drafter on 40 standard-library files (Ray Data + Ray
Train), `generate` of 16 seeds x (greedy, T = 1) with vLLM, `distill` (Ray Train, one target
actor), `evaluate` on the reference engine. Each run has a folder of its own under --out.

1. the reference: the run once, uninterrupted;
2. chaos runs, each in a fresh folder: the same command, and at random moments (seeded) a
   SIGKILL to one of four process kinds: the driver (`draftalign run`), the vLLM engine actor,
   a Ray Train worker, the target pool's actor. The kind aimed at is the one killed least so
   far (ties drawn) among those the run can still reach, so the kills cover every kind; once it
   is alive the kill falls a random 2-30 s later (--gap), and when it is no longer alive then it
   is recorded as "not present" and the least-killed kind that is alive is killed instead. Every
   process is found below the driver this script started (Ray titles its workers `ray::Class`),
   never by a name on the machine. After a kill that ends the run (the driver's, or one Ray does
   not absorb), the same command runs again until it completes (--max-attempts per run);
3. the checks, against the reference: the distillation set row for row (ids, token ids); every
   training job at its last step, and after a kill while it trained resumed from a checkpoint,
   not from step 0; every evaluation cell and prompt, once; no lock or temporary file left; no
   stale input read (fingerprints and the data files distillation read are the current ones);
4. the report: markdown (--report) and JSON beside it.

    .venv/bin/python bench/chaos.py --kills 20 --runs 3 --seed 0 --report docs/chaos.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The tests find a run's processes from outside the same way: one copy, in tests/procs.py.
from tests.procs import command_line, descendants, ray_processes  # noqa: E402

CONFIG = ROOT / "examples" / "tiny.yaml"
KINDS = ("driver", "vllm", "train_worker", "target_actor")
# Ray titles a worker process `ray::Class.method` (`ray::MapWorker(MapBatches(vLLMEngineStageUDF))`
# for the engine of ray.data.llm): the class names below pick each kind among the driver's descendants.
TITLES = {"vllm": "vLLMEngineStageUDF", "train_worker": "RayTrainWorker", "target_actor": "TargetActor"}
LOCK_NAME = ".draftalign.lock"  # draftalign/pipelines/locks.py
SMALL_ARCH = ("{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
              "num_attention_heads: 2, num_key_value_heads: 2}")


# ---------------------------------------------------------------- the world and its command

def make_target(folder: Path) -> Path:
    """A random one-layer Llama (hidden 64) with the embedded tokenizer, as tests/worlds.py makes it."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftalign.data.tokenization import materialize_tokenizer

    materialize_tokenizer("embedded", folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    return folder


def overrides(run: Path, target: Path) -> list[str]:
    """examples/tiny.yaml cut to a few minutes: a drafter pretrained 12 steps, 32 rows generated,
    24 distillation steps, one held-out prompt per task. Checkpoints every 3 steps, so a kill in
    training always has one to resume from once the first is saved."""
    train = {"num_workers": 1, "cpus_per_worker": 1, "max_steps": 12, "checkpoint_every": 3, "log_every": 1,
             "micro_batch_size": 2, "seq_len": 64, "eval_batches": 2}
    return [f"run.output={run}", "run.name=chaos", f"models.target={target}", "pretrain.only=draft",
            "pretrain.corpus.max_documents=40", "pretrain.corpus.holdout_fraction=0.2",
            *[f"pretrain.jobs.draft.train.{k}={v}" for k, v in train.items()],
            f"pretrain.jobs.draft.arch.overrides={SMALL_ARCH}", "pretrain.jobs.draft.optim.warmup_steps=1",
            "generate.max_seeds=16",
            "generate.sampling=[{name: greedy, temperature: 0, max_tokens: 16}, "
            "{name: t1.0, temperature: 1.0, top_p: 0.95, max_tokens: 16}]",
            "generate.engine.max_model_len=256", "generate.engine.batch_size=4",
            "distill.holdout_fraction=0.3", "distill.train.max_steps=24", "distill.train.checkpoint_every=3",
            "distill.train.seq_len=48", "distill.train.micro_batch_size=4", "distill.train.log_every=1",
            "distill.train.eval_batches=1", "distill.target_pool.cpus_per_actor=0.5",
            "evaluate.gammas=[2]", "evaluate.temperatures=[0.0]", "evaluate.max_prompts=1",
            "evaluate.max_new_tokens=8"]


def command(run: Path, target: Path) -> list[str]:
    return [sys.executable, "-m", "draftalign", "run", str(CONFIG), *overrides(run, target)]


# ---------------------------------------------------------------- processes of this script's runs

def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def present(driver: int) -> dict[str, list[int]]:
    """{kind: live pids} of every kind alive now below `driver` (the driver itself included)."""
    found: dict[str, list[int]] = {k: [] for k in KINDS}
    if _alive(driver):
        found["driver"].append(driver)
    for kind, name in TITLES.items():
        found[kind] += sorted(pid for pid in ray_processes(driver, name) if _alive(pid))
    return {k: v for k, v in found.items() if v}


# ---------------------------------------------------------------- what a run folder says

def running_stage(run: Path, since: float = 0.0) -> str | None:
    """The stage run_manifest.json marks running (the run writes it at each stage's start and end);
    None before this attempt (started at `since`) has written it: a killed attempt's is stale."""
    path = run / "run_manifest.json"
    try:
        if path.stat().st_mtime < since:
            return None
        stages = json.loads(path.read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return None
    return next((s["stage"] for s in reversed(stages) if s.get("status") == "running"), None)


def checkpoints(run: Path) -> dict[str, int]:
    """{Ray Train run name: step of its newest registered checkpoint}, for jobs not exported yet."""
    out = {}
    for snap in run.rglob("checkpoint_manager_snapshot.json"):
        job_dir = snap.parent.parent.parent  # JOB/ray/RUN_NAME/checkpoint_manager_snapshot.json
        if (job_dir / "model" / "draftalign_model.json").is_file():
            continue  # finished: nothing left to resume
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):  # being replaced
            continue
        if latest:
            out[snap.parent.name] = int(latest["metrics"]["step"])
    return out


# ---------------------------------------------------------------- the kill loop

@dataclass
class Kill:
    run: int
    attempt: int
    aimed: str  # the kind chosen (least killed so far)
    kind: str  # the kind killed: `aimed`, or another alive one when it was not present
    pid: int
    stage: str | None  # the stage run_manifest.json marked running
    at_s: float  # seconds into the attempt
    checkpoints: dict[str, int]  # registered checkpoint step of every unfinished training job
    log_pos: int  # offset into the run's attempt logs, all attempts one after the other
    # Processes below the killed one still alive once it died: for the driver 30 s after the kill,
    # for an actor at the attempt's end (a vLLM engine core outliving its actor holds its memory).
    orphans: int = 0


@dataclass
class Attempt:
    run: int
    index: int
    rc: int | None
    seconds: float
    log: str
    paused_s: float = 0.0  # frozen (SIGSTOP) while another job ran: see Options.pause_while


@dataclass
class Plan:
    aimed: str
    moment: float | None = None  # set once the aimed kind is alive


# The stages each kind lives in: a kill aimed at a kind waits for it while the run can still get there.
LIVES_IN = {"driver": ("start-up", "pretrain", "generate", "distill", "evaluate"), "vllm": ("generate",),
            "train_worker": ("pretrain", "distill"), "target_actor": ("distill",)}


def can_appear(kind: str, stage: str | None) -> bool:
    order = LIVES_IN["driver"]
    now = order.index(stage or "start-up")
    return any(order.index(s) >= now for s in LIVES_IN[kind])


@dataclass
class Options:
    gap: tuple[float, float] = (2.0, 30.0)  # seconds from the aimed kind alive to its kill, drawn uniformly
    max_attempts: int = 12
    attempt_timeout: float = 900.0
    pause_while: str | None = None  # a command-line fragment: the soak holds while such a process runs


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            break
    return out


def busy(fragment: str) -> bool:
    """Whether a process other than this script (and its shells) has `fragment` in its command line."""
    mine = _ancestors(os.getpid())  # this script's own command line holds the text too
    return any(fragment in command_line(int(p.parent.name)) and int(p.parent.name) not in mine
               for p in Path("/proc").glob("[0-9]*/cmdline"))


def wait_for_quiet(fragment: str | None) -> None:
    """On a shared machine, start no attempt while another job's process (its command line holding
    `fragment`) runs: the soak's load would skew that job's timings."""
    while fragment and busy(fragment):
        print(f"[chaos] waiting: a process with {fragment!r} in its command line is running", flush=True)
        time.sleep(60)


def _starttime(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class ChaosRun:
    """One whole run in its own folder: start the command, kill at random moments while the quota
    lasts, rerun after a kill that ended it, until it completes or the attempts run out."""

    def __init__(self, index: int, folder: Path, target: Path, rng: random.Random, tally: Counter,
                 quota: int, opts: Options) -> None:
        self.index, self.folder, self.cmd = index, folder, command(folder / "run", target)
        self.rng, self.tally, self.quota, self.opts = rng, tally, quota, opts
        self.kills: list[Kill] = []
        self.attempts: list[Attempt] = []
        self.log_base = 0  # bytes of the earlier attempts' logs
        self.tree: dict[int, str | None] = {}  # every process this run started: pid -> start time
        self.below: list[tuple[Kill, dict[int, str | None]]] = []  # each actor kill: what ran below it
        self.next_look = 0.0  # when freeze_while_busy next reads the machine's command lines

    def run(self) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        while len(self.attempts) < self.opts.max_attempts:
            attempt = self.attempt()
            self.attempts.append(attempt)
            if attempt.rc == 0:
                return True
        return False

    def attempt(self) -> Attempt:
        wait_for_quiet(self.opts.pause_while)
        log = self.folder / f"attempt-{len(self.attempts) + 1}.log"
        env = {**os.environ, "DRAFTALIGN_VERBOSE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        t0 = time.time()
        with log.open("wb") as out:
            # A session of its own: the kill of the driver's group never reaches this script.
            proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                    start_new_session=True)
            plan: Plan | None = None
            hung, paused = False, 0.0
            while proc.poll() is None:
                self.track(proc.pid)
                if self.quota > 0:
                    plan = self.schedule(plan, proc, t0, log)
                paused += self.freeze_while_busy()
                if time.time() - t0 - paused > self.opts.attempt_timeout:
                    hung = True  # a finding: the report shows exit code None
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.5)
        self.count_orphans()
        self.reap()
        self.log_base += log.stat().st_size
        return Attempt(self.index, len(self.attempts) + 1, None if hung else proc.returncode,
                       round(time.time() - t0, 1), str(log), round(paused, 1))

    def track(self, driver: int) -> None:
        """Remember every process below the driver, so what a killed driver orphans can be found."""
        for pid in descendants(driver) | {driver}:
            self.tree[pid] = _starttime(pid)

    def schedule(self, plan: Plan | None, proc: subprocess.Popen, t0: float, log: Path) -> Plan | None:
        """Aim at the least-killed kind that can still appear in this attempt; once it is alive,
        kill at a random moment up to `gap` later (it may be gone by then: not present)."""
        stage = running_stage(self.folder / "run", t0)
        if plan is None or (plan.moment is None and not can_appear(plan.aimed, stage)):
            return Plan(self.aim(stage))
        if plan.moment is None:
            if plan.aimed in present(proc.pid):
                plan.moment = time.time() + self.rng.uniform(*self.opts.gap)
            return plan
        if time.time() < plan.moment:
            return plan
        self.kill(proc, t0, log, plan.aimed)
        return None

    def aim(self, stage: str | None) -> str:
        kinds = [k for k in KINDS if can_appear(k, stage)]
        least = min(self.tally[k] for k in kinds)
        return self.rng.choice([k for k in kinds if self.tally[k] == least])

    def choose(self, aimed: str, alive: dict[str, list[int]]) -> str:
        """The kind to kill: `aimed`, or the least-killed alive one when it is not present."""
        if aimed in alive:
            return aimed
        least = min(self.tally[k] for k in alive)
        return self.rng.choice(sorted(k for k in alive if self.tally[k] == least))

    def freeze_while_busy(self) -> float:
        """On a shared machine: while another job named by Options.pause_while runs, hold this
        attempt's whole tree stopped (SIGSTOP) so it takes no CPU from it. Returns the seconds held."""
        if not self.opts.pause_while or time.time() < self.next_look:
            return 0.0
        self.next_look = time.time() + 5.0  # reading every command line is not free
        if not busy(self.opts.pause_while):
            return 0.0
        t0, pids = time.time(), [p for p in self.tree if _alive(p)]
        for sig in (signal.SIGSTOP, signal.SIGCONT):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGSTOP:
                wait_for_quiet(self.opts.pause_while)
        return time.time() - t0

    def kill(self, proc: subprocess.Popen, t0: float, log: Path, aimed: str) -> None:
        run = self.folder / "run"
        alive = present(proc.pid)
        if "driver" not in alive:
            return  # it is ending on its own
        kind = self.choose(aimed, alive)
        pid = self.rng.choice(alive[kind])
        # What a resume must start from, read before the kill: a checkpoint registered later is newer.
        saved, stage = checkpoints(run), running_stage(run, t0)
        self.track(proc.pid)
        below = {p: _starttime(p) for p in descendants(pid)}
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # ended between the look and the kill: the next moment tries again
            return
        self.tally[kind] += 1
        self.quota -= 1
        kill = Kill(self.index, len(self.attempts) + 1, aimed, kind, pid, stage, round(time.time() - t0, 1),
                    saved, self.log_base + log.stat().st_size)
        self.kills.append(kill)
        print(f"[chaos] run {self.index} attempt {kill.attempt}: kill -9 {kind} (pid {pid}, aimed {aimed}) "
              f"in {stage} at {kill.at_s:.0f} s; checkpoints {saved}", flush=True)
        if kind == "driver":
            proc.wait()
            deadline = time.time() + 30.0  # Ray's processes follow a dead driver: what is left then is orphaned
            while time.time() < deadline and self._left():
                time.sleep(0.5)
            self.count_orphans()
            kill.orphans = self.reap(grace=0.0)
        else:
            self.below.append((kill, below))

    def count_orphans(self) -> None:
        """For each actor killed in this attempt: how many of the processes below it outlived it."""
        for kill, below in self.below:
            kill.orphans = sum(_alive(p) and _starttime(p) == start for p, start in below.items())
        self.below = []

    def reap(self, grace: float = 10.0) -> int:
        """Wait `grace` s for what this run started to end (Ray's processes follow a dead driver),
        then SIGKILL the rest; only pids whose start time is still the one recorded (never a reused pid)."""
        deadline = time.time() + grace
        while time.time() < deadline and self._left():
            time.sleep(0.5)
        left = self._left()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.tree = {}
        return len(left)

    def _left(self) -> list[int]:
        return [p for p, start in self.tree.items() if _alive(p) and _starttime(p) == start]


# ---------------------------------------------------------------- the checks (pure, unit-tested)

def compare_rows(ref: list[dict], got: list[dict], key, fields: tuple[str, ...]) -> dict[str, Any]:
    """Row for row: the keys missing, extra and duplicated in `got`, and those whose `fields` differ."""
    counts = Counter(key(r) for r in got)
    by_ref, by_got = {key(r): r for r in ref}, {}
    for r in got:
        by_got.setdefault(key(r), r)
    differ = [k for k in by_ref.keys() & by_got.keys()
              if any(_plain(by_ref[k][f]) != _plain(by_got[k][f]) for f in fields)]
    return {"rows": len(got), "reference_rows": len(ref),
            "missing": sorted(map(str, by_ref.keys() - by_got.keys())),
            "extra": sorted(map(str, by_got.keys() - by_ref.keys())),
            "duplicated": sorted(str(k) for k, n in counts.items() if n > 1),
            "differ": sorted(map(str, differ))}


def _plain(value: Any) -> Any:
    return list(value) if hasattr(value, "__len__") and not isinstance(value, (str, bytes, dict)) else value


# `[distill tvd++] 1 worker(s), ...` opens every start of a trainer (workers/trainer.py); the line
# after it says where the start went on from.
TRAIN_LINE = re.compile(r"\[(pretrain|distill) ([^\]\s]+)\] (\d+ worker\(s\)|resumed from checkpoint at step (\d+)"
                        r"|the run finished earlier|before training|step (\d+)/\d+)")


def train_events(text: str) -> list[dict[str, Any]]:
    """Every start, resume and step line of a trainer in the attempts' logs, in order."""
    out = []
    for m in TRAIN_LINE.finditer(text):
        what = m.group(3)
        kind = ("start" if "worker(s)" in what else "resumed" if m.group(4) else
                "finished" if "finished" in what else "fresh" if what == "before training" else "step")
        step = int(m.group(4) or m.group(5) or 0)
        # The Ray Train run name's tail (pipelines/distill.py: the label with + as p).
        out.append({"pos": m.start(), "job": f"{m.group(1)}-{m.group(2).replace('+', 'p')}", "event": kind,
                    "step": step})
    return out


def restarts(text: str, kills: list[dict]) -> list[dict[str, Any]]:
    """For each kill and each training job that held a registered checkpoint then: where the job
    went on from. `from_step_0` (a fresh start) or `resumed_older` (before the checkpoint) lose
    training; `resumed` and `finished` do not; `not_restarted`: the job never started again
    (the kill did not stop it, e.g. a target actor the pool replaced)."""
    events, out = train_events(text), []
    for i, k in enumerate(kills):
        for run_name, saved in k["checkpoints"].items():
            mine = [e for e in events if e["pos"] >= k["log_pos"] and run_name.endswith(e["job"])]
            start = next((j for j, e in enumerate(mine) if e["event"] == "start"), None)
            after = mine[start + 1] if start is not None and start + 1 < len(mine) else None
            if start is None:
                verdict, step = "not_restarted", None
            elif after is None:
                verdict, step = "unknown", None
            elif after["event"] == "resumed":
                verdict, step = ("resumed" if after["step"] >= saved else "resumed_older"), after["step"]
            elif after["event"] == "finished":
                verdict, step = "finished", None
            else:
                verdict, step = "from_step_0", 0
            out.append({"kill": i, "job": run_name, "checkpoint": saved, "went_on_from": step, "verdict": verdict})
    return out


def leftovers(run: Path) -> list[str]:
    """Locks and temporary files a finished run must not leave: `.draftalign.lock`, atomicio's
    `.NAME.*.tmp`, publish_model's `model.tmp` / `model.old` (Ray Train's own folders excepted)."""
    found = []
    for p in run.rglob("*"):
        rel = p.relative_to(run)
        if "ray" in rel.parts[:-1] and p.name != LOCK_NAME:
            continue
        if p.name == LOCK_NAME or p.name.endswith(".tmp") or p.name.endswith(".old"):
            found.append(str(rel))
    return sorted(found)


def stale_reads(run: Path) -> list[str]:
    """Inputs of an earlier attempt a stage may have read: each training job's fingerprint must be
    the same in job.json, run_info.json and its export, and distillation must have read exactly
    the data files generate holds now."""
    problems = []
    for job in sorted(run.rglob("job.json")):
        d = job.parent
        fps = {name: _json(d / name).get("fingerprint") for name in ("job.json", "run_info.json")}
        fps["model"] = _json(d / "model" / "draftalign_model.json").get("fingerprint")
        if len(set(fps.values())) != 1:
            problems.append(f"{d.relative_to(run)}: fingerprints differ {fps}")
    data = sorted(str(p.resolve()) for p in (run / "generate" / "data").glob("*.parquet"))
    for info in sorted((run / "distill").glob("*/run_info.json")):
        read = sorted(str(Path(p).resolve()) for p in _json(info).get("data_files", []))
        if read != data:
            problems.append(f"{info.parent.relative_to(run)} read {len(read)} data files, generate holds {len(data)}: "
                            f"{sorted(set(read) ^ set(data))[:4]}")
    return problems


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def trained_steps(run: Path) -> dict[str, int | None]:
    """{exported model: the step it exported at} of every training job."""
    return {str(p.parent.parent.relative_to(run)): _json(p).get("metrics", {}).get("step")
            for p in sorted(run.rglob("model/draftalign_model.json")) if "ray" not in p.parts}


def set_rows(run: Path) -> list[dict]:
    import pyarrow.parquet as pq

    cols = ["row_key", "id", "prompt_token_ids", "response_token_ids"]
    return [r for f in sorted((run / "generate" / "data").glob("part-*.parquet"))
            for r in pq.read_table(f, columns=cols).to_pylist()]


def eval_rows(run: Path) -> list[dict]:
    import pyarrow.parquet as pq

    path = run / "evaluate" / "rows.parquet"
    return pq.read_table(path).to_pylist() if path.is_file() else []


def eval_key(r: dict) -> tuple:
    return (r["drafter"], r["task"], r["engine"], r["gamma"], r["temperature"], r["prompt_id"])


def check_run(ref: Path, run: Path, text: str, kills: list[dict]) -> dict[str, Any]:
    """Everything the chaos run must share with the reference, and what it must not leave behind."""
    data = compare_rows(set_rows(ref), set_rows(run), lambda r: r["row_key"],
                        ("id", "prompt_token_ids", "response_token_ids"))
    cells = compare_rows(eval_rows(ref), eval_rows(run), eval_key, ())
    # At T = 0 the target's greedy answer is the same whatever drafter proposes (exact verification).
    greedy = [r for r in eval_rows(ref) if r["temperature"] == 0]
    greedy_run = [r for r in eval_rows(run) if r["temperature"] == 0]
    cells["greedy_outputs_differ"] = compare_rows(greedy, greedy_run, eval_key, ("generated_token_ids",))["differ"]
    steps_ref, steps = trained_steps(ref), trained_steps(run)
    return {"set": data, "eval": cells, "steps": steps,
            "steps_short": sorted(k for k in steps_ref if steps.get(k) != steps_ref[k]),
            "restarts": restarts(text, kills), "leftovers": leftovers(run), "stale": stale_reads(run),
            "manifest": _json(run / "run_manifest.json").get("stages", [])}


def problems(check: dict[str, Any]) -> list[str]:
    """What the checks found wrong, one line each (empty: the run lost nothing)."""
    out = []
    for part in ("set", "eval"):
        for what in ("missing", "extra", "duplicated", "differ"):
            if check[part][what]:
                out.append(f"{part}: {len(check[part][what])} {what} ({', '.join(check[part][what][:3])})")
    if check["eval"].get("greedy_outputs_differ"):
        out.append(f"eval: {len(check['eval']['greedy_outputs_differ'])} greedy outputs differ")
    out += [f"training: {k} not at the reference's last step" for k in check["steps_short"]]
    out += [f"training: {r['job']} went on from step {r['went_on_from']} after kill {r['kill']} with a checkpoint "
            f"at step {r['checkpoint']}" for r in check["restarts"] if r["verdict"] in ("from_step_0", "resumed_older")]
    out += [f"left behind: {p}" for p in check["leftovers"]] + [f"stale: {p}" for p in check["stale"]]
    return out


# ---------------------------------------------------------------- the report

def totals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The soak's figures over every chaos run (each run: kills, attempts, check, completed, seconds)."""
    kills = [k for r in runs for k in r["kills"]]
    checks = [r["check"] for r in runs if r.get("check")]
    verdicts = Counter(x["verdict"] for c in checks for x in c["restarts"])
    return {
        "runs": len(runs), "completed": sum(r["completed"] for r in runs),
        "attempts": sum(len(r["attempts"]) for r in runs), "kills": len(kills),
        "kills_by_kind": dict(Counter(k["kind"] for k in kills)),
        "not_present": dict(Counter(k["aimed"] for k in kills if k["aimed"] != k["kind"])),
        "kills_by_stage": {f"{k}/{s}": n for (k, s), n in Counter((k["kind"], k["stage"] or NO_STAGE)
                                                                    for k in kills).items()},
        "orphans_killed": sum(k["orphans"] for k in kills),
        "rows_missing": sum(len(c["set"]["missing"]) for c in checks),
        "rows_duplicated": sum(len(c["set"]["duplicated"]) for c in checks),
        "rows_differ": sum(len(c["set"]["differ"]) for c in checks),
        "eval_missing": sum(len(c["eval"]["missing"]) for c in checks),
        "eval_duplicated": sum(len(c["eval"]["duplicated"]) for c in checks),
        "restarts": dict(verdicts),
        "restarts_from_step_0_with_checkpoint": verdicts["from_step_0"] + verdicts["resumed_older"],
        "leftovers": sum(len(c["leftovers"]) for c in checks), "stale": sum(len(c["stale"]) for c in checks),
        "problems": [p for r in runs for p in r.get("problems", [])],
        "seconds": round(sum(r["seconds"] for r in runs), 1),
    }


def markdown(report: dict[str, Any]) -> str:
    t, ref = report["totals"], report["reference"]
    lines = ["# Chaos: whole runs under kill -9", "",
             f"`{report['command']}` at commit `{report['commit']}`, {report['date']}, {report['machine']}; "
             f"wall time {report['wall_s'] / 60:.1f} min. Written by `bench/chaos.py` (`make bench-chaos`).", "",
             *ABOUT, "",
             f"The reference run took {ref['seconds']:.0f} s uninterrupted (exit {ref['rc']}); its set has "
             f"{ref['rows']} rows and its evaluation {ref['eval_rows']} per-prompt rows.", "",
             "| figure | value |", "|---|---:|",
             f"| chaos runs (completed) | {t['runs']} ({t['completed']}) |", f"| attempts | {t['attempts']} |",
             f"| kills | {t['kills']} |"]
    lines += [f"| kills of the {k} | {t['kills_by_kind'].get(k, 0)} |" for k in KINDS]
    lines += [f"| aimed at the {k}, not present | {t['not_present'].get(k, 0)} |" for k in KINDS]
    lines += [f"| set rows lost / duplicated / different | {t['rows_missing']} / {t['rows_duplicated']} / "
              f"{t['rows_differ']} |",
              f"| evaluation rows lost / duplicated | {t['eval_missing']} / {t['eval_duplicated']} |",
              f"| training restarts from step 0 (or an older checkpoint) where a checkpoint existed | "
              f"{t['restarts_from_step_0_with_checkpoint']} |",
              f"| resumes after a kill in training: {', '.join(f'{k} {n}' for k, n in sorted(t['restarts'].items()))}"
              f" | |", f"| locks or temporary files left | {t['leftovers']} |",
              f"| stale inputs read | {t['stale']} |", f"| processes left 30 s after a killed driver, or outliving a "
              f"killed actor (then killed) | {t['orphans_killed']} |", "", "Kills by kind and the stage they landed in (no stage: the driver starting Ray, between two "
              "stages, or shutting down after the last):", "",
              "| kind | " + " | ".join(STAGES) + " |", "|---|" + "---:|" * len(STAGES)]
    for k in KINDS:
        lines.append(f"| {k} | " + " | ".join(str(t["kills_by_stage"].get(f"{k}/{s}", 0)) for s in STAGES) + " |")
    lines += ["", "| run | attempts (exit codes) | kills | completed | seconds | problems |", "|---|---|---|---|---:|---|"]
    for r in report["runs"]:
        rcs = ", ".join(str(a["rc"]) for a in r["attempts"])
        kinds = ", ".join(f"{k['kind']}@{k['stage'] or NO_STAGE}" for k in r["kills"])
        lines.append(f"| {r['index']} | {len(r['attempts'])} ({rcs}) | {kinds} | {r['completed']} | "
                     f"{r['seconds']:.0f} | {'; '.join(r.get('problems', [])) or 'none'} |")
    lines += ["", "Problems found: " + ("none." if not t["problems"] else ""), *[f"- {p}" for p in t["problems"]]]
    return "\n".join(lines) + "\n"


# A kill outside every stage: the driver starting (Ray, the config), between two stages, or after
# the last one (shutting Ray down): run_manifest.json marks no stage running then.
NO_STAGE = "no stage"
STAGES = (NO_STAGE, "pretrain", "generate", "distill", "evaluate")
ABOUT = [
    "The world is the smallest whole pipeline: a random one-layer Llama target, a drafter pretrained 12 "
    "steps on 40 standard-library files (Ray Data, Ray Train), 16 seeds x (greedy, T = 1) answered by vLLM, "
    "24 distillation steps (Ray Train and one target actor), 9 evaluation cells on the reference engine; "
    "checkpoints every 3 steps. A reference run goes uninterrupted; each chaos run, in a folder of its own, "
    "gets SIGKILLs at random moments (seeded) to the driver (`draftalign run`), the vLLM engine actor, the "
    "Ray Train worker or the target actor, each found below the driver the script started. The kind aimed "
    "at is the one killed least so far among those the run can still reach; the kill falls a random time "
    "after it is alive (`--gap`), and when it is gone by then it counts as not present and the least-killed "
    "alive kind is killed. A run ended by a kill is rerun with the same command until it "
    "completes. Then, against the reference: the distillation set row for row (row key, id, prompt and "
    "response token ids), every training job at its last step and, after each kill while it trained, "
    "resumed at or after the checkpoint registered before the kill (the trainers' `resumed from checkpoint "
    "at step N` lines), every evaluation cell and prompt once (and the greedy outputs, which exact "
    "verification makes the target's whatever the drafter), no `.draftalign.lock`, `*.tmp` or `*.old` left, "
    "and no stale input (each job's fingerprint the same in job.json, run_info.json and its export; "
    "distillation read exactly the data files generate holds).",
]


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "draftalign"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + (" (draftalign/ modified)" if dirty else "")


# ---------------------------------------------------------------- the soak

def run_record(r: ChaosRun, completed: bool, t0: float) -> dict[str, Any]:
    return {"index": r.index, "folder": str(r.folder), "completed": completed, "seconds": round(time.time() - t0, 1),
            "attempts": [asdict(a) for a in r.attempts], "kills": [asdict(k) for k in r.kills]}


def attempt_text(r: ChaosRun) -> str:
    """The attempts' logs one after the other (Kill.log_pos points into this)."""
    return "".join(Path(a.log).read_text(errors="replace") for a in r.attempts)


@dataclass
class Soak:
    out: Path
    kills: int
    min_runs: int
    max_runs: int
    rng: random.Random
    opts: Options
    report_path: Path
    argv: list[str]
    tally: Counter = field(default_factory=Counter)
    runs: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.time)
    commit: str = field(default_factory=lambda: git_commit())  # the code the soak runs, read at its start

    def start(self) -> None:
        wait_for_quiet(self.opts.pause_while)
        self.target = make_target(self.out / "target")
        self.ref = ChaosRun(0, self.out / "reference", self.target, self.rng, Counter(), 0, self.opts)
        run = self.ref.folder / "run"
        manifest = _json(run / "run_manifest.json")
        if manifest.get("report") and (self.ref.folder / "attempt-1.log").is_file():
            rc, seconds = 0, manifest["seconds"]  # made uninterrupted by an earlier soak into this --out
        elif self.ref.run():
            rc, seconds = self.ref.attempts[-1].rc, self.ref.attempts[-1].seconds
        else:
            sys.exit(f"the reference run failed: see {self.ref.attempts[-1].log}")
        self.reference = {"seconds": seconds, "rc": rc,
                          "rows": len(set_rows(run)), "eval_rows": len(eval_rows(run)),
                          "steps": trained_steps(run), "leftovers": leftovers(run), "stale": stale_reads(run),
                          "stages": _json(run / "run_manifest.json").get("stages", [])}

    def chaos(self) -> None:
        while len(self.runs) < self.max_runs and (sum(len(r["kills"]) for r in self.runs) < self.kills
                                                  or len(self.runs) < self.min_runs):
            left = self.kills - sum(len(r["kills"]) for r in self.runs)
            quota = max(0, -(-left // max(self.min_runs - len(self.runs), 1)))
            index = len(self.runs) + 1
            r = ChaosRun(index, self.out / f"chaos-{index}", self.target, self.rng, self.tally, quota, self.opts)
            t0 = time.time()
            completed = r.run()
            rec = run_record(r, completed, t0)
            if completed:
                try:
                    rec["check"] = check_run(self.ref.folder / "run", r.folder / "run", attempt_text(r), rec["kills"])
                    rec["problems"] = problems(rec["check"])
                except Exception as exc:  # a broken check must not cost the soak its other runs
                    rec["problems"] = [f"the check failed: {exc!r}"]
            else:
                rec["problems"] = [f"run {index} did not complete in {len(r.attempts)} attempts"]
            self.runs.append(rec)
            self.write()  # after every run: a soak cut short still leaves its figures

    def write(self) -> None:
        report = {"command": " ".join(["python", "bench/chaos.py", *self.argv]), "commit": self.commit,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                  "wall_s": round(time.time() - self.t0, 1), "out": str(self.out),
                  "run_command": " ".join(command(Path("RUN"), Path("TARGET"))[1:]),
                  "reference": self.reference, "runs": self.runs, "totals": totals(self.runs)}
        self.report_path.parent.mkdir(parents=True, exist_ok=True)
        self.report_path.write_text(markdown(report))
        self.report_path.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")


def machine() -> str:
    return f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="kills over all chaos runs (at least)")
    ap.add_argument("--runs", type=int, default=3, help="whole chaos runs the kills are spread over (at least)")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (default 3 x --runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="the run folders (default: a new temporary folder)")
    ap.add_argument("--report", default=str(ROOT / "docs" / "chaos.md"), help="markdown; JSON beside it")
    ap.add_argument("--gap", type=float, nargs=2, default=(2.0, 30.0), metavar=("MIN", "MAX"),
                    help="seconds from the aimed kind alive to its kill, drawn uniformly")
    ap.add_argument("--max-attempts", type=int, default=12, help="attempts per run before it counts as lost")
    ap.add_argument("--pause-while", default=None, metavar="TEXT",
                    help="hold the soak (its run stopped) while a process whose command line holds TEXT runs")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="draftalign-chaos-"))
    out.mkdir(parents=True, exist_ok=True)
    soak = Soak(out.resolve(), args.kills, args.runs, args.max_runs or 3 * args.runs, random.Random(args.seed),
                Options(gap=tuple(args.gap), max_attempts=args.max_attempts, pause_while=args.pause_while), Path(args.report), argv)
    print(f"[chaos] run folders under {soak.out}", flush=True)
    soak.start()
    soak.chaos()
    soak.write()
    t = totals(soak.runs)
    print(f"[chaos] {t['kills']} kills {t['kills_by_kind']}, {t['completed']}/{t['runs']} runs completed, "
          f"{len(t['problems'])} problems; report {args.report}", flush=True)


if __name__ == "__main__":
    main()
