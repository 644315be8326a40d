"""Writers that replace a file whole or not at all: a kill or a full disk midway leaves the old file."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["write_text_atomic", "write_json_atomic", "write_parquet_atomic", "LOW_DISK_BYTES", "explain_write_error"]

# Below this much free space a failed write is put down to the disk: a checkpoint of the demo's
# drafter is about 200 MB, and torch's own error for a full disk reads "unexpected pos ...".
LOW_DISK_BYTES = 1 << 30


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` whole or not at all: a full disk or a kill midway leaves the old
    file as it was and no temp file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # a full disk shows here at the latest, before the old file is gone
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(table: pa.Table, path: str | Path) -> Path:
    """Write `table` to `path` via a temp file in the same folder and os.replace.

    A writer killed midway leaves at most a hidden `.name.*.tmp` file, never a half file
    under the final name; readers see the old file or the new one.
    """
    import pyarrow.parquet as pq  # not at import time: the JSON writers serve processes without pyarrow loaded

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to the final file; "xb" still refuses a clash.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def explain_write_error(exc: BaseException, what: str, folder: str | Path) -> BaseException:
    """`exc`, raised while writing `what` under `folder`, as an error that names a full disk when
    the disk is nearly full (torch and DeepSpeed report one as "iostream error" or "unexpected
    pos"); otherwise `exc` itself."""
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return exc
    if free >= LOW_DISK_BYTES:
        return exc
    return OSError(f"could not write {what} under {folder}: the disk is nearly full ({free / 2**20:.0f} MiB free); "
                   f"free some space (old run folders, checkpoints under RUN/*/ray/) and rerun: the run resumes "
                   f"from its last checkpoint ({type(exc).__name__}: {exc})")
