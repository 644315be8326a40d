"""Starting or joining Ray from the typed config."""

from __future__ import annotations

from draftalign.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.address:
        ray.init(address=cfg.address)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                 dashboard_host=cfg.dashboard_host)
