"""cluster/grafana-draftalign.json queries only the metrics draftalign exports (draftalign/cluster/metrics.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from draftalign.cluster.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana-draftalign.json"
NAME = re.compile(r"\bray_(draftalign_[a-z0-9_]+)")


def _panels(items: list[dict]) -> list[dict]:
    out = []
    for p in items:
        out += _panels(p.get("panels", [])) if p.get("type") == "row" else [p]
    return out


def test_every_panel_queries_an_exported_metric() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = _panels(dash["panels"])
    assert panels
    used = set()
    for p in panels:
        assert p.get("targets"), p["title"]
        for t in p["targets"]:
            names = NAME.findall(t["expr"])
            assert names, f"panel {p['title']!r}: {t['expr']!r} names no ray_draftalign_* metric"
            unknown = set(names) - set(METRICS)
            assert not unknown, f"panel {p['title']!r} queries metrics draftalign does not export: {unknown}"
            assert "draftalign_" not in NAME.sub("", t["expr"]), f"an unprefixed draftalign_ name in {t['expr']!r}"
            used.update(names)
    assert used == set(METRICS), f"metrics without a panel: {set(METRICS) - used}"


def test_counters_are_shown_as_rates_and_ids_are_unique() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = _panels(dash["panels"])
    for p in panels:
        for t in p["targets"]:
            for name in NAME.findall(t["expr"]):
                if METRICS[name][0] == "counter":
                    assert f"rate(ray_{name}" in t["expr"], f"counter {name} plotted raw in {p['title']!r}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] == "draftalign"
