"""Progress reports and the ``"spdjax"`` logger's output: :class:`Progress`, :func:`log_to`.

A run reports ``step i/N | loss | steps/s | ETA`` at every log step. Printed to a terminal
(:func:`log_to` on a stream that is a TTY) the report is one live line, redrawn in place with a
bar; to a file, a pipe or a notebook it is one plain line per report, as tqdm and rich users
expect. Other messages (warnings, the summary) print above the live line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Iterator, TextIO

log = logging.getLogger("spdjax")
BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    """``seconds`` as ``"1h02m03s"``, ``"2m03s"`` or ``"3s"`` (``"?"`` when not finite)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_bytes(n: float) -> str:
    """``n`` bytes as ``"1.5 GB"``, ``"20.0 MB"``, ``"512 B"`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # unreachable


def evaluation_line(n_examples: int, microbatches: int = 1) -> str:
    """``"Evaluating on N examples..."`` (``" in M chunks"`` when microbatched)."""
    chunks = f" in {microbatches} chunks" if microbatches > 1 else ""
    return f"Evaluating on {n_examples} examples{chunks}..."


def announce_evaluation(n_examples: int, microbatches: int = 1) -> None:
    """Logs :func:`evaluation_line` before a final evaluation starts (it can take a while)."""
    log.info(evaluation_line(n_examples, microbatches))


class Progress:
    """Logs ``step i/N | loss | steps/s | ETA`` lines; measures rate since the last mark."""

    def __init__(self, total_steps: int, start_step: int = 0, *, label: str = ""):
        self.total, self.start = total_steps, start_step
        self.prefix = f"{label}: " if label else ""
        self._last_step, self._last_time = start_step, time.perf_counter()
        self.steps_per_sec = float("nan")

    def mark(self, step: int) -> float:
        """Updates the rate estimate at ``step`` and returns steps/s since the last mark."""
        now = time.perf_counter()
        if step > self._last_step:
            self.steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        return self.steps_per_sec

    def line(self, step: int, loss: float) -> str:
        eta = (self.total - step) / self.steps_per_sec if self.steps_per_sec > 0 else float("nan")
        return (f"{self.prefix}step {step:>{len(str(self.total))}}/{self.total} | loss {loss:.4e} "
                f"| {self.steps_per_sec:7.1f} steps/s | ETA {format_duration(eta)}")

    def report(self, step: int, loss: float) -> None:
        log.info(self.line(step, loss), extra={"progress": (step, self.total)})

    def report_chunk(self, step: int, loss: float) -> None:
        """:meth:`mark` then :meth:`report`: one line per chunk of steps (e.g. target training)."""
        self.mark(step)
        self.report(step, loss)


class _Formatter(logging.Formatter):
    """The message alone; ``WARNING: message`` from warnings up."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return f"{record.levelname}: {msg}" if record.levelno >= logging.WARNING else msg


class _LiveHandler(logging.StreamHandler):
    """On a terminal: progress records redraw one line in place (``\\r``) with a bar; any other
    record clears that line, prints, and the bar is drawn again below it."""

    def __init__(self, stream):
        super().__init__(stream)
        self._live = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            progress = getattr(record, "progress", None)
            if progress is None:
                self.stream.write("\r\033[K")  # clear the live line, print the record
                self.stream.write(self.format(record) + self.terminator)
                if self._live:
                    self.stream.write(self._live)
            else:
                step, total = progress
                filled = int(BAR_WIDTH * step / max(total, 1))
                bar = "#" * filled + "." * (BAR_WIDTH - filled)
                self._live = f"[{bar}] {self.format(record)}"
                self.stream.write("\r\033[K" + self._live)
                if step >= total:
                    self.stream.write(self.terminator)
                    self._live = ""
            self.flush()
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)

    def close(self) -> None:
        if self._live:  # leave the cursor on a fresh line
            self.stream.write(self.terminator)
            self._live = ""
        super().close()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def log_to(stream: TextIO | None = None, level: int = logging.INFO) -> Iterator[None]:
    """Prints the ``"spdjax"`` logger's records to ``stream`` (default stdout) while active: a
    live progress line on a terminal, plain lines elsewhere.

    Does nothing if the logger already has a handler (an application configured it).
    """
    if log.handlers:
        yield
        return
    stream = stream or sys.stdout
    handler = _LiveHandler(stream) if _is_terminal(stream) else logging.StreamHandler(stream)
    handler.setFormatter(_Formatter("%(message)s"))
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    try:
        yield
    finally:
        handler.flush()
        log.removeHandler(handler)
        if isinstance(handler, _LiveHandler):
            handler.close()
        log.setLevel(old_level)
        log.propagate = old_propagate
