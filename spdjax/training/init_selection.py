"""Best-of-K initialisation: train K inits briefly, keep the one with the lowest SPD loss.

On TMS 5-2, 3 of 13 seeds of the paper's init end in a local minimum where one subcomponent
carries two features (RESULTS.md, "Seed sensitivity"), and that minimum has a higher loss early:
at 8k of 40k steps 1.76-2.29e-3 for the three failing seeds against 1.45-1.68e-3 for four good
ones (benchmarks/results/tms_seed_probe_5-2_loss_curves.json). With
``config.init_candidates = K > 1`` the run trains K inits (candidate 0 is the plain run's init, the
others fold the candidate index into the init key) for ``config.init_select_steps`` steps each, on
the same data and mask stream, and continues the one whose mean total loss over the last quarter of
those steps is lowest. Only the training objective decides, never a ground-truth metric, so the same
recipe applies to models without known features. The choice, with every candidate's loss, is saved
to ``workdir/init_selection.json`` and copied into ``summary.json``.

A continued candidate is the run it would have been on its own: the steps after the selection draw
the same batches and masks, so ``init_candidates = 1`` (the default) and a selection that keeps
candidate 0 give the same results up to float rounding. A run interrupted during the selection
redoes it; after it, the run resumes from its checkpoints as usual.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax

RECORD_FILE = "init_selection.json"


def candidate_key(init_key: jax.Array, index: int) -> jax.Array:
    """Candidate 0 keeps the run's own init key; candidate ``i`` folds ``i`` into it."""
    return init_key if index == 0 else jax.random.fold_in(init_key, index)


def check_config(config) -> None:
    """Clear errors for an unusable selection setting, before anything is trained."""
    k, n = config.init_candidates, config.init_select_steps
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"init_candidates must be an integer >= 1, got {k!r}.")
    if k > 1 and not (isinstance(n, int) and 4 <= n < config.steps):
        raise ValueError(
            f"init_select_steps={n!r} must be an integer in [4, steps={config.steps}) when "
            f"init_candidates={k} > 1: each candidate trains that many steps before the choice."
        )


@dataclasses.dataclass
class Probe:
    """One candidate after its selection steps."""

    index: int
    loss: float  # mean total loss over the last quarter of the selection steps
    state: Any  # its train state (kept only for the best candidate)
    lines: list  # its metric lines, written to metrics.jsonl if it wins


class TailMean:
    """``on_step`` callback: the mean total loss over the last quarter of ``n_steps`` steps,
    summed on device (no host sync until :meth:`value`)."""

    def __init__(self, n_steps: int):
        self.n_steps, self.tail = n_steps, max(1, n_steps // 4)
        self._sum = 0.0

    def __call__(self, step: int, metrics: dict) -> None:
        if step > self.n_steps - self.tail:
            self._sum = self._sum + metrics["loss"]["total"]

    def value(self) -> float:
        return float(self._sum) / self.tail


def select(
    n_candidates: int, probe: Callable[[int], Probe], *, report: Callable[[str], None] = print
) -> tuple[Probe, dict]:
    """Runs ``probe(i)`` for every candidate and returns the lowest-loss one and the record."""
    best, losses = None, []
    for index in range(n_candidates):
        result = probe(index)
        losses.append(result.loss)
        report(f"init candidate {index + 1}/{n_candidates}: loss {result.loss:.5e}")
        if best is None or result.loss < best.loss:
            best = result  # the other candidates' states are dropped here
    record = {"chosen": best.index, "losses": losses}
    report(f"Continuing init candidate {best.index + 1} (lowest loss {best.loss:.5e}).")
    return best, record


def save_record(workdir: pathlib.Path, record: dict) -> None:
    """Writes the init-selection ``record`` (chosen candidate, losses) into ``workdir``."""
    (workdir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_record(workdir: pathlib.Path) -> dict | None:
    """The init-selection record of the run in ``workdir``, or None if it chose no init."""
    path = workdir / RECORD_FILE
    return json.loads(path.read_text()) if path.exists() else None
