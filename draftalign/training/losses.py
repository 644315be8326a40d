"""Token-level distillation losses between a frozen target and a trainable draft.

Notation (paper-spec §1.2, §5): at each position t, p = target next-token distribution and
q = draft next-token distribution over the vocabulary V. Every loss in :data:`LOSSES` has the
signature ``f(draft_logits [B,T,V], target_logprobs [B,T,V] | SparseTargetLogprobs | SupportTargetLogprobs,
loss_mask [B,T], *, draft_vocab=None, **options) -> Tensor[B,T]`` and returns a per-token loss
that is exactly zero where ``loss_mask`` is zero; reduce it with :func:`masked_mean`.

A drafter with a reduced vocabulary (draftalign/draftvocab.py) passes ``draft_vocab``, the ids
[V'] of its support S, and logits [B,T,V'] over them; q(x) = 0 outside S. Each loss is then its
exact value for that q (TVD counts the target's mass outside S, which no draft can reach), except
the forward KL, which would be infinite: it is taken against p restricted to S and renormalised,
p_S(x) = p(x) / p(S), the best q the subset allows. Every such loss reads p on S only (and p(S)),
so the target may send just those V' columns (:class:`SupportTargetLogprobs`): the same values,
V / V' times less to compute, cache and ship.

All softmax work happens in float32 (float64 if both inputs are float64) whatever the input
dtype, because bf16 has ~3 significant digits: log-probabilities near the tail would round to
-inf and the indicator 1{p > q} would flip on rounding noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Floor for log p in the reverse KL: log of float32's smallest normal (~ -87.34). A target zero
# would make q log(q/p) = +inf with NaN gradients; the floor keeps the loss finite while a draft
# putting mass there is still pushed away from it by a large (87 nats) penalty.
LOG_P_FLOOR = float(torch.log(torch.tensor(torch.finfo(torch.float32).tiny, dtype=torch.float64)))


@dataclass
class SparseTargetLogprobs:
    """Top-k target log-probabilities, as a target-logit worker may send them.

    indices: int64 [B, T, K], token ids of the k most likely target tokens.
    logprobs: float [B, T, K], log p at those ids (normalised over the full vocabulary).
    """

    indices: torch.Tensor
    logprobs: torch.Tensor


@dataclass
class SupportTargetLogprobs:
    """The target's log-probs on a reduced draft vocabulary S only, as the target pool sends them.

    logprobs: float [B, T, V'], log p(x) for x in S, in ``draft_vocab``'s order, normalised over
    the full vocabulary (so Σ_S p = p(S) <= 1; the mass outside S is 1 − p(S)).
    """

    logprobs: torch.Tensor


def on_support(target_logprobs: torch.Tensor, draft_vocab) -> torch.Tensor:
    """Full log-probs [..., V] -> their columns on S [..., V'] (what SupportTargetLogprobs holds)."""
    return target_logprobs.index_select(-1, torch.as_tensor(draft_vocab, device=target_logprobs.device))


def support_log_p(on_s: torch.Tensor) -> torch.Tensor:
    """log p on S [..., V'] as sent, made exact to use: rows whose p(S) rounding on the wire
    (float16) pushed above 1 are scaled back to p(S) = 1; others are left as they are."""
    return on_s - torch.logsumexp(on_s, dim=-1, keepdim=True).clamp_min(0.0)


def sparsify_topk(target_logprobs: torch.Tensor, k: int) -> SparseTargetLogprobs:
    """Keep the k largest entries of dense target log-probs [B, T, V] -> SparseTargetLogprobs [B, T, k]."""
    values, indices = target_logprobs.topk(k, dim=-1)
    return SparseTargetLogprobs(indices=indices, logprobs=values)


def densify_topk(sparse: SparseTargetLogprobs, vocab_size: int) -> torch.Tensor:
    """Dense log-probs [B, T, V] from top-k log-probs, tail mass spread uniformly.

    p̃(x) = p(x) for the K kept ids, and p̃(x) = (1 − Σ_topk p) / (V − K) for every other id.
    Spreading the tail keeps p̃ a distribution, so TVD and both KLs stay defined (a zero tail
    would make the reverse KL blow up on every tail token the draft uses); it is exact when
    the true tail is flat, and :func:`topk_tail_error` measures how far off it is otherwise.
    Note that r = 1{p > q} on tail tokens is then judged against the flat tail value.
    The result is renormalised with log_softmax so rounding (Σ_topk p > 1 in bf16) cannot
    leave a row that sums to more than one. Computed in float32 (float64 if given float64).
    """
    k = sparse.indices.shape[-1]
    dtype = torch.promote_types(sparse.logprobs.dtype, torch.float32)
    top = sparse.logprobs.to(dtype)
    if k >= vocab_size:
        tail_logp = torch.full_like(top[..., :1], float("-inf"))
    else:
        tail = (1.0 - top.exp().sum(-1, keepdim=True)).clamp_min(0.0)
        tail_logp = torch.log(tail / (vocab_size - k))
    dense = tail_logp.expand(*top.shape[:-1], vocab_size).clone()
    dense.scatter_(-1, sparse.indices, top)
    return F.log_softmax(dense, dim=-1)


def topk_tail_error(target_logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """TVD [B, T] between the full target p and its top-k densified form p̃: ½ Σ_x |p − p̃|.

    Reports how much the sparse top-k transport distorts the target vs the full vocabulary.
    """
    dense = F.log_softmax(target_logprobs.to(torch.promote_types(target_logprobs.dtype, torch.float32)), -1)
    approx = densify_topk(sparsify_topk(dense, k), dense.shape[-1])
    return 0.5 * (dense.exp() - approx.exp()).abs().sum(-1)


def expected_acceptance(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """Speculative-sampling acceptance probability β = Σ_x min(p(x), q(x)) = 1 − TVD(p, q).

    target_probs, draft_probs: [..., V] probabilities -> [...].
    """
    return torch.minimum(target_probs, draft_probs).sum(-1)


def masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Scalar Σ_t m_t L_t / Σ_t m_t over per_token [B, T] and loss_mask [B, T].

    An empty mask gives 0 (still connected to the graph, so backward() works) rather than 0/0.
    """
    mask = loss_mask.bool()
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    return total / mask.sum().clamp_min(1).to(per_token.dtype)


def _prepare(draft_logits, target_logprobs, loss_mask, draft_vocab=None):
    """-> (log q [B,T,V'] with grad, log p [B,T,V'] constant, mask bool [B,T]) in the compute dtype.

    V' = V without ``draft_vocab``; with it (ids [V']), log p holds the target's log-probs
    gathered on those ids: it sums to p(S) <= 1 and is not renormalised.
    """
    if isinstance(target_logprobs, SupportTargetLogprobs):
        return _prepare_on_support(draft_logits, target_logprobs.logprobs, loss_mask, draft_vocab)
    if isinstance(target_logprobs, SparseTargetLogprobs):
        if draft_vocab is not None:
            raise ValueError("a reduced draft vocabulary needs the target's full distribution, not its top-k")
        target_logprobs = densify_topk(target_logprobs, draft_logits.shape[-1])
    expected = draft_logits.shape[-1] if draft_vocab is None else target_logprobs.shape[-1]
    if target_logprobs.shape[:-1] != draft_logits.shape[:-1] or target_logprobs.shape[-1] != expected:
        raise ValueError(f"target {tuple(target_logprobs.shape)} != draft {tuple(draft_logits.shape)}")
    if draft_vocab is not None and len(draft_vocab) != draft_logits.shape[-1]:
        raise ValueError(f"draft_vocab has {len(draft_vocab)} ids but the draft gives {draft_logits.shape[-1]} logits")
    log_q, target, mask = _draft_and_masked_target(draft_logits, target_logprobs, loss_mask)
    # log_softmax is the identity on normalised log-probs; it repairs bf16 rounding (Σp ≠ 1).
    log_p = F.log_softmax(target, dim=-1)
    if draft_vocab is not None:
        log_p = on_support(log_p, draft_vocab)
    return log_q, log_p, mask


def _draft_and_masked_target(draft_logits, target_logprobs, loss_mask):
    """(log q, the target with padded rows zeroed, mask bool [B,T]) in the compute dtype: float32
    at least (float64 if both inputs are)."""
    mask = loss_mask.bool()
    if mask.shape != draft_logits.shape[:-1]:
        raise ValueError(f"loss_mask {tuple(mask.shape)} != draft [B, T] {tuple(draft_logits.shape[:-1])}")
    dtype = torch.promote_types(torch.promote_types(draft_logits.dtype, target_logprobs.dtype), torch.float32)
    log_q = F.log_softmax(draft_logits.to(dtype), dim=-1)
    # Padded rows may carry garbage targets (all -inf, NaN); a NaN there would reach the
    # gradient through 0 * NaN even though the loss is masked, so make them uniform instead.
    target = torch.where(mask[..., None], target_logprobs.detach().to(dtype), 0.0)
    return log_q, target, mask


def _prepare_on_support(draft_logits, support_logprobs, loss_mask, draft_vocab):
    """_prepare for SupportTargetLogprobs: log p [B,T,V'] arrives already gathered on S."""
    if draft_vocab is None:
        raise ValueError("target log-probs on a draft vocabulary need that draft_vocab")
    if support_logprobs.shape != draft_logits.shape or len(draft_vocab) != draft_logits.shape[-1]:
        raise ValueError(f"target on S {tuple(support_logprobs.shape)}, draft {tuple(draft_logits.shape)} "
                         f"and draft_vocab ({len(draft_vocab)} ids) must agree")
    log_q, target, mask = _draft_and_masked_target(draft_logits, support_logprobs, loss_mask)
    # Wire rounding repaired as log_softmax does in _prepare (p on S is not normalised on S).
    return log_q, support_log_p(target), mask


def _on_support(log_p: torch.Tensor, draft_vocab) -> torch.Tensor:
    """log p_S: the target restricted to the draft's support S and renormalised (log p itself
    for a full-vocabulary draft). Used where a KL(p ‖ q) would be infinite on a subset."""
    return log_p if draft_vocab is None else F.log_softmax(log_p, dim=-1)


def _masked(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, loss, torch.zeros_like(loss))


def _kl_terms(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_x p(x) (log p(x) − log q(x)) over the last axis; xlogy gives 0 · log 0 = 0 where the
    target has no mass (p = 0 → log p = -inf)."""
    return (torch.special.xlogy(p, p) - p * log_q).sum(-1)


def forward_kl(draft_logits, target_logprobs, loss_mask, *, draft_vocab=None) -> torch.Tensor:
    """KL(p ‖ q) = Σ_x p(x) (log p(x) − log q(x)), per token [B, T]; terms with p(x) = 0 are 0.

    With ``draft_vocab``: KL(p_S ‖ q) over the support S (p_S: p renormalised on S).
    """
    log_q, log_p, mask = _prepare(draft_logits, target_logprobs, loss_mask, draft_vocab)
    return _masked(_kl_terms(_on_support(log_p, draft_vocab).exp(), log_q), mask)


def reverse_kl(draft_logits, target_logprobs, loss_mask, *, draft_vocab=None) -> torch.Tensor:
    """KL(q ‖ p) = Σ_x q(x) (log q(x) − max(log p(x), LOG_P_FLOOR)), per token [B, T].

    Gradient flows through q only; see LOG_P_FLOOR for why log p is floored. With
    ``draft_vocab`` the sum runs over S (exact: q is zero elsewhere).
    """
    log_q, log_p, mask = _prepare(draft_logits, target_logprobs, loss_mask, draft_vocab)
    loss = (log_q.exp() * (log_q - log_p.clamp_min(LOG_P_FLOOR))).sum(-1)
    return _masked(loss, mask)


def tvd(draft_logits, target_logprobs, loss_mask, *, draft_vocab=None) -> torch.Tensor:
    """TVD(p, q) = ½ Σ_x |p(x) − q(x)| = 1 − acceptance probability, per token [B, T].

    Gradient wrt draft logits z: ∂/∂z_j = −q_j (r_j − E_q[r]) with r = 1{p > q}. With
    ``draft_vocab``: ½ Σ_{x∈S} |p(x) − q(x)| + ½ (1 − p(S)), the exact TVD of the full distributions.
    """
    log_q, log_p, mask = _prepare(draft_logits, target_logprobs, loss_mask, draft_vocab)
    p = log_p.exp()
    loss = 0.5 * (p - log_q.exp()).abs().sum(-1)
    if draft_vocab is not None:
        loss = loss + 0.5 * (1.0 - p.sum(-1)).clamp_min(0.0)
    return _masked(loss, mask)


def _standardise_over_vocab(reward: torch.Tensor, eps: float) -> torch.Tensor:
    """r̂ = (r − mean_x r) / (std_x r + eps) over the last axis; std is unbiased like torch.std."""
    return (reward - reward.mean(-1, keepdim=True)) / (reward.std(-1, keepdim=True) + eps)


def tvd_plus_plus(
    draft_logits,
    target_logprobs,
    loss_mask,
    *,
    variant: str = "vocab",
    eps: float = 1e-5,
    num_samples: int = 8,
    generator: torch.Generator | None = None,
    draft_vocab=None,
) -> torch.Tensor:
    """TVD++ surrogate (paper-spec §5.3), per token [B, T]; r(x) = 1{p(x) > q(x)}, computed detached.

    variant="vocab" (B, default): r̂ = (r − mean_x r)/(std_x r + eps) per position,
        L = −(1/|V|) Σ_x r̂(x) log q(x). Since Σ_x r̂ = 0, ∂L/∂z = −r̂/|V|: every
        under-predicted token is pushed up regardless of how small q is.
    variant="exact" (A): L = −Σ_x sg[q(x)] r̂(x) log q(x); ∂L/∂z = TVD gradient / (std_x r + eps).
    variant="sampled" (C): draw num_samples tokens x_k ~ q per valid position (using
        ``generator``), standardise r(x_k) over all samples of all valid positions in the
        batch, L = −mean_k r̂_k log q(x_k).
    The value is a surrogate, not a divergence (it can be negative); log :func:`tvd` to monitor.
    With ``draft_vocab`` the vocabulary V is the draft's support S (|V| = V'): tokens outside it
    cannot be drafted, so neither pushed.
    """
    log_q, log_p, mask = _prepare(draft_logits, target_logprobs, loss_mask, draft_vocab)
    q = log_q.detach().exp()
    reward = (log_p.exp() > q).to(log_q.dtype)
    if variant == "vocab":
        loss = -(_standardise_over_vocab(reward, eps) * log_q).mean(-1)
    elif variant == "exact":
        loss = -(q * _standardise_over_vocab(reward, eps) * log_q).sum(-1)
    elif variant == "sampled":
        samples = torch.zeros(*mask.shape, num_samples, dtype=torch.long, device=log_q.device)
        if mask.any():
            samples[mask] = torch.multinomial(q[mask], num_samples, replacement=True, generator=generator)
        r = reward.gather(-1, samples)
        valid = mask[..., None].expand_as(r)
        n = valid.sum()
        # Statistics over valid samples only: padded positions must not shift the baseline.
        mu = torch.where(valid, r, 0.0).sum() / n.clamp_min(1)
        var = torch.where(valid, (r - mu) ** 2, 0.0).sum() / (n - 1).clamp_min(1)
        r_hat = (r - mu) / (var.sqrt() + eps)
        loss = -(r_hat * log_q.gather(-1, samples)).mean(-1)
    else:
        raise ValueError(f"unknown tvd++ variant {variant!r}; known: 'vocab', 'exact', 'sampled'")
    return _masked(loss, mask)


# Floor on α in −log α: a draft with no overlap at a position would give +inf and a NaN gradient.
LK_ALPHA_FLOOR = 1e-6
LK_ETA = 3.0  # LK^λ's default η in λ = exp(−η α), as vllm-project/speculators ships it


def lk_alpha(draft_logits, target_logprobs, loss_mask, *, draft_vocab=None) -> torch.Tensor:
    """LK^α (Samarin et al. 2026, "LK losses"): −log α with α = Σ_x min(p(x), q(x)), per token [B, T].

    α is the acceptance probability of speculative sampling at the position, so this maximises
    the log of the acceptance directly. ∂L/∂z = (1/α) · ∂TVD/∂z = −(q/α)(r − E_q[r]) with
    r = 1{p > q}: TVD's direction, scaled up where the overlap is small (a cold start), which
    TVD's own gradient is not. α is floored at LK_ALPHA_FLOOR. With ``draft_vocab``, α = Σ_{x∈S}
    min(p, q), exact.
    """
    log_q, log_p, mask = _prepare(draft_logits, target_logprobs, loss_mask, draft_vocab)
    alpha = torch.minimum(log_p.exp(), log_q.exp()).sum(-1)
    return _masked(-alpha.clamp_min(LK_ALPHA_FLOOR).log(), mask)


def lk_hybrid(draft_logits, target_logprobs, loss_mask, *, eta: float = LK_ETA, draft_vocab=None) -> torch.Tensor:
    """LK^λ (Samarin et al. 2026): λ KL(p ‖ q) + (1 − λ) TVD(p, q), per token [B, T], with
    λ = exp(−η · sg[α]) per position, α = Σ_x min(p(x), q(x)) and sg the stop-gradient.

    Where the draft is far off (α → 0, λ → 1) forward KL's strong gradient leads; as the overlap
    grows the weight moves to TVD = 1 − α, the acceptance itself. η (`distill.losses[].eta`)
    sets how fast. With ``draft_vocab`` the KL is forward_kl's KL(p_S ‖ q) and α is exact.
    """
    log_q, log_p, mask = _prepare(draft_logits, target_logprobs, loss_mask, draft_vocab)
    p, q = log_p.exp(), log_q.exp()
    alpha = torch.minimum(p, q).sum(-1)
    weight = torch.exp(-eta * alpha.detach())
    kl = _kl_terms(_on_support(log_p, draft_vocab).exp(), log_q)
    return _masked(weight * kl + (1.0 - weight) * (1.0 - alpha), mask)


LossFn = Callable[..., torch.Tensor]

LOSSES: dict[str, LossFn] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "tvd": tvd,
    "tvd++": tvd_plus_plus,
    "lk": lk_alpha,
    "lk_hybrid": lk_hybrid,
}


def get_loss(name: str) -> LossFn:
    """The per-token loss function registered under ``name`` in :data:`LOSSES`."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}") from None


def loss_options(loss) -> dict[str, str]:
    """The keyword options a configured loss (config.LossConfig) passes to its function."""
    if loss.name == "tvd++":
        return {"variant": loss.variant}
    return {"eta": loss.eta} if loss.name == "lk_hybrid" else {}
