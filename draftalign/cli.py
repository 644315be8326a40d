"""`draftalign STAGE CONFIG [a.b=value ...] [--plan]`: the one place config is validated."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import yaml

from draftalign.config import Config, dump_config, load_config
from draftalign.errors import DraftalignError

STAGES = ("pretrain", "generate", "distill", "evaluate", "run")
# Stages land one issue at a time; until then they say so instead of pretending.
_NOT_BUILT = {"distill": "distillation", "evaluate": "speculative-decoding evaluation"}


def _plan(cfg: Config, stage: str) -> dict:
    from draftalign.pipelines.generate import describe_generate
    from draftalign.pipelines.pretrain import describe_jobs

    plan: dict = {}
    if stage in ("pretrain", "run"):
        plan["pretrain"] = {"ray": cfg.ray.model_dump(), "jobs": describe_jobs(cfg)}
    if stage in ("generate", "run"):
        plan["generate"] = {"ray": cfg.ray.model_dump(), **describe_generate(cfg)}
    if stage in _NOT_BUILT:
        plan[stage] = "not built yet"
    return plan


def _run_stage(cfg: Config, stage: str) -> int:
    if stage in _NOT_BUILT:
        print(f"draftalign {stage}: {_NOT_BUILT[stage]} is not built yet", file=sys.stderr)
        return 2
    if stage in ("pretrain", "run"):
        from draftalign.pipelines.pretrain import run_pretrain

        exported = run_pretrain(cfg)
        for name, path in exported.items():
            print(f"{name}: {path}")
    if stage in ("generate", "run"):
        from draftalign.pipelines.generate import run_generate

        manifest = run_generate(cfg)
        print(f"distillation set: {cfg.generate.output} ({manifest['counts']['rows_in_data']} rows)")
    if stage == "run":
        print("next: distill and evaluate are not built yet; the pretrained models and the distillation "
              "set above are the embedded world's target, drafter and training data", file=sys.stderr)
    return 0


def _stage_command(stage: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        cfg = load_config(args.config, args.overrides)
        if args.plan:
            print(dump_config(cfg), end="")
            print("---")
            print(yaml.safe_dump({"plan": _plan(cfg, stage)}, sort_keys=False), end="")
            return 0
        return _run_stage(cfg, stage)

    return command


def _inspect(args: argparse.Namespace) -> int:
    from draftalign.inspect import inspect_main

    return inspect_main(args.path, args.rows, args.plot, out=sys.stdout)


def _not_built(what: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        print(f"draftalign: {what} is not built yet", file=sys.stderr)
        return 2

    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage" if stage != "run" else "run every stage in order")
        p.add_argument("config", help="YAML config, e.g. examples/tiny.yaml")
        p.add_argument("overrides", nargs="*", help="a.b=value overrides (values parsed as YAML)")
        p.add_argument("--plan", action="store_true", help="print the resolved config and Ray resources, then exit")
        p.set_defaults(func=_stage_command(stage))
    p = sub.add_parser("inspect", help="describe a Parquet data set of the project")
    p.add_argument("path", help="a .parquet file or a stage output folder")
    p.add_argument("--rows", type=int, default=3, help="sample rows to show (default 3)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the token-length histograms")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("submit", help="submit a stage to a Ray cluster through the Jobs API")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_not_built("submit"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DraftalignError, FileNotFoundError) as exc:
        print(f"draftalign: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"draftalign: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
