"""Starting or joining Ray from the typed config."""

from __future__ import annotations

import os

from draftalign.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray Data's per-operator progress bars are the long-work progress users expect.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if cfg.address:
        ray.init(address=cfg.address)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                 dashboard_host=cfg.dashboard_host)
