"""Device meshes and shardings: components along C on the ``model`` axis, batches along ``data``.

Sharding is layout only: masks and data are drawn with their global shapes from counter-based
keys, so a step gives the same numbers on 1 device and on 8 (up to float reduction order).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spdjax import ci as ci_lib
from spdjax.decomposition import Decomposition

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


def param_specs(decomposition: Decomposition, params: dict) -> dict:
    """PartitionSpecs for SPD params: the component axis C goes on ``model``."""
    comps = {n: {"V": P(None, MODEL), "U": P(MODEL, None)} for n in params["components"]}
    kind = ci_lib.get_ci_kind(decomposition.ci_fn)
    cis = {}
    for name, layers in params["ci"].items():
        if kind.component_axis_first:
            cis[name] = jax.tree.map(lambda _: P(MODEL), layers)
        else:
            specs = [{"w": P(), "b": P()} for _ in layers]
            specs[-1] = {"w": P(None, MODEL), "b": P(MODEL)}
            cis[name] = specs
    return {"components": comps, "ci": cis}


def check_divisible(decomposition: Decomposition, mesh: Mesh, batch_size: int) -> None:
    """Fails early if C or the batch does not split evenly over the mesh."""
    m, d = mesh.shape[MODEL], mesh.shape[DATA]
    for name, C in decomposition.C.items():
        if C % m:
            raise ValueError(f"Site {name!r}: C={C} is not divisible by the model axis size {m}.")
    if batch_size % d:
        raise ValueError(f"batch_size={batch_size} is not divisible by the data axis size {d}.")


def shard_params(decomposition: Decomposition, params: dict, mesh: Mesh) -> dict:
    """Places SPD params on the mesh according to :func:`param_specs`."""
    specs = param_specs(decomposition, params)
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
