"""The feature drafter (EAGLE-3 style): its inputs, the training-time-test unroll, its folder, and
exact speculative decoding with it on the reference engine."""

from __future__ import annotations

import pytest
import torch

from draftalign.evaluation.featurespec import FeatureProposer
from draftalign.evaluation.specdecode import autoregressive_generate, speculative_generate
from draftalign.models.feature import (
    default_layers,
    feature_from_target,
    feature_spec,
    is_feature_drafter,
    load_feature_drafter,
    restrict_head,
    save_feature_drafter,
    ttt_mask,
    unrolled_logits,
)
from tests.test_specdecode import V_SMALL, chi2_critical, chi2_stat, next_probs, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0, vocab=64, hidden=64, layers=6, heads=2, lm_scale=8.0)


def _features(target, ids: torch.Tensor, layers) -> torch.Tensor:
    with torch.no_grad():
        hs = target(input_ids=ids, output_hidden_states=True).hidden_states
    return torch.cat([hs[i] for i in layers], dim=-1)


def _trained_like(draft, seed: int = 0, scale: float = 0.3):
    """The start's weights, perturbed everywhere: a drafter that reads both of its inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() + 0.02))
    return draft.eval()


def test_default_layers_are_a_low_a_middle_and_a_high_one():
    assert default_layers(30) == [2, 15, 27]  # SmolLM2's 30 layers: vLLM's own choice
    assert default_layers(32) == [2, 16, 29]
    assert default_layers(6) == [0, 3, 5] and default_layers(1) == [0]


def test_the_start_reads_the_chosen_layers_and_the_targets_weights(target):
    spec = feature_spec(target.config)
    draft = feature_from_target(target, spec)
    h = target.config.hidden_size
    assert spec.target_layers == [0, 3, 5]
    assert draft.fc.weight.shape == (h, 3 * h)
    # fc starts as the identity on the highest layer read, zero on the others
    assert torch.equal(draft.fc.weight[:, 2 * h:], torch.eye(h)) and not draft.fc.weight[:, :2 * h].any()
    first = draft.layers[0]
    assert first.self_attn.q_proj.weight.shape[1] == 2 * h  # [embedding | fused feature]
    last = target.model.layers[-1]
    assert torch.equal(first.self_attn.q_proj.weight[:, h:], last.self_attn.q_proj.weight)
    assert not first.self_attn.q_proj.weight[:, :h].any()
    assert torch.equal(draft.embed_tokens.weight, target.model.embed_tokens.weight)
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)
    with pytest.raises(ValueError, match="distinct layers"):
        feature_spec(target.config, [1, 6])


def test_the_next_tokens_embedding_and_the_features_both_reach_the_output(target):
    draft = _trained_like(feature_from_target(target, feature_spec(target.config)))
    ids = torch.tensor([[5, 9, 2, 7, 3, 8]])
    feats = _features(target, ids, draft.spec.target_layers)
    base = unrolled_logits(draft, feats, ids, 1)[0]
    other_next = ids.clone()
    other_next[0, 3] = 11  # x_3 is the next token of position 2 only (before position 3's attention)
    changed = (unrolled_logits(draft, feats, other_next, 1)[0] - base).abs().amax(-1)[0]
    assert changed[2] > 0 and torch.all(changed[:2] == 0)
    more = feats.clone()
    more[0, 4] += 1.0  # position 4's features reach position 4 and later, not earlier
    changed = (unrolled_logits(draft, more, ids, 1)[0] - base).abs().amax(-1)[0]
    assert changed[4] > 0 and torch.all(changed[:4] == 0)


def test_ttt_mask_reads_the_anchors_prefix_and_the_chain_only():
    m = ttt_mask(5, 3, torch.device("cpu"))
    # step 3 at t = 4: anchor 2; step 1's keys 0..2, step 2's at 3, its own at 4
    assert m[4].tolist() == [True, True, True, False, False] + [False, False, False, True, False] \
        + [False, False, False, False, True]
    assert ttt_mask(4, 1, torch.device("cpu")).equal(torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("decoder_layers", [1, 2])
def test_the_unroll_equals_a_naive_step_by_step_chain(target, decoder_layers):
    spec = feature_spec(target.config, decoder_layers=decoder_layers)
    draft = _trained_like(feature_from_target(target, spec))
    restrict_head(draft, list(range(0, 64, 2)))
    ids = torch.tensor([[5, 9, 2, 7, 3, 8, 1, 4, 6, 10], [3, 14, 15, 9, 26, 5, 35, 8, 9, 7]])
    feats = _features(target, ids, spec.target_layers)
    steps = 3
    with torch.no_grad():
        unrolled = unrolled_logits(draft, feats, ids, steps)
        for b in range(2):
            for anchor in range(ids.shape[1] - steps):
                cache: list = []  # the inference path: prefill to the anchor, then chain on own outputs
                logits, hidden = draft.step(draft.fuse(feats[b:b + 1, :anchor + 1]), ids[b:b + 1, 1:anchor + 2],
                                            torch.arange(anchor + 1), cache)
                for j in range(1, steps + 1):
                    t = anchor + j - 1
                    assert torch.allclose(logits[0, -1], unrolled[j - 1][b, t], atol=1e-5), (b, anchor, j)
                    if j == steps:
                        break
                    logits, hidden = draft.step(hidden[:, -1:], ids[b:b + 1, t + 2:t + 3], torch.tensor([t + 1]),
                                                cache)


def test_the_folder_is_vllms_eagle3_format_and_reloads(target, tmp_path):
    from safetensors import safe_open

    draft = _trained_like(feature_from_target(target, feature_spec(target.config, verifier="t")))
    ids = [1, 2, 3, 10, 40, 63]
    restrict_head(draft, ids)
    save_feature_drafter(draft, tmp_path)
    assert is_feature_drafter(tmp_path) and not is_feature_drafter(tmp_path / "nothing")
    import json

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["draft_vocab_size"] == 6
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 3, 5]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
        assert f.get_tensor("lm_head.weight").shape == (6, 64)
    assert (d2t + torch.arange(6)).tolist() == ids  # draft id + d2t[draft id] = target id
    assert t2d.nonzero().flatten().tolist() == ids
    back = load_feature_drafter(tmp_path)
    x = torch.tensor([[5, 9, 2, 7]])
    feats = _features(target, x, draft.spec.target_layers)
    with torch.no_grad():
        assert torch.equal(unrolled_logits(back, feats, x, 2)[1], unrolled_logits(draft, feats, x, 2)[1])


@pytest.mark.parametrize("gamma", [1, 3])
def test_greedy_decoding_with_the_feature_drafter_equals_the_target(target, gamma):
    draft = feature_from_target(target, feature_spec(target.config))
    restrict_head(draft, list(range(0, 64, 2)) + [63])  # some target tokens can never be drafted
    for prompt in [[7], [3, 14, 15, 9], [26, 5, 35, 8, 9, 7, 9]]:
        want = autoregressive_generate(target, prompt, 20)
        res = speculative_generate(target, FeatureProposer(draft), prompt, gamma, 20)
        assert res.tokens == want
        assert res.iterations[0].num_drafted == 0  # the target's prefill drafts nothing
        assert all(r.num_drafted == min(gamma, 20 - sum(x.num_emitted for x in res.iterations[:i]) - 1)
                   for i, r in enumerate(res.iterations[1:], start=1))
    # the start reads the target's own high layer through its last layer: it agrees sometimes
    assert res.stats.num_accepted > 0


def test_sampled_output_follows_the_target():
    target = tiny_llama(10, vocab=V_SMALL, hidden=64, layers=4, heads=2, lm_scale=12.0)
    draft = _trained_like(feature_from_target(target, feature_spec(target.config)), scale=0.1)
    prompt, gamma, runs = [3, 1, 4], 2, 1000
    # the exact law of the second and third emitted tokens, after the first (the prefill's)
    p1 = next_probs(target, [prompt], 1.0, 1.0)[0]
    p2 = next_probs(target, [prompt + [a] for a in range(V_SMALL)], 1.0, 1.0)
    joint12 = p1[:, None] * p2
    pairs = [prompt + [a, b] for a in range(V_SMALL) for b in range(V_SMALL)]
    marg3 = (joint12.flatten()[:, None] * next_probs(target, pairs, 1.0, 1.0)).sum(0)
    gen = torch.Generator().manual_seed(1234)
    counts12, counts3 = torch.zeros(V_SMALL, V_SMALL), torch.zeros(V_SMALL)
    accepted = 0
    for _ in range(runs):
        res = speculative_generate(target, FeatureProposer(draft), prompt, gamma, max_new_tokens=4,
                                   temperature=1.0, generator=gen)
        t1, t2, t3 = res.tokens[:3]
        counts12[t1, t2] += 1
        counts3[t3] += 1
        accepted += res.iterations[1].num_accepted
    for counts, probs in [(counts12, joint12), (counts3, marg3)]:
        stat, df = chi2_stat(counts, probs)
        assert stat < chi2_critical(df), (stat, df)
    assert accepted > 0  # the drafts were used, not all rejected
