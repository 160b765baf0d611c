"""What the training loop needs from a target family, and the registry of families by name.

An :class:`Experiment` bundles a trained target, its decomposition, an on-device data sampler and
a final evaluation (metrics + figures). Families are looked up by ``config.experiment``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from typing import Any, Callable

import jax

from spdjax.decomposition import Decomposition
from spdjax.target import Target

# name -> "module:function" building an Experiment from a config (imported lazily).
EXPERIMENTS: dict[str, str] = {
    "tms": "spdjax.tms_experiment:build",
    "resid_mlp": "spdjax.resid_experiment:build",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Experiment:
    """A decomposition problem ready to train.

    Attributes:
      target, target_params: the frozen model being decomposed.
      decomposition: sites, C, CI functions and sigmoid.
      batch_fn: ``key -> batch`` of the training batch size (runs inside the jitted step).
      eval_batch_fn: ``key -> batch`` of the evaluation batch size.
      evaluate: ``(params, figures_dir) -> summary dict`` of family-specific metrics, writing
        figures into ``figures_dir``.
    """

    target: Target
    target_params: Any
    decomposition: Decomposition
    batch_fn: Callable[[jax.Array], Any]
    eval_batch_fn: Callable[[jax.Array], Any]
    evaluate: Callable[[dict, pathlib.Path], dict]


def build_experiment(config) -> Experiment:
    """Builds the experiment named by ``config.experiment``."""
    if config.experiment not in EXPERIMENTS:
        raise ValueError(
            f"Unknown experiment {config.experiment!r}; expected one of {sorted(EXPERIMENTS)}."
        )
    module, fn = EXPERIMENTS[config.experiment].split(":")
    return getattr(importlib.import_module(module), fn)(config)
