"""Ctrl-C during training stops the run at the next step boundary, after a checkpoint.

A ``KeyboardInterrupt`` raised wherever Python happens to be can land inside the checkpoint
library while it finalises a save (orbax then logs a traceback and may leave that save half
written). :class:`StopRequest` instead turns the first SIGINT into a request the loop honours
between steps: it saves the current step and raises ``KeyboardInterrupt`` there, so nothing is
lost and nothing is cut short. A second Ctrl-C interrupts at once, as usual.

Off the main thread (where Python cannot install signal handlers) it does nothing: Ctrl-C then
behaves as Python's default.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("spdjax")


class StopRequest:
    """Context manager: while active, the first SIGINT sets :attr:`requested` instead of raising.

    >>> with StopRequest() as stop:
    ...     for step in steps:
    ...         ...
    ...         if stop.requested:
    ...             save(step); raise KeyboardInterrupt
    """

    def __init__(self):
        self.requested = False
        self._installed = False
        self._previous = None

    def _restore(self) -> None:
        # signal.signal returns None for a handler installed from C: put the default back then.
        signal.signal(signal.SIGINT,
                      signal.SIG_DFL if self._previous is None else self._previous)

    def _handle(self, signum, frame):
        if self.requested:  # the second Ctrl-C: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Interrupt received: stopping after this step's checkpoint (press Ctrl-C "
                    "again to stop at once).")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            self._restore()
            self._installed = False
