"""One run per output folder: a second run is refused naming the holder; a dead holder's lock is taken over."""

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from draftalign.cli import main
from draftalign.pipelines.locks import LOCK_NAME, OutputLockedError, output_lock
from tests import scripts

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny.yaml"


@pytest.fixture
def holder():
    """Start a process that holds the lock of a folder until the test ends (or kills it)."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen(scripts.command("hold_lock", folder), stdout=subprocess.PIPE, text=True,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize(("stage", "folder"), [
    ("generate", "generate"), ("pretrain", "pretrain"), ("distill", "distill"),
    ("evaluate", "evaluate"), ("run", ".")])
def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(capsys, tmp_path, holder, stage, folder):
    run = tmp_path / "run"
    proc = holder(run / folder)
    rc = main([stage, str(TINY), f"run.output={run}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("draftalign: error: output folder ")
    assert f"is in use by pid {proc.pid} on host {socket.gethostname()} (generate, since " in err
    assert "two runs must not share a folder" in err
    assert proc.poll() is None and (run / folder / LOCK_NAME).is_file()  # the holder keeps it


def test_a_lock_killed_with_its_holder_is_taken_over_and_the_message_says_so(tmp_path, holder, capsys):
    proc = holder(tmp_path / "out")
    with pytest.raises(OutputLockedError):
        with output_lock(tmp_path / "out", "generate"):
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with output_lock(tmp_path / "out", "generate") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    out = capsys.readouterr().out
    assert f"taking over the stale lock of pid {proc.pid} on host {socket.gethostname()}" in out
    assert "no longer running" in out


def test_the_lock_is_reentrant_in_one_process_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "a" / "b"
    with output_lock(folder, "run"):
        with output_lock(folder, "evaluate"):
            assert (folder / LOCK_NAME).is_file()
        assert (folder / LOCK_NAME).is_file()  # still held by the outer block
    assert not (tmp_path / "a").exists()  # folders made only for the lock go again
    (tmp_path / "c").mkdir()
    with output_lock(tmp_path / "c", "generate"):
        (tmp_path / "c" / "kept.txt").write_text("x")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["kept.txt"]
