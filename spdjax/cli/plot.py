"""Redraw every figure of a run: ``python -m spdjax.cli.plot --workdir=DIR [--step=N] [--out=DIR]``.

Reads the run with :func:`spdjax.load` (config, target and params all from the workdir) and
writes the experiment's figures and the training curves to ``DIR/figures`` (or ``--out``). A
workdir without a run, or a step without a checkpoint, is one ``error:`` line (exit 2).
"""

from absl import app, flags, logging

from spdjax.cli import common
from spdjax.config.runs import load

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "Figures directory (default: <workdir>/figures).")


def main(argv):
    """Redraws the figures of the run in ``--workdir`` (absl entry point) and prints their paths."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    with common.user_errors():
        run = load(_WORKDIR.value, step=_STEP.value)
        for path in run.plot(_OUT.value):
            print(path)


def run() -> None:
    """The ``spdjax-plot`` console script."""
    flags.mark_flags_as_required(["workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
