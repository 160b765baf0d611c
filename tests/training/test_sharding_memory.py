"""Sharding that matters: with C along the ``model`` axis, the memory of params + optimizer state
per device falls with the number of devices, the result equals the one-device run, and the
compiled step moves no factor between devices (no all-gather; two all-reduces).

Covers aliased ties (a weight and its transpose, the reference's two copies), the per-site
``vector_mlp`` and the per-component ``mlp`` CI functions, and micro-batching with a mesh.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.methods import spd
from spdjax.training import sharding

D, H, C, BATCH = 32, 64, 256, 32
LOSSES = {"faithfulness": {"coeff": 1.0}, "stochastic_recon": {"coeff": 1.0},
          "stochastic_recon_layerwise": {"coeff": 1.0},
          "importance_minimality": {"coeff": 1e-3, "pnorm": 1.0}}


def tied_autoencoder(p, x):  # the weight and its transpose: sites "w" and "w#2", tied
    return jax.nn.relu(x @ p["w"] + p["b"]) @ p["w"].T


def batch_fn(key):
    return jax.random.normal(key, (BATCH, D))


def per_device_bytes(tree) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
               for s in leaf.addressable_shards if s.device == dev)


def run_on(model: int, ci_fn: str):
    rng = np.random.default_rng(0)
    tp = {"w": jnp.asarray(rng.normal(size=(D, H)) / 6, jnp.float32), "b": jnp.zeros(H)}
    target, tp = spdjax.from_jax(tied_autoencoder, tp, jnp.ones((2, D)))
    d = spdjax.decompose(target, {"w": C, "w#2": C}, ties={"w#2": "w"}, tie_mode="aliased",
                         ci_fn=ci_fn, ci_hidden=(8,))
    mesh = sharding.make_mesh(jax.device_count() // model, model)
    opt = spd.make_optimizer(d, 1e-3)
    params = sharding.shard_params(d, d.init(jax.random.key(0), tp), mesh)
    state, shardings = sharding.place_state(spdjax.init_train_state(params, opt), mesh)
    step = spdjax.make_train_step(spd.objective(d, spdjax.losses.terms_from_config(LOSSES)), opt,
                                  batch_fn, total_steps=10, mesh=mesh, state_sharding=shardings,
                                  microbatches=2)
    tp = sharding.replicate(tp, mesh)
    compiled = step.lower(state, tp, jax.random.key(1)).compile()
    memory = per_device_bytes(state)
    for _ in range(2):
        state, metrics = step(state, tp, jax.random.key(1))
    return memory, compiled, float(metrics["loss"]["total"]), jax.device_get(state.params)


@pytest.mark.parametrize("ci_fn", ["vector_mlp", pytest.param("mlp", marks=pytest.mark.slow)])
def test_memory_per_device_falls_with_the_model_axis_and_nothing_is_gathered(ci_fn):
    assert jax.device_count() == 8, "conftest must fake 8 CPU devices"
    base_mem, base_compiled, base_loss, base_params = run_on(1, ci_fn)
    base_temp = base_compiled.memory_analysis().temp_size_in_bytes
    for model in (2, 8):
        mem, compiled, loss, params = run_on(model, ci_fn)
        # params + Adam moments of the factors and CI functions are all C-sharded: 1/model each
        assert mem == pytest.approx(base_mem / model, rel=0.02), (model, mem, base_mem)
        # XLA's temporaries per device fall too (the [batch, C, hidden] CI tensors are C-sharded)
        assert compiled.memory_analysis().temp_size_in_bytes < 0.75 * base_temp * 2 / model
        hlo = compiled.as_text()
        assert re.findall(r"all-gather", hlo) == []  # no factor or CI weight moves whole
        # what is summed over devices: activations [batch, d], the faithfulness term's weight
        # reconstructions [d_in, d_out] and scalars; never anything with the C axis
        reduced = re.findall(r"= (\([^)]*\)|\S+) all-reduce\(", hlo)
        dims = [int(n) for shapes in reduced for shape in re.findall(r"\[([\d,]*)\]", shapes)
                for n in shape.split(",") if n]
        assert reduced and C not in dims, reduced
        np.testing.assert_allclose(loss, base_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     params, base_params)
