"""One writer per output folder: an exclusive lock that records who holds it.

Two `generate` runs on one folder each skip the other's rows as "done", retry the same
requests and replace each other's files; two trainings mix checkpoints. So every stage takes
`LOCK_NAME` in its output folder before writing there, and a second run is refused with the
holder's host and pid.

The lock is an flock on the file (released by the kernel when its holder dies, even by
`kill -9`; NFS clients map it to a POSIX lock the server arbitrates) plus the holder's
identity written into it. A file left behind by a dead holder is taken over, and the message
says whose it was.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from draftalign.errors import DraftalignError

__all__ = ["LOCK_NAME", "OutputLockedError", "output_lock", "locked_output"]

LOCK_NAME = ".draftalign.lock"
_held: dict[Path, int] = {}  # lock file -> depth: `run` holds its folder while its stages lock theirs


class OutputLockedError(DraftalignError):
    """Another run holds the output folder."""


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        info = json.loads(raw) if raw.strip() else {}
    except ValueError:
        info = {}
    return info if isinstance(info, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
            f"({info.get('stage', '?')}, since {info.get('since', '?')})")


def _acquire(path: Path) -> int:
    """An fd holding the flock on `path`, whose content then names this process."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(fd)
            os.close(fd)
            raise OutputLockedError(
                f"output folder {str(path.parent)!r} is in use by {_describe(info)}: two runs must not "
                f"share a folder; wait for that run to end, stop it, or choose another output folder") from None
        # A releasing holder unlinks the file: if ours is no longer the one at `path`, retry.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def output_lock(folder: str | Path, stage: str) -> Iterator[Path]:
    """Hold the exclusive lock of `folder` (created if needed) for the block; re-entrant."""
    folder = Path(folder).resolve()
    path = folder / LOCK_NAME
    if path in _held:
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    # Folders made only for the lock go again if the stage wrote nothing (a refused input).
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path)
    except OSError as exc:
        raise OSError(f"cannot write to output folder {str(folder)!r}: {exc.strerror or exc}") from exc
    try:
        stale = _holder(fd)
        if stale.get("pid") and stale.get("pid") != os.getpid():
            here = stale.get("host") == socket.gethostname()
            gone = "no longer running" if here and not _alive(int(stale["pid"])) else "its lock released"
            print(f"[lock] {folder}: taking over the stale lock of {_describe(stale)}, {gone}", flush=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        _held[path] = 1
        yield path
    finally:
        _held.pop(path, None)
        try:
            path.unlink(missing_ok=True)  # while still locked, so no one locks a file about to vanish
        finally:
            os.close(fd)
        for p in created:  # deepest first; rmdir leaves any folder that holds something
            try:
                p.rmdir()
            except OSError:
                break


def locked_output(stage: str, folder: Callable[[Any], str | Path]) -> Callable:
    """Decorate a stage's `run_*(cfg, ...)` to hold the lock of `folder(cfg)` while it runs."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            with output_lock(folder(cfg), stage):
                return fn(cfg, *args, **kwargs)
        return run
    return wrap
