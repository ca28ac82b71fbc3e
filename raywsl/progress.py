"""What a person sees while raywsl works: one line (or a live bar) per stage, and progress with rate and ETA.

The terminal (stderr) shows only raywsl's own lines: stage starts and results (`console`), progress
(`Progress`) and warnings. Everything else, raywsl's details and Ray's, MLflow's and the libraries'
output, goes to the run's log file (logs/<verb>.log); `-v` shows it all in the terminal too. On a
terminal progress is a bar redrawn in place; elsewhere (CI, `ray job logs`) it is a line every few
seconds, so logs stay readable.

    console.info("fit: 32 shapes ...")            # a line in the terminal and in the log file
    with Progress("fit", total=32, unit="shapes") as p:
        p.update(4)                                # a live bar, or a line every PROGRESS_EVERY_S
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

console = logging.getLogger("raywsl.console")  # lines meant for the person at the terminal
log = logging.getLogger("raywsl.progress")

PROGRESS_EVERY_S = 10.0  # a progress line this often where there is no live bar
LIVE_EVERY_S = 0.25  # the live bar is redrawn at most this often


class Terminal(logging.Handler):
    """The terminal handler: raywsl's console and progress lines and warnings (everything with
    `verbose`), on a stream that may also hold one live status line, redrawn in place."""

    def __init__(self, stream: TextIO | None = None, verbose: bool = False):
        super().__init__(logging.DEBUG if verbose else logging.INFO)
        self.stream = stream or sys.stderr
        self.verbose = verbose
        self.live = (not verbose) and self.stream.isatty()
        self._status = False  # a status line is on screen, without its newline
        self.setFormatter(logging.Formatter("%(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        name = record.name
        if name == console.name:
            return True
        if name == log.name:
            return not self.live  # with a live bar, progress is drawn by status()
        return record.levelno >= (logging.WARNING if name.startswith("raywsl") else logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.WARNING and record.name != console.name:
                text = f"{record.levelname.lower()}: {text}"
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def status(self, text: str) -> None:
        """Draw `text` as the live status line (terminals only)."""
        if not self.live:
            return
        width = 120
        self.stream.write("\r\x1b[K" + text[:width])
        self.stream.flush()
        self._status = True

    def _clear(self) -> None:
        if self._status:
            self.stream.write("\r\x1b[K")
            self._status = False


def setup_logging(verbose: bool = False) -> None:
    """The terminal handler, and a buffer that keeps the log records until the command's log file
    opens (`open_log_file`): a command refused before it starts writes nothing anywhere."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, (Terminal, logging.FileHandler, _Buffer)):
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.INFO)  # raywsl's own loggers go down to DEBUG (the CLI sets that)
    root.addHandler(Terminal(verbose=verbose))
    root.addHandler(_Buffer())
    logging.captureWarnings(True)  # the libraries' warnings go to the log file, not the terminal
    for name in ("matplotlib", "urllib3", "filelock", "alembic", "numcodecs", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    route_library_logs()


def route_library_logs() -> None:
    """Ray and MLflow install handlers of their own when imported (printing to the terminal): send
    their records through raywsl's handlers instead (the log file; the terminal with -v or from
    ERROR on). Called again after importing them."""
    if is_verbose():
        return
    loggers = logging.root.manager.loggerDict
    for name in [n for n in loggers if n.split(".")[0] in ("ray", "mlflow", "alembic")]:
        lib = loggers[name]
        if isinstance(lib, logging.Logger):
            for h in list(lib.handlers):
                lib.removeHandler(h)
            lib.propagate = True


class _Buffer(logging.Handler):
    """Holds the records logged before the log file opens."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def open_log_file(path: str) -> None:
    """Log everything from now on (and what was buffered) to `path` (a local file; remote run
    folders keep their logs in the job's output)."""
    root = logging.getLogger()
    buffered: list[logging.LogRecord] = []
    for h in list(root.handlers):
        if isinstance(h, (_Buffer, logging.FileHandler)):
            buffered += getattr(h, "records", [])
            root.removeHandler(h)
            h.close()
    if "://" in path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for record in buffered:
        handler.handle(record)
    root.addHandler(handler)


def _is_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # pytest's capture, a StringIO: not the descriptor
        return False


@contextmanager
def native_output_to(path: str) -> Iterator[None]:
    """Native code (Ray's C++ core worker, libraries' C extensions) writes to file descriptor 2
    itself, past Python's logging: point descriptor 2 at the log file for the block, while raywsl's
    terminal lines and Python's sys.stderr keep going to the real terminal."""
    t = terminal()
    if t is None or t.verbose or "://" in path:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    term = os.fdopen(os.dup(saved), "w", buffering=1)
    swapped = {"terminal": _is_fd2(t.stream), "stderr": _is_fd2(sys.stderr)}
    old = t.stream, sys.stderr
    if swapped["terminal"]:
        t.stream = term
    if swapped["stderr"]:
        sys.stderr = term
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        term.flush()
        os.dup2(saved, 2)
        os.close(saved)
        t.stream, sys.stderr = old
        term.close()


def terminal() -> Terminal | None:
    """The installed terminal handler (the CLI installs one), if any."""
    for h in logging.getLogger().handlers:
        if isinstance(h, Terminal):
            return h
    return None


def is_verbose() -> bool:
    t = terminal()
    return bool(t and t.verbose)


def bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * done / max(total, 1))
    return "#" * filled + "." * (width - filled)


def eta_text(seconds: float) -> str:
    if seconds == float("inf") or seconds != seconds:
        return "?"
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


class Progress:
    """Counts work done of `total` and shows it: a live bar on a terminal, else a line every
    PROGRESS_EVERY_S (and at the end), with the rate, failures and the ETA."""

    def __init__(self, name: str, total: int, unit: str = "items", every_s: float = PROGRESS_EVERY_S,
                 start: int = 0):
        self.name, self.total, self.unit, self.every_s = name, total, unit, every_s
        self.count = self.logged = self.first = start  # `start`: work done before (a resumed run)
        self.failed = 0
        self.start = self.last_line = self.last_live = time.perf_counter()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, failed: int = 0) -> None:
        self.set(self.count + n, self.failed + failed)

    def set(self, count: int, failed: int | None = None) -> None:
        """Absolute progress (what a training loop reports)."""
        self.count = count
        self.failed = self.failed if failed is None else failed
        now = time.perf_counter()
        t = terminal()
        if t and t.live and now - self.last_live >= LIVE_EVERY_S:
            self.last_live = now
            t.status(self.text(now, live=True))
        if now - self.last_line >= self.every_s:
            self._line(now)

    def close(self) -> None:
        if self.logged != self.count:  # the final line, unless one was just written
            self._line(time.perf_counter())

    def text(self, now: float, live: bool = False) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.count - self.first) / elapsed
        eta = (self.total - self.count) / rate if rate > 0 else float("inf")
        failed = f", {self.failed} failed" if self.failed else ""
        head = f"  {self.name:11s} [{bar(self.count, self.total)}] " if live else f"{self.name}: "
        return (f"{head}{self.count}/{self.total} {self.unit}{failed}, {rate:.3g} {self.unit}/s, "
                f"{elapsed:.0f} s elapsed, eta {eta_text(eta)}")

    def _line(self, now: float) -> None:
        self.last_line = now
        self.logged = self.count
        log.info(self.text(now))
