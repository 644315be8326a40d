"""`python -m draftalign` is a complete entry point (what `ray job submit ... -- python -m draftalign run` runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_python_m_draftalign_run_plan() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "draftalign", "run", "examples/tiny.yaml", "evaluate.gammas=[3]",
                          "--plan"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    config_text, plan_text = out.stdout.split("\n---\n", 1)
    assert yaml.safe_load(config_text)["evaluate"]["gammas"] == [3]
    plan = yaml.safe_load(plan_text)["plan"]
    assert set(plan) == {"pretrain", "generate", "distill", "evaluate"}


def test_python_m_draftalign_reports_a_bad_key() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "draftalign", "run", "examples/tiny.yaml", "nope.x=1", "--plan"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "draftalign: error:" in out.stderr and "nope" in out.stderr
    assert "usage:" not in out.stderr  # the config's error, not argparse's
