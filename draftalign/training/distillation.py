"""Pure pieces of the distill stage: training sequences from distillation rows, and the
held-out numbers that say whether the draft got closer to the target.

Positions: a causal LM's logits at position t predict token t+1, so the loss mask marks
t when token t+1 is one the draft should learn (a response token by default). Padding is on
the right with attention 0 and loss 0.
"""

from __future__ import annotations

import numpy as np
import torch

from draftalign.data.split import is_holdout
from draftalign.training.losses import SupportTargetLogprobs, expected_acceptance, on_support, support_log_p

SEQUENCE_COLUMNS = ("input_ids", "attention_mask", "loss_mask")


def build_sequences(prompt_ids: list, response_ids: list, seq_len: int, include_prompt: bool,
                    pad_id: int) -> dict[str, np.ndarray]:
    """Rows of prompt + response ids -> fixed-length int64 arrays [N, seq_len].

    Sequences longer than ``seq_len`` are cut at the end (the response tail is lost, never
    the prompt's start, which holds BOS and the chat frame the target conditioned on).
    """
    n = len(prompt_ids)
    out = {c: np.zeros((n, seq_len), dtype=np.int64) for c in SEQUENCE_COLUMNS}
    out["input_ids"][:] = pad_id
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        p, r = list(p), list(r)
        ids = (p + r)[:seq_len]
        length = len(ids)
        out["input_ids"][i, :length] = ids
        out["attention_mask"][i, :length] = 1
        # Position t is trained when token t+1 exists and is learnable.
        first = 1 if include_prompt else len(p)
        start = max(first - 1, 0)
        out["loss_mask"][i, start:max(length - 1, start)] = 1
    return out


def trim_padding(batch: dict, columns=SEQUENCE_COLUMNS) -> dict:
    """`batch` cut to its longest row: build_sequences pads on the right, and a causal model's
    outputs at real positions do not depend on trailing pads, so the cut changes nothing but
    the work (rows of the demo set use about 120 of their 160 positions)."""
    longest = int(batch["attention_mask"].sum(1).max()) if len(batch["attention_mask"]) else 0
    return {k: (v[:, :longest] if k in columns else v) for k, v in batch.items()}


def masked_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits [N, V] at the N positions where `mask` [B, T] is set (row-major).

    The output layer runs on those positions only: at a 49k vocabulary it is most of a small
    drafter's cost, and the response positions are about half of each sequence. A drafter with a
    reduced vocabulary (draftvocab.ReducedHead) gives [N, V'], its logits over its support only.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    head = model.get_output_embeddings()
    return getattr(head, "subset_logits", head)(hidden[mask])


def holdout_row(seed_id: str, fraction: float) -> bool:
    """Held-out split by seed id, so every sampling setting of a seed lands on the same side."""
    return is_holdout(f"distill:{seed_id}", fraction)


def chained_block_efficiency(alpha: torch.Tensor, mask: torch.Tensor, gamma: int) -> torch.Tensor:
    """Block efficiency τ_t implied by per-position acceptances along each sequence.

    alpha, mask: [B, T]. A block drafted at position t emits 1 + α_t + α_t α_{t+1} + … +
    Π_{j<γ} α_{t+j} tokens in expectation (the draft proposes γ tokens; each is accepted only
    if all before it were; the target adds one token at the end). Returns τ_t [B, T] for the
    start positions whose whole block of γ positions is in the mask, and 0 elsewhere: blocks
    cut short by the end of a response would read as low acceptance.
    """
    m = mask.bool()
    a = torch.where(m, alpha, torch.zeros_like(alpha)).to(torch.float64)
    tau = torch.ones_like(a)
    run = torch.ones_like(a)
    full = m.clone()
    for j in range(gamma):
        shifted = torch.zeros_like(a)
        shifted_mask = torch.zeros_like(m)
        if j < a.shape[1]:
            shifted[:, : a.shape[1] - j] = a[:, j:]
            shifted_mask[:, : a.shape[1] - j] = m[:, j:]
        run = run * shifted
        tau = tau + run
        full &= shifted_mask
    return torch.where(full, tau, torch.zeros_like(tau))


def _target_log_p(target_logprobs: torch.Tensor | SupportTargetLogprobs,
                  draft_vocab: torch.Tensor | None) -> torch.Tensor:
    """log p [N, V], or on the draft vocabulary S [N, V'] (normalised over the full vocabulary)."""
    if isinstance(target_logprobs, SupportTargetLogprobs):
        if draft_vocab is None:
            raise ValueError("target log-probs on a draft vocabulary need that draft_vocab")
        return support_log_p(target_logprobs.logprobs.float())
    log_p = torch.log_softmax(target_logprobs.float(), -1)
    return log_p if draft_vocab is None else on_support(log_p, draft_vocab)


def position_acceptance(draft_logits: torch.Tensor, target_logprobs: torch.Tensor | SupportTargetLogprobs,
                        draft_vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_x min(p, q) at each of N positions [N]: draft_logits [N, V] (or [N, V'] on S), target as in
    :func:`heldout_sums`; q = 0 outside S, so the acceptance is exact with a reduced head."""
    log_q = torch.log_softmax(draft_logits.float(), -1)
    return expected_acceptance(_target_log_p(target_logprobs, draft_vocab).exp(), log_q.exp())


def heldout_sums(draft_logits: torch.Tensor, target_logprobs: torch.Tensor | SupportTargetLogprobs,
                 mask: torch.Tensor, gamma: int, draft_vocab: torch.Tensor | None = None,
                 alpha: torch.Tensor | None = None) -> dict[str, float]:
    """Sums over the masked positions, to add up across batches and workers.

    draft_logits, target_logprobs: [N, V] at the N positions where mask [B, T] is set, in
    row-major order (``x[mask]``); or the target's [N, V'] on the draft vocabulary only
    (SupportTargetLogprobs). Keys: positions, tvd, acceptance (expected acceptance Σ min(p, q)),
    forward_kl, blocks, tau (Σ of :func:`chained_block_efficiency` over whole blocks). With a
    reduced draft vocabulary (ids [V'], draft_logits [N, V']) the acceptance and TVD are exact
    (q = 0 outside S), the forward KL is against p renormalised on S (as losses.forward_kl), and
    `support_mass` sums p(S), the target's mass the draft can reach. `alpha` [N] is
    :func:`position_acceptance` of the same arguments, where the caller already has it.
    """
    m = mask.bool()
    log_q = torch.log_softmax(draft_logits.float(), -1)
    log_p = _target_log_p(target_logprobs, draft_vocab)
    extra: dict[str, float] = {}
    if draft_vocab is not None:
        extra["support_mass"] = float(log_p.exp().sum())
    if alpha is None:
        alpha = expected_acceptance(log_p.exp(), log_q.exp())
    log_ps = log_p if draft_vocab is None else torch.log_softmax(log_p, -1)
    ps = log_ps.exp()
    # 0 · log 0 = 0 where the target has no mass (log p = -inf), as in losses.forward_kl; the plain
    # product would give 0 · -inf = NaN there.
    fkl = torch.where(ps > 0, ps * (log_ps - log_q), 0.0).sum(-1)
    alpha_bt = torch.zeros(m.shape, dtype=alpha.dtype)
    alpha_bt[m] = alpha
    tau = chained_block_efficiency(alpha_bt, m, gamma)
    blocks = tau > 0
    return {
        "positions": float(m.sum()),
        "tvd": float((1 - alpha).sum()),
        "acceptance": float(alpha.sum()),
        "forward_kl": float(fkl.sum()),
        "blocks": float(blocks.sum()),
        "tau": float(tau[blocks].sum()),
        **extra,
    }


def unrolled_block_efficiency(alphas: list[torch.Tensor], valid: list[torch.Tensor], gamma: int) -> tuple[float, float]:
    """(Σ τ_a, blocks): the block efficiency a feature drafter implies, from its unrolled drafts.

    alphas[j], valid[j]: [B, T], the acceptance Σ min(p, q) of the (j+1)-th draft at draft index t
    (anchor a = t − j) and whether it is scored. τ_a = 1 + Σ_{j<γ} Π_{i<=j} α_i(a + i), summed over
    the anchors whose γ drafts are all scored (needs len(alphas) >= γ).
    """
    if len(alphas) < gamma:
        raise ValueError(f"{len(alphas)} unrolled drafts cannot give the block efficiency at γ = {gamma}")
    length = alphas[0].shape[1]
    run = torch.ones_like(alphas[0], dtype=torch.float64)
    tau = torch.ones_like(run)
    full = torch.ones_like(valid[0], dtype=torch.bool)
    for j in range(gamma):
        a = torch.zeros_like(run)
        ok = torch.zeros_like(full)
        a[:, :length - j] = alphas[j][:, j:].double()  # anchor a reads draft index a + j
        ok[:, :length - j] = valid[j][:, j:]
        run = run * a
        tau = tau + run
        full &= ok
    return float(tau[full].sum()), float(full.sum())


def heldout_means(sums: dict[str, float], gamma: int) -> dict[str, float]:
    """Per-position means from :func:`heldout_sums` totals (empty sets give no keys)."""
    n, b = sums.get("positions", 0.0), sums.get("blocks", 0.0)
    if not n:
        return {}
    out = {f"holdout_{k}": sums[k] / n for k in ("tvd", "forward_kl", "support_mass") if k in sums}
    # Σ min(p, q) is the expected acceptance, not evaluate's draft acceptance rate (accepted / drafted)
    out["holdout_expected_acceptance"] = sums["acceptance"] / n
    if b:
        out[f"holdout_tau_gamma{gamma}"] = sums["tau"] / b
    return out
