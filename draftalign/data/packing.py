"""Sequence packing: documents become fixed-length rows with no padding.

Each document is wrapped as [bos] + tokens + [eos] and the stream is cut into rows of
`seq_len` tokens. The incomplete tail of a batch is dropped rather than padded, so
every trained position is real text; at most `seq_len - 1` tokens per batch are lost.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def pack_documents(docs: Iterable[list[int]], seq_len: int, bos_id: int | None, eos_id: int | None) -> np.ndarray:
    """Pack token lists into an int32 array [N, seq_len]; N may be 0."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    stream: list[int] = []
    for doc in docs:
        if not doc:
            continue
        if bos_id is not None:
            stream.append(bos_id)
        stream.extend(doc)
        if eos_id is not None:
            stream.append(eos_id)
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
