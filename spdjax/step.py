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


def aliased_tie_updates(decomposition: Decomposition) -> optax.GradientTransformation:
    """Adds the updates of each tied pair's two copies and gives both the sum (``tie_mode="aliased"``).

    Chained after the optimizer: ``u_owner + swap(u_tied)`` goes to the owner and its
    swap-transpose (``V <- Uᵀ``, ``U <- Vᵀ``) to the tied copy, so copies that start equal stay
    equal, each moved by both of its own optimizer steps, as in the reference.
    """

    def update_fn(updates, state, params=None):
        del params
        comps = dict(updates["components"])
        for tied, owner in decomposition.ties.items():
            u_owner, u_tied = comps[owner], comps[tied]
            merged = {"V": u_owner["V"] + u_tied["U"].T, "U": u_owner["U"] + u_tied["V"].T}
            comps[owner], comps[tied] = merged, {"V": merged["U"].T, "U": merged["V"].T}
        return {**updates, "components": comps}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(decomposition: Decomposition, learning_rate) -> optax.GradientTransformation:
    """Adam (β 0.9/0.999, eps 1e-8, no weight decay: the paper's), plus the tied-copy sync for
    ``tie_mode="aliased"``. ``learning_rate`` is a float or an optax schedule."""
    adam = optax.adam(learning_rate)
    if decomposition.ties and decomposition.tie_mode == "aliased":
        return optax.chain(adam, aliased_tie_updates(decomposition))
    return adam


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
    microbatches: int = 1,
) -> Callable[[TrainState, Any, Array], tuple[TrainState, dict[str, Array]]]:
    """Returns jitted ``step(state, target_params, root_key) -> (state, metrics)``.

    The step draws its own batch with ``batch_fn(key)`` on device; the step key is
    ``fold_in(root_key, state.step)``, so a run is a pure function of its seed and can resume.
    With a ``mesh`` the batch is sharded along ``data`` and the state keeps ``state_sharding``
    (from :func:`~spdjax.sharding.place_state` after :func:`~spdjax.sharding.shard_params`).

    ``microbatches > 1`` splits the batch into that many equal chunks and averages their gradients
    (a ``lax.scan``). Every SPD loss term is a mean over examples, so this is the full-batch
    gradient, with each chunk drawing its own masks; it keeps the ``[batch, C, hidden]`` CI
    tensors in cache on CPU, which is several times faster for large C (benchmarks/README.md).
    """
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}.")
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def grads_and_metrics(params, target_params, batch, key, step_frac):
        if microbatches == 1:
            (_, metrics), grads = grad_fn(params, target_params, batch, key, step_frac)
            return grads, metrics

        def split(x):
            if x.shape[0] % microbatches:
                raise ValueError(
                    f"Batch size {x.shape[0]} is not divisible by microbatches={microbatches}."
                )
            # Chunk i holds rows i, i + n, i + 2n, ...: the data-sharded axis stays leading.
            x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
            return jnp.moveaxis(x, 1, 0)

        def body(acc, inputs):
            i, chunk = inputs
            (_, metrics), grads = grad_fn(
                params, target_params, chunk, jax.random.fold_in(key, i), step_frac
            )
            return jax.tree.map(jnp.add, acc, (grads, metrics)), None

        chunks = jax.tree.map(split, batch)
        zeros = jax.tree.map(
            jnp.zeros_like,
            jax.eval_shape(lambda: grad_fn(params, target_params,
                                           jax.tree.map(lambda x: x[0], chunks), key, step_frac)),
        )
        init = (zeros[1], zeros[0][1])
        (grads, metrics), _ = jax.lax.scan(body, init, (jnp.arange(microbatches), chunks))
        return jax.tree.map(lambda a: a / microbatches, (grads, metrics))


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
        grads, metrics = grads_and_metrics(state.params, target_params, batch, k_loss, step_frac)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if mesh is not None and state_sharding is not None:
        kwargs["out_shardings"] = (state_sharding, NamedSharding(mesh, P()))
    return jax.jit(step, **kwargs)
