"""Global CI functions (spdjax/core/ci_global.py): one network for the CI of every site.

Shapes and per-site heads, the transformer's causality, the global MLP and a one-block
transformer against float64 NumPy forwards, RoPE against its complex-rotation definition,
chunking, errors, sharding on 8 fake devices, and tiny managed runs (TMS, the LM family) with a
checkpoint resume.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import spdjax
from spdjax.core import ci_global
from spdjax.core.ci import make_ci_fn
from spdjax.training import sharding

from helpers import finish, np_gelu, two_site_target

GLOBAL_FNS = ["global_mlp", "global_transformer", "chunkwise_transformer"]
SMALL = {"d_model": 8, "heads": 2, "layers": 2, "sites_per_chunk": 1}
SITES = {"a": (3, 5), "b": (4, 3), "c": (2, 6)}  # site -> (d_in, C)


def _xs(shape_lead, seed=0):
    k = jax.random.split(jax.random.key(seed), len(SITES))
    return {n: jax.random.normal(kn, (*shape_lead, d)) for kn, (n, (d, _)) in zip(k, SITES.items())}


# -------------------------------------------------------------------------- shapes and heads


@pytest.mark.parametrize("ci_fn", GLOBAL_FNS)
def test_every_site_gets_its_own_C_from_one_network(ci_fn):
    target, tp = two_site_target()
    d = spdjax.decompose(target, {"a": 5, "b": 3}, ci_fn=ci_fn, ci_hidden=(6,), ci_options=SMALL)
    params = d.init(jax.random.key(0), tp)
    assert set(params["ci"]) == {ci_global.GLOBAL}
    ci_of = jax.jit(lambda p, x: spdjax.make_context(d, tp, p, x).ci)
    for x in (jnp.ones((2, 3)), jax.random.normal(jax.random.key(1), (2, 4, 3))):
        before = ci_of(params, x)
        assert before["a"].pre.shape == (*x.shape[:-1], 5)
        assert before["b"].pre.shape == (*x.shape[:-1], 3)
    # site a's head moves site a's CI only (the same program: bumped params, the last x)
    bumped = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 1.0 if "'a'" in jax.tree_util.keystr(path) and "heads" in
        jax.tree_util.keystr(path) else v, params)
    after = ci_of(bumped, x)
    assert not np.allclose(before["a"].pre, after["a"].pre)
    np.testing.assert_array_equal(before["b"].pre, after["b"].pre)
    g = jax.jit(jax.grad(lambda p: spdjax.importance_minimality(
        p, spdjax.make_context(d, tp, p, x), pnorm=2.0)))(params)
    leaves = jax.tree.leaves(g["ci"])
    assert all(np.isfinite(np.asarray(v)).all() for v in leaves)
    assert sum(float(jnp.abs(v).sum()) > 0 for v in leaves) > len(leaves) // 2


def test_params_of_another_kind_of_ci_function_are_refused():
    target, tp = two_site_target()
    # Shapes only: the check is on the params' structure, made while tracing (no compiles).
    def init(d):
        return jax.eval_shape(d.init, jax.random.key(0), tp)

    def context(d, params):
        return jax.eval_shape(lambda p: spdjax.make_context(d, tp, p, jnp.ones((2, 3))), params)

    per_site = init(spdjax.decompose(target, {"a": 5, "b": 3}))
    d = spdjax.decompose(target, {"a": 5, "b": 3}, ci_fn="global_mlp")
    with pytest.raises(ValueError, match=r"CI params under \['__global__'\]: a global CI"):
        context(d, per_site)
    one_site = init(spdjax.decompose(target, {"a": 5}, ci_fn="global_mlp"))
    other = {**init(d), "ci": one_site["ci"]}
    with pytest.raises(ValueError, match=r"gave CI for \['a'\], but this decomposition has"):
        context(d, other)


# -------------------------------------------------------------------------- the transformer


@pytest.mark.parametrize("causal", [True, False])
def test_causal_attention_keeps_earlier_positions_blind_to_later_ones(causal):
    fn = make_ci_fn("global_transformer", options={**SMALL, "causal": causal})
    params = fn.init(jax.random.key(0), sites=SITES)
    xs = _xs((2, 6))
    changed = {n: x.at[:, 3].add(1.0) for n, x in xs.items()}
    apply = jax.jit(fn.apply)
    a, b = apply(params, xs), apply(params, changed)
    for n in SITES:
        assert not np.allclose(a[n][:, 3:], b[n][:, 3:], atol=1e-6)
        if causal:
            np.testing.assert_array_equal(a[n][:, :3], b[n][:, :3])
        else:
            assert not np.allclose(a[n][:, :3], b[n][:, :3], atol=1e-6)


def test_positionless_inputs_are_sequences_of_length_one():
    fn = make_ci_fn("global_transformer", options=SMALL)
    params = fn.init(jax.random.key(0), sites=SITES)
    xs = _xs((5,))
    apply = jax.jit(fn.apply)  # one compile per input rank, not one per op and shape
    flat = apply(params, xs)
    as_seq = apply(params, {n: x[:, None, :] for n, x in xs.items()})
    for n in SITES:
        np.testing.assert_allclose(flat[n], as_seq[n][:, 0], rtol=1e-6, atol=1e-6)


def np_rope(x, base=10000.0):
    """x [..., T, H, dh]: the planes (x_i, x_{i+dh/2}) as complex numbers, times e^{i t θ_i}."""
    T, dh = x.shape[-3], x.shape[-1]
    theta = base ** (-np.arange(0, dh, 2) / dh)
    z = (x[..., : dh // 2] + 1j * x[..., dh // 2:]) * np.exp(
        1j * np.arange(T)[:, None, None] * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_against_numpy_and_relative_positions():
    x = np.random.default_rng(0).normal(size=(2, 7, 3, 8))
    got = jax.jit(ci_global.rope)(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, np_rope(x), rtol=1e-5, atol=1e-5)
    # <rope(q)_t, rope(k)_s> depends on t - s only: shift both by 2 positions
    q, k = x[0, :, 0], x[1, :, 0]  # one vector per position
    same_q = np.broadcast_to(q[:1], (7, 8))[:, None, :]
    same_k = np.broadcast_to(k[:1], (7, 8))[:, None, :]
    rq, rk = np_rope(same_q)[:, 0], np_rope(same_k)[:, 0]
    np.testing.assert_allclose(rq[3] @ rk[1], rq[5] @ rk[3], rtol=1e-10)


def np_rms(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + ci_global.RMS_EPS)


def np_transformer(chunk, xs, heads, causal):
    """float64 NumPy forward of one chunk: sorted concat of RMS-normed inputs [B, T, d]."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x = np.concatenate([np_rms(f(xs[n])) for n in sorted(chunk["heads"])], axis=-1)
    h = x @ f(chunk["in"]["w"]) + f(chunk["in"]["b"])
    for blk in chunk["blocks"]:
        a = np_rms(h)
        B, T, D = a.shape
        q, k, v = ((a @ f(blk[w]["w"])).reshape(B, T, heads, D // heads) for w in "qkv")
        q, k = np_rope(q), np_rope(k)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // heads)
        if causal:
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, T, D)
        h = h + o @ f(blk["o"]["w"])
        mi, mo = blk["mlp_in"], blk["mlp_out"]
        h = h + np_gelu(np_rms(h) @ f(mi["w"]) + f(mi["b"])) @ f(mo["w"]) + f(mo["b"])
    return {n: h @ f(p["w"]) + f(p["b"]) for n, p in chunk["heads"].items()}


@pytest.mark.parametrize("causal", [True, False])
def test_transformer_against_numpy(causal):
    fn = make_ci_fn("global_transformer", options={**SMALL, "causal": causal})
    params = fn.init(jax.random.key(3), sites=SITES)
    xs = _xs((2, 5), seed=4)
    got = jax.jit(fn.apply)(params, xs)
    want = np_transformer(params["chunks"][0], xs, SMALL["heads"], causal)
    for n in SITES:
        np.testing.assert_allclose(got[n], want[n], rtol=2e-4, atol=2e-5)


def test_transformer_init_scales():
    fn = make_ci_fn("global_transformer", options={"d_model": 256, "heads": 4, "layers": 1})
    sites = {"a": (300, 400), "b": (212, 400)}
    chunk = fn.init(jax.random.key(0), sites=sites)["chunks"][0]
    np.testing.assert_allclose(np.std(chunk["in"]["w"]), math.sqrt(2 / 512), rtol=0.05)
    blk = chunk["blocks"][0]
    assert blk["mlp_in"]["w"].shape == (256, 1024)  # ff = 0: 4 * d_model
    np.testing.assert_allclose(np.std(blk["q"]["w"]), 1 / math.sqrt(3 * 256), rtol=0.05)
    np.testing.assert_allclose(np.std(blk["mlp_in"]["w"]), math.sqrt(2 / 256), rtol=0.05)
    np.testing.assert_allclose(np.std(blk["mlp_out"]["w"]), 1 / math.sqrt(1024), rtol=0.05)
    np.testing.assert_allclose(np.std(chunk["heads"]["a"]["w"]), 1 / 16, rtol=0.05)


def test_chunks_read_only_their_own_sites():
    fn = make_ci_fn("chunkwise_transformer", options={**SMALL, "sites_per_chunk": 2})
    params = fn.init(jax.random.key(0), sites=SITES)  # chunks: (a, b), (c,)
    assert [sorted(c["heads"]) for c in params["chunks"]] == [["a", "b"], ["c"]]
    assert params["chunks"][0]["in"]["w"].shape == (3 + 4, 8)
    xs = _xs((2, 4))
    apply = jax.jit(fn.apply)
    a = apply(params, xs)
    b = apply(params, {**xs, "c": xs["c"] + 1.0})
    for n in ("a", "b"):
        np.testing.assert_array_equal(a[n], b[n])
    assert not np.allclose(a["c"], b["c"])
    # the global one reads every site
    g = make_ci_fn("global_transformer", options=SMALL)
    gp = g.init(jax.random.key(0), sites=SITES)
    g_apply = jax.jit(g.apply)
    assert not np.allclose(g_apply(gp, xs)["a"], g_apply(gp, {**xs, "c": xs["c"] + 1.0})["a"])


# -------------------------------------------------------------------------- the global MLP


def test_global_mlp_against_numpy():
    fn = make_ci_fn("global_mlp", (7, 5))
    params = fn.init(jax.random.key(0), sites=SITES)
    assert params["trunk"][0]["w"].shape == (9, 7)
    xs = _xs((4, 2))
    params = jax.tree.map(lambda v: v + 0.1, params)  # nonzero biases too
    got = jax.jit(fn.apply)(params, xs)
    p64 = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    h = np.concatenate([np.asarray(xs[n], np.float64) for n in sorted(SITES)], axis=-1)
    for layer in p64["trunk"]:
        h = np_gelu(h @ layer["w"] + layer["b"])
    for n, (_, C) in SITES.items():
        want = h @ p64["heads"][n]["w"] + p64["heads"][n]["b"]
        assert got[n].shape == (4, 2, C)
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-5)
    linear = make_ci_fn("global_mlp", ())  # no hidden layer: one linear map
    assert linear.init(jax.random.key(0), sites=SITES)["trunk"] == []


# -------------------------------------------------------------------------- errors


def test_bad_options_and_inputs_fail_with_what_to_do():
    with pytest.raises(ValueError, match="needs sites_per_chunk >= 1"):
        make_ci_fn("chunkwise_transformer")
    with pytest.raises(ValueError, match="heads of even width"):
        make_ci_fn("global_transformer", options={"d_model": 12, "heads": 4})
    with pytest.raises(ValueError, match="layers must be a non-negative int"):
        make_ci_fn("global_transformer", options={"layers": -1})
    with pytest.raises(ValueError, match="Unknown CI function type 'global'"):
        make_ci_fn("global")
    fn = make_ci_fn("global_mlp")
    params = fn.init(jax.random.key(0), sites=SITES)
    with pytest.raises(ValueError, match="share its leading"):
        fn.apply(params, {**_xs((2,)), "c": jnp.ones((3, 2))})
    with pytest.raises(ValueError, match="per-site CI function on inner activations"):
        from spdjax.families.lm import model as lm_model

        cfg = lm_model.VARIANTS["ih"]
        spdjax.decompose(lm_model.target(cfg), {"embed": 4}, ci_fn="global_transformer")


# -------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("ci_fn, shard_trunk", [("global_mlp", False),
                                                ("global_transformer", False),
                                                ("chunkwise_transformer", True)])
def test_heads_on_the_model_axis_and_the_same_ci_on_8_devices(ci_fn, shard_trunk):
    assert jax.device_count() == 8, "conftest must fake 8 CPU devices"
    target, tp = two_site_target()
    d = spdjax.decompose(target, {"a": 16, "b": 8}, ci_fn=ci_fn, ci_hidden=(8,),
                         ci_options={**SMALL, "shard_trunk": shard_trunk, "d_model": 16})
    params = d.init(jax.random.key(0), tp)
    specs = d.partition_specs(params, sharding.MODEL)
    g = specs["ci"][ci_global.GLOBAL]
    heads = g["heads"] if ci_fn == "global_mlp" else g["chunks"][0]["heads"]
    assert heads["a"] == {"w": P(None, "model"), "b": P("model")}
    if ci_fn != "global_mlp":
        w1 = g["chunks"][0]["blocks"][0]["mlp_in"]["w"]
        assert w1 == (P(None, "model") if shard_trunk else P(None, None))
    mesh = sharding.make_mesh(data=1, model=8)
    sharding.check_divisible(params, specs, mesh, 8)
    placed = sharding.shard_params(d, params, mesh)
    x = jax.random.normal(jax.random.key(2), (8, 3))
    pre = jax.jit(lambda p: {n: c.pre for n, c in spdjax.make_context(d, tp, p, x).ci.items()})
    want, got = pre(params), pre(placed)
    assert got["a"].sharding.spec[-1] == "model"
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------- managed runs

RUN = {"steps": 4, "log_every": 2, "checkpoint_every": 2, "batch_size": 16,
       "eval_batch_size": 32, "figures": False}


def _tms_config(ci_fn, **overrides):
    return spdjax.config.load("tms:5-2", {**RUN, "ci_fn": ci_fn, "ci_hidden": (8,),
                                          "ci_options.d_model": 8, "ci_options.heads": 2,
                                          "ci_options.layers": 1,
                                          "ci_options.sites_per_chunk": 1, **overrides})


# ~12 s CPU each, nearly all compiling: the managed run's path for a global CI function runs in
# the default suite with [global_transformer] (VPD's); the other two functions' forwards,
# gradients and sharded train steps are tested above and below
# (test_every_site_gets_its_own_C_from_one_network, test_heads_on_the_model_axis_...,
# test_a_train_step_on_8_model_devices_...).
@pytest.mark.parametrize("ci_fn", [pytest.param("global_mlp", marks=pytest.mark.slow),
                                   "global_transformer",
                                   pytest.param("chunkwise_transformer", marks=pytest.mark.slow)])
def test_tms_run_with_a_global_ci_function(ci_fn, tmp_path):
    summary, step = finish(_tms_config(ci_fn), tmp_path / "run")
    assert step == 4 and np.isfinite(summary["loss"]["total"])
    assert set(summary["ci_l0"]) == {"linear1", "linear2"}


@pytest.mark.slow  # ~10 s; a global CI's params are checkpointed like every other param
def test_a_global_ci_run_resumes_from_its_checkpoint(tmp_path):
    from spdjax.training import loop

    config = _tms_config("global_transformer", mesh_model=2)
    straight = spdjax.setup(config)
    loop.train(straight)
    stopped = spdjax.setup(config, tmp_path / "run")
    loop.train(stopped, 2)
    loop.close(stopped)
    resumed = spdjax.setup(config, tmp_path / "run")
    assert resumed.step == 2
    loop.train(resumed)
    loop.close(resumed)
    assert set(resumed.params["ci"]) == {ci_global.GLOBAL}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(resumed.params), jax.device_get(straight.params))


@pytest.mark.slow  # ~1 min each; the transformer's causality and forward are tested apart
@pytest.mark.parametrize("ci_fn", ["global_mlp", "global_transformer", "chunkwise_transformer"])
def test_lm_run_with_a_global_ci_function(ci_fn, tmp_path, monkeypatch):
    monkeypatch.setenv("SPDJAX_CACHE", str(tmp_path / "cache"))
    config = spdjax.config.load("lm:ih", {**RUN, "target_steps": 10, "C": 8, "batch_size": 8,
                                          "eval_batch_size": 8, "ci_fn": ci_fn,
                                          "ci_hidden": (8,), "ci_options.d_model": 8,
                                          "ci_options.heads": 2, "ci_options.layers": 1,
                                          "ci_options.sites_per_chunk": 4})
    summary, step = finish(config, tmp_path / "run")
    assert step == 4 and np.isfinite(summary["kl_ci_masked"])
    assert len(summary["alive"]) == 8


def test_muon_sees_every_weight_matrix_of_the_transformer():
    from spdjax.methods.optimizers import muon_dims

    fn = make_ci_fn("global_transformer", options=SMALL)
    params = fn.init(jax.random.key(0), sites=SITES)
    dims = jax.tree_util.tree_leaves_with_path(muon_dims(params), is_leaf=lambda x: x is None or
                                               isinstance(x, optax.contrib.MuonDimensionNumbers))
    matrices = sorted(jax.tree_util.keystr(p) for p, d in dims if d is not None)
    # per block q, k, v, o, mlp_in, mlp_out; the input projection; one head per site
    assert len(matrices) == 6 * SMALL["layers"] + 1 + len(SITES)
    assert all(m.endswith("['w']") for m in matrices)


@pytest.mark.parametrize("ci_fn", ["global_mlp", pytest.param("global_transformer",
                                                              marks=pytest.mark.slow)])
def test_a_train_step_on_8_model_devices_equals_one_device_and_gathers_nothing(ci_fn):
    import re

    from benchmarks.sharding_memory import build

    def run_on(model):
        state, step, tp = build(64, ci_fn, model, d=16, h=32, batch=16, ci_hidden=8)
        compiled = step.lower(state, tp, jax.random.key(1)).compile()  # run as compiled: once
        (state, metrics), err = compiled(state, tp, jax.random.key(1))
        assert err.get() is None
        return compiled.as_text(), float(metrics["loss"]["total"]), jax.device_get(state.params)

    _, base_loss, base_params = run_on(1)
    hlo, loss, params = run_on(8)
    assert re.findall(r"all-gather", hlo) == []  # no factor, head or trunk weight moves whole
    np.testing.assert_allclose(loss, base_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params, base_params)
