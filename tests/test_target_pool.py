"""The target pool's pieces that need no Ray: the per-sequence disk cache and padding trim."""

import numpy as np
import pytest

from draftalign.config import TargetPoolConfig
from draftalign.training.distillation import trim_padding
from draftalign.workers.target_pool import LogprobCache

V = 5


def _batch(rows: list[list[int]], masks: list[list[int]]) -> dict[str, np.ndarray]:
    ids = np.array(rows)
    return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "loss_mask": np.array(masks)}


class CountingTarget:
    """A stand-in for the target: position t of a row gets log-probs (row sum + t) per token id."""

    def __init__(self) -> None:
        self.rows_computed = 0

    def __call__(self, batch):
        self.rows_computed += len(batch["input_ids"])
        out = []
        for ids, mask in zip(batch["input_ids"], batch["loss_mask"], strict=True):
            for t in np.flatnonzero(mask):
                out.append(np.full(V, ids.sum() + t, dtype=np.float16))
        return {"logprobs": np.stack(out) if out else np.zeros((0, V), np.float16)}


def test_the_cache_computes_each_sequence_once_and_answers_in_row_order(tmp_path):
    cache, target = LogprobCache(str(tmp_path), TargetPoolConfig()), CountingTarget()
    first = _batch([[1, 2, 3, 0], [4, 5, 6, 7]], [[0, 1, 1, 0], [0, 0, 1, 1]])
    expected = target(first)["logprobs"]
    target.rows_computed = 0
    assert np.array_equal(cache.logprobs(target, first)["logprobs"], expected)
    assert target.rows_computed == 2 and cache.hits == 0
    # The same two rows, swapped, beside a new one: only the new row reaches the target, and
    # the reply is in the batch's row order.
    mixed = _batch([[4, 5, 6, 7], [9, 9, 9, 0], [1, 2, 3, 0]], [[0, 0, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0]])
    want = CountingTarget()(mixed)["logprobs"]
    assert np.array_equal(cache.logprobs(target, mixed)["logprobs"], want)
    assert target.rows_computed == 3 and cache.hits == 2
    # Another loss mask over the same tokens is another entry (other positions travel).
    other = _batch([[1, 2, 3, 0]], [[1, 1, 1, 0]])
    assert cache.logprobs(target, other)["logprobs"].shape == (3, V) and target.rows_computed == 4


def test_another_wire_format_does_not_read_the_entries_of_the_first(tmp_path):
    batch, target = _batch([[1, 2, 3]], [[0, 1, 1]]), CountingTarget()
    LogprobCache(str(tmp_path), TargetPoolConfig()).logprobs(target, batch)
    LogprobCache(str(tmp_path), TargetPoolConfig(wire_dtype="float32")).logprobs(target, batch)
    assert target.rows_computed == 2


def test_trimming_trailing_padding_changes_no_target_log_prob():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftalign.workers.target_pool import target_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    batch = _batch([[1, 5, 6, 7, 0, 0, 0, 0], [1, 8, 9, 0, 0, 0, 0, 0]],
                   [[0, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    assert trim_padding(batch)["input_ids"].shape == (2, 4)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(batch["input_ids"]),
                       attention_mask=torch.tensor(batch["attention_mask"])).logits
    full = torch.log_softmax(logits[torch.tensor(batch["loss_mask"]).bool()], -1)
    got = target_logprobs(model, batch, None, "float32")["logprobs"]
    assert got == pytest.approx(full.numpy(), abs=1e-5)


def test_target_on_a_draft_vocabulary_sends_those_columns_and_caches_apart(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftalign.workers.target_pool import TargetComputer, target_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    batch = _batch([[1, 5, 6, 7], [1, 8, 9, 3]], [[0, 1, 1, 1], [1, 1, 1, 0]])
    support = (3, 0, 17, 63, 8)
    full = target_logprobs(model, batch, None, "float32")["logprobs"]
    on_s = target_logprobs(model, batch, None, "float32", support)["support_logprobs"]
    assert on_s.shape == (6, len(support))
    assert np.array_equal(on_s, full[:, list(support)])  # normalised over all 64 tokens, not over S
    cfg = TargetPoolConfig()
    reduced = TargetComputer(model, cfg, str(tmp_path), support)(batch)
    whole = TargetComputer(model, cfg, str(tmp_path))(batch)
    # Same rows, two wire formats: the second must not be served the first's cached entries.
    assert reduced["cached_rows"] == 0 and whole["cached_rows"] == 0
    assert whole["logprobs"].shape == (6, 64) and reduced["support_logprobs"].shape == (6, 5)
    assert TargetComputer(model, cfg, str(tmp_path), support)(batch)["cached_rows"] == 2


class FeatureTarget(CountingTarget):
    """CountingTarget plus features: attended position t of a row gets (row sum, t)."""

    def __call__(self, batch):
        out = super().__call__(batch)
        feats = [[ids.sum(), t] for ids, attn in zip(batch["input_ids"], batch["attention_mask"], strict=True)
                 for t in np.flatnonzero(attn)]
        return {**out, "features": np.array(feats, dtype=np.float16)}


def test_features_are_cached_per_attended_position_and_log_probs_are_shared_with_a_standalone_drafter(tmp_path):
    batch = _batch([[1, 2, 3, 0], [4, 5, 6, 7]], [[0, 1, 1, 0], [0, 0, 1, 1]])
    target = FeatureTarget()
    want = target(batch)
    target.rows_computed = 0
    featured = LogprobCache(str(tmp_path), TargetPoolConfig(), feature_layers=[2, 5])
    got = featured.logprobs(target, batch)
    assert np.array_equal(got["features"], want["features"]) and np.array_equal(got["logprobs"], want["logprobs"])
    again = featured.logprobs(target, batch)  # a second pass: all from disk
    assert np.array_equal(again["features"], want["features"]) and target.rows_computed == 2
    # a standalone drafter on the same set reads the log-probs the feature pass left, not the features
    plain = LogprobCache(str(tmp_path), TargetPoolConfig())
    only = plain.logprobs(CountingTarget(), batch)
    assert set(only) == {"logprobs"} and plain.hits == 2 and np.array_equal(only["logprobs"], want["logprobs"])
    # other layers are other features: computed again
    other = LogprobCache(str(tmp_path), TargetPoolConfig(), feature_layers=[1, 5])
    other.logprobs(target, batch)
    assert other.hits == 0 and target.rows_computed == 4
