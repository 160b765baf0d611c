"""Adapters that turn unmodified Flax models (linen or nnx) into
:class:`~spdjax.core.target.Target`.

Both trace the model once on an example input (:func:`spdjax.core.tracing.from_jax`), so every
weight application is a site: ``Dense``/``Linear``, ``DenseGeneral``/``LinearGeneral``/``Einsum``
kernels of any rank (the attention projections of ``MultiHeadDotProductAttention`` and
``nnx.MultiHeadAttention`` included), ``Embed`` lookups and ``Embed.attend``, layers stacked by
``nn.scan``/``nnx.scan`` (one site per layer) and layers called more than once (one site per
call). Sites are named by module path: linen ``"layers_0/mlp_in"``, nnx ``"layers/0/mlp_in"``.
Target params are returned as a plain nested dict of arrays, so the rest of the library never
sees a Flax object.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from spdjax.core.target import Target
from spdjax.core.tracing import from_jax


def _to_plain_dict(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _to_plain_dict(v) for k, v in tree.items()}
    return tree


def from_linen(module: nn.Module, variables: dict, example_input: Any,
               **apply_kwargs) -> tuple[Target, dict]:
    """Wraps a linen module and its variables. Returns ``(target, target_params)``.

    ``example_input`` is one batch the model accepts (its shapes find the sites; any batch size
    works later). ``apply_kwargs`` are passed to every ``module.apply`` (e.g. ``train=False``).
    """
    if "params" not in variables:
        raise ValueError("from_linen expects variables with a 'params' collection, as from init().")
    params = _to_plain_dict(variables["params"])
    other = {k: v for k, v in variables.items() if k != "params"}

    def fn(p, x):
        return module.apply({**other, "params": p}, x, **apply_kwargs)

    return from_jax(fn, params, example_input)


def from_nnx(model: nnx.Module, example_input: Any, **call_kwargs) -> tuple[Target, dict]:
    """Wraps an nnx module. Returns ``(target, target_params)``; the module itself is not changed.

    ``example_input`` is one batch the model accepts; ``call_kwargs`` are passed to every
    ``model(x, ...)`` call.
    """
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    params = _to_plain_dict(nnx.to_pure_dict(param_state))

    def fn(p, x):
        state = jax.tree.map(lambda v: v, param_state)
        nnx.replace_by_pure_dict(state, p)
        # fresh copies of the other state (rng counts, batch stats): a model in train mode
        # updates them inside this trace, and the originals must stay untouched
        return nnx.merge(graphdef, state, jax.tree.map(lambda v: v, rest))(x, **call_kwargs)

    return from_jax(fn, params, example_input)
