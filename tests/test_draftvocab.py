"""The reduced draft vocabulary (draftalign/draftvocab.py) and the drafter cut from the target:
losses on a subset against brute force, q = 0 outside it, the sampler still lossless, the
full-vocabulary export, and the target's own weights where copied."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftalign.evaluation.specdecode import speculative_generate
from draftalign.models.arch import draft_from_target, step_weights
from draftalign.models.draftvocab import (
    DRAFT_VOCAB_FILE,
    ReducedHead,
    coverage,
    draft_vocab_ids,
    export_state_dict,
    install_reduced_head,
    load_draft_model,
    read_draft_vocab,
    top_tokens,
    write_draft_vocab,
)
from draftalign.training import losses as L
from draftalign.training.distillation import heldout_sums, masked_logits
from tests.test_specdecode import chi2_critical, chi2_stat, next_probs, tiny_llama

SUBSET = [0, 2, 3, 5, 8, 9]  # of V = 11


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_top_tokens_counts_specials_and_fills_in_id_order():
    rows = [[5, 5, 5, 7], [7, 1], [5]]
    # 5 (4 times), 7 (twice), 1 (once); the special 9 first; then unused ids 0, 2, ... in id order
    assert top_tokens(rows, 4, 10, always=[9]) == [1, 5, 7, 9]
    assert top_tokens(rows, 6, 10) == [0, 1, 2, 3, 5, 7]
    assert top_tokens([], 3, 10) == [0, 1, 2]
    with pytest.raises(ValueError, match="does not fit"):
        top_tokens(rows, 11, 10)
    assert coverage(rows, [5, 7]) == pytest.approx(6 / 7)
    assert coverage([[]], [5]) is None


def _subset_inputs(seed: int, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    full_draft = 2.0 * torch.randn(2, 4, V, generator=g, dtype=torch.float64)
    target = torch.log_softmax(2.0 * torch.randn(2, 4, V, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, -1] = False
    return full_draft[..., SUBSET], target, mask


def _full_q(sub_logits: list[float], V: int = 11) -> list[float]:
    """The draft's full-vocabulary law: softmax over the subset, exactly 0 elsewhere."""
    m = max(sub_logits)
    e = [math.exp(x - m) for x in sub_logits]
    q = [0.0] * V
    for i, v in zip(SUBSET, e, strict=True):
        q[i] = v / sum(e)
    return q


def _bf(name: str, p: list[float], q: list[float]) -> float:
    """Brute force over the full vocabulary (q = 0 outside S), float64 Python."""
    on = [i for i in range(len(p)) if i in SUBSET]
    ps = [p[i] / sum(p[j] for j in on) for i in on]  # p restricted to S, renormalised
    alpha = sum(min(a, b) for a, b in zip(p, q, strict=True))
    fkl_s = sum(a * (math.log(a) - math.log(q[i])) for a, i in zip(ps, on, strict=True))
    if name == "forward_kl":
        return fkl_s
    if name == "reverse_kl":
        return sum(q[i] * (math.log(q[i]) - math.log(p[i])) for i in on)
    if name == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))
    if name == "lk":
        return -math.log(alpha)
    if name == "lk_hybrid":
        w = math.exp(-3.0 * alpha)
        return w * fkl_s + (1 - w) * (1 - alpha)
    r = [1.0 if p[i] > q[i] else 0.0 for i in on]  # tvd++ (vocab): the vocabulary is S
    mu = sum(r) / len(r)
    sd = math.sqrt(sum((x - mu) ** 2 for x in r) / (len(r) - 1))
    return -sum((x - mu) / (sd + 1e-5) * math.log(q[i]) for x, i in zip(r, on, strict=True)) / len(on)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tvd", "tvd++", "lk", "lk_hybrid"])
def test_losses_on_a_subset_match_brute_force(name):
    draft, target, mask = _subset_inputs(seed=3)
    out = L.get_loss(name)(draft, target, mask, draft_vocab=torch.tensor(SUBSET))
    for b in range(2):
        for t in range(4):
            if not mask[b, t]:
                assert out[b, t].item() == 0.0
                continue
            p = target[b, t].exp().tolist()
            assert out[b, t].item() == pytest.approx(_bf(name, p, _full_q(draft[b, t].tolist())), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tvd", "tvd++", "lk", "lk_hybrid"])
def test_target_sent_on_the_subset_only_gives_the_same_loss_and_gradient(name):
    draft, target, mask = _subset_inputs(seed=6)
    ids = torch.tensor(SUBSET)
    on_s = L.SupportTargetLogprobs(L.on_support(target, ids))
    assert on_s.logprobs.shape[-1] == len(SUBSET) < target.shape[-1]
    grads = []
    for t in (target, on_s):
        d = draft.clone().requires_grad_(True)
        out = L.get_loss(name)(d, t, mask, draft_vocab=ids)
        L.masked_mean(out, mask).backward()
        grads.append((out.detach(), d.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_target_on_the_subset_rounded_above_one_is_scaled_back():
    draft, target, mask = _subset_inputs(seed=7)
    ids = torch.tensor(SUBSET)
    # All of p on S, then float16-like rounding up by 0.1%: p(S) = 1.001 must read as 1 (TVD >= 0).
    on_s = torch.log_softmax(L.on_support(target, ids), -1) + math.log(1.001)
    out = L.tvd(draft, L.SupportTargetLogprobs(on_s), mask, draft_vocab=ids)
    exact = L.tvd(draft, L.SupportTargetLogprobs(torch.log_softmax(L.on_support(target, ids), -1)), mask,
                  draft_vocab=ids)
    assert torch.allclose(out, exact, atol=1e-6)
    with pytest.raises(ValueError, match="need that draft_vocab"):
        L.tvd(draft[..., :len(SUBSET)], L.SupportTargetLogprobs(on_s), mask)


def test_subset_losses_refuse_shape_errors_and_topk():
    draft, target, mask = _subset_inputs(seed=4)
    with pytest.raises(ValueError, match="draft_vocab has 5 ids"):
        L.tvd(draft, target, mask, draft_vocab=torch.tensor(SUBSET[:5]))
    with pytest.raises(ValueError, match="top-k"):
        L.tvd(draft, L.sparsify_topk(target, 3), mask, draft_vocab=torch.tensor(SUBSET))


def test_heldout_acceptance_on_a_subset_is_exact():
    draft, target, mask = _subset_inputs(seed=5)
    m = torch.ones(1, 8, dtype=torch.bool)
    sums = heldout_sums(draft.reshape(8, -1), target.reshape(8, -1), m, 3, torch.tensor(SUBSET))
    q = [_full_q(row) for row in draft.reshape(8, -1).tolist()]
    p = target.reshape(8, -1).exp().tolist()
    alpha = sum(sum(min(a, b) for a, b in zip(pr, qr, strict=True)) for pr, qr in zip(p, q, strict=True))
    assert sums["acceptance"] == pytest.approx(alpha, rel=1e-5)
    assert sums["support_mass"] == pytest.approx(sum(sum(pr[i] for i in SUBSET) for pr in p), rel=1e-5)


def test_heldout_sums_from_the_target_on_the_subset_equal_the_full_ones():
    draft, target, mask = _subset_inputs(seed=8)
    m, ids = torch.ones(1, 8, dtype=torch.bool), torch.tensor(SUBSET)
    full = heldout_sums(draft.reshape(8, -1), target.reshape(8, -1), m, 3, ids)
    on_s = heldout_sums(draft.reshape(8, -1), L.SupportTargetLogprobs(L.on_support(target.reshape(8, -1), ids)),
                        m, 3, ids)
    assert on_s.keys() == full.keys()
    for k in full:
        assert on_s[k] == pytest.approx(full[k], rel=1e-5), k


def test_reduced_head_gives_zero_probability_outside_the_subset():
    model = tiny_llama(2, vocab=11, hidden=32, layers=1, heads=2)
    full = model.lm_head.weight.detach().clone()
    head = install_reduced_head(model, SUBSET)
    x = torch.tensor([[1, 4, 7]])
    logits = model(input_ids=x).logits
    outside = [i for i in range(11) if i not in SUBSET]
    assert torch.isinf(logits[..., outside]).all() and (logits[..., outside] < 0).all()
    assert torch.allclose(logits[..., SUBSET], model.model(input_ids=x).last_hidden_state @ full[SUBSET].T, atol=1e-6)
    assert torch.softmax(logits, -1)[..., outside].sum() == 0
    # training sees the subset's logits only
    sub = masked_logits(model, x, torch.ones_like(x), torch.ones_like(x).bool())
    assert sub.shape == (3, len(SUBSET))
    assert isinstance(head, ReducedHead) and torch.equal(draft_vocab_ids(model), torch.tensor(SUBSET))


def test_export_is_a_full_vocabulary_folder_that_loads_back_reduced(tmp_path):
    model = tiny_llama(3, vocab=11, hidden=32, layers=1, heads=2)
    before = model.lm_head.weight.detach().clone()
    head = install_reduced_head(model, SUBSET)
    with torch.no_grad():
        head.weight.add_(1.0)  # "training"
    state = export_state_dict(model, model.state_dict())
    assert state["lm_head.weight"].shape == (11, 32)
    outside = [i for i in range(11) if i not in SUBSET]
    # Zero outside S: an engine loading the full head (vLLM) gives those tokens logit 0 instead
    # of the start's logits, which outbid the trained rows.
    assert not state["lm_head.weight"][outside].any()
    assert torch.equal(state["lm_head.weight"][SUBSET], before[SUBSET] + 1.0)
    model.save_pretrained(str(tmp_path), state_dict=state)
    write_draft_vocab(tmp_path, SUBSET, {"holdout_coverage": 0.9})
    assert read_draft_vocab(tmp_path)["holdout_coverage"] == 0.9
    plain = LlamaForCausalLM.from_pretrained(str(tmp_path))  # what vLLM and transformers get
    assert plain.lm_head.weight.shape == (11, 32) and not plain.config.tie_word_embeddings
    loaded = load_draft_model(str(tmp_path))
    assert torch.equal(draft_vocab_ids(loaded), torch.tensor(SUBSET))
    x = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded(input_ids=x).logits, model(input_ids=x).logits)
    (tmp_path / DRAFT_VOCAB_FILE).write_text('{"ids": []}')
    with pytest.raises(ValueError, match="no token ids"):
        load_draft_model(str(tmp_path))


V_S = 12


def test_sampler_with_a_reduced_drafter_is_lossless():
    """χ² at T = 1: the emitted tokens follow the target's law though q is 0 off the subset."""
    target = tiny_llama(10, vocab=V_S, hidden=32, layers=1, heads=2, lm_scale=12.0)
    draft = tiny_llama(11, vocab=V_S, hidden=32, layers=1, heads=2, lm_scale=4.0)
    install_reduced_head(draft, [0, 1, 3, 4, 6, 7, 9])
    prompt = [3, 1, 4]
    p1 = next_probs(target, [prompt], 1.0, 1.0)[0]
    p2 = next_probs(target, [prompt + [a] for a in range(V_S)], 1.0, 1.0)
    joint = p1[:, None] * p2
    gen = torch.Generator().manual_seed(99)
    counts = torch.zeros(V_S, V_S)
    for _ in range(800):
        t1, t2 = speculative_generate(target, draft, prompt, 2, max_new_tokens=2, temperature=1.0, generator=gen).tokens
        counts[t1, t2] += 1
    stat, df = chi2_stat(counts, joint)
    assert stat < chi2_critical(df), (stat, df)


def test_greedy_with_a_reduced_drafter_equals_the_target():
    target = tiny_llama(0, vocab=64, lm_scale=8.0)
    draft = tiny_llama(1, vocab=64, hidden=32, layers=1, heads=2, lm_scale=4.0)
    install_reduced_head(draft, list(range(0, 64, 2)))
    from draftalign.evaluation.specdecode import autoregressive_generate

    for prompt in ([7], [3, 14, 15, 9]):
        want = autoregressive_generate(target, prompt, 20)
        assert speculative_generate(target, draft, prompt, 3, 20).tokens == want


@pytest.mark.parametrize("tied", [True, False])
def test_draft_from_target_copies_weights_and_all_layers_reproduce_it(tied):
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    target = LlamaForCausalLM(config).eval()
    x = torch.randint(0, 50, (2, 9))
    whole = draft_from_target(target, [0, 1, 2, 3])
    assert torch.allclose(whole(input_ids=x).logits, target(input_ids=x).logits, atol=1e-6)
    cut = draft_from_target(target, [3, 1])
    assert cut.config.num_hidden_layers == 2
    t_state, d_state = target.state_dict(), cut.state_dict()
    for name, tensor in d_state.items():
        source = name.replace("layers.0.", "layers.3.") if "layers.0." in name else name
        assert torch.equal(tensor, t_state[source]), name
    assert torch.equal(cut.model.norm.weight, target.model.norm.weight)
    assert (cut.lm_head.weight is cut.model.embed_tokens.weight) == tied
    # MBSU's cost: an untied input table is read one row per step, a tied one in full (as the head)
    per_layer = sum(p.numel() for p in target.model.layers[0].parameters())
    assert step_weights(cut) == 2 * per_layer + 32 + 50 * 32
    with pytest.raises(ValueError, match="layers 0..3"):
        draft_from_target(target, [4])
