"""The terminal of a `draftalign` stage: draftalign's own lines, progress bars, everything else in RUN/logs/.

By default a stage prints only what draftalign says: a header per stage, a progress bar per long
step (training steps with loss and held-out acceptance, generated rows with tokens/s, evaluation
cells), warnings and the final table. What Ray (driver and worker logs), Ray Data, Ray Train,
DeepSpeed, vLLM and transformers print goes to `RUN/logs/draftalign.log`, and
`RUN/logs/ray-session` points at Ray's own session logs. When stdout is not a terminal (CI, a
Ray job's log) the bars become plain lines: one per training log step (loss, held-out
acceptance, tokens/s), at most one every PLAIN_EVERY_S seconds for rows. `-v/--verbose` (or
DRAFTALIGN_VERBOSE=1) keeps everything on the terminal, as it was.

The hooks: `setup` (cli.py, once the config is read), `ray_started` (cluster/session.py, after
`ray.init`), `track` (the generate pass's rows), `line`/`expect_cells` (evaluate's log) and
`error_line` (cli.py's last line). Without `setup` (the Python API, in-process tests) every
hook passes lines through unchanged.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:  # tqdm is imported when the first bar opens
    from tqdm import tqdm

VERBOSE_ENV = "DRAFTALIGN_VERBOSE"
LOG_NAME = "draftalign.log"
SESSION_LINK = "ray-session"
PLAIN_EVERY_S = 30.0  # plain mode: at most one progress line this often (rows, cells)
# Loggers whose terminal output goes to the log file only (their warnings too: none needs the user).
LIBRARIES = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "deepspeed", "DeepSpeed", "vllm",
             "transformers", "datasets", "accelerate", "torch", "py.warnings")
# A training progress line as workers/trainer.py prints it: "[pretrain target] step 20/60 {...}".
TRAIN_LINE = re.compile(r"^\[(?P<name>(?:pretrain|distill)\b[^\]]*)\] (?P<msg>.*)$")
STEP = re.compile(r"^step (?P<n>\d+)/(?P<total>\d+)(?: (?P<metrics>\{.*\}))?$")
# A sweep cell's line, or the target alone's on a task ("... autoregressive / task T=0: ..."): each is a cell of the bar.
CELL_LINE = re.compile(r"^\[evaluate\] (reference|vllm) (.+ γ=\d+|autoregressive / \S+) T=")
_FLOAT = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"


class RayLogBatch(TypedDict, total=False):
    """A batch of worker lines as Ray's log monitor hands it over (its keys, as far as they are read)."""

    pid: int | str  # a worker's pid, or "autoscaler" / "raylet" for the cluster's own lines
    actor_name: str
    task_name: str
    ip: str
    localhost: str
    lines: list[str]


# A step line's metrics: numbers, or the number's text when the line could not be read as a dict.
StepMetrics = dict[str, float | str]


class _State:
    def __init__(self) -> None:
        self.configured = False
        self.verbose = False
        self.log_dir: Path | None = None
        self.handler: logging.Handler | None = None
        self.ray_started = False
        self.told = False
        self.lock = threading.RLock()
        self.bars: dict[str, tqdm] = {}
        self.cells_total: int | None = None
        self.cells_last = 0.0
        self.terminal = None  # the terminal's stderr once fd 2 goes to the log file


_S = _State()


def verbose() -> bool:
    return _S.verbose or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def interactive() -> bool:
    """Bars instead of lines: set up by the CLI, not verbose, and stdout is a terminal."""
    if not _S.configured or verbose():
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def log_file() -> Path | None:
    return _S.log_dir / LOG_NAME if _S.log_dir else None


class _RunLogHandler(logging.FileHandler):
    """RUN/logs/draftalign.log, opened (and its folder made) at the first record: a stage refused
    before it starts leaves no logs folder behind."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.setLevel(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def write_line(self, text: str) -> None:
        """A raw line (a worker's output, as Ray formats it) into the same file."""
        with self.lock:  # logging.Handler's own lock
            if self.stream is None:
                self.stream = self._open()
            self.stream.write(text.rstrip("\n") + "\n")
            self.stream.flush()


def setup(run_output: str | Path, verbose_flag: bool = False) -> None:
    """Route library logging to RUN/logs/draftalign.log and quiet it on the terminal (unless verbose)."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"  # on-policy rounds and child processes see it too
    _S.verbose = verbose_flag
    _S.configured = True
    _S.log_dir = Path(run_output).expanduser().resolve() / "logs"
    old = _S.handler
    _S.handler = _RunLogHandler(_S.log_dir / LOG_NAME)
    for name in ("", "draftalign", *_library_loggers()):
        lg = logging.getLogger(name)
        if old is not None and old in lg.handlers:
            lg.removeHandler(old)
    logging.getLogger("draftalign").setLevel(logging.DEBUG)
    if not verbose():
        # Ray Data's bars and its execution summary, in the driver and in Ray Train's data actors.
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        logging.captureWarnings(True)  # library warnings to py.warnings: the log file only
        import ray  # noqa: F401  (Ray sets up its logger on import: quieted below, before ray.init's banner)
        # transformers' and the Hub's download/loading bars (this driver and, inherited, Ray's workers).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        _hf_bars_off()
        # ray.llm gives each of its loggers a terminal handler of its own on import unless "ray.llm"
        # has one: this one lets their records propagate to "ray" (the log file; errors on the terminal).
        llm = logging.getLogger("ray.llm")
        if not llm.handlers:
            llm.addHandler(logging.NullHandler())
        # DeepSpeed gives its logger a stdout handler of its own on import (whenever that is):
        # a filter set now sends its records below ERROR to the log file instead.
        ds = logging.getLogger("DeepSpeed")
        if not any(isinstance(f, _LogFileOnly) for f in ds.filters):
            ds.addFilter(_LogFileOnly())
    _route_loggers()


class _LogFileOnly(logging.Filter):
    """A logger filter: records below ERROR go to RUN/logs/draftalign.log only, not to the
    logger's own (terminal) handlers; errors pass as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or verbose():
            return True
        if _S.handler is not None and record.levelno >= _S.handler.level:
            _S.handler.handle(record)
        return False


def _native_stderr_to_log() -> None:
    """What native code writes to this process's fd 2 goes to the log file: Ray's core worker
    ("core_worker.cc:... Actor with class name ... has constructor arguments in the object
    store"), vLLM's and DeepSpeed's C++ parts; Python's sys.stderr keeps the terminal (bars,
    warnings for the user, the error line). Only at a terminal: captured output (CI, tests,
    a Ray job's log) keeps fd 2 as it is."""
    if _S.log_dir is None or getattr(sys.stderr, "draftalign_terminal", False):
        return
    try:
        if not os.isatty(2):
            return
        _S.log_dir.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(_S.log_dir / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None),
                             errors="backslashreplace")
        os.dup2(log_fd, 2)
        os.close(log_fd)
    except OSError:
        return
    terminal.draftalign_terminal = True  # type: ignore[attr-defined]
    _S.terminal = sys.stderr = terminal


def _terminal():
    """Where bars go: the terminal's stderr (fd 2 itself, unless _native_stderr_to_log moved it)."""
    return _S.terminal or sys.__stderr__


def _route_loggers() -> None:
    """Our file handler on the root logger and on each library logger that does not propagate;
    the libraries' own terminal handlers raised to ERROR (unless verbose). Idempotent: run again
    whenever a library may have set up its logging since (Ray at init, vLLM on import)."""
    h = _S.handler
    if h is None:
        return
    root = logging.getLogger()
    if h not in root.handlers:
        root.addHandler(h)
    for name in ("draftalign", *_library_loggers()):
        lg = logging.getLogger(name)
        if not lg.propagate and h not in lg.handlers:
            lg.addHandler(h)
        if verbose():
            continue
        for other in lg.handlers:
            if isinstance(other, logging.StreamHandler) and not isinstance(other, logging.FileHandler):
                other.setLevel(max(other.level, logging.ERROR))


def _hf_bars_off() -> None:
    """The loading bars of a transformers or huggingface_hub imported before the env var was set."""
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()


def _library_loggers() -> list[str]:
    """LIBRARIES and every logger below them that exists now (ray.llm.* each get a handler of
    their own on import, and do not propagate)."""
    known = [n for n in list(logging.root.manager.loggerDict)
             if any(n == lib or n.startswith(lib + ".") for lib in LIBRARIES)]
    return sorted(set(LIBRARIES) | set(known))


def ray_started() -> None:
    """After `ray.init`: worker output to the log file (and, unless verbose, off the terminal but
    for draftalign's own progress lines), Ray's session logs linked, Ray Data kept quiet."""
    if not _S.configured or _S.ray_started:
        return
    _S.ray_started = True
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: leave its printing as it is
        dispatcher = None
    if dispatcher is not None:
        if not verbose():
            dispatcher.remove_handler("ray_print_logs")
            _route_cluster_messages()
        dispatcher.add_handler("draftalign_console", _on_worker_output)
    if not verbose():
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM imported in this driver after now
        try:
            from ray.data import DataContext

            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False
            for name in ("enable_operator_progress_bars", "print_on_execution_start", "verbose_stats_logs"):
                if hasattr(ctx, name):
                    setattr(ctx, name, False)
        except ImportError:
            pass
    _link_session()
    _route_loggers()
    if not verbose():
        _native_stderr_to_log()
    _tell_once()


def _route_cluster_messages() -> None:
    """Ray's error listener prints the cluster's messages ("(raylet) WARNING: 8 PYTHON worker
    processes have been started...", a worker's death) with print_to_stdstream: to the log file
    instead. A failure they explain still ends the run with its error line, which names the log."""
    import ray._private.worker as rw

    if getattr(rw.print_to_stdstream, "draftalign", False):
        return

    def to_log(data: RayLogBatch, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            _write_log(f"{_prefix(data)} {line}")

    to_log.draftalign = True  # type: ignore[attr-defined]
    rw.print_to_stdstream = to_log


def _link_session() -> None:
    try:
        import ray._private.worker as rw

        session = Path(rw._global_node.get_session_dir_path()) / "logs"
    except Exception:  # noqa: BLE001  (a client connection, another Ray: no local session folder)
        return
    link = _S.log_dir / SESSION_LINK
    try:
        _S.log_dir.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(session, target_is_directory=True)
    except OSError:
        _write_log(f"Ray's session logs: {session}")


def _tell_once() -> None:
    if _S.told or verbose():
        return
    _S.told = True
    emit(f"[logs] Ray, Ray Data, DeepSpeed and vLLM output: {_S.log_dir}/ ({LOG_NAME}, {SESSION_LINK}/); "
         "-v shows it here")


def _write_log(text: str) -> None:
    h = _S.handler
    if isinstance(h, _RunLogHandler):
        try:
            h.write_line(text)
        except OSError:
            pass


def _prefix(data: RayLogBatch) -> str:
    """Ray's own "(Name pid=N)" in front of a forwarded worker line, without its colours."""
    pid = data.get("pid")
    if pid in ("autoscaler", "raylet"):
        return f"({pid})"
    name = data.get("actor_name") or data.get("task_name") or ""
    ip = data.get("ip")
    where = "" if ip == data.get("localhost") else f", ip={ip}"
    return f"({name + ' ' if name else ''}pid={pid}{where})"


def _on_worker_output(data: RayLogBatch) -> None:
    """Ray's log thread hands over each batch of worker lines: all into the log file; unless
    verbose, draftalign's training lines (only) on to the terminal."""
    try:
        _worker_output(data)
    except Exception:  # noqa: BLE001  (never kill Ray's log thread over a line)
        pass


def _worker_output(data: RayLogBatch) -> None:
    prefix, lines = _prefix(data), data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its events, as Ray would print them; warnings reach the terminal
        try:
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        except ImportError:
            pass
        for line in lines:
            _write_log(f"{prefix} {line}")
            if not verbose() and ("Warning" in line or "Error" in line):
                emit(f"{prefix} {line}")
        return
    for line in lines:
        _write_log(f"{prefix} {line}")
        if verbose():
            continue
        m = TRAIN_LINE.match(line)
        if m:
            training_line(m["name"], m["msg"])


# ---- the terminal ----------------------------------------------------------------------------

def _new_bar(desc: str, total: int | None, unit: str, initial: int = 0):
    from tqdm import tqdm

    _route_loggers()  # a library imported since may have put up its own terminal handler
    try:
        shape = os.get_terminal_size(_terminal().fileno())
    except (AttributeError, OSError, ValueError):
        shape = os.terminal_size((0, 0))
    # A terminal of no size (a pty nobody sized: `script` run from a job) made tqdm hide every bar.
    size = {"dynamic_ncols": True} if min(shape) > 0 else {"ncols": 100, "nrows": 24}
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=_terminal(), leave=True,
                mininterval=0.5, smoothing=0.3, **size)


def emit(text: str) -> None:
    """Print a line of draftalign's (above any open bar)."""
    with _S.lock:
        bars = list(_S.bars.values())
        for b in bars:
            b.clear()
        print(text, flush=True)
        for b in bars:
            b.refresh()


def close_bars() -> None:
    with _S.lock:
        for b in _S.bars.values():
            b.close()
        _S.bars.clear()


def _close(key: str) -> None:
    with _S.lock:
        b = _S.bars.pop(key, None)
        if b is not None:
            b.close()


def parse_metrics(text: str | None) -> StepMetrics:
    """The metrics dict of a step line (its repr); nan and inf, which literal_eval refuses, as floats."""
    if not text:
        return {}
    try:
        return ast.literal_eval(re.sub(r"\b(nan|inf)\b", r"'\1'", text))
    except (ValueError, SyntaxError):
        return {k: v for k, v in re.findall(rf"'(\w+)': ({_FLOAT})", text)}


def step_postfix(metrics: StepMetrics) -> str:
    """loss, then held-out acceptance (or perplexity) when this step evaluated."""
    parts = []
    for key, label in (("loss", "loss"), ("holdout_expected_acceptance", "acc"),
                       ("holdout_perplexity", "ppl"), ("tokens_per_s", "tok/s")):
        v = metrics.get(key)
        if v is None:
            continue
        try:
            parts.append(f"{label}={float(v):.4g}" if key != "tokens_per_s" else f"{label}={float(v):.0f}")
        except (TypeError, ValueError):
            parts.append(f"{label}={v}")
    return " ".join(parts)


def training_line(name: str, msg: str) -> None:
    """A trainer's line `[name] msg`: a bar update for a step at a terminal, a short line for it
    elsewhere (every metric stays in the log file and the tracker), any other line as it is."""
    m = STEP.match(msg)
    if not m:
        emit(f"[{name}] {msg}")
        return
    n, total = int(m["n"]), int(m["total"])
    if not interactive():
        emit(f"[{name}] step {n}/{total} {step_postfix(parse_metrics(m['metrics']))}".rstrip())
        return
    with _S.lock:
        bar = _S.bars.get(name)
        if bar is None:
            bar = _S.bars[name] = _new_bar(f"[{name}]", total, "step", initial=max(0, n - 1))
        bar.set_postfix_str(step_postfix(parse_metrics(m["metrics"])), refresh=False)
        bar.update(n - bar.n)
    if n >= total:
        _close(name)


class _Plain:
    """Plain-mode progress: a line at most every `every_s` seconds."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self.last = every_s, time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            return True
        return False


def track(items: Iterable[dict], total: int, desc: str, unit: str = "rows",
          tokens_key: str | None = None, every_s: float | None = None) -> Iterator[dict]:
    """Yield `items`, showing how many of `total` passed (and tokens/s of `tokens_key`): a bar on a
    terminal, a plain line at most every `every_s` seconds otherwise (none without `setup`)."""
    t0, n, tokens = time.monotonic(), 0, 0
    _route_loggers()  # the libraries this step imported (ray.llm, vLLM) may have their own handlers
    bar = _new_bar(desc, total, unit) if interactive() else None
    if bar is not None:
        with _S.lock:
            _S.bars[desc] = bar
    plain = _Plain(PLAIN_EVERY_S if every_s is None else every_s) if _S.configured and bar is None else None
    try:
        for item in items:
            n += 1
            tokens += int(item.get(tokens_key) or 0) if tokens_key else 0
            rate = tokens / max(time.monotonic() - t0, 1e-9)
            if bar is not None:
                with _S.lock:
                    if tokens_key:
                        bar.set_postfix_str(f"{rate:.1f} tokens/s", refresh=False)
                    bar.update(1)
            elif plain is not None and plain.due() and n < total:
                emit(f"{desc} {n}/{total} {unit}" + (f", {rate:.1f} tokens/s" if tokens_key else ""))
            yield item
    finally:
        if bar is not None:
            _close(desc)


def expect_cells(total: int) -> None:
    """How many evaluation cells the sweep will log (the cell bar's total)."""
    _S.cells_total = total


def line(msg: str) -> None:
    """evaluate's log: a sweep cell's line updates the cell bar on a terminal; anything else prints."""
    if interactive() and CELL_LINE.match(msg):
        with _S.lock:
            bar = _S.bars.get("[evaluate]")
            if bar is None:
                bar = _S.bars["[evaluate]"] = _new_bar("[evaluate]", _S.cells_total, "cell")
            bar.set_postfix_str(msg.removeprefix("[evaluate] ").split(" (")[0], refresh=False)
            bar.update(1)
            done = bar.total is not None and bar.n >= bar.total
        if done:
            _close("[evaluate]")
        return
    emit(msg)


def is_ray_failure(exc: BaseException) -> bool:
    """A Ray error (a training run, task or actor that failed) in a quiet run: the CLI ends it with
    its error line (the traceback goes to the log) instead of a traceback; -v keeps the traceback."""
    return _S.configured and _S.ray_started and not verbose() and type(exc).__module__.startswith("ray.")


def _short(exc: BaseException) -> str:
    """A Ray error's message holds a worker's whole traceback: keep its first line and its
    "SomeError: reason" lines."""
    text = str(exc)
    if not type(exc).__module__.startswith("ray.") or "\n" not in text.strip():
        return text
    first = text.strip().splitlines()[0].strip()
    causes = [ln.strip() for ln in text.splitlines()
              if re.match(r"^\s*[\w.]*(Error|Exception): ", ln) and ln.strip() != first]
    return " ".join([first, "; ".join(dict.fromkeys(causes))])[:1000].strip()


def error_line(exc: BaseException) -> str:
    """The run's last line; names the log file when the cause may be in it (Ray ran: its workers'
    output is there, not on the terminal)."""
    close_bars()
    if _S.handler is not None and _S.ray_started:  # a refusal before Ray starts leaves no logs folder
        logging.getLogger("draftalign").error("the run failed", exc_info=exc)
    text = f"draftalign: error: {_short(exc) if _S.ray_started and not verbose() else exc}"
    path = log_file()
    if _S.ray_started and path is not None and path.is_file():
        text += f" (logs: {path})"
    return text


def reset() -> None:
    """Forget `setup` (tests)."""
    close_bars()
    for name in ("", "draftalign", *_library_loggers()):
        if _S.handler is not None:
            logging.getLogger(name).removeHandler(_S.handler)
    if _S.handler is not None:
        _S.handler.close()
    ds = logging.getLogger("DeepSpeed")
    for f in [f for f in ds.filters if isinstance(f, _LogFileOnly)]:
        ds.removeFilter(f)
    _S.__init__()


