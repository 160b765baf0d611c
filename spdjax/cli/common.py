"""What the post-hoc commands on a workdir share (``spdjax.cli.plot``, ``spdjax.cli.harvest``,
``spdjax.cli.dataset_attributions``): one ``error:`` line and an exit code instead of a
traceback for the errors a user can fix, a progress line for a pass over batches, and
:func:`resumable_pass`, the whole ``main`` of a resumable pass over a run's data.

Exit codes: 2 for bad input (a workdir without a run, a step without a checkpoint, a bad
flag value, settings that do not match a saved state), 130 after Ctrl-C, 143 after SIGTERM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterator

from absl import app, logging

from spdjax.analysis import streaming
from spdjax.config.runs import load
from spdjax.training import interrupts
from spdjax.training.progress import format_duration


def begin(argv) -> None:
    """What each analysis command's ``main`` does first: refuses positional arguments (absl's
    usage error) and keeps absl's logging to warnings."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)


def fail(code: int, message: str):
    """Prints ``error: message`` to stderr and exits with ``code``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def user_errors(interrupted: str | Callable[[], str] = "interrupted.") -> Iterator[None]:
    """Inside: a ``ValueError`` or ``OSError`` is one ``error:`` line (exit 2), an interrupt
    (Ctrl-C, or SIGTERM under :func:`stop_on_signals`) prints ``interrupted`` (a callable:
    its result at that moment; exit 130 / 143)."""
    try:
        yield
    except KeyboardInterrupt:
        signum = interrupts.received()
        fail(interrupts.exit_code(signum), interrupted() if callable(interrupted) else interrupted)
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


def result_name(prefix: str, arguments, **extra) -> str:
    """``prefix`` + a short hash of every flag in ``arguments`` (absl flag holders) and ``extra``
    (e.g. the checkpoint step): a result's default file name, different whenever what it depends
    on differs."""
    key = json.dumps({f.name: f.value for f in arguments} | extra, sort_keys=True)
    return prefix + hashlib.sha1(key.encode()).hexdigest()[:8]


def int_list(flag: str, values, example: str = "0,1,2") -> list[int]:
    """A ``DEFINE_list`` flag's values as ints; a ``ValueError`` naming the flag, its values
    and an example otherwise."""
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated ints, e.g. {flag}={example}; got "
                         f"{','.join(values)!r}.") from None


def _stamp(path: pathlib.Path):
    """What changes when ``path`` is (atomically) rewritten; None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def resumable_pass(*, label: str, workdir: str, step: int | None, out: str | None,
                   subdir: str, state_file: str, compute: Callable[[Any, pathlib.Path,
                                                                    ProgressLine], Any],
                   describe: Callable[[Any], str]) -> None:
    """The ``main`` of a resumable pass (``spdjax.harvest``, ``spdjax.dataset_attributions``):
    loads the run in ``workdir`` at ``step``, runs ``compute(run, out_dir, progress)``
    (``out_dir``: ``out`` or ``<workdir>/analysis/<subdir>``; it keeps its state in
    ``out_dir/state_file``) and prints the directory and ``describe(result)``. SIGTERM stops
    it like Ctrl-C; the interrupt message says whether a state was saved (and of how many
    batches), so "run the same command to resume" is said only when there is one."""
    stop_on_signals()
    where = {}

    def interrupted() -> str:
        path = where.get("state")
        now = None if path is None else _stamp(path)
        if now is None:
            return f"interrupted before the first batch finished: no state saved ({label})."
        done = streaming.read_meta(path).get("done")
        if now != where["before"]:
            return (f"interrupted: the state after {done} batches is saved in {path}; run the "
                    "same command to resume.")
        return (f"interrupted before another batch finished; the earlier state of {done} "
                f"batches in {path} is kept: run the same command to resume.")

    with user_errors(interrupted):
        run = load(workdir, step=step)
        out_dir = pathlib.Path(out or run.workdir / "analysis" / subdir)
        where["state"] = out_dir / state_file
        where["before"] = _stamp(where["state"])
        result = compute(run, out_dir, ProgressLine(label))
        print(out_dir)
        print(describe(result))
