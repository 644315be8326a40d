"""Prompt rendering through the target's chat template.

The distillation set must hold exactly the token sequences the target sees at serving
time, so prompts are rendered by the tokenizer's own chat template (Llama 2's when the
tokenizer has none; see `draftalign.data.tokenization.materialize_tokenizer`) and the
template's hash is stored next to every row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

__all__ = [
    "render_prompt",
    "encode_prompt",
    "chat_template_hash",
]


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]], system_prompt: str | None = None) -> str:
    """The chat-templated prompt text, ending where the target's answer starts.

    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...], last one a
    user turn. `system_prompt` (None or "" = none, the paper-spec default) becomes a leading
    system turn, unless the conversation already opens with its own, which then wins.
    For Llama 2 and one user turn "hello": "<s>[INST] hello [/INST]". The text already
    holds the BOS token, so tokenize it with `encode_prompt`, not the tokenizer's defaults.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; materialize it with draftalign.data.tokenization")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):  # some transformers versions wrap a single render in a list
        text = text[0]
    return text


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt; no special tokens added, since the template has them."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_template_hash(tokenizer: Any) -> str:
    """16 hex chars of sha256 of the chat template, to tell apart data rendered differently."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template to hash")
    if not isinstance(template, str):  # named templates come as a dict
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]
