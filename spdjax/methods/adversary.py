"""Persistent adversaries: loss terms that own parameters the optimizer moves *up* the loss.

A loss function with an ``adversary_init(decomposition, key, **options) -> tree`` attribute (VPD's
persistent PGD, :func:`spdjax.losses.adversarial.persistent_pgd_recon`) keeps state across
training steps in ``params["adversary"][term name]``. Being params, that state is checkpointed,
resumed, placed on the mesh and evaluated with the rest; this module gives SPD's method the three
pieces it needs: the initial state, the optimizer that ascends it while the components and CI
functions descend, and its (replicated) sharding.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from spdjax.losses import Term, term_key
from spdjax.losses.adversarial import ADVERSARY

Array = jax.Array


def adversarial_terms(terms: Sequence[Term]) -> list[Term]:
    """The terms that own a persistent adversary."""
    return [t for t in terms if hasattr(t.fn, "adversary_init")]


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


def with_adversary(main: optax.GradientTransformation,
                   adversary: optax.GradientTransformation | None = None
                   ) -> optax.GradientTransformation:
    """``main`` on every params entry but ``"adversary"``, ``adversary`` (default
    :func:`ascend_in_unit_box`) on that one; params without it get ``main`` alone."""
    adversary = adversary or ascend_in_unit_box()

    def split(tree):
        return {k: v for k, v in tree.items() if k != ADVERSARY}, tree.get(ADVERSARY)

    def init_fn(params):
        rest, adv = split(params)
        return main.init(rest), (adversary.init(adv) if adv is not None else optax.EmptyState())

    def update_fn(updates, state, params=None):
        rest_u, adv_u = split(updates)
        rest_p, adv_p = split(params) if params is not None else (None, None)
        rest_u, main_state = main.update(rest_u, state[0], rest_p)
        if adv_u is None:
            return rest_u, (main_state, state[1])
        adv_u, adv_state = adversary.update(adv_u, state[1], adv_p)
        return {**rest_u, ADVERSARY: adv_u}, (main_state, adv_state)

    return optax.GradientTransformation(init_fn, update_fn)


def partition_specs(decomposition, params: Any, model_axis: str) -> dict:
    """The decomposition's specs, with the adversary's state replicated."""
    rest = {k: v for k, v in params.items() if k != ADVERSARY}
    specs = decomposition.partition_specs(rest, model_axis)
    if ADVERSARY in params:
        specs[ADVERSARY] = jax.tree.map(lambda _: P(), params[ADVERSARY])
    return specs
