"""Ray Data batch functions: decode, tokenize and pack documents (run inside Ray tasks)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from draftalign.packing import pack_documents


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    # Loaded once per Ray worker process; workers are reused across tasks.
    from draftalign.tokenization import load_tokenizer

    return load_tokenizer(path)


def bytes_to_text(batch: dict[str, Any]) -> dict[str, Any]:
    """{bytes, path} rows from read_binary_files -> {text}; bad UTF-8 is replaced, not fatal."""
    return {"text": np.array([b.decode("utf-8", "replace") for b in batch["bytes"]], dtype=object)}


def tokenize_and_pack(batch: dict[str, Any], tokenizer_path: str, seq_len: int) -> dict[str, Any]:
    """{text} rows -> {input_ids: int32[seq_len]} rows, packed with bos/eos separators."""
    tok = _tokenizer(tokenizer_path)
    texts = [t for t in batch["text"] if isinstance(t, str) and t]
    ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    packed = pack_documents(ids, seq_len, tok.bos_token_id, tok.eos_token_id)
    return {"input_ids": packed}
