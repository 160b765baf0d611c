"""Harvest a finished run: ``python -m spdjax.harvest --workdir=DIR [--batches=N --seed=S
--step=K]``.

One pass over ``--batches`` batches of the run's data (:func:`spdjax.analysis.harvest.harvest`)
into ``DIR/analysis/harvest/``: ``harvest.npz`` (the accumulators), ``summary.json`` and, for a
language model, ``examples.html`` (the sampled examples of every subcomponent that fired, in
context). The state is saved every ``--save_every`` batches and on Ctrl-C or SIGTERM; running
the same command again resumes from it (``--fresh`` starts over). Errors a user can fix are one
``error:`` line (exit 2).
"""

import pathlib

from absl import app, flags

from spdjax.analysis import harvest as harvest_lib
from spdjax.cli import common
from spdjax.families.lm import harvest_page

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/analysis/harvest).")
_BATCHES = flags.DEFINE_integer("batches", 100, "Batches in the pass.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Examples (sequences) per batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data and the example sampling.")
_THRESHOLD = flags.DEFINE_float("threshold", None,
                                "CI above which a subcomponent fires (default: the run's "
                                "l0_threshold).")
_EXAMPLES = flags.DEFINE_integer("examples", 10, "Examples kept per subcomponent.")
_WINDOW = flags.DEFINE_integer("window", 8, "Tokens kept on each side of an example.")
_BLOCK = flags.DEFINE_integer("block", 1024, "Co-occurrence rows per block.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 10, "Save the state every this many batches.")
_FRESH = flags.DEFINE_bool("fresh", False, "Ignore a saved state and start over.")


def _compute(run, out: pathlib.Path, progress) -> harvest_lib.Harvest:
    h = harvest_lib.harvest(
        run, n_batches=_BATCHES.value, batch_size=_BATCH_SIZE.value, seed=_SEED.value,
        threshold=_THRESHOLD.value, examples=_EXAMPLES.value, window=_WINDOW.value,
        block=_BLOCK.value, out_dir=out, save_every=_SAVE_EVERY.value,
        resume=not _FRESH.value, report=progress)
    if run.experiment.family.name == "lm":
        harvest_page.write_harvest_examples(
            h, out / "examples.html", decode=harvest_page.decoder(run.experiment.model_config))
    return h


def main(argv):
    """Harvests the run in ``--workdir`` (absl entry point) and prints the output directory."""
    common.begin(argv)
    common.resumable_pass(
        label="harvest", workdir=_WORKDIR.value, step=_STEP.value, out=_OUT.value,
        subdir="harvest", state_file=harvest_lib.STATE_FILE, compute=_compute,
        describe=lambda h: f"{h.n} examples; {int((h.count > 0).sum())} of {len(h.names)} "
                           f"subcomponents fired (CI > {h.spec.threshold}).")


def run() -> None:
    """The ``spdjax-harvest`` console script."""
    flags.mark_flags_as_required(["workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
