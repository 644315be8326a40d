"""Does an exported drafter serve? transformers' `assistant_model` (vLLM's `draft_model` is
exercised by the evaluate stage's vllm engine, in a Ray actor).

A drafter that loads but uses another tokenizer would be accepted by both engines and then
propose nonsense, so the vocabulary is compared first and a mismatch is refused with both
sides named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

from draftalign.errors import VocabMismatchError
from draftalign.models.arch import check_compatible

__all__ = ["check_vocab", "check_transformers"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class TransformersCheck(TypedDict):
    drafter: str
    transformers: str  # "ok": a failure raises instead
    tokens: list[int]  # what the target generated with the drafter assisting


def _vocab(path: str) -> dict[str, int] | None:
    """The token-to-id map of a folder's tokenizer (None for a folder without one)."""
    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from draftalign.data.tokenization import load_tokenizer

    return load_tokenizer(path).get_vocab()


def check_vocab(target: str, draft: str, trust_remote_code: bool = False) -> None:
    """Raise VocabMismatchError, naming both models, unless `draft` can draft for `target`."""
    from draftalign.models.arch import load_model_config

    t_cfg = load_model_config(target, trust_remote_code).get_text_config()
    d_cfg = load_model_config(draft, trust_remote_code).get_text_config()
    try:
        check_compatible(t_cfg, d_cfg, _vocab(target), _vocab(draft))
    except VocabMismatchError as exc:
        raise VocabMismatchError(f"drafter {draft!r} cannot draft for target {target!r}: {exc}") from None


def check_feature_vocab(target: str, draft: str, trust_remote_code: bool = False) -> None:
    """Raise VocabMismatchError unless the feature drafter `draft` was built for `target`'s vocabulary,
    special tokens and hidden size (it reads the target's embeddings and hidden states)."""
    from draftalign.models.arch import load_model_config
    from draftalign.models.feature import load_feature_spec

    t_cfg = load_model_config(target, trust_remote_code).get_text_config()
    layer = load_feature_spec(draft).layer
    problems = [f"{name}: target {getattr(t_cfg, name, None)} != draft {layer.get(name)}"
                for name in ("vocab_size", "hidden_size", "bos_token_id")
                if getattr(t_cfg, name, None) != layer.get(name)]
    if not problems and _vocab(target) != _vocab(draft):
        problems.append("the tokenizers differ")
    if problems:
        raise VocabMismatchError(f"feature drafter {draft!r} was not built for target {target!r}: "
                                 + "; ".join(problems))


def check_transformers(target: Any, draft: Any, target_name: str, draft_name: str,
                       prompt_ids: list[int] | None = None, max_new_tokens: int = 4) -> TransformersCheck:
    """Run `target.generate(..., assistant_model=draft)` for a few tokens on loaded models.

    Checks the vocabulary of the loaded configs first (VocabMismatchError naming both).
    Returns {"drafter", "transformers": "ok", "tokens"}; other failures raise RuntimeError.
    """
    import torch

    t_cfg, d_cfg = target.config.get_text_config(), draft.config.get_text_config()
    try:
        check_compatible(t_cfg, d_cfg)
    except VocabMismatchError as exc:
        raise VocabMismatchError(f"drafter {draft_name!r} cannot draft for target {target_name!r}: {exc}") from None
    ids = torch.tensor([prompt_ids or [t_cfg.bos_token_id if t_cfg.bos_token_id is not None else 0]],
                       device=target.device)
    eos = t_cfg.eos_token_id
    from transformers.utils import logging as hf_logging

    # transformers' own assisted generation calls the drafter's generate with both a
    # generation_config and kwargs, and warns users about it: not theirs to act on.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.inference_mode():
            out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft,
                                  max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=eos if isinstance(eos, int) else None)
    except Exception as exc:
        raise RuntimeError(f"drafter {draft_name!r} does not run as transformers' assistant_model for "
                           f"target {target_name!r}: {type(exc).__name__}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    return {"drafter": draft_name, "transformers": "ok", "tokens": out[0, ids.shape[1]:].tolist()}
