"""Stateful loss terms: terms that keep state across training steps in ``params["adversary"]``.

A loss function with an ``adversary_init(decomposition, key, **options) -> tree`` attribute keeps
its state in ``params["adversary"][term name]``. Being params, that state is checkpointed,
resumed, placed on the mesh (replicated) and evaluated with the rest. Each such term also chooses
how the training step moves its state, with an optional attribute

    ``adversary_optimizer(**options) -> optax.GradientTransformation``

(``options``: the term's bound options), applied by :func:`with_adversary` to that term's subtree
alone, on the gradient of the total loss with respect to it. Without the attribute the state is
ascended: :func:`ascend_in_unit_box` (Adam *up* the loss, each value kept in [0, 1]).

Two patterns:

* **ascend on the gradient** (the default): the term's value depends on its state, and the
  optimizer moves the state up (an adversary) or down that gradient.
* **assign** a state the term computes itself (persistent PGD, whose warm-up and outer ascents
  happen inside the loss; an EMA of firing frequencies): the term adds
  :func:`spdjax.losses.adversarial.assign_state` ``(state, new)`` to its value, whose gradient is
  ``state - new`` whatever the term's coefficient, and declares ``optax.sgd(1.0)``: one descent
  step lands on ``new``. Keep such terms out of gradient averaging over microbatches.

A term whose options name a source optimizer (persistent PGD's ``optimizer="adam"``, ``lr``,
``optimizer_options``) gets it resolved here, once, by :func:`resolve_source_optimizers` with
:func:`spdjax.methods.optimizers.make` (names at the edge, values inside).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from spdjax.losses import Term, term_key
from spdjax.losses.adversarial import ADVERSARY
from spdjax.losses.persistent_pgd import default_optimizer_options
from spdjax.methods import optimizers

Array = jax.Array
SOURCE_OPTIMIZER_OPTIONS = ("optimizer", "lr", "optimizer_options")


def adversarial_terms(terms: Sequence[Term]) -> list[Term]:
    """The terms that keep state in ``params["adversary"]``."""
    return [t for t in terms if hasattr(t.fn, "adversary_init")]


def resolve_source_optimizers(terms: Sequence[Term]) -> list[Term]:
    """``terms`` with each stateful term's ``optimizer`` name (a parameter of its function, with
    ``lr`` and ``optimizer_options``) turned into ``optimizers.make(name, lr, **options)``; an
    unknown name or option fails here, naming the term."""
    resolved = []
    for t in terms:
        params = inspect.signature(t.fn).parameters
        if not hasattr(t.fn, "adversary_init") or not set(SOURCE_OPTIMIZER_OPTIONS) <= set(params):
            resolved.append(t)
            continue
        given = {k: t.options.get(k, params[k].default) for k in SOURCE_OPTIMIZER_OPTIONS}
        if isinstance(given["optimizer"], str):
            extra = given["optimizer_options"]
            extra = default_optimizer_options(given["optimizer"]) if extra is None else dict(extra)
            try:
                value = optimizers.make(given["optimizer"], given["lr"], **extra)
            except ValueError as e:
                raise ValueError(f"Loss {t.name!r}, source optimizer: {e}") from None
            t = dataclasses.replace(t, options={**t.options, "optimizer": value})
        resolved.append(t)
    return resolved


def init_adversary(decomposition, terms: Sequence[Term], key: Array) -> dict:
    """``{term name: its initial state}`` (each from its own key)."""
    return {t.name: t.fn.adversary_init(decomposition, term_key(key, t.name), **t.options)
            for t in adversarial_terms(terms)}


def ascend_in_unit_box(learning_rate: float = 0.01, b1: float = 0.5,
                       b2: float = 0.99) -> optax.GradientTransformation:
    """Adam *ascent* (VPD's adversary: β = (0.5, 0.99), lr 0.01), each value kept in [0, 1]."""
    adam = optax.chain(optax.scale(-1.0), optax.adam(learning_rate, b1=b1, b2=b2))

    def update_fn(updates, state, params):
        updates, state = adam.update(updates, state, params)
        return jax.tree.map(lambda p, u: jnp.clip(p + u, 0.0, 1.0) - p, params, updates), state

    return optax.GradientTransformation(adam.init, update_fn)


def term_optimizers(terms: Sequence[Term]) -> dict[str, optax.GradientTransformation]:
    """``{term name: the optimizer of its state}``: its ``adversary_optimizer(**options)``, or
    :func:`ascend_in_unit_box`."""
    return {t.name: (t.fn.adversary_optimizer(**t.options) if hasattr(t.fn, "adversary_optimizer")
                     else ascend_in_unit_box()) for t in adversarial_terms(terms)}


def with_adversary(main: optax.GradientTransformation,
                   adversary: (optax.GradientTransformation
                               | Mapping[str, optax.GradientTransformation] | None) = None
                   ) -> optax.GradientTransformation:
    """``main`` on every params entry but ``"adversary"``; on ``params["adversary"][name]`` the
    optimizer ``adversary[name]`` (a mapping, e.g. :func:`term_optimizers`) or ``adversary`` for
    every term (default :func:`ascend_in_unit_box`). Params without the entry get ``main`` alone."""
    single = None if isinstance(adversary, Mapping) else (adversary or ascend_in_unit_box())

    def opt(name):
        if single is not None:
            return single
        if name not in adversary:
            raise ValueError(f"params['adversary'][{name!r}] has no optimizer; the adversary "
                             f"optimizers are for {sorted(adversary)}.")
        return adversary[name]

    def split(tree):
        return {k: v for k, v in tree.items() if k != ADVERSARY}, tree.get(ADVERSARY)

    def init_fn(params):
        rest, adv = split(params)
        adv_state = ({n: opt(n).init(s) for n, s in adv.items()} if adv is not None
                     else optax.EmptyState())
        return main.init(rest), adv_state

    def update_fn(updates, state, params=None):
        rest_u, adv_u = split(updates)
        rest_p, adv_p = split(params) if params is not None else (None, None)
        rest_u, main_state = main.update(rest_u, state[0], rest_p)
        if adv_u is None:
            return rest_u, (main_state, state[1])
        new_u, new_state = {}, {}
        for n in adv_u:
            new_u[n], new_state[n] = opt(n).update(
                adv_u[n], state[1][n], None if adv_p is None else adv_p[n])
        return {**rest_u, ADVERSARY: new_u}, (main_state, new_state)

    return optax.GradientTransformation(init_fn, update_fn)


def partition_specs(decomposition, params: Any, model_axis: str) -> dict:
    """The decomposition's specs, with the adversary's state replicated."""
    rest = {k: v for k, v in params.items() if k != ADVERSARY}
    specs = decomposition.partition_specs(rest, model_axis)
    if ADVERSARY in params:
        specs[ADVERSARY] = jax.tree.map(lambda _: P(), params[ADVERSARY])
    return specs
