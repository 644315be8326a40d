"""Pure pieces of the distill stage: sequences, the held-out split, implied block efficiency,
and the target pool's wire format (computed in process, no Ray)."""

import itertools

import numpy as np
import pytest
import torch

from draftalign.evaluation.metrics import implied_block_efficiency
from draftalign.training.distillation import (
    build_sequences,
    chained_block_efficiency,
    heldout_means,
    heldout_sums,
    holdout_row,
)
from draftalign.training.losses import SparseTargetLogprobs, densify_topk


def test_sequences_mark_the_positions_that_predict_response_tokens():
    out = build_sequences([[1, 10, 11]], [[20, 21, 2]], seq_len=8, include_prompt=False, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 10, 11, 20, 21, 2, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]
    # logits at 2 predict 20, at 3 predict 21, at 4 predict EOS; nothing after the last token.
    assert out["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 0, 0]]
    with_prompt = build_sequences([[1, 10, 11]], [[20, 21, 2]], 8, True, 0)["loss_mask"]
    assert with_prompt.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]


def test_sequences_are_cut_at_the_end_and_empty_responses_train_nothing():
    out = build_sequences([[1, 10], [1, 5, 6, 7]], [[20, 21, 22, 23], []], seq_len=4, include_prompt=False, pad_id=9)
    assert out["input_ids"].tolist() == [[1, 10, 20, 21], [1, 5, 6, 7]]
    assert out["loss_mask"].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]
    assert out["input_ids"].dtype == np.int64


def test_holdout_split_is_by_seed_and_stable():
    ids = [f"s-{i}" for i in range(2000)]
    held = [i for i in ids if holdout_row(i, 0.1)]
    assert 150 < len(held) < 250
    assert held == [i for i in ids if holdout_row(i, 0.1)]
    assert not any(holdout_row(i, 0.0) for i in ids)


def _brute_tau(alpha, mask, gamma):
    B, T = alpha.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b, t in itertools.product(range(B), range(T)):
        if t + gamma > T or not all(mask[b, t + j] for j in range(gamma)):
            continue
        total, run = 1.0, 1.0
        for j in range(gamma):
            run *= float(alpha[b, t + j])
            total += run
        out[b, t] = total
    return out


def test_chained_block_efficiency_matches_a_loop_and_the_iid_formula():
    g = torch.Generator().manual_seed(0)
    alpha = torch.rand(3, 9, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, :2] = False
    for gamma in (1, 3, 5):
        assert torch.allclose(chained_block_efficiency(alpha, mask, gamma), _brute_tau(alpha, mask, gamma))
    flat = torch.full((1, 6), 0.7, dtype=torch.float64)
    tau = chained_block_efficiency(flat, torch.ones(1, 6, dtype=torch.bool), 3)
    assert tau[0, 0].item() == pytest.approx(implied_block_efficiency(0.7, 3))
    assert (tau[0, 4:] == 0).all()  # blocks that would run past the end are not counted


def test_heldout_sums_of_a_perfect_draft():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    sel = logits[: int(mask.sum())]
    means = heldout_means(heldout_sums(sel, torch.log_softmax(sel, -1), mask, 2), 2)
    # Σ min(p, q) is named expected acceptance, unlike evaluate's draft acceptance rate (accepted / drafted)
    assert means["holdout_expected_acceptance"] == pytest.approx(1.0) and "holdout_acceptance" not in means
    assert means["holdout_tvd"] == pytest.approx(0.0, abs=1e-6)
    assert means["holdout_forward_kl"] == pytest.approx(0.0, abs=1e-5)
    assert means["holdout_tau_gamma2"] == pytest.approx(3.0)
    assert heldout_means({}, 2) == {}



def test_heldout_forward_kl_is_finite_where_the_target_has_no_mass():
    """A top-k target (or a masked vocabulary) gives log p = -inf: 0 · log 0 counts 0, as in losses.forward_kl."""
    from draftalign.training.losses import forward_kl

    g = torch.Generator().manual_seed(2)
    draft = torch.randn(4, 10, generator=g)
    target = torch.log_softmax(torch.randn(4, 10, generator=g), -1)
    target[:, 7:] = float("-inf")
    mask = torch.ones(1, 4, dtype=torch.bool)
    fkl = heldout_sums(draft, target, mask, 2)["forward_kl"]
    assert np.isfinite(fkl)
    assert fkl == pytest.approx(float(forward_kl(draft[None], target[None], mask).sum()), rel=1e-5)

def _tiny_llama(vocab=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def test_target_logprobs_on_the_wire_full_and_topk():
    from draftalign.workers.target_pool import target_logprobs

    model = _tiny_llama()
    batch = build_sequences([[1, 5, 6], [1, 7]], [[8, 9, 2], [3]], 8, False, 0)
    mask = torch.as_tensor(batch["loss_mask"]).bool()
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.as_tensor(batch["input_ids"]),
                                      attention_mask=torch.as_tensor(batch["attention_mask"])).logits, -1)[mask]
    full = target_logprobs(model, batch, None, "float16")["logprobs"]
    assert full.dtype == np.float16 and full.shape == (int(mask.sum()), 64)
    assert np.abs(full.astype(np.float32) - ref.numpy()).max() < 2e-2  # float16 rounding of log p
    exact = target_logprobs(model, batch, None, "float32")["logprobs"]
    assert np.allclose(exact, ref.numpy(), atol=1e-5)
    top = target_logprobs(model, batch, 5, "float32")
    assert top["values"].shape == top["indices"].shape == (int(mask.sum()), 5)
    dense = densify_topk(SparseTargetLogprobs(torch.from_numpy(top["indices"]).long(),
                                              torch.from_numpy(top["values"])), 64)
    kept = torch.from_numpy(top["indices"]).long()
    assert torch.allclose(dense.gather(-1, kept), ref.gather(-1, kept), atol=1e-5)


def test_distill_refuses_missing_inputs_before_starting_ray(tmp_path, capsys):
    from pathlib import Path

    from draftalign.cli import main

    tiny = str(Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml")
    assert main(["distill", tiny, f"run.output={tmp_path}", f"models.target={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot load the target" in err and "nowhere" in err
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, hidden in (("target", 64), ("draft", 32)):
        LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / name)
    args = ["distill", tiny, f"run.output={tmp_path}", f"models.target={tmp_path / 'target'}",
            f"distill.init_from={tmp_path / 'draft'}"]
    assert main(args) == 2
    assert "no distillation set" in capsys.readouterr().err  # generate has not run
    (tmp_path / "generate" / "data").mkdir(parents=True)
    (tmp_path / "generate" / "data" / "part-0.parquet").write_bytes(b"not parquet")
    assert main(args) == 2
    assert "part-0.parquet" in capsys.readouterr().err
    assert not (tmp_path / "distill").exists()  # nothing was written for a refused run
