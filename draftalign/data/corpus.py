"""Pretraining corpora: which documents there are (the hold-out split is data/split.py).

The embedded default reads the Python standard library's own `.py` files, found from the
running interpreter, so it needs neither a download nor a copy in the repository.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

# Test suites are large, repetitive and full of deliberately odd code: not what a target
# would be trained on. site-packages holds third-party code, not the standard library.
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files, sorted so every run sees the same order."""
    root = root or stdlib_root()
    files = [p for p in root.rglob("*.py") if not _SKIP_PARTS.intersection(p.relative_to(root).parts)]
    if not files:
        raise RuntimeError(f"no .py files found under the standard library at {root}")
    return sorted(files)


def list_files(paths: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Expand files and folders into a sorted file list; a missing path is an error."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            out.extend(q for q in p.rglob("*") if q.is_file() and q.suffix in suffixes)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"corpus path {raw!r} does not exist")
    if not out:
        raise FileNotFoundError(f"no corpus files with suffix {', '.join(suffixes)} under {paths}")
    return sorted(set(out))
