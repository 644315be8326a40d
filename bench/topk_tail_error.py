"""What top-k target log-probs cost against the full vocabulary, on real distillation rows.

For each k, the target pool could send k values and ids instead of all V log-probs
(`distill.target_pool.top_k`). This measures, over the response positions of the first
`--rows` rows of the distillation set: the TVD between the target's full distribution and its
top-k form (`losses.topk_tail_error`), the relative error of the TVD and forward-KL losses of
the pretrained drafter computed from the top-k form, and, per loss, the cosine between the
gradient w.r.t. the draft logits computed from the top-k target and from the full one (what
training actually follows: a loss value can be close while its gradient points elsewhere, as
for TVD++, which config validation refuses with a top-k target). Bytes per position are those
on the wire (float16 values + int32 ids, against float16 for the full vocabulary).

    .venv/bin/python bench/topk_tail_error.py            # needs the toy world `make demo-toy` builds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (label, loss name, keyword arguments): every loss the distill stage can train, both TVD++ variants
# that use the whole vocabulary deterministically (the sampled one's gradient is random by design)
GRADIENT_LOSSES = (("forward_kl", "forward_kl", {}), ("reverse_kl", "reverse_kl", {}), ("tvd", "tvd", {}),
                   ("tvd++ vocab", "tvd++", {"variant": "vocab"}), ("tvd++ exact", "tvd++", {"variant": "exact"}))


def missing_world(run: Path) -> str | None:
    """Why ``run`` cannot be measured (the folders `make demo-toy` writes), or None."""
    need = [run / "generate/data", run / "pretrain/target/model", run / "pretrain/draft/model"]
    missing = [str(p) for p in need if not p.is_dir()]
    if missing:
        return (f"no toy world in {run} (missing {', '.join(missing)}): run `make demo-toy` "
                "(or pretrain and generate) first, or pass --run RUN_OUTPUT")
    return None


def gradient_cosines(draft_logits, full_logprobs, approx_logprobs) -> dict[str, float]:
    """Per loss: cosine between ∂loss/∂draft_logits with the approximate target and with the full one.

    draft_logits, full_logprobs, approx_logprobs: [N, V] at the loss positions.
    """
    import torch

    from draftalign.training.losses import LOSSES, masked_mean

    mask = torch.ones(1, draft_logits.shape[0], dtype=torch.bool)

    def grad(fn, kwargs, logprobs):
        z = draft_logits.detach()[None].clone().requires_grad_(True)
        masked_mean(fn(z, logprobs[None], mask, **kwargs), mask).backward()
        return z.grad.flatten()

    out = {}
    for label, name, kwargs in GRADIENT_LOSSES:
        g_full, g_approx = grad(LOSSES[name], kwargs, full_logprobs), grad(LOSSES[name], kwargs, approx_logprobs)
        out[label] = torch.nn.functional.cosine_similarity(g_full, g_approx, dim=0).item()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs/tiny"))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--k", type=int, nargs="+", default=[8, 20, 32, 128, 512, 2048])
    args = ap.parse_args(argv)
    run = Path(args.run)
    if (why := missing_world(run)) is not None:
        sys.exit(why)  # before the heavy imports: a missing world is the common first-run mistake

    import pyarrow.dataset as pads
    import torch
    from transformers import AutoModelForCausalLM

    from draftalign.training.distillation import build_sequences
    from draftalign.training.losses import LOSSES, densify_topk, masked_mean, sparsify_topk, topk_tail_error

    table = pads.dataset(run / "generate/data", format="parquet").head(
        args.rows, columns=["prompt_token_ids", "response_token_ids"])
    target = AutoModelForCausalLM.from_pretrained(run / "pretrain/target/model").eval()
    draft = AutoModelForCausalLM.from_pretrained(run / "pretrain/draft/model").eval()
    seqs = build_sequences(table["prompt_token_ids"].to_pylist(), table["response_token_ids"].to_pylist(),
                           args.seq_len, False, target.config.pad_token_id or 0)
    ids, attn = torch.from_numpy(seqs["input_ids"]), torch.from_numpy(seqs["attention_mask"])
    mask = torch.from_numpy(seqs["loss_mask"]).bool()
    with torch.no_grad():
        logp = torch.log_softmax(target(input_ids=ids, attention_mask=attn).logits.float(), -1)
        q_logits = draft(input_ids=ids, attention_mask=attn).logits.float()
        # Quantised as the pool sends it by default, so only the top-k step differs below.
        logp = torch.log_softmax(logp.half().float(), -1)
    full = {name: masked_mean(LOSSES[name](q_logits, logp, mask), mask).item() for name in ("tvd", "forward_kl")}
    vocab = logp.shape[-1]
    print(f"{int(mask.sum())} response positions, V={vocab}; full vocabulary: {2 * vocab} bytes/position, "
          f"tvd {full['tvd']:.4f}, forward_kl {full['forward_kl']:.4f}")
    labels = [label for label, _, _ in GRADIENT_LOSSES]
    print("| k | bytes/position | mean TVD(p, p_k) | p95 | tvd rel. error | forward_kl rel. error | "
          + " | ".join(f"grad cos {label}" for label in labels) + " |")
    print("|---" * (6 + len(labels)) + "|")
    for k in args.k:
        err = topk_tail_error(logp, k)[mask]
        approx = densify_topk(sparsify_topk(logp, k), vocab)
        with torch.no_grad():
            rel = {name: abs(masked_mean(LOSSES[name](q_logits, approx, mask), mask).item() - full[name])
                   / max(abs(full[name]), 1e-12) for name in full}
        cos = gradient_cosines(q_logits[mask], logp[mask], approx[mask])
        print(f"| {k} | {6 * k} | {err.mean():.4f} | {err.quantile(0.95):.4f} | "
              f"{rel['tvd']:.2%} | {rel['forward_kl']:.2%} | " + " | ".join(f"{cos[lb]:.3f}" for lb in labels) + " |")


if __name__ == "__main__":
    main()
