"""Command line: ``python -m spdjax.main --config=configs/tms.py[:variant] [--workdir=DIR]``.

Config fields are overridden with ``--config.key=value`` (e.g. ``--config.steps=2000``). A run
resumes from the latest checkpoint in its workdir; ``--fresh`` discards that run instead.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from spdjax.training.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tms.py:5-2.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Output directory (default: workdir/<experiment>_<variant>).")
_FRESH = flags.DEFINE_bool("fresh", False, "Discard an existing run in the workdir and start over.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    config = _CONFIG.value
    workdir = _WORKDIR.value or f"workdir/{config.experiment}_{config.variant}"
    train_and_evaluate(config, workdir, fresh=_FRESH.value)  # prints spdjax's log to stdout


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
