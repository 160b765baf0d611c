"""Is a run still healthy? Checked at every log step and before every checkpoint save.

A run whose loss terms or parameters are not finite, or whose total loss exceeds
``config.divergence_factor`` times its lowest logged total, stops with :class:`DivergenceError`
before anything bad is saved, so the checkpoints kept are the good ones.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


class DivergenceError(FloatingPointError):
    """The run's loss or params went non-finite or exploded; its checkpoints stay good."""


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check_health(config, checkpointer, step: int, values: dict, params, history: list) -> None:
    """Raises :class:`DivergenceError` if a metric or parameter is not finite, or the total loss
    exceeds ``divergence_factor`` times the lowest logged total of the run (``history``), which
    catches a sudden jump and a steady climb alike."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    problems = [f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}"] if bad else []
    if not bool(_all_finite(params)):
        problems.append("non-finite parameters")
    factor, total = config.divergence_factor, values["loss/total"]
    if not problems and factor and len(history) >= 3:
        level = min(history)
        if total > factor * level:
            terms = ", ".join(f"{k}={v:.3g}" for k, v in values.items() if k.startswith("loss/"))
            problems.append(f"loss/total {total:.3g} is {total / level:.3g}x the run's lowest "
                            f"{level:.3g} (divergence_factor {factor:g}; terms: {terms})")
    if problems:
        if checkpointer is not None:
            checkpointer.wait()
            last = checkpointer.latest_step()
            where = (f"The last good checkpoint (step {last}) is kept in "
                     f"{checkpointer.directory}; resume from it with a smaller lr, e.g. "
                     f"--config.lr={config.lr / 10:g} --allow_config_change=lr"
                     if last else "No checkpoint was written before it; lower the lr")
        else:
            where = "Lower the lr or the loss coefficients"
        raise DivergenceError(f"The run diverged at step {step}: {'; '.join(problems)}. "
                              f"{where} (nothing bad was saved).")
    if math.isfinite(total):
        history.append(total)
