"""What the post-hoc commands on a workdir share (``spdjax.cli.plot``, ``spdjax.cli.harvest``,
``spdjax.cli.dataset_attributions``): one ``error:`` line and an exit code instead of a
traceback for the errors a user can fix, and a progress line for a pass over batches.

Exit codes: 2 for bad input (a workdir without a run, a step without a checkpoint, a bad
flag value, settings that do not match a saved state), 130 after Ctrl-C, 143 after SIGTERM.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

from spdjax.training import interrupts
from spdjax.training.progress import format_duration


def fail(code: int, message: str):
    """Prints ``error: message`` to stderr and exits with ``code``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def user_errors(interrupted: str = "interrupted.") -> Iterator[None]:
    """Inside: a ``ValueError`` or ``OSError`` is one ``error:`` line (exit 2), an interrupt
    (Ctrl-C, or SIGTERM under :func:`stop_on_signals`) prints ``interrupted`` (exit 130 /
    143)."""
    try:
        yield
    except KeyboardInterrupt:
        signum = interrupts.received()
        fail(interrupts.exit_code(signum), interrupted)
    except (ValueError, OSError) as e:
        fail(2, str(e) if isinstance(e, (ValueError, FileNotFoundError))
             else f"{type(e).__name__}: {e}")


def stop_on_signals() -> None:
    """SIGTERM (a scheduler's or ``kill``'s) raises ``KeyboardInterrupt`` like Ctrl-C, so a pass
    saves its state before the process ends; a second signal ends it at once."""

    def second(first, signum):
        print(f"error: {interrupts.signal_name(signum)} again: stopped at once.", file=sys.stderr)

    interrupts.ShutdownGuard(second).install()


class ProgressLine:
    """``label: batch i/N | r batches/s | ETA`` on stderr, at most ``lines`` times per pass
    (and after the last batch)."""

    def __init__(self, label: str, lines: int = 20, stream=None):
        self.label, self.lines = label, lines
        self.stream = stream or sys.stderr
        self._last, self._first = -1.0, None

    def __call__(self, done: int, total: int, seconds: float) -> None:
        if self._first is None:  # a resumed pass starts after the batches already done
            self._first = done - 1
        every = max(1, total // self.lines)
        if done % every and done != total:
            return
        now = time.perf_counter()
        if done != total and now - self._last < 0.5:
            return
        self._last = now
        rate = (done - self._first) / seconds if seconds > 0 else float("nan")
        eta = (total - done) / rate if rate > 0 else float("nan")
        self.stream.write(f"{self.label}: batch {done}/{total} | {rate:.2f} batches/s | ETA "
                          f"{format_duration(eta)}\n")
        self.stream.flush()
