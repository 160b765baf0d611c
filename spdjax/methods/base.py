"""What a decomposition method is to the training loop: :class:`Method`.

The loop (:mod:`spdjax.training.loop`) knows nothing about SPD. It asks a method for initial
parameters, an objective to differentiate, an optimizer, a sharding layout and an evaluation of
its own, and treats the parameters as an opaque pytree. SPD (:mod:`spdjax.methods.spd`) is the
first method; a second one (APD) fills in the same fields.

The objective's metrics are a nested dict of scalars with at least ``metrics["loss"]["total"]``;
the loop writes them flattened with ``/`` (``loss/total``, ``ci_l0/linear1``) to
``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

Array = jax.Array
Params = Any
# (params, target_params, batch, key, step_frac) -> (loss, metrics)
Objective = Callable[[Params, Any, Any, Array, Array], tuple[Array, dict]]


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
    """A decomposition method, ready to train on one target.

    Attributes:
      name: registry name (``"spd"``), recorded in checkpoints.
      decomposition: the method's static structure (sites, C, ...), for evaluation and analysis.
      init: ``(key, target_params) -> params``.
      objective: see :data:`Objective`; pure, differentiated with respect to ``params``.
      optimizer: the optax transformation that trains ``params``.
      partition_specs: ``(params, model_axis) -> PartitionSpec pytree`` (C on ``model_axis``).
      evaluate: ``(params, target_params, batch, key, *, microbatches=1) -> summary dict``: the
        method's own final metrics on an evaluation batch, in ``microbatches`` chunks (the
        experiment adds its ground-truth ones).
    """

    name: str
    decomposition: Any
    init: Callable[[Array, Any], Params]
    objective: Objective
    optimizer: optax.GradientTransformation
    partition_specs: Callable[[Params, str], Any]
    evaluate: Callable[[Params, Any, Any, Array], dict]
