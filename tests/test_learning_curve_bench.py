"""bench/learning_curve.py's subsets: nested, every held-out row kept, the tokens counted (its
measurements are in docs/results/learning-curve.md)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from draftalign.training.distillation import holdout_row
from tests.benches import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("learning_curve")


def _rows(n: int) -> pa.Table:
    return pa.table({"id": [f"row-{i}" for i in range(n)],
                     "prompt_token_ids": [[1] * (i % 3 + 1) for i in range(n)],
                     "response_token_ids": [[2] * (i % 5 + 1) for i in range(n)]})


def test_subsets_are_nested_and_keep_every_held_out_row(bench, tmp_path):
    rows, frac = _rows(400), 0.2
    held = {r for r in rows.column("id").to_pylist() if holdout_row(r, frac)}
    assert 0 < len(held) < 400
    kept = {}
    for share in (0.25, 0.5, 1.0):
        counts = bench.write_subset(rows, share, frac, tmp_path / str(share))
        ids = set(pq.read_table(tmp_path / str(share) / "part-0.parquet").column("id").to_pylist())
        assert held <= ids
        assert counts["holdout_rows"] == len(held) and counts["train_rows"] == len(ids - held)
        assert counts["train_rows"] == round(share * (400 - len(held)))
        kept[share] = ids - held
    assert kept[0.25] < kept[0.5] < kept[1.0]
    every = {r["id"]: len(r["prompt_token_ids"]) + len(r["response_token_ids"]) for r in rows.to_pylist()}
    assert bench.write_subset(rows, 1.0, frac, tmp_path / "all")["train_tokens"] == \
        sum(v for k, v in every.items() if k not in held)


def test_the_table_shows_each_point(bench):
    point = {"drafter": "feature-forward_kl", "fraction": 0.5, "train_rows": 10, "train_tokens": 1234,
             "seconds": 60.0, "figures": {"acceptance_draft1": 0.4, "acceptance_draft2": 0.3, "tau": 1.7,
                                          "initial_tau": 1.02}}
    table = bench.report([point, {**point, "drafter": "forward_kl", "figures": {
        "acceptance_draft1": 0.35, "tau": 1.5, "initial_tau": 1.05}}], 3, "cmd")
    assert "| feature-forward_kl | 50% | 10 | 1,234 | 0.400 | 0.300 | 1.020 → 1.700 | 60 |" in table
    assert "| forward_kl | 50% | 10 | 1,234 | 0.350 | – | 1.050 → 1.500 | 60 |" in table
