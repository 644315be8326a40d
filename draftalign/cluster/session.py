"""Starting or joining Ray from the typed config."""

from __future__ import annotations

import os

from draftalign.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Join `ray.address`, else the cluster a Ray job runs in, else start a fresh local Ray.

    "local" is explicit so that a `ray start` cluster left running on a laptop is not joined
    by accident (it would refuse `num_cpus` and mix this run's actors into another's).
    """
    import ray

    if ray.is_initialized():
        return
    if cfg.address:
        ray.init(address=cfg.address)
    elif os.environ.get("RAY_ADDRESS") and os.environ["RAY_ADDRESS"] != "local":
        ray.init()  # inside `draftalign submit`'s job: the job's own cluster
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                 dashboard_host=cfg.dashboard_host)
    from draftalign.util.console import ray_started

    ray_started()  # worker output to RUN/logs/ (the terminal keeps draftalign's progress lines)
