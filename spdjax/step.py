"""The training step: one pure function, jitted at the boundary, shared by every method.

A *method* is an ``objective(params, target_params, batch, key, step_frac) -> (loss, metrics)``;
SPD's is :func:`spd_objective`. A different decomposition method (e.g. APD) supplies its own
objective and reuses :func:`make_train_step` and the training loop unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spdjax import sharding as shard_lib
from spdjax.decomposition import Decomposition
from spdjax.losses import make_context, make_total_loss

Array = jax.Array
Objective = Callable[[Any, Any, Any, Array, Array], tuple[Array, dict[str, Array]]]


@flax.struct.dataclass
class TrainState:
    """Step counter, the decomposition's params, and the optimizer state (kept separate)."""

    step: Array
    params: Any
    opt_state: Any


def ci_l0(ci_lower: Array, threshold: float) -> Array:
    """Mean over examples of the number of components with CI above ``threshold``."""
    return jnp.mean(jnp.sum((ci_lower > threshold).astype(jnp.float32), axis=-1))


def spd_objective(
    decomposition: Decomposition,
    loss_config: Mapping[str, Mapping[str, Any]],
    *,
    l0_threshold: float = 0.1,
) -> Objective:
    """The SPD objective: weighted sum of the configured loss terms (see :mod:`spdjax.losses`).

    Metrics: ``loss/total``, ``loss/<term>`` (unweighted) and ``ci_l0/<site>``.
    """
    total_loss = make_total_loss(loss_config)

    def objective(params, target_params, batch, key, step_frac):
        ctx = make_context(decomposition, target_params, params, batch, step_frac)
        total, terms = total_loss(params, ctx, key)
        metrics = {"loss/total": total, **{f"loss/{k}": v for k, v in terms.items()}}
        for name, c in ctx.ci.items():
            metrics[f"ci_l0/{name}"] = ci_l0(c.lower, l0_threshold)
        return total, metrics

    return objective


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0 (the optimizer state inherits the params' shardings)."""
    opt_state = jax.jit(optimizer.init)(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def make_train_step(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    batch_fn: Callable[[Array], Any],
    *,
    total_steps: int,
    mesh: Mesh | None = None,
    state_sharding: Any = None,
    donate: bool = True,
) -> Callable[[TrainState, Any, Array], tuple[TrainState, dict[str, Array]]]:
    """Returns jitted ``step(state, target_params, root_key) -> (state, metrics)``.

    The step draws its own batch with ``batch_fn(key)`` on device; the step key is
    ``fold_in(root_key, state.step)``, so a run is a pure function of its seed and can resume.
    With a ``mesh`` the batch is sharded along ``data`` and the state keeps ``state_sharding``
    (from :func:`~spdjax.sharding.place_state` after :func:`~spdjax.sharding.shard_params`).
    """

    def step(state: TrainState, target_params, root_key):
        key = jax.random.fold_in(root_key, state.step)
        k_batch, k_loss = jax.random.split(key)
        batch = batch_fn(k_batch)
        if mesh is not None:
            batch = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(
                    x, NamedSharding(mesh, shard_lib.batch_spec(x))
                ),
                batch,
            )
        step_frac = state.step.astype(jnp.float32) / max(total_steps, 1)
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, target_params, batch, k_loss, step_frac)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if mesh is not None and state_sharding is not None:
        kwargs["out_shardings"] = (state_sharding, NamedSharding(mesh, P()))
    return jax.jit(step, **kwargs)
