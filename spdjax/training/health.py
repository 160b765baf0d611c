"""Is a run still healthy? Checked at every log step, before every checkpoint save, and on the
loss of every saved state.

A run stops with :class:`DivergenceError`, before anything bad is saved, when

* a loss term or a parameter is not finite;
* (absolute bound) its total loss exceeds ``config.divergence_factor`` times the first loss the
  run knows: the loss at initialisation (the objective at the initial state, which the first
  step computes anyway), or, on a resume, the first total in ``metrics.jsonl``. SPD/APD totals
  fall from initialisation (the LM's CE starts near ln(vocab)), so a healthy run stays far below
  1000x its initial loss; a run whose totals are astronomical from its first steps (1e25...) is
  caught at its first check, which the relative bound alone cannot do;
* (relative bound, once three totals are known) its total exceeds ``divergence_factor`` times
  the lowest total the run has logged: a sudden jump or a steady climb after a good start.

``divergence_factor = 0`` switches both bounds off (only non-finite values then stop a run; the
final summary's are still an error, :func:`nonfinite_values`).

A checkpoint is kept as good only if the loss of its state is finite and within the bounds: the
step after a save computes exactly that loss (the objective at the saved state, on the batch
the resumed run would draw next), so :func:`check_saved_state` reads it at no extra cost; a
checkpoint that fails is moved to ``workdir/damaged/`` before the error names the last good one,
so resuming from it with a smaller lr (the advice in the error) trains.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from spdjax.training.distributed import is_primary


class DivergenceError(FloatingPointError):
    """The run's loss or params went non-finite or exploded; its checkpoints stay good."""


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _problems(config, values: dict, params, history: list) -> list[str]:
    """What is wrong with a state's metric line ``values`` (and ``params``, unless None)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    problems = [f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}"] if bad else []
    if params is not None and not bool(_all_finite(params)):
        problems.append("non-finite parameters")
    factor, total = config.divergence_factor, values["loss/total"]
    if problems or not factor or not history:
        return problems
    terms = ", ".join(f"{k}={v:.3g}" for k, v in values.items() if k.startswith("loss/"))
    level = min(history)
    if len(history) >= 3 and level > 0 and total > factor * level:
        problems.append(f"loss/total {total:.3g} is {total / level:.3g}x the run's lowest "
                        f"{level:.3g} (divergence_factor {factor:g}; terms: {terms})")
    elif history[0] > 0 and total > factor * history[0]:
        problems.append(f"loss/total {total:.3g} is {total / history[0]:.3g}x the run's first "
                        f"loss {history[0]:.3g}, at initialisation or its first log "
                        f"(divergence_factor {factor:g}; terms: {terms})")
    return problems


def _error(config, checkpointer, step: int, problems: list[str], note: str = ""
           ) -> DivergenceError:
    if checkpointer is not None:
        checkpointer.wait()
        last = checkpointer.latest_step()
        where = (f"The last good checkpoint (step {last}) is kept in "
                 f"{checkpointer.directory}; resume from it with a smaller lr, e.g. "
                 f"--config.lr={config.lr / 10:g} --allow_config_change=lr"
                 if last else "No good checkpoint was written before it; lower the lr (the run "
                 "then starts over)")
    else:
        where = "Lower the lr or the loss coefficients"
    return DivergenceError(f"The run diverged at step {step}: {'; '.join(problems)}.{note} "
                           f"{where}{'' if note else ' (nothing bad was saved)'}.")


def check_health(config, checkpointer, step: int, values: dict, params, history: list) -> None:
    """Raises :class:`DivergenceError` if a metric or parameter is not finite, or the total loss
    exceeds ``divergence_factor`` times the run's first loss (``history[0]``) or its lowest
    logged total (``history``), which catches astronomical losses, a sudden jump and a steady
    climb alike (module docstring); else appends the total to ``history``."""
    problems = _problems(config, values, params, history)
    if problems:
        raise _error(config, checkpointer, step, problems)
    if math.isfinite(values["loss/total"]):
        history.append(values["loss/total"])


def check_saved_state(config, checkpointer, step: int, values: dict, history: list) -> None:
    """``values``: the metric line of the step after ``step``, i.e. the loss of the state at
    ``step``. An empty ``history`` takes it as the run's first loss (at step 0: the loss at
    initialisation). When it fails the health check, the checkpoint of ``step`` (if
    ``checkpointer`` holds one) is moved to ``damaged/`` (it would diverge at once at any lr)
    and :class:`DivergenceError` names the last good one."""
    problems = _problems(config, values, None, history)
    if not problems:
        if not history and math.isfinite(values["loss/total"]):
            history.append(values["loss/total"])
        return
    note = ""
    if checkpointer is not None:
        checkpointer.wait()
        if checkpointer.latest_step() == step and step > 0:
            moved = set_aside(checkpointer, step)
            note = (f" The checkpoint of step {step} holds that state (its loss is the one "
                    f"above, at any lr); it was moved to {moved}.")
    raise _error(config, checkpointer, step + 1, problems, note)


def set_aside(checkpointer, step: int) -> Any:
    """Moves checkpoint ``step`` to ``damaged/`` next to the checkpoints (nothing is deleted; by
    the primary process only, which owns the run's files)."""
    folder = checkpointer.directory.parent / "damaged"
    return checkpointer.move_aside(step, folder, "diverged") if is_primary() else folder


def evaluation_diverged(config, checkpointer, step: int, bad: list[str]) -> DivergenceError:
    """The error for a final evaluation with non-finite values ``bad``
    (:func:`nonfinite_values`); the checkpoint of that state (``step``, if the newest) is moved
    to ``damaged/`` first, so that a rerun does not evaluate it again."""
    note = ""
    if checkpointer is not None:
        checkpointer.wait()
        if checkpointer.latest_step() == step and step > 0:
            note = f" Its checkpoint was moved to {set_aside(checkpointer, step)}."
    error = _error(config, checkpointer, step, [f"the evaluation of the state at step {step} is "
                                                f"not finite ({', '.join(bad)})"], note)
    return DivergenceError(str(error).replace(f"The run diverged at step {step}: ",
                                              "The run diverged: ", 1))


def nonfinite_values(summary: dict) -> list[str]:
    """``name=value`` of every non-finite number in ``summary`` (nested dicts, dotted names)."""
    bad = []

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            if not math.isfinite(node):
                bad.append(f"{prefix[:-1]}={node}")
    walk("", summary)
    return bad
