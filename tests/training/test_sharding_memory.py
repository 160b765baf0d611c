"""Sharding that matters: with C along the ``model`` axis, the memory of params + optimizer state
per device falls with the number of devices, the result equals the one-device run, and the
compiled step moves no factor between devices (no all-gather; two all-reduces).

The model is the one of ``python -m benchmarks.sharding_memory``, smaller. Covers aliased ties (a
weight and its transpose, the reference's two copies), the per-site ``vector_mlp`` and the
per-component ``mlp`` CI functions, and micro-batching with a mesh.
"""

import re

import jax
import numpy as np
import pytest

from benchmarks.sharding_memory import build, per_device_bytes

C = 256


def run_on(model: int, ci_fn: str):
    state, step, tp = build(C, ci_fn, model, d=32, h=64, batch=32, ci_hidden=8, microbatches=2)
    compiled = step.lower(state, tp, jax.random.key(1)).compile()
    memory = per_device_bytes(state)
    for _ in range(2):  # the program measured above; calling ``step`` would compile it again
        (state, metrics), checks = compiled(state, tp, jax.random.key(1))
        assert checks.get() is None  # the step's input checks, which ``step`` would read
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
