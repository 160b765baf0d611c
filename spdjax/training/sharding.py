"""Device meshes and shardings: components along C on the ``model`` axis, batches along ``data``.

Sharding is layout only: masks and data are drawn with their global shapes from counter-based
keys, so a step gives the same numbers on 1 device and on 8 (up to float reduction order).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"


def make_mesh(data: int | None = None, model: int = 1) -> Mesh:
    """A ``(data, model)`` mesh; ``data`` defaults to all devices not used by ``model``."""
    n = jax.device_count()
    if data is None:
        if n % model:
            raise ValueError(f"model axis size {model} does not divide the {n} devices.")
        data = n // model
    if data * model > n:
        raise ValueError(f"Mesh {data}x{model} needs {data * model} devices; only {n} available.")
    # Auto axes: the compiler propagates shardings from jit's in/out shardings and constraints.
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(
        (data, model), (DATA, MODEL), axis_types=auto, devices=jax.devices()[: data * model]
    )


def check_divisible(params: Any, specs: Any, mesh: Mesh, batch_size: int) -> None:
    """Fails early if a sharded axis (e.g. C) or the batch does not split evenly over the mesh."""
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    flat = jax.tree_util.tree_leaves_with_path(params)
    for (path, x), spec in zip(flat, flat_specs):
        for dim, axis in enumerate(spec):
            if axis is not None and x.shape[dim] % mesh.shape[axis]:
                raise ValueError(
                    f"Parameter {jax.tree_util.keystr(path)} has size {x.shape[dim]} on axis "
                    f"{dim}, which is sharded along {axis!r} (size {mesh.shape[axis]}) but not "
                    "divisible by it; choose C divisible by the model axis size."
                )
    if batch_size % mesh.shape[DATA]:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the data axis size {mesh.shape[DATA]}."
        )


def shard_params(layout: Any, params: Any, mesh: Mesh) -> Any:
    """Places params on the mesh by ``layout.partition_specs(params, MODEL)``.

    ``layout`` is a :class:`~spdjax.core.decomposition.Decomposition` or a
    :class:`~spdjax.methods.Method`: anything that knows where its component axis is.
    """
    specs = layout.partition_specs(params, MODEL)
    return jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` on all devices of ``mesh`` (e.g. the frozen target params)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def batch_spec(x: jax.Array) -> P:
    """Leading axis on ``data``, the rest replicated."""
    return P(DATA, *([None] * (x.ndim - 1)))


def place_state(state: Any, mesh: Mesh) -> tuple[Any, Any]:
    """Replicates every leaf not already laid out on ``mesh`` (step counters, optimizer counts).

    Returns ``(state, shardings)``; pass the shardings to ``make_train_step(state_sharding=...)``.
    """

    def sharding_of(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return s
        return NamedSharding(mesh, P())

    shardings = jax.tree.map(sharding_of, state)
    return jax.device_put(state, shardings), shardings
