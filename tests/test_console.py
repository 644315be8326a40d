"""draftalign/util/console.py: the quiet terminal, its plain mode off a terminal, -v, the error line."""

import contextlib
import io
import logging
import sys

import pytest

from draftalign.cli import build_parser
from draftalign.util import console

STEP = "[pretrain target] step 2/6 {'step': 2, 'epoch': 0, 'loss': 3.5, 'lr': 0.001, 'holdout_perplexity': nan}"


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    for var in (console.VERBOSE_ENV, "RAY_DATA_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(var, "")  # recorded, so that what setup() sets is undone after the test
        monkeypatch.delenv(var)
    console.reset()
    yield
    console.reset()
    logging.captureWarnings(False)


def _batch(*lines: str) -> dict:
    return {"pid": 12, "actor_name": "RayTrainWorker", "ip": "10.0.0.1", "localhost": "10.0.0.1",
            "is_err": False, "lines": list(lines)}


def test_plain_mode_passes_only_training_lines_and_logs_everything(tmp_path, capsys):
    console.setup(tmp_path / "run")
    assert not console.interactive()  # captured stdout is no terminal
    console._on_worker_output(_batch(STEP, "[2026-01-01 00:00:00,000] [INFO] DeepSpeed chatter",
                                     "Reporting training result 1: TrainingReport(checkpoint=None, metrics={})"))
    out = capsys.readouterr().out.splitlines()
    assert out == ["[pretrain target] step 2/6 loss=3.5 ppl=nan"]  # a short line per step, without Ray's prefix
    log = (tmp_path / "run" / "logs" / console.LOG_NAME).read_text()
    assert "DeepSpeed chatter" in log and "Reporting training result 1" in log and STEP in log  # every metric


def test_plain_mode_keeps_a_trainers_other_lines_whole(tmp_path, capsys):
    console.setup(tmp_path / "run")
    console._on_worker_output(_batch("[distill lk] before training: {'initial_holdout_tau_gamma3': 1.05}",
                                     "[distill lk] step 40/160 {'loss': 2.5, 'holdout_expected_acceptance': 0.25, "
                                     "'tokens_per_s': 1249.3, 'initial_holdout_tvd': 0.9}"))
    assert capsys.readouterr().out.splitlines() == [
        "[distill lk] before training: {'initial_holdout_tau_gamma3': 1.05}",
        "[distill lk] step 40/160 loss=2.5 acc=0.25 tok/s=1249"]


@contextlib.contextmanager
def _terminal_handler(name: str):
    """A library's logger with a terminal handler of its own (a StringIO here), as vLLM and DeepSpeed set up."""
    lg = logging.getLogger(name)
    stream = io.StringIO()
    own = logging.StreamHandler(stream)
    lg.addHandler(own)
    lg.setLevel(logging.INFO)
    try:
        yield lg, stream
    finally:
        lg.removeHandler(own)


def test_library_logging_goes_to_the_log_file_not_the_terminal(tmp_path):
    with _terminal_handler("vllm") as (lg, stream):
        console.setup(tmp_path)
        lg.info("engine start-up chatter")
        lg.error("a real failure")
        assert "chatter" not in stream.getvalue() and "a real failure" in stream.getvalue()
        assert "engine start-up chatter" in (tmp_path / "logs" / console.LOG_NAME).read_text()


def test_deepspeeds_own_handler_set_up_after_setup_stays_off_the_terminal(tmp_path):
    # DeepSpeed puts up a stdout handler of its own when imported, which may be after setup().
    console.setup(tmp_path)
    with _terminal_handler("DeepSpeed") as (lg, stream):
        lg.warning("Setting accelerator to CPU")
        lg.error("a real failure")
        assert "accelerator" not in stream.getvalue() and "a real failure" in stream.getvalue()
        assert "Setting accelerator to CPU" in (tmp_path / "logs" / console.LOG_NAME).read_text()
    console.reset()
    assert not lg.filters  # reset() undoes it: verbose or API use sees DeepSpeed as it is


def test_no_logs_folder_until_something_is_logged(tmp_path):
    console.setup(tmp_path / "run")
    assert not (tmp_path / "run" / "logs").exists()


def test_plain_progress_is_rate_limited(tmp_path, capsys):
    rows = [{"num_generated_tokens": 4} for _ in range(5)]
    console.setup(tmp_path)
    assert list(console.track(rows, 5, "[generate]", tokens_key="num_generated_tokens", every_s=0.0)) == rows
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(",")[0] for ln in lines] == [f"[generate] {n}/5 rows" for n in range(1, 5)]
    assert all("tokens/s" in ln for ln in lines)  # the last is the stage's own "done" line
    assert list(console.track(rows, 5, "[generate]", every_s=3600.0)) == rows
    assert capsys.readouterr().out == ""


def test_without_setup_everything_passes_through(capsys):
    console.line("[evaluate] reference d / t γ=1 T=0: τ=1.50 draft_acceptance=0.50 (2 prompts, 0.1 s)")
    assert list(console.track([{"a": 1}], 1, "[generate]", every_s=0.0)) == [{"a": 1}]
    console.ray_started()  # no-op: Ray's own printing stays
    assert capsys.readouterr().out.startswith("[evaluate] reference d / t")


def test_terminal_mode_draws_bars_and_prints_other_lines(tmp_path, capsys, monkeypatch):
    console.setup(tmp_path)
    bars = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", bars)
    monkeypatch.setattr(console, "interactive", lambda: True)
    console.training_line("pretrain target", STEP.split("] ", 1)[1])
    console.training_line("pretrain target", "before training: {'initial_loss': 9.0}")
    assert "[pretrain target]:  33%" in bars.getvalue() and "2/6" in bars.getvalue() and "loss=3.5" in bars.getvalue()
    assert capsys.readouterr().out.splitlines() == ["[pretrain target] before training: {'initial_loss': 9.0}"]
    console.training_line("pretrain target", "step 6/6 {'loss': 2.0, 'holdout_expected_acceptance': 0.61}")
    assert "pretrain target" not in console._S.bars and "acc=0.61" in bars.getvalue()
    console.expect_cells(3)  # the target alone on a task is a cell of the bar too
    console.line("[evaluate] reference autoregressive / t T=0: 15.1 tokens/s (8 prompts, 17.0 s)")
    for _ in range(2):
        console.line("[evaluate] reference d / t γ=1 T=0: τ=1.50 draft_acceptance=0.50 (2 prompts, 0.1 s)")
    assert capsys.readouterr().out == "" and not console._S.bars and "3/3" in bars.getvalue()


def test_flags_may_stand_between_overrides():
    from draftalign.cli import parse

    args = parse(["pretrain", "examples/tiny.yaml", "a=1", "-v", "b=2", "--plan", "c=3"])
    assert args.verbose and args.plan and args.overrides == ["a=1", "b=2", "c=3"]  # in order: later wins
    with pytest.raises(SystemExit):
        parse(["pretrain", "examples/tiny.yaml", "-v", "not-an-override"])


def test_verbose_flag_reaches_the_console(tmp_path, capsys):
    args = build_parser().parse_args(["run", "examples/tiny.yaml", "-v"])
    assert args.verbose and not build_parser().parse_args(["pretrain", "x.yaml", "a=1"]).verbose
    console.setup(tmp_path, args.verbose)
    assert console.verbose() and not console.interactive()
    console._on_worker_output(_batch(STEP))  # Ray's own handler prints it in verbose mode
    assert capsys.readouterr().out == ""
    assert STEP in (tmp_path / "logs" / console.LOG_NAME).read_text()


def test_error_line_names_the_log_only_when_ray_ran(tmp_path):
    assert console.error_line(ValueError("bad key")) == "draftalign: error: bad key"
    console.setup(tmp_path)
    assert console.error_line(ValueError("bad key")) == "draftalign: error: bad key"
    console._S.ray_started = True
    console._write_log("(pid=1) engine died")
    line = console.error_line(RuntimeError("the engine failed"))
    assert line == f"draftalign: error: the engine failed (logs: {tmp_path.resolve() / 'logs' / console.LOG_NAME})"


def test_step_metrics_with_nan_parse():
    m = console.parse_metrics("{'step': 2, 'loss': 3.5, 'holdout_perplexity': nan, 'resumed_from_step': None}")
    assert m["loss"] == 3.5 and m["resumed_from_step"] is None
    assert console.step_postfix(m) == "loss=3.5 ppl=nan"


def test_a_ray_failure_ends_with_one_line_naming_the_log(tmp_path):
    class TrainingFailedError(RuntimeError):
        pass

    TrainingFailedError.__module__ = "ray.train.v2.api.exceptions"
    exc = TrainingFailedError("Training failed due to worker errors:\n[Rank 0]\nTraceback (most recent call last):\n"
                              "  File \"trainer.py\", line 1\nRuntimeError: injected failure at step 3\n")
    assert not console.is_ray_failure(exc)  # no setup: the traceback, as before
    console.setup(tmp_path)
    console._S.ray_started = True
    assert console.is_ray_failure(exc) and not console.is_ray_failure(ValueError("x"))
    line = console.error_line(exc)
    assert line.startswith("draftalign: error: Training failed due to worker errors: RuntimeError: injected failure "
                           "at step 3 (logs: ") and "\n" not in line
    assert "Traceback" in (tmp_path / "logs" / console.LOG_NAME).read_text()


def test_ray_cluster_messages_go_to_the_log(tmp_path, capsys, monkeypatch):
    import ray._private.worker as rw

    monkeypatch.setattr(rw, "print_to_stdstream", rw.print_to_stdstream)  # restored after the test
    console.setup(tmp_path)
    console._route_cluster_messages()
    rw.print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes have been started"], "pid": "raylet",
                           "is_err": False}, ignore_prefix=False)
    assert capsys.readouterr().out == ""
    assert "(raylet) WARNING: 8 PYTHON worker" in (tmp_path / "logs" / console.LOG_NAME).read_text()


def test_at_a_terminal_native_writes_to_fd_2_go_to_the_log_and_python_keeps_the_terminal(tmp_path):
    # Ray's core worker writes its own lines straight to fd 2 ("core_worker.cc:... Actor with class
    # name ..."); at a terminal they belong in the log file, while draftalign's bars and error line
    # (Python's sys.stderr) stay on screen.
    import os
    import pty
    import subprocess

    code = ("import os, sys\nfrom draftalign.util import console\n"
            f"console.setup({str(tmp_path)!r})\nconsole._native_stderr_to_log()\n"
            "os.write(2, b'core_worker.cc: native chatter\\n')\n"
            "print('draftalign: error: for the user', file=sys.stderr, flush=True)\n")
    main, child = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=child, timeout=120)
        os.close(child)
        seen = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the pty's other end is closed: all was read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(main)
    assert proc.returncode == 0
    assert b"draftalign: error: for the user" in seen and b"native chatter" not in seen
    assert "core_worker.cc: native chatter" in (tmp_path / "logs" / console.LOG_NAME).read_text()
