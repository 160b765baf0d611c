"""Command line: ``python -m spdjax.main --config=configs/tms.py[:variant] [--workdir=DIR]``
(or, installed, ``spdjax --config=tms:5-2``: a config file by path or by name).

Config fields are overridden with ``--config.key=value`` (e.g. ``--config.steps=2000``). A run
resumes from the latest good checkpoint in its workdir; ``--fresh`` discards that run instead, and
``--allow_config_change=lr,steps`` resumes it with those fields changed on purpose (e.g. a smaller
lr after a divergence, or more steps for a finished run).

Exit codes: 0 done; 2 a user error (bad flag or config value, workdir in use or holding another
run), printed as one ``error:`` line; 3 the run diverged (its good checkpoints are kept); 4 the
evaluation failed after training (rerun to evaluate); 130 interrupted by Ctrl-C, 143 stopped by
SIGTERM (rerun to resume; either signal saves the current step first, a second one during the
shutdown ends the process at once with one line). A full disk while writing ends with one
``error:`` line naming the workdir and its disk (exit 2).
"""

import errno
import logging as stdlib_logging
import os
import pathlib
import re
import shutil
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from spdjax.config import files as config_files
from spdjax.config.runs import train_and_evaluate
from spdjax.training import distributed, interrupts, targets, writers
from spdjax.training.loop import DivergenceError, EvaluationError
from spdjax.training.progress import format_bytes, log_to
from spdjax.training.workdir import WorkdirLockedError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tms.py:5-2.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Output directory (default: workdir/<experiment>_<variant>).")
_FRESH = flags.DEFINE_bool("fresh", False, "Discard an existing run in the workdir and start over.")
_ALLOW = flags.DEFINE_list("allow_config_change", [],
                           "Config fields (dotted prefixes) a resume may change, e.g. lr,steps.")


def _fail(code: int, message: str, *, at_once: bool = False):
    """One ``error:`` line on stderr, then exit ``code`` (``at_once``: without waiting for the
    checkpoint library's background threads, e.g. ones still failing on a full disk)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if at_once:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


_HELD_LOGGERS = ("absl", "asyncio")  # orbax logs through absl; abandoned tasks through asyncio


class _HeldCheckpointErrors(stdlib_logging.Filter):
    """Holds the checkpoint library's error reports instead of printing them: its (orbax's) error
    records, which come with a traceback per background thread, and the tracebacks its native
    callbacks print through ``sys.excepthook`` or ``sys.unraisablehook`` while it fails (e.g.
    "Event loop is closed" on a full disk), and asyncio's "Task exception was never retrieved"
    for the library's reads abandoned by a failed restore. The error that reaches the CLI is
    reported in one line; the held reports are printed only if the CLI meets an error it cannot
    name."""

    def __init__(self):
        super().__init__()
        self.held: list = []
        self._hook = self._unraisable = None

    def filter(self, record: stdlib_logging.LogRecord) -> bool:
        failed = record.levelno >= stdlib_logging.ERROR or record.exc_info
        if failed and ("orbax" in record.pathname or record.name == "asyncio"):
            self.held.append(record)
            return False
        return True

    def _excepthook(self, *exc_info) -> None:
        self.held.append(exc_info)

    def _unraisablehook(self, unraisable) -> None:
        self.held.append(unraisable)

    def install(self) -> "_HeldCheckpointErrors":
        for name in _HELD_LOGGERS:
            stdlib_logging.getLogger(name).addFilter(self)
        self._hook, sys.excepthook = sys.excepthook, self._excepthook
        self._unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisablehook
        return self

    def release(self) -> None:
        """Stops holding and prints what was held (through the handlers it was kept from)."""
        for name in _HELD_LOGGERS:
            stdlib_logging.getLogger(name).removeFilter(self)
        if self._hook is not None:
            sys.excepthook, self._hook = self._hook, None
            sys.unraisablehook, self._unraisable = self._unraisable, None
        for item in self.held:
            if isinstance(item, stdlib_logging.LogRecord):
                stdlib_logging.getLogger(item.name).handle(item)
            elif isinstance(item, tuple):
                sys.excepthook(*item)
            else:
                sys.unraisablehook(item)
        self.held = []


def _config_paths(argv: list[str]) -> list[str]:
    """``--config=tms:5-2`` (a name, as ``spdjax.config.load`` takes) -> the file's path."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            spec = arg[len("--config="):]
            name, sep, variant = spec.partition(":")
            if name and not name.endswith(".py"):
                try:
                    name = str(config_files.config_path(name))
                except ValueError as e:
                    _fail(2, str(e))
                arg = f"--config={name}{sep}{variant}"
            elif name and not os.path.isfile(name):
                _fail(2, f"config file {name} not found (--config takes a config file's path, "
                         "e.g. configs/tms.py:5-2, or a config name, e.g. tms:5-2).")
        out.append(arg)
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one ``error:`` line and exit code 2 for a bad flag or config."""
    try:
        return flags.FLAGS(_config_paths(argv))
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _fail(2, " ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else (lines or [repr(e)])[0])
    except (KeyError, AttributeError) as e:  # a --config.<field> the config does not have
        text = re.sub(r"\s+", " ", re.sub(r"\\n|[\\'\"]", " ", str(e))).strip()
        _fail(2, f"unknown config field: {text}")
    except (ValueError, TypeError) as e:
        _fail(2, f"{type(e).__name__}: {e}")


def _stopped_message(signum: int | None, workdir: str) -> str:
    """The line of a run stopped by ``signum`` (SIGINT: Ctrl-C, or SIGTERM)."""
    what = "terminated (SIGTERM)" if signum == interrupts.signal.SIGTERM else "interrupted"
    return (f"{what}; rerun the same command to resume from the last checkpoint in "
            f"{workdir}/checkpoints.")


def _on_second_signal(workdir: str):
    def on_second(first: int, signum: int) -> None:
        print(f"error: {interrupts.signal_name(signum)} during the shutdown: stopped at once; "
              f"rerun the same command to resume from the last complete checkpoint in "
              f"{workdir}/checkpoints (a checkpoint cut short is set aside then).",
              file=sys.stderr, flush=True)
    return on_second


def _errors(e: BaseException):
    """``e`` and the exceptions it was raised from or during."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an exception behind it) is a full disk or an exceeded quota, as an
    ``OSError`` or as a message (the checkpoint library rewraps its writers' errors)."""
    for err in _errors(e):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if re.search(r"no space left on device|disk quota exceeded", str(err), re.I):
            return True
    return False


def disk_full_message(workdir: str | os.PathLike) -> str:
    """One line: the disk of ``workdir`` is full (its mount point and free space), and what to
    do."""
    path = pathlib.Path(workdir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    mount = path
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        usage = shutil.disk_usage(path)
        free = f"{format_bytes(usage.free)} free of {format_bytes(usage.total)}"
    except OSError:
        free = "free space unknown"
    return (f"no space left on the disk of {workdir} (the disk mounted at {mount}: {free}) "
            f"while writing the run; free some space, then rerun the same command to resume "
            f"from the last complete checkpoint in {workdir}/checkpoints.")


def main(argv):
    """Trains and evaluates the run that ``--config`` and ``--workdir`` describe (absl entry point);
    a user error exits with code 2 and one line."""
    if len(argv) > 1:
        _fail(2, f"unexpected arguments: {argv[1:]}")
    try:
        config = _CONFIG.value
    except OSError as e:  # a config file that does not load
        _fail(2, " ".join(str(e).split()))
    if config is None:
        _fail(2, "--config is required, e.g. --config=configs/tms.py:5-2")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    workdir = _WORKDIR.value or f"workdir/{config.experiment}_{config.variant}"
    interrupts.ShutdownGuard(_on_second_signal(workdir)).install()  # until the process ends
    held = _HeldCheckpointErrors().install()
    try:
        with log_to():  # "waiting for N processes" while the others connect
            distributed.initialize()  # several processes, when the environment sets them up
        writers.check_dirs(config, workdir)  # before any work
        targets.check_cache_dir(config.get("target_cache_dir") or targets.default_cache_dir())
        train_and_evaluate(config, workdir, fresh=_FRESH.value,
                           allow_changes=tuple(_ALLOW.value))  # prints spdjax's log to stdout
    # A named error is the whole report: exit at once, before the checkpoint library's
    # background threads can print late callbacks of a failed read or write at shutdown (the
    # run's files were closed and its lock released on the way here).
    except KeyboardInterrupt:
        signum = interrupts.received()
        _fail(interrupts.exit_code(signum), _stopped_message(signum, workdir), at_once=True)
    except DivergenceError as e:
        _fail(3, str(e), at_once=True)
    except EvaluationError as e:
        if disk_full(e):
            _fail(2, disk_full_message(workdir), at_once=True)
        _fail(4, str(e), at_once=True)
    except (ValueError, WorkdirLockedError, FileNotFoundError) as e:
        _fail(2, str(e), at_once=True)
    except Exception as e:
        if disk_full(e):
            _fail(2, disk_full_message(workdir), at_once=True)
        held.release()  # what the checkpoint library said may explain it
        if isinstance(e, OSError):
            _fail(2, f"{type(e).__name__}: {e}")
        raise
    held.release()


def run() -> None:
    """The ``spdjax`` console script (``python -m spdjax.main`` runs the same)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
