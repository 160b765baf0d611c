"""The jitted train step: traces once, trains, and gives the same numbers on 1 and 8 devices."""

import json

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import spdjax
from spdjax.methods import spd
from spdjax.training import sharding

from helpers import two_site_target

LOSS_CONFIG = {
    "faithfulness": {"coeff": 1.0},
    "stochastic_recon": {"coeff": 1.0},
    "stochastic_recon_layerwise": {"coeff": 1.0},
    "importance_minimality": {"coeff": 3e-3, "pnorm": 1.0},
}
BATCH = 16


def batch_fn(key):
    return spdjax.sparse_features(key, BATCH, 3, feature_probability=0.5)


def build(mesh=None, ci_fn="mlp"):
    target, tp = two_site_target()
    d = spdjax.decompose(target, {"a": 8, "b": 4}, ci_fn=ci_fn, ci_hidden=(4,))
    params = d.init(jax.random.key(0), tp)
    opt = optax.adam(1e-2)
    state_sharding = None
    if mesh is not None:
        sharding.check_divisible(params, d.partition_specs(params, "model"), mesh, BATCH)
        params = sharding.shard_params(d, params, mesh)
        tp = sharding.replicate(tp, mesh)
    state = spdjax.init_train_state(params, opt)
    if mesh is not None:
        state, state_sharding = sharding.place_state(state, mesh)
    objective = spd.objective(d, spdjax.losses.terms_from_config(LOSS_CONFIG))
    step = spdjax.make_train_step(objective, opt, batch_fn,
                                  total_steps=100, mesh=mesh, state_sharding=state_sharding)
    return d, tp, state, step


def test_step_traces_once_and_reduces_loss():
    d, tp, state, step = build()
    traces = []
    inner = step.__wrapped__

    def counting(*args):
        traces.append(1)
        return inner(*args)

    step = jax.jit(counting, donate_argnums=0)
    key = jax.random.key(0)
    first = None
    for _ in range(60):
        state, metrics = step(state, tp, key)
        first = first if first is not None else float(metrics["loss"]["total"])
    assert len(traces) == 1
    assert int(state.step) == 60
    assert float(metrics["loss"]["total"]) < first
    assert set(metrics["loss"]) >= {"total", "faithfulness"}
    assert set(metrics["ci_l0"]) >= {"a", "b"}


@pytest.mark.parametrize("ci_fn", ["mlp", pytest.param("shared_mlp", marks=pytest.mark.slow)])
def test_same_loss_on_one_and_eight_devices(ci_fn):
    assert jax.device_count() == 8, "conftest must fake 8 CPU devices"
    results = []
    for data, model in ((1, 1), (4, 2), (2, 4)):
        mesh = sharding.make_mesh(data, model)
        d, tp, state, step = build(mesh, ci_fn)
        for _ in range(3):
            state, metrics = step(state, tp, jax.random.key(42))
        results.append((float(metrics["loss"]["total"]), jax.device_get(state.params)))
        if model > 1:
            V = state.params["components"]["a"]["V"]
            assert V.sharding.spec == P(None, "model")
            assert len(V.sharding.device_set) == data * model
    base_loss, base_params = results[0]
    for loss, params in results[1:]:
        np.testing.assert_allclose(loss, base_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     params, base_params)


def test_mesh_divisibility_errors():
    target, tp = two_site_target()

    def check(sites, mesh, batch_size):
        d = spdjax.decompose(target, sites)
        params = d.init(jax.random.key(0), tp)
        sharding.check_divisible(params, d.partition_specs(params, "model"), mesh, batch_size)

    with pytest.raises(ValueError, match=r"has size 6 on axis \d, which is sharded along 'model' "
                                         r"\(size 4\) but not divisible by it; choose C"):
        check({"a": 6, "b": 4}, sharding.make_mesh(2, 4), 16)
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by the data axis size 4"):
        check({"a": 4, "b": 4}, sharding.make_mesh(4, 2), 10)
    with pytest.raises(ValueError, match="needs 32 devices"):
        sharding.make_mesh(8, 4)


def test_microbatched_gradient_equals_full_batch_gradient():
    # With CI forced to 1, masks are 1 whatever the draw: the gradient is deterministic and the
    # micro-batched average must equal the full-batch gradient.
    target, tp = two_site_target()
    d = spdjax.decompose(target, {"a": 8, "b": 4}, ci_hidden=(4,))
    params = d.init(jax.random.key(0), tp)
    for n in params["ci"]:
        params["ci"][n][-1]["b"] = params["ci"][n][-1]["b"] + 50.0
    objective = spd.objective(d, spdjax.losses.terms_from_config(LOSS_CONFIG))
    opt = optax.sgd(1.0)
    states, metrics = [], []
    for mb in (1, 4):
        step = spdjax.make_train_step(objective, opt, batch_fn, total_steps=10, microbatches=mb,
                                      donate=False)
        s, m = step(spdjax.init_train_state(params, opt), tp, jax.random.key(3))
        states.append(s)
        metrics.append(m)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 states[0].params, states[1].params)
    np.testing.assert_allclose(metrics[0]["loss"]["total"], metrics[1]["loss"]["total"],
                               rtol=1e-5)
    with pytest.raises(ValueError, match="not divisible by microbatches=5"):
        spdjax.make_train_step(objective, opt, batch_fn, total_steps=10, microbatches=5)(
            spdjax.init_train_state(params, opt), tp, jax.random.key(0))


@pytest.mark.slow  # ~30 s; steps_per_call's scan is tested by test_ensemble.py's member runs
def test_several_steps_per_call_train_the_same_run_and_resume_at_any_step(tmp_path):
    import spdjax
    from spdjax.training import loop

    def config(k):
        return spdjax.config.load("tms:5-2", {"steps": 20, "C": 6, "batch_size": 64,
                                               "log_every": 5, "checkpoint_every": 10,
                                               "eval_batch_size": 64, "figures": False,
                                               "steps_per_call": k})

    one = spdjax.setup(config(1))
    loop.train(one)
    seen = []
    five = spdjax.setup(config(5), tmp_path / "run")
    loop.train(five, 7, on_step=lambda step, m: seen.append((step, float(m["loss"]["total"]))))
    loop.close(five)
    assert [s for s, _ in seen] == list(range(1, 8))  # every step reported, one at a time
    five = spdjax.setup(config(5), tmp_path / "run")  # resumes at step 7: chunks 7-10, 10-15, ...
    assert five.step == 7
    loop.train(five)
    loop.close(five)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
              .splitlines()]
    assert [r["step"] for r in logged] == [5, 7, 10, 15, 20]  # 7: where the first call stopped
    np.testing.assert_allclose([r["loss/total"] for r in logged if r["step"] != 7],
                               [r["loss/total"] for r in one.writer.rows], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 jax.device_get(five.params), jax.device_get(one.params))
    assert [r["step"] for r in one.writer.rows] == [5, 10, 15, 20]
    with pytest.raises(ValueError, match="log_every=5 is not a multiple of steps_per_call=4"):
        spdjax.setup(config(4))


def test_matmul_precision_reaches_the_compiled_step():
    import spdjax

    texts = {}
    for precision in ("highest", "bfloat16"):
        run = spdjax.setup(spdjax.config.load("tms:5-2", {"steps": 4, "C": 4, "batch_size": 16,
                                                        "matmul_precision": precision}))
        texts[precision] = run.step_fn.lower(run.state, run.target_params,
                                             run.keys.train).as_text()
    assert "HIGHEST" in texts["highest"] and "HIGHEST" not in texts["bfloat16"]
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        spdjax.setup(spdjax.config.load("tms:5-2", {"matmul_precision": "fp8"}))
