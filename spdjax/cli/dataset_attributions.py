"""Dataset attributions of a finished run: ``python -m spdjax.dataset_attributions
--workdir=DIR [--batches=N --seed=S --step=K]``.

Gradient x activation from input tokens and subcomponents to subcomponents and outputs, summed
over ``--batches`` batches of the run's data
(:func:`spdjax.analysis.dataset_attributions.dataset_attributions`), into
``DIR/analysis/dataset_attributions/``: ``attributions.npz`` and ``summary.json`` (each
target's top sources). Saved every ``--save_every`` batches and on Ctrl-C or SIGTERM; the same
command resumes (``--fresh`` starts over). Errors a user can fix are one ``error:`` line.
"""

import pathlib

from absl import app, flags

from spdjax.analysis import dataset_attributions as attributions_lib
from spdjax.cli import common

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None,
                           "Output directory (default: <workdir>/analysis/dataset_attributions).")
_BATCHES = flags.DEFINE_integer("batches", 20, "Batches in the pass.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Examples (sequences) per batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data.")
_CHUNK = flags.DEFINE_integer("chunk", 64, "Targets per vmapped backward pass (memory).")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 5, "Save the state every this many batches.")
_FRESH = flags.DEFINE_bool("fresh", False, "Ignore a saved state and start over.")


def _compute(run, out: pathlib.Path, progress) -> attributions_lib.DatasetAttributions:
    return attributions_lib.dataset_attributions(
        run, n_batches=_BATCHES.value, batch_size=_BATCH_SIZE.value, seed=_SEED.value,
        chunk=_CHUNK.value, out_dir=out, save_every=_SAVE_EVERY.value,
        resume=not _FRESH.value, report=progress)


def main(argv):
    """Computes the attributions of the run in ``--workdir`` (absl entry point)."""
    common.begin(argv)
    common.resumable_pass(
        label="dataset attributions", workdir=_WORKDIR.value, step=_STEP.value, out=_OUT.value,
        subdir="dataset_attributions", state_file=attributions_lib.STATE_FILE,
        compute=_compute,
        describe=lambda r: f"{r.n} examples; {len(r.spec.target_names)} targets x "
                           f"{len(r.spec.source_names)} sources.")


def run() -> None:
    """The ``spdjax-attributions`` console script."""
    flags.mark_flags_as_required(["workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
