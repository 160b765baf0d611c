"""Ctrl-C (SIGINT) and SIGTERM during training stop the run at the next step boundary, after a
checkpoint.

A ``KeyboardInterrupt`` raised wherever Python happens to be can land inside the checkpoint
library while it finalises a save (orbax then logs a traceback and may leave that save half
written), and SIGTERM (what schedulers, ``docker stop`` and preemption send) kills a process at
once by default. :class:`StopRequest` instead turns the first of either signal into a request the
loop honours between steps: it saves the current step and raises ``KeyboardInterrupt`` there, so
nothing is lost and nothing is cut short. A second signal interrupts at once, as usual.

:func:`received` tells which signal stopped the run (the CLI exits 130 after SIGINT, 143 after
SIGTERM); :class:`ShutdownGuard` is the CLI's process-wide handler: outside the training loop the
first signal raises ``KeyboardInterrupt`` (as Python's default for SIGINT does), and a signal
while the process is already shutting down ends it quietly with one line instead of a traceback.

Off the main thread (where Python cannot install signal handlers) they do nothing: the signals
then behave as Python's default.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Callable

log = logging.getLogger("spdjax")
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signals this process's handlers got, in order


def received() -> int | None:
    """The first SIGINT or SIGTERM a handler of this module got (None: none yet)."""
    return _received[0] if _received else None


def reset() -> None:
    """Forgets the signals received (a process that trains again after an interrupt)."""
    _received.clear()


def exit_code(signum: int | None) -> int:
    """The shell's exit code of a process stopped by ``signum``: 130 for SIGINT, 143 for
    SIGTERM (128 + the signal's number)."""
    return 128 + int(signum if signum is not None else signal.SIGINT)


def signal_name(signum: int | None) -> str:
    """``"SIGTERM"``, ``"SIGINT"``, ..."""
    return signal.Signals(signum if signum is not None else signal.SIGINT).name


class _Handlers:
    """One handler for SIGINT and SIGTERM on the main thread; restores the previous ones."""

    def __init__(self):
        self._previous: dict[int, object] = {}

    def _install(self, handler: Callable) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, handler)

    def _restore(self) -> None:
        # signal.signal returns None for a handler installed from C: put the default back then.
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}


class StopRequest(_Handlers):
    """Context manager: while active, the first SIGINT or SIGTERM sets :attr:`requested` (and
    :attr:`signum`) instead of raising or killing.

    >>> with StopRequest() as stop:
    ...     for step in steps:
    ...         ...
    ...         if stop.requested:
    ...             save(step); raise KeyboardInterrupt
    """

    def __init__(self):
        super().__init__()
        self.requested = False
        self.signum: int | None = None

    def _handle(self, signum, frame):
        if self.requested:  # the second signal: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        _received.append(signum)
        if signum == signal.SIGTERM:
            log.warning("SIGTERM received: stopping after this step's checkpoint.")
        else:
            log.warning("Interrupt received: stopping after this step's checkpoint (press "
                        "Ctrl-C again to stop at once).")

    def __enter__(self) -> "StopRequest":
        self._install(self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


class ShutdownGuard(_Handlers):
    """The CLI's handler for the whole process (:class:`StopRequest` takes over while training).

    The first SIGINT or SIGTERM outside the training loop raises ``KeyboardInterrupt`` (recorded
    by :func:`received`); any signal after the first (the process is shutting down: waiting for
    a checkpoint, closing files) calls ``on_second(first_signum, signum)``, which should print
    its line; the process then exits at once with the first signal's exit code, without a
    traceback.
    """

    def __init__(self, on_second: Callable[[int, int], None]):
        super().__init__()
        self.on_second = on_second

    def _handle(self, signum, frame):
        if not _received:
            _received.append(signum)
            raise KeyboardInterrupt
        first = _received[0]
        try:
            self.on_second(first, signum)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
            os._exit(exit_code(first))

    def __enter__(self) -> "ShutdownGuard":
        self._install(self._handle)
        return self

    def install(self) -> "ShutdownGuard":
        """Installs the handlers for the rest of the process (through interpreter exit, when
        pending checkpoint threads are joined)."""
        return self.__enter__()

    def __exit__(self, *exc) -> None:
        self._restore()
