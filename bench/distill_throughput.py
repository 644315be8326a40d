"""Distillation tokens/s with the target streamed from the pool against the target computed
inside the train worker, side by side in one run.

Both runs distil the same drafter against the same target on the same batches, on the same
machine. The train worker gets all `--cpus` in both (so the same torch threads); the pool run
adds one target actor beside it, which computes the next batch's log-probs while the draft
trains on the current one, and competes with the trainer for the same physical cores.
`--split` instead halves the CPUs between the trainer and the actor (Ray accounting as on a
cluster node). tokens/s (trained response positions) is read from the last log window, so
start-up and the first steps are left out.
Needs the toy world (`make demo-toy`, or pretrain + generate of examples/tiny.yaml) in runs/tiny.
Usage: python bench/distill_throughput.py [--steps N] [--cpus C]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny.yaml"


def run(in_process: bool, cpus: int, steps: int, out: Path, split: bool) -> dict:
    worker_cpus = cpus / 2 if split and not in_process else cpus
    pool = [] if in_process else [f"distill.target_pool.cpus_per_actor={cpus / 2 if split else 1}"]
    args = [
        sys.executable, "-m", "draftalign", "distill", str(TINY), f"distill.output={out}",
        f"ray.num_cpus={cpus + 2}", "ray.include_dashboard=false",
        f"distill.target_pool.in_process={str(in_process).lower()}", *pool,
        f"distill.train.cpus_per_worker={worker_cpus}",
        f"distill.train.max_steps={steps}", f"distill.train.log_every={steps // 2}",
        f"distill.train.checkpoint_every={steps}", "distill.train.eval_batches=1",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"run with in_process={in_process} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "tvdpp" / "model" / "draftalign_model.json").read_text())["metrics"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the train worker")
    ap.add_argument("--split", action="store_true", help="split --cpus between trainer and target actor")
    a = ap.parse_args()
    if not (ROOT / "runs/tiny/generate/data").is_dir():
        sys.exit("no toy world in runs/tiny: run `make demo-toy` (or pretrain and generate) first")
    with tempfile.TemporaryDirectory() as d:
        local = run(True, a.cpus, a.steps, Path(d) / "local", a.split)
        pool = run(False, a.cpus, a.steps, Path(d) / "pool", a.split)
    how = "split between trainer and actor" if a.split else "for the trainer in both runs"
    print(f"distill tokens/s (trained positions), toy target + drafter, {a.cpus} CPUs {how}, {a.steps} steps")
    print(f"  target in the train worker: {local['tokens_per_s']:9.1f}")
    print(f"  target pool (1 actor)     : {pool['tokens_per_s']:9.1f}   trainer waited "
          f"{pool['trainer_wait_s']:.1f} s in all, queue depth {pool['pool_queue_depth']}")
    print(f"  ratio pool / in-process: {pool['tokens_per_s'] / local['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
