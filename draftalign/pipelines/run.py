"""`draftalign run`: every stage in order, in one run folder.

Each stage reuses its output when it exists for the same inputs and config (pretrain and
distill by fingerprint, generate by row key) and resumes when it was cut short, so
rerunning `draftalign run` after a kill finishes the run instead of redoing it. With
`distill.on_policy.rounds` the distill step is the on-policy rounds (pipelines/rounds.py), each
round a generate and a distill of its own.
`run.output/run_manifest.json` records each stage's output, status and time as it goes;
`run.output/logs/run.log` keeps what the terminal showed; logs/draftalign.log the rest (console.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from draftalign.config import Config
from draftalign.pipelines.locks import locked_output
from draftalign.util.runinfo import RunManifest, StageRun, recorded_step, write_run_info


class _Tee:
    """Write to the terminal and to the run log alike."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if not self.log.closed:  # colorama's atexit reset writes through a Tee the run has closed
            self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextmanager
def _logged(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


def _stages(cfg: Config) -> list[tuple[str, Callable[[Config], Any], str]]:
    from draftalign.pipelines.distill import run_distill
    from draftalign.pipelines.evaluate import run_evaluate
    from draftalign.pipelines.generate import run_generate
    from draftalign.pipelines.pretrain import run_pretrain
    from draftalign.pipelines.rounds import run_rounds

    stages = [("pretrain", run_pretrain, cfg.pretrain.output)] if cfg.pretrain.jobs else []
    # The target's set is generated either way: the rounds mix it in, and hold its seeds out.
    distill = run_rounds if cfg.distill.on_policy.rounds else run_distill
    return stages + [("generate", run_generate, cfg.generate.output),
                     ("distill", distill, cfg.distill.output),
                     ("evaluate", run_evaluate, cfg.evaluate.output)]


@locked_output("run", lambda cfg: cfg.run.output)
def run_all(cfg: Config) -> RunManifest:
    """Run the stages in order; returns the run manifest (also written as it goes)."""
    root = Path(cfg.run.output)
    write_run_info(root, cfg, "run")
    manifest = RunManifest(run=cfg.run.name, output=str(root))
    path = root / "run_manifest.json"
    start = time.time()
    with _logged(root / "logs" / "run.log"):
        for name, fn, output in _stages(cfg):
            entry = StageRun(stage=name, output=output)
            manifest.stages.append(entry)
            print(f"==> [run] {name} -> {output}", flush=True)
            with recorded_step(lambda: manifest.write(path), entry):
                fn(cfg)
        manifest.seconds = round(time.time() - start, 1)
        manifest.report = str(Path(cfg.evaluate.output) / "report.md")
        manifest.write(path)
        print(f"==> [run] done in {manifest.seconds / 60:.1f} min; report: {manifest.report}", flush=True)
    return manifest
