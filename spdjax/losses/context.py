"""What one training step computes once and every loss term reads: :class:`Context`.

Because the causal importances in a context are a function of ``params``, build the context
*inside* the function you differentiate (:func:`make_context`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from spdjax.core.decomposition import CausalImportance, Decomposition

Array = jax.Array


@flax.struct.dataclass
class Context:
    """The batch, the clean target output, each site's clean input and the CI of every site."""

    decomposition: Decomposition = flax.struct.field(pytree_node=False)
    target_params: Any
    batch: Any
    target_out: Array
    site_inputs: dict[str, Array]
    ci: dict[str, CausalImportance]
    step_frac: Array  # step / total steps, in [0, 1]; used by p-annealing


def make_context(
    decomposition: Decomposition, target_params: Any, params: dict, batch: Any, step_frac=0.0,
    *, ci_lower_noise: float = 0.0, key: Array | None = None,
) -> Context:
    """Clean target forward (output and site inputs) and causal importances for ``batch``
    (``ci_lower_noise`` with ``key``: the noisy ``σ_lo`` input of
    :meth:`~spdjax.core.decomposition.Decomposition.causal_importance`)."""
    target_out, site_inputs = decomposition.clean_forward(target_params, batch)
    target_out = jax.lax.stop_gradient(target_out)
    site_inputs = jax.lax.stop_gradient(site_inputs)
    ci = decomposition.causal_importance(params, site_inputs, lower_noise=ci_lower_noise, key=key)
    return Context(
        decomposition=decomposition,
        target_params=target_params,
        batch=batch,
        target_out=target_out,
        site_inputs=site_inputs,
        ci=ci,
        step_frac=jnp.asarray(step_frac, jnp.float32),
    )
