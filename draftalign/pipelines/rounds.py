"""On-policy rounds (`distill.on_policy.rounds` N ≥ 1), the distill step of `draftalign run`:
the current drafter answers the seeds (generate, with the drafter as generate.generator), the
target scores those answers and a share λ of the training rows comes from them (distill), and
the new drafter answers again, N times over.

Each round is an ordinary generate and an ordinary distill run with a config derived from the
run's, so each keeps its stage's rules: round R of a loss lives in
`distill.output/rounds/round-R/<drafter folder>/` (`set/` the drafter's answers, `model/` the
drafter distilled from them), a rerun reuses a finished round by its fingerprints and resumes a
cut one, and a set or drafter made otherwise is refused unless generate.overwrite /
distill.overwrite say so. Only pipelines/run.py calls this module; it calls the two stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from draftalign.config import Config, LossConfig, deep_merge
from draftalign.models.identity import absolute_model_path
from draftalign.pipelines.locks import locked_output
from draftalign.util.atomicio import write_json_atomic
from draftalign.util.runinfo import recorded_step


# A chain file is rewritten as each round starts and ends, so its records stay mutable.
@dataclass
class RoundRun:
    """One on-policy round: who generated its set, then its status, drafter and seconds once known."""

    round: int
    generator: str
    set: str
    status: str | None = None
    model: str | None = None
    seconds: float | None = None

    def to_json(self) -> dict[str, int | str | float]:
        # In the order they become known: status first, the model while it runs, seconds at the end.
        out: dict[str, int | str | float] = {"round": self.round, "generator": self.generator, "set": self.set}
        for key in ("status", "model", "seconds"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass
class RoundChain:
    """`distill.output/rounds/<drafter folder>.json`: one loss's rounds, from its starting drafter."""

    drafter: str
    fraction: float
    start: str
    rounds: list[RoundRun] = field(default_factory=list)

    def write(self, path: Path) -> None:
        write_json_atomic(path, {"drafter": self.drafter, "fraction": self.fraction, "start": self.start,
                                 "rounds": [r.to_json() for r in self.rounds]})


def round_config(cfg: Config, loss: LossConfig, r: int, drafter: str) -> Config:
    """The config of round r for `loss`: `drafter` (the previous round's, or the starting one)
    generates the round's set and is where its distillation starts."""
    op = cfg.distill.on_policy
    folder = cfg.round_dir(loss, r)
    data = cfg.model_dump(mode="json")
    patch: dict[str, Any] = {
        "generate": {"output": str(folder / "set"), "generator": drafter,
                     "sampling": [s.model_dump(mode="json") for s in (op.sampling or cfg.generate.sampling)]},
        "distill": {
            "output": str(folder.parent), "init_from": drafter, "losses": [loss.model_dump(mode="json")],
            # The target's set stays the run's (its default follows generate.output, moved above).
            "data": cfg.distill_data_path(),
            "on_policy": {"fraction": op.fraction, "rounds": 0, "data": str(folder / "set"), "round": r,
                          "sampling": None},
            # One target cache for every round: the target's set is scored once.
            "target_pool": {"cache_dir": cfg.distill.target_pool.cache_dir
                            or str(Path(cfg.distill.output) / "target_cache")},
        },
    }
    return Config.model_validate(deep_merge(data, patch))


def _start(cfg: Config) -> str:
    """The drafter round 1 generates with and starts from: distill.init_from, else the pretrained one."""
    return absolute_model_path(cfg.distill.init_from or cfg.draft_path())


@locked_output("distill", lambda cfg: cfg.distill.output)
def run_rounds(cfg: Config) -> list[Path]:
    """Every loss's N rounds, one after the other; returns each loss's last drafter.

    `distill.output/rounds/<drafter folder>.json` records each round's set, drafter, status and
    time: one file per chain, so runs of other λ sharing distill.output keep theirs."""
    from draftalign.pipelines.distill import run_distill
    from draftalign.pipelines.generate import run_generate

    op = cfg.distill.on_policy
    finals = []
    for loss in cfg.distill.losses:
        drafter = _start(cfg)
        chain = RoundChain(drafter=cfg.distill.drafter_label(loss), fraction=op.fraction, start=drafter)
        path = cfg.round_dir(loss, 1).parent.parent / f"{cfg.distill.drafter_folder(loss)}.json"
        for r in range(1, op.rounds + 1):
            rcfg = round_config(cfg, loss, r, drafter)
            entry = RoundRun(round=r, generator=drafter, set=rcfg.generate.output)
            chain.rounds.append(entry)
            print(f"==> [rounds] {rcfg.distill.drafter_label(loss)}: generate with {drafter}", flush=True)
            with recorded_step(lambda chain=chain, path=path: chain.write(path), entry):
                run_generate(rcfg)
                [model] = run_distill(rcfg)
                drafter = entry.model = str(model)
        finals.append(Path(drafter))
    return finals
