"""Ray Data batch functions: decode, tokenize and pack documents (run inside Ray tasks)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow as pa

from draftalign.data.packing import pack_documents


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    # Loaded once per Ray worker process; workers are reused across tasks.
    from draftalign.data.tokenization import load_tokenizer

    return load_tokenizer(path)


# Every source yields Arrow batches with one string column "text": Ray Data cannot batch a
# union of sources whose blocks come in different formats (Arrow and pandas).


def bytes_to_text(batch: pa.Table) -> pa.Table:
    """{bytes, path} rows from read_binary_files -> {text}; bad UTF-8 is replaced, not fatal."""
    return pa.table({"text": [b.decode("utf-8", "replace") for b in batch.column("bytes").to_pylist()]})


def column_as_text(batch: pa.Table, field: str) -> pa.Table:
    """{field, ...} rows -> {text}; values that are not strings become empty and are skipped later."""
    values = batch.column(field).to_pylist()
    return pa.table({"text": [v if isinstance(v, str) else "" for v in values]})


def tokenize_and_pack(batch: dict[str, np.ndarray], tokenizer_path: str, seq_len: int) -> dict[str, np.ndarray]:
    """{text} rows -> {input_ids: int32[seq_len]} rows, packed with bos/eos separators."""
    tok = _tokenizer(tokenizer_path)
    texts = [t for t in batch["text"] if isinstance(t, str) and t]
    ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    packed = pack_documents(ids, seq_len, tok.bos_token_id, tok.eos_token_id)
    return {"input_ids": packed}
