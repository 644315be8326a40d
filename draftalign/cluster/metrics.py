"""The project's Ray dashboard metrics (Prometheus export), all named `draftalign_*`.

Ray prefixes custom metrics with `ray_` on its Prometheus endpoint, so
`draftalign_distill_loss` is scraped as `ray_draftalign_distill_loss`. Every metric carries
a `stage` tag. Metrics are created on first use, inside whatever Ray process records them,
and recording is a no-op when Ray is not running (unit tests, --plan).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.util.metrics import Metric

# name -> (kind, description); the README's metrics table is this list.
METRICS: dict[str, tuple[str, str]] = {
    "draftalign_generated_rows_total": ("counter", "distillation rows written"),
    "draftalign_generated_tokens_total": ("counter", "tokens the target generated"),
    "draftalign_generation_tokens_per_s": ("gauge", "generation throughput of the last write"),
    "draftalign_distill_loss": ("gauge", "distillation loss of the last log window"),
    "draftalign_distill_tokens_per_s": ("gauge", "trained positions per second"),
    "draftalign_expected_acceptance": ("gauge", "held-out expected acceptance sum min(p, q)"),
    "draftalign_target_pool_queue_depth": ("gauge", "target-pool requests in flight ahead of the trainer"),
    "draftalign_trainer_wait_seconds_total": ("counter", "time the trainer waited for target log-probs"),
    "draftalign_target_tokens_total": ("counter", "positions the target pool scored"),
    "draftalign_eval_block_efficiency": ("gauge", "block efficiency tau of an evaluation cell"),
}

_created: dict[str, Metric] = {}  # a Counter or Gauge per name and tag keys


def _metric(name: str, tag_keys: tuple[str, ...]):
    from ray.util import metrics

    key = f"{name}:{','.join(tag_keys)}"
    if key not in _created:
        kind, description = METRICS[name]
        cls = metrics.Counter if kind == "counter" else metrics.Gauge
        _created[key] = cls(name, description=description, tag_keys=tag_keys)
    return _created[key]


def record(name: str, value: float, **tags: str) -> None:
    """Set a gauge or add to a counter; silently nothing outside a Ray process."""
    import ray

    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; add it to draftalign.cluster.metrics.METRICS")
    if not ray.is_initialized() or value is None:
        return
    tags = {k: str(v) for k, v in tags.items()}
    m = _metric(name, tuple(sorted(tags)))
    if METRICS[name][0] == "counter":
        if value > 0:
            m.inc(float(value), tags=tags)
    else:
        m.set(float(value), tags=tags)
