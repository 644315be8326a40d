"""`draftalign STAGE CONFIG [a.b=value ...] [--plan]`: the one place config is validated."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

from draftalign.config import Config, RayConfig, load_config
from draftalign.errors import DraftalignError
from draftalign.util import console
from draftalign.util.redact import dump_config, redact, secret_overrides_from_env

if TYPE_CHECKING:
    from draftalign.pipelines.distill import DistillPlan
    from draftalign.pipelines.evaluate import EvaluatePlan
    from draftalign.pipelines.generate import GeneratePlan
    from draftalign.pipelines.pretrain import JobPlan

STAGES = ("pretrain", "generate", "distill", "evaluate", "run")


@dataclass(frozen=True)
class Plan:
    """What `--plan` shows of a stage (of every stage for `run`), worked out offline without Ray."""

    ray: RayConfig
    pretrain: list[JobPlan] | None = None
    generate: GeneratePlan | None = None
    distill: DistillPlan | None = None
    evaluate: EvaluatePlan | None = None

    def to_dict(self) -> dict[str, dict]:
        """The plan as printed under `plan:` and returned by draftalign.plan_stage, stages in run order;
        each Ray stage leads with the Ray settings it would start or join with."""
        out: dict[str, dict] = {}
        if self.pretrain is not None:
            out["pretrain"] = {"ray": self.ray.model_dump(), "jobs": self.pretrain}
        if self.generate is not None:
            out["generate"] = {"ray": self.ray.model_dump(), **self.generate}
        if self.distill is not None:
            out["distill"] = {"ray": self.ray.model_dump(), **self.distill}
        if self.evaluate is not None:
            out["evaluate"] = dict(self.evaluate)
        return out


def _plan(cfg: Config, stage: str) -> Plan:
    # Each stage's pipeline is imported only when planned, as when it runs.
    jobs = generate = distill = evaluate = None
    if stage in ("pretrain", "run"):
        from draftalign.pipelines.pretrain import describe_jobs

        jobs = describe_jobs(cfg)
    if stage in ("generate", "run"):
        from draftalign.pipelines.generate import describe_generate

        generate = describe_generate(cfg)
    if stage in ("distill", "run"):
        from draftalign.pipelines.distill import describe_distill

        distill = describe_distill(cfg)
    if stage in ("evaluate", "run"):
        from draftalign.pipelines.evaluate import describe_evaluate

        evaluate = describe_evaluate(cfg)
    return Plan(ray=cfg.ray, pretrain=jobs, generate=generate, distill=distill, evaluate=evaluate)


def _run_stage(cfg: Config, stage: str) -> int:
    if stage == "run":
        from draftalign.pipelines.run import run_all

        run_all(cfg)
    elif stage == "pretrain":
        from draftalign.pipelines.pretrain import run_pretrain

        for name, path in run_pretrain(cfg).items():
            print(f"{name}: {path}")
    elif stage == "generate":
        from draftalign.pipelines.generate import run_generate

        manifest = run_generate(cfg)
        print(f"distillation set: {cfg.generate.output} ({manifest['counts']['rows_in_data']} rows)")
    elif stage == "distill":
        from draftalign.pipelines.distill import run_distill

        print(f"distilled drafter: {run_distill(cfg)}")
    else:
        from draftalign.pipelines.evaluate import run_evaluate

        run_evaluate(cfg)
    return 0


def _stage_command(stage: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from draftalign.models.gguf import resolve_sources

        # GGUF models become folders here, once, before Ray starts (a bad file fails now).
        cfg = resolve_sources(load_config(args.config, [*args.overrides, *secret_overrides_from_env()]))
        from draftalign.models.support import check_target

        check_target(cfg, stage)  # a target no stage can handle: one error line, before Ray starts
        if args.plan:
            print(dump_config(cfg), end="")
            print("---")
            print(yaml.safe_dump({"plan": redact(_plan(cfg, stage).to_dict())}, sort_keys=False), end="")
            return 0
        console.setup(cfg.run.output, args.verbose)  # library and worker output: RUN/logs/ (-v: here too)
        return _run_stage(cfg, stage)

    return command


def _inspect(args: argparse.Namespace) -> int:
    from draftalign.data.datasetinfo import inspect_main

    return inspect_main(args.path, args.rows, args.plot, out=sys.stdout)


def _submit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from draftalign.cluster import jobs

    cfg = load_config(args.config, args.overrides)  # validated here: a typo fails before any upload
    job_id = jobs.submit(args.address, args.stage, args.config, args.overrides, args.runtime_env, Path.cwd(), cfg)
    print(f"submitted {args.stage} as job {job_id}")
    print(f"dashboard: {args.address.rstrip('/')}/#/jobs/{job_id}")
    print(f"follow it: draftalign job logs {job_id} --follow --address {args.address}")
    return 0


def _card(args: argparse.Namespace) -> int:
    from draftalign.models.card import write_card

    print(f"model card: {write_card(args.model_dir, args.summary)}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from draftalign.models.hub import push

    push(args.model_dir, args.repo_id, private=args.private, dry_run=args.dry_run)
    return 0


def _job(args: argparse.Namespace) -> int:
    import asyncio

    from draftalign.cluster import jobs

    c = jobs.client(args.address)
    if args.action == "status":
        info = c.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
        return 0 if str(info.status) != "FAILED" else 1
    if args.action == "stop":
        print(f"{args.job_id}: {'stop requested' if c.stop_job(args.job_id) else 'already finished'}")
        return 0
    if not args.follow:
        print(c.get_job_logs(args.job_id), end="")
        return 0

    async def tail() -> None:
        async for lines in c.tail_job_logs(args.job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return 0 if str(c.get_job_status(args.job_id)) == "SUCCEEDED" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage" if stage != "run" else "run every stage in order")
        p.add_argument("config", help="YAML config, e.g. examples/tiny.yaml")
        p.add_argument("overrides", nargs="*", help="a.b=value overrides (values parsed as YAML)")
        p.add_argument("--plan", action="store_true", help="print the resolved config and Ray resources, then exit")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="also print Ray's, Ray Data's, DeepSpeed's and vLLM's output (always in RUN/logs/)")
        p.set_defaults(func=_stage_command(stage))
    p = sub.add_parser("inspect", help="describe a Parquet data set of the project")
    p.add_argument("path", help="a .parquet file or a stage output folder")
    p.add_argument("--rows", type=int, default=3, help="sample rows to show (default 3)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the token-length histograms")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("submit", help="submit a stage (default: the whole run) to a Ray cluster's job server")
    p.add_argument("config", help="YAML config inside this repository (it is uploaded with it)")
    p.add_argument("overrides", nargs="*", help="a.b=value overrides, passed on to the job")
    p.add_argument("--address", required=True, help="the job server, e.g. http://127.0.0.1:8265")
    p.add_argument("--stage", default="run", choices=STAGES)
    p.add_argument("--runtime-env", help="runtime env YAML (default: cluster/runtime_env.yaml)")
    p.set_defaults(func=_submit)
    p = sub.add_parser("job", help="status, logs or stop of a submitted job")
    p.add_argument("action", choices=("status", "logs", "stop"))
    p.add_argument("job_id")
    p.add_argument("--address", required=True, help="the job server, e.g. http://127.0.0.1:8265")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.set_defaults(func=_job)
    p = sub.add_parser("card", help="write README.md, the model card, into an exported drafter folder")
    p.add_argument("model_dir", help="an exported drafter folder (with draftalign_model.json)")
    p.add_argument("--summary", help="evaluate's summary.json (default: the run's evaluate/summary.json)")
    p.set_defaults(func=_card)
    p = sub.add_parser("push", help="upload an exported drafter folder to the Hugging Face Hub")
    p.add_argument("model_dir", help="an exported drafter folder")
    p.add_argument("repo_id", help="the Hub repository, e.g. me/smollm2-drafter")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    p.set_defaults(func=_push)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with flags anywhere: `draftalign run CFG -v a=1 b=2` keeps both overrides
    (argparse alone ends a nargs="*" positional at the first flag and refuses what follows)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides", None) is None or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.func(args)
    except (DraftalignError, FileNotFoundError) as exc:
        _fail(exc)
        return 2
    except OSError as exc:
        _fail(exc)
        return 1
    except Exception as exc:  # a Ray failure: one error line; the traceback is in RUN/logs/ (-v: here)
        if not console.is_ray_failure(exc):
            raise
        _fail(exc)
        return 1


def _fail(exc: BaseException) -> None:
    """Print the error as the run's last line.

    Ray forwards worker logs (a dying engine's crash dump, say) to this process's stderr from a
    background thread; shutting Ray down first stops that, so the reason is not buried under them.
    """
    ray = sys.modules.get("ray")  # never import Ray just to fail
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    print(console.error_line(exc), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
