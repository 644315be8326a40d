"""The feature drafter through the pipeline (slow: starts Ray): built from the target by
`draftalign pretrain`, distilled with the training-time test on the target's streamed features,
the features cached and served again to a second loss, the export in vLLM's eagle3 format."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.worlds import distill_set, tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"
LOSSES = [{"name": "forward_kl", "drafter_kind": "feature"}, {"name": "lk", "drafter_kind": "feature"}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature")
    tiny_llama(root / "target", seed=0, hidden=64, layers=4)
    distill_set(root / "set", 40, target=root / "target")
    return root


def _run(stage: str, root: Path, out: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    args = [f"run.output={out}", f"models.target={root / 'target'}", "pretrain.only=feature",
            'pretrain.jobs.feature={"arch": {"feature": {"layers": [1, 2, 3]}}, "train": null}',
            f"distill.data={root / 'set'}", "distill.holdout_fraction=0.2", "distill.target_pool.cpus_per_actor=0.5",
            "distill.target_pool.cache=true", "distill.draft_vocab=512", f"distill.losses={json.dumps(LOSSES)}",
            "ray.num_cpus=3", "ray.include_dashboard=false", "distill.optim.warmup_steps=1",
            *[f"distill.train.{k}={v}" for k, v in {"num_workers": 1, "cpus_per_worker": 1, "seq_len": 32,
                                                    "micro_batch_size": 4, "max_steps": 4, "checkpoint_every": 2,
                                                    "log_every": 1, "eval_batches": 1}.items()], *extra]
    proc = subprocess.run([sys.executable, "-m", "draftalign", stage, str(TINY), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_a_feature_drafter_is_built_distilled_on_cached_features_and_exported_for_vllm(world):
    import numpy as np

    from draftalign.models.feature import is_feature_drafter, load_feature_drafter

    out = world / "run"
    built = _run("pretrain", world, out)
    assert "a feature drafter on the target's layers [1, 2, 3]" in built.stdout
    assert is_feature_drafter(out / "pretrain" / "feature" / "model")
    proc = _run("distill", world, out)
    metrics = []
    for folder in ("feature-forward_kl", "feature-lk"):
        model = out / "distill" / folder / "model"
        info = json.loads((model / "draftalign_model.json").read_text())
        assert info["drafter"] == folder and info["loss"]["drafter_kind"] == "feature"
        m = info["metrics"]
        assert m["step"] == 4 and m["pool_restarts"] == 0
        # each unrolled draft is scored on its own; τ is chained over the three
        for j in (1, 2, 3):
            assert 0.0 <= m[f"holdout_expected_acceptance_draft{j}"] <= 1.0
        assert m["holdout_expected_acceptance_draft1"] == pytest.approx(m["holdout_expected_acceptance"])
        assert 1.0 <= m["holdout_tau_gamma3"] <= 4.0
        assert is_feature_drafter(model)
        draft = load_feature_drafter(model)
        assert len(draft.draft_ids) == 512 and draft.spec.target_layers == [1, 2, 3]
        metrics.append(m)
    # The first loss asked the target for every row (log-probs on the 512 tokens and the three layers'
    # features), the second read them all back from the cache.
    assert metrics[0]["pool_cached_rows"] <= 4 and metrics[1]["pool_cached_rows"] >= 16
    assert f"{3 * 64 * 2:,} bytes a position" in proc.stdout  # the features' size is reported
    # A row's log-probs and features are two entries: a standalone drafter reads the first alone.
    entries = {}
    for entry in (out / "distill" / "target_cache").rglob("*.npz"):
        with np.load(entry) as f:
            assert f.files in (["features"], ["support_logprobs"])
            entries.setdefault(f.files[0], []).append(f[f.files[0]].shape)
    assert len(entries["features"]) == len(entries["support_logprobs"]) >= 16
    assert {s[1] for s in entries["features"]} == {3 * 64} and {s[1] for s in entries["support_logprobs"]} == {512}
    # features at every attended position, log-probs at the scored ones
    assert sum(s[0] for s in entries["features"]) > sum(s[0] for s in entries["support_logprobs"])
