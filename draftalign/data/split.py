"""The stable hold-out split: which documents (pretraining) and seeds (distillation) are held out.

One hash of a key decides, independent of order and of the run, so pretraining's corpus and
distillation's sets split the same way everywhere. Imports nothing of draftalign.
"""

from __future__ import annotations

import hashlib


def is_holdout(key: str, fraction: float) -> bool:
    """Stable split by a hash of the document's key (path or text), independent of order."""
    if fraction <= 0:
        return False
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8", "replace")).digest()[:8], "big")
    return bucket / 2**64 < fraction
