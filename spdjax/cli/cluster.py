"""Cluster a finished run's subcomponents: ``python -m spdjax.cluster --workdir=DIR
[--seeds=0,1,2 --batches=N --alpha=A --step=K]``.

Per data seed, the firings (CI > ``--threshold``) on ``--batches`` batches of the run's data,
merged into mechanisms under the MDL cost (:func:`spdjax.analysis.clustering.cluster`), into
``DIR/analysis/clustering/``: ``seed_<s>.npz`` (each seed's merge history), ``clustering.json``
(clusters at the chosen iteration, distances between seeds) and ``clustering.png``. A finished
seed is saved at once; running the same command again after an interruption reads the finished
seeds back and computes the rest (``--fresh`` recomputes all). Errors a user can fix are one
``error:`` line (exit 2).
"""

import pathlib
import sys

from absl import app, flags

from spdjax.analysis import clustering as clustering_lib
from spdjax.analysis import clustering_plots
from spdjax.cli import common
from spdjax.config.runs import load

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None,
                           "Output directory (default: <workdir>/analysis/clustering).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Data seeds, one clustering each.")
_BATCHES = flags.DEFINE_integer("batches", 10, "Batches of data per seed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Examples (sequences) per batch.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 16384,
                                     "Examples (token positions) kept per seed, at most.")
_ALPHA = flags.DEFINE_float("alpha", 1.0, "Weight of a group's rank bits in the MDL cost.")
_THRESHOLD = flags.DEFINE_float("threshold", None,
                                "CI above which a subcomponent fires (default: the run's "
                                "l0_threshold).")
_PAIR_THRESHOLD = flags.DEFINE_float("pair_threshold", 0.0,
                                     "0: merge the cheapest pair; > 0: a pair drawn among those "
                                     "within this fraction of the cost range (the reference's "
                                     "range sampler).")
_ITERATION = flags.DEFINE_integer("iteration", None,
                                  "Read the clusterings after this many merges (default: each "
                                  "seed's MDL minimum).")
_FRESH = flags.DEFINE_bool("fresh", False, "Recompute the seeds saved by an earlier run.")


def main(argv):
    """Clusters the run in ``--workdir`` (absl entry point) and prints the output directory."""
    common.begin(argv)
    common.stop_on_signals()
    where: dict = {}

    def interrupted() -> str:
        saved = [s for s in where.get("seeds", ())
                 if (where["out"] / f"seed_{s}.npz").exists()] if "out" in where else []
        if not saved:
            return "interrupted before any seed finished: nothing saved."
        return (f"interrupted: seeds {', '.join(map(str, saved))} are saved; run the same "
                "command to compute the rest.")

    with common.user_errors(interrupted):
        seeds = common.int_list("--seeds", _SEEDS.value)
        run = load(_WORKDIR.value, step=_STEP.value)
        out = pathlib.Path(_OUT.value or run.workdir / "analysis" / "clustering")
        where.update(out=out, seeds=seeds)
        result = clustering_lib.cluster(
            run, seeds=seeds, n_batches=_BATCHES.value, batch_size=_BATCH_SIZE.value,
            alpha=_ALPHA.value, threshold=_THRESHOLD.value, max_examples=_MAX_EXAMPLES.value,
            pair_threshold=_PAIR_THRESHOLD.value, iteration=_ITERATION.value, out_dir=out,
            resume=not _FRESH.value,
            progress=lambda seed: common.ProgressLine(f"cluster seed {seed}"),
            log=lambda line: print(line, file=sys.stderr, flush=True))
        clustering_plots.plot_clustering(result, out / "clustering.png",
                                         title=f"{run.workdir.name}: clustering by co-activation")
        summary = result.summary()
        print(out)
        ks = ", ".join(str(v["clusters"]) for v in summary["seeds"].values())
        print(f"clusters per seed: {ks}; distance between seeds (permutation-invariant "
              f"Hamming) mean {summary['distance_hamming_mean']:.3f}, max "
              f"{summary['distance_hamming_max']:.3f}.")


def run() -> None:
    """The ``spdjax-cluster`` console script."""
    flags.mark_flags_as_required(["workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
