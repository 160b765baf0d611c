"""Optimizers by name, for one parameter group at a time (components, CI functions, adversary).

A config names an optimizer per group (``"adam"``, ``"adamw"``, ``"sgd"``, ``"muon"``) with its
learning rate and options; :func:`make` turns that into an ``optax.GradientTransformation``.
:data:`OPTIMIZERS` is an open registry: register a factory ``(learning_rate, **options) ->
GradientTransformation`` of your own and name it in a config.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; optax's
``optax.contrib.muon``) orthogonalises the momentum of each 2-D parameter with Newton-Schulz
iterations and updates every other parameter (biases, vectors) with Adam, as the VPD recipe uses
it for the components and the CI function ("Interpreting Language Model Parameters", Bushnaq et
al. 2026, training recipe).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import optax

from spdjax.core.registry import Registry

OptimizerFactory = Callable[..., optax.GradientTransformation]


def _muon(learning_rate, **options) -> optax.GradientTransformation:
    """optax's Muon: matrices (2-D leaves) orthogonalised, every other leaf with Adam."""
    return optax.contrib.muon(learning_rate, **options)


OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer", {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "muon": _muon,
})


def _accepted(factory: OptimizerFactory) -> set[str] | None:
    """Keyword options ``factory`` takes besides the learning rate (None: any, ``**kwargs``)."""
    target = optax.contrib.muon if factory is _muon else factory
    params = inspect.signature(target).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n != "learning_rate"}


def make(name: str | OptimizerFactory, learning_rate: Any,
         **options) -> optax.GradientTransformation:
    """``OPTIMIZERS[name](learning_rate, **options)``; an unknown name or option fails here, naming
    the value and what was expected."""
    factory = OPTIMIZERS.resolve(name)
    if not callable(factory):
        raise ValueError(f"An optimizer must be a registered name or a factory; got {name!r}.")
    accepted = _accepted(factory)
    unknown = sorted(set(options) - accepted) if accepted is not None else []
    if unknown:
        raise ValueError(f"Optimizer {name!r} takes no options {unknown}; accepted: "
                         f"{sorted(accepted)}.")
    return factory(learning_rate, **options)
