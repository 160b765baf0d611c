"""Command line: ``python -m spdjax.main --config=configs/tms.py[:variant] [--workdir=DIR]``
(or, installed, ``spdjax --config=tms:5-2``: a config file by path or by name).

Config fields are overridden with ``--config.key=value`` (e.g. ``--config.steps=2000``). A run
resumes from the latest good checkpoint in its workdir; ``--fresh`` discards that run instead, and
``--allow_config_change=lr,steps`` resumes it with those fields changed on purpose (e.g. a smaller
lr after a divergence, or more steps for a finished run).

Exit codes: 0 done; 2 a user error (bad flag or config value, workdir in use or holding another
run), printed as one ``error:`` line; 3 the run diverged (its good checkpoints are kept); 4 the
evaluation failed after training (rerun to evaluate); 130 interrupted (rerun to resume).
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from spdjax.config import files as config_files
from spdjax.config.runs import train_and_evaluate
from spdjax.training import distributed
from spdjax.training.loop import DivergenceError, EvaluationError
from spdjax.training.workdir import WorkdirLockedError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tms.py:5-2.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Output directory (default: workdir/<experiment>_<variant>).")
_FRESH = flags.DEFINE_bool("fresh", False, "Discard an existing run in the workdir and start over.")
_ALLOW = flags.DEFINE_list("allow_config_change", [],
                           "Config fields (dotted prefixes) a resume may change, e.g. lr,steps.")


def _fail(code: int, message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


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


def main(argv):
    """Trains and evaluates the run that ``--config`` and ``--workdir`` describe (absl entry point);
    a user error exits with code 2 and one line."""
    if len(argv) > 1:
        _fail(2, f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        _fail(2, "--config is required, e.g. --config=configs/tms.py:5-2")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    try:
        distributed.initialize()  # several processes, when the environment sets them up
    except ValueError as e:
        _fail(2, str(e))
    config = _CONFIG.value
    workdir = _WORKDIR.value or f"workdir/{config.experiment}_{config.variant}"
    try:
        train_and_evaluate(config, workdir, fresh=_FRESH.value,
                           allow_changes=tuple(_ALLOW.value))  # prints spdjax's log to stdout
    except KeyboardInterrupt:
        _fail(130, f"interrupted; rerun the same command to resume from the last checkpoint in "
                   f"{workdir}/checkpoints.")
    except DivergenceError as e:
        _fail(3, str(e))
    except EvaluationError as e:
        _fail(4, str(e))
    except (ValueError, WorkdirLockedError, FileNotFoundError) as e:
        _fail(2, str(e))


def run() -> None:
    """The ``spdjax`` console script (``python -m spdjax.main`` runs the same)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
