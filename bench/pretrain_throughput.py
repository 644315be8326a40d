"""Pretraining tokens/s with 1 and with 2 Ray Train workers, side by side in one run.

Both runs train the same model on the same corpus with the same per-worker micro batch and
share the machine's CPUs between their workers (1 worker x all CPUs vs 2 workers x half).
tokens/s is read from the last log window of each run, so start-up and the first steps
are left out. Usage: python bench/pretrain_throughput.py [--steps N] [--cpus C]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"


def run(workers: int, cpus: int, steps: int, out: Path) -> float:
    args = [
        sys.executable, "-m", "draftalign", "pretrain", str(TINY), f"run.output={out}", "pretrain.only=target",
        f"ray.num_cpus={cpus + 1}",
        f"pretrain.jobs.target.train.num_workers={workers}",
        f"pretrain.jobs.target.train.cpus_per_worker={cpus / workers}",
        f"pretrain.jobs.target.train.max_steps={steps}",
        f"pretrain.jobs.target.train.log_every={steps // 2}",
        f"pretrain.jobs.target.train.checkpoint_every={steps}",
        "pretrain.jobs.target.train.micro_batch_size=8",
        "pretrain.jobs.target.train.eval_batches=1",
    ]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run with {workers} worker(s) failed:\n{proc.stderr[-3000:]}")
    info = json.loads((out / "pretrain" / "target" / "model" / "draftalign_model.json").read_text())
    return float(info["metrics"]["tokens_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs shared by the workers of each run")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        one = run(1, a.cpus, a.steps, Path(d) / "w1")
        two = run(2, a.cpus, a.steps, Path(d) / "w2")
    print(f"pretrain tokens/s, toy target, {a.cpus} CPUs, {a.steps} steps")
    print(f"  1 worker : {one:9.1f}")
    print(f"  2 workers: {two:9.1f}")
    print(f"  ratio 2 workers / 1 worker: {two / one:.2f}")


if __name__ == "__main__":
    main()
