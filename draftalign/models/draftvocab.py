"""A reduced draft vocabulary: the drafter's output layer covers a subset S of the target's tokens.

On a small drafter the output layer (V × H: 49,152 × 576 for SmolLM2) is most of the time per
draft token, while the target's answers use a few thousand distinct tokens. FR-Spec (ACL 2025)
and EAGLE-3 cut the draft head to the most frequent tokens; q(x) = 0 outside S, so speculative
sampling stays exact (the target still verifies over its full vocabulary), and only tokens
outside S can never be drafted.

On disk a reduced drafter is an ordinary full-vocabulary Llama folder (what vLLM and
transformers load as a `draft_model`: the head rows of S as trained, the others as they
started) plus `draft_vocab.json`; :func:`load_draft_model` reads it back with the reduced head.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn

DRAFT_VOCAB_FILE = "draft_vocab.json"

# The functional form because `from` is a keyword. The distill stage's account of its subset:
# how many of the target's tokens, chosen from where, and how much of the held-out (and training)
# responses' tokens they cover (None without such tokens).
DraftVocabInfo = TypedDict("DraftVocabInfo", {"size": int, "vocab_size": int, "from": str,
                                              "holdout_coverage": float | None, "train_coverage": float | None})
# draft_vocab.json: a drafter the trainer exports mid-run writes only size and ids.
_DraftVocabAbout = TypedDict("_DraftVocabAbout", {"vocab_size": int, "from": str, "holdout_coverage": float | None,
                                                  "train_coverage": float | None}, total=False)


class DraftVocabFile(_DraftVocabAbout):
    """draft_vocab.json as read: the subset's size and ids, with DraftVocabInfo's account when distill wrote it."""

    size: int
    ids: list[int]


def scatter_to_full(sub: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft-vocabulary logits [..., V'] as full-vocabulary ones [..., V]: −inf outside `ids`,
    so every consumer of logits (samplers, transformers' generate) sees q(x) = 0 there."""
    full = sub.new_full((*sub.shape[:-1], vocab_size), float("-inf"))
    return full.index_copy_(-1, ids, sub)


class ReducedHead(nn.Module):
    """The output layer over the token ids `ids` [V'] of a V-token vocabulary.

    weight: [V', H], the rows of the full head for `ids`. `subset_logits(h)` gives [..., V'];
    `forward(h)` gives full-vocabulary logits [..., V], −inf outside S, so every consumer of
    logits (samplers, transformers' generate) sees q(x) = 0 there and needs no change.
    """

    def __init__(self, full_weight: torch.Tensor, ids: torch.Tensor) -> None:
        super().__init__()
        ids = torch.as_tensor(ids, dtype=torch.long)
        self.vocab_size = int(full_weight.shape[0])
        self.weight = nn.Parameter(full_weight.detach()[ids].clone())
        self.register_buffer("ids", ids.clone(), persistent=False)

    def subset_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return scatter_to_full(self.subset_logits(hidden), self.ids, self.vocab_size)

    def full_head(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The [V, H] head to export: the trained rows (`weight`, default this module's) on S, zero elsewhere.

        An engine that loads the full head (vLLM's draft_model) gives a token outside S logit 0,
        which in practice lies below the top logit on S, so its greedy drafts are the reduced
        head's: on the demo's drafter 3,401 of 3,401 held-out positions, against 21% with the
        start's rows kept outside S (their logits outbid the trained ones). At T > 0 the tokens
        outside S keep a little mass (13% on average there) where the reduced head has none.
        """
        rows = (self.weight if weight is None else weight).detach()
        full = rows.new_zeros((self.vocab_size, rows.shape[-1]))
        full[self.ids] = rows
        return full


def top_tokens(token_lists: Iterable[Iterable[int]], size: int, vocab_size: int,
               always: Iterable[int] = ()) -> list[int]:
    """The `size` ids of the subset, ascending: `always` (special tokens), then the most frequent
    ids in `token_lists`, ties and unused ids filled in id order so that the size is exact."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"a draft vocabulary of {size} tokens does not fit a {vocab_size}-token vocabulary")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for tokens in token_lists:
        ids = np.asarray(list(tokens), dtype=np.int64)
        if ids.size:
            counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    chosen = [i for i in dict.fromkeys(int(i) for i in always) if 0 <= i < vocab_size][:size]
    # A stable sort on −count keeps id order among equal counts (unused tokens: count 0).
    taken = set(chosen)
    for i in np.argsort(-counts, kind="stable"):
        if len(chosen) >= size:
            break
        if int(i) not in taken:
            chosen.append(int(i))
    return sorted(chosen)


def coverage(token_lists: Iterable[Iterable[int]], ids: Iterable[int]) -> float | None:
    """The share of the tokens in `token_lists` that lie inside the subset `ids` (None: no token)."""
    inside = set(int(i) for i in ids)
    total = hit = 0
    for tokens in token_lists:
        for t in tokens:
            total += 1
            hit += int(t) in inside
    return hit / total if total else None


def install_reduced_head(model: Any, ids: list[int] | torch.Tensor) -> ReducedHead:
    """Replace `model`'s output layer by a ReducedHead cut from its current head (tied or not).

    The head becomes a weight of its own (untied): with frozen embeddings it may still train.
    """
    full = model.get_output_embeddings().weight
    head = ReducedHead(full, torch.as_tensor(ids, dtype=torch.long))
    model.set_output_embeddings(head)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return head


def reduced_head(model: Any) -> ReducedHead | None:
    head = model.get_output_embeddings()
    return head if isinstance(head, ReducedHead) else None


def draft_vocab_ids(model: Any) -> torch.Tensor | None:
    """The subset's ids [V'] when `model` drafts over a reduced vocabulary, else None."""
    head = reduced_head(model)
    return head.ids if head is not None else None


def export_state_dict(model: Any, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with a reduced head written back as the full-vocabulary `lm_head.weight`."""
    head = reduced_head(model)
    if head is None:
        return state_dict
    key = next(k for k in state_dict if k.endswith("lm_head.weight"))
    return {**state_dict, key: head.full_head(state_dict[key])}


def write_draft_vocab(folder: Path | str, ids: list[int], info: DraftVocabInfo | None = None) -> None:
    """`draft_vocab.json` in a drafter folder: {size, ...info, ids} (written whole or not at all)."""
    from draftalign.util.atomicio import write_json_atomic

    write_json_atomic(Path(folder, DRAFT_VOCAB_FILE), {**(info or {}), "size": len(ids), "ids": list(ids)})


def read_draft_vocab(folder: Path | str) -> DraftVocabFile | None:
    """The folder's draft_vocab.json ({size, ids, ...}), or None for a full-vocabulary drafter."""
    path = Path(folder, DRAFT_VOCAB_FILE)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data.get("ids"), list) or not data["ids"]:
        raise ValueError(f"{path} holds no token ids")
    return data


def load_draft_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> Any:
    """A drafter as draftalign decodes and trains it: with its reduced head where the folder has one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    vocab = read_draft_vocab(path) if Path(path).is_dir() else None
    if vocab is not None:
        install_reduced_head(model, vocab["ids"])
    return model
