"""Tests for spdjax.families.resid_mlp.model: the target, its training, the naive baseline,
the cache, the CLI."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.cli import target as target_cli
from spdjax.families.resid_mlp import cache as rm_cache
from spdjax.families.resid_mlp import model as rm

TINY = rm.ResidMLPConfig(6, 8, 3, 2, batch_size=64)
# Room for the exact baseline (n_features + d_mlp <= d_embed); feature 6 is left unserved.
SMALL = rm.ResidMLPConfig(7, 12, 3, 2, batch_size=512)


def _random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    params = {"W_E": rng.normal(size=(cfg.n_features, cfg.d_embed))}
    for i in range(cfg.n_layers):
        params[f"layers_{i}"] = {"mlp_in": {"kernel": rng.normal(size=(cfg.d_embed, cfg.d_mlp))},
                                 "mlp_out": {"kernel": rng.normal(size=(cfg.d_mlp, cfg.d_embed))}}
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _sparse_x(cfg, n=16, seed=1, features=None):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, cfg.n_features)) * (rng.uniform(size=(n, cfg.n_features)) < 0.4)
    if features is not None:
        x[:, [f for f in range(cfg.n_features) if f not in features]] = 0.0
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("fold", [True, False])
def test_forward_matches_numpy(fold):
    params = _random_params(TINY)
    x = _sparse_x(TINY)
    target = rm.resid_mlp_target(TINY, fold=fold)
    out, inputs = jax.jit(lambda p, x: target.forward(p, x, {}))(params, x)

    p = jax.tree.map(np.asarray, params)
    r, expected_inputs = np.asarray(x) @ p["W_E"], {}
    for i in range(2):
        expected_inputs[f"layers_{i}/mlp_in"] = r
        h = np.maximum(r @ p[f"layers_{i}"]["mlp_in"]["kernel"], 0.0)
        expected_inputs[f"layers_{i}/mlp_out"] = h
        r = r + h @ p[f"layers_{i}"]["mlp_out"]["kernel"]
    np.testing.assert_allclose(out, r @ p["W_E"].T, rtol=1e-4, atol=1e-4)
    assert set(inputs) == set(expected_inputs) == set(target.sites)
    for site, value in expected_inputs.items():  # folded: the Mapped inputs stand for these
        np.testing.assert_allclose(spdjax.dense_input(inputs[site]), value, rtol=1e-4, atol=1e-4)


def test_sites_init_and_recipe():
    sites = rm.resid_mlp_target(TINY).sites
    assert {n: (s.kind, s.d_in, s.d_out, s.bias) for n, s in sites.items()} == {
        "layers_0/mlp_in": ("linear", 8, 3, None), "layers_0/mlp_out": ("linear", 3, 8, None),
        "layers_1/mlp_in": ("linear", 8, 3, None), "layers_1/mlp_out": ("linear", 3, 8, None),
    }
    params = rm.init_resid_mlp_params(jax.random.key(0), TINY)
    np.testing.assert_allclose(jnp.linalg.norm(params["W_E"], axis=-1), 1.0, rtol=1e-6)
    assert sites["layers_1/mlp_out"].weight(params) is params["layers_1"]["mlp_out"]["kernel"]
    for i in range(2):
        W_in, W_out = (params[f"layers_{i}"][m]["kernel"] for m in ("mlp_in", "mlp_out"))
        assert W_in.shape == (8, 3) and float(jnp.max(jnp.abs(W_in))) <= 8**-0.5
        assert W_out.shape == (3, 8) and float(jnp.max(jnp.abs(W_out))) <= 3**-0.5
    assert [c.steps for c in rm.RESID_VARIANTS.values()] == [1000, 1000, 10_000]
    assert [(c.d_mlp, c.n_layers) for c in rm.RESID_VARIANTS.values()] == [(50, 1), (25, 2),
                                                                          (17, 3)]
    with pytest.raises(ValueError, match=r"valid: \['1', '2', '3'\]"):
        rm.get_resid_config("4")
    with pytest.raises(ValueError, match="Unknown act 'tanh'"):
        rm.ResidMLPConfig(6, 8, 3, 1, act="tanh")
    # ResidMLPConfig's own message, or the lr-schedule registry's (SCHEDULES.get) wording.
    with pytest.raises(ValueError, match="Unknown (lr )?schedule 'cos'"):
        rm.ResidMLPConfig(6, 8, 3, 1, schedule="cos")


def _exact_factors(d, tp):
    """Factors with V U = W exactly: [I, 0] and [W; 0] when C >= d_in, else [W, 0] and [I; 0]."""
    params = d.init(jax.random.key(0), tp)
    for name in d.owners:
        W, C = d.site(name).weight(tp), d.C[name]
        d_in, d_out = W.shape
        if C >= d_in:
            V, U = jnp.eye(d_in, C), jnp.pad(W, ((0, C - d_in), (0, 0)))
        else:
            V, U = jnp.pad(W, ((0, 0), (0, C - d_out))), jnp.eye(C, d_out)
        params["components"][name] = {"V": V, "U": U}
    return params


def test_decomposition_reproduces_target_exactly():
    target = rm.resid_mlp_target(TINY)
    tp = rm.init_resid_mlp_params(jax.random.key(0), TINY)
    d = spdjax.decompose(target, {"layers_*/mlp_in": 5, "layers_*/mlp_out": 5})
    assert d.site_names == ("layers_0/mlp_in", "layers_1/mlp_in",  # in pattern order
                            "layers_0/mlp_out", "layers_1/mlp_out")
    params, x = _exact_factors(d, tp), _sparse_x(TINY)

    @jax.jit
    def compute(params, x):
        ctx = spdjax.make_context(d, tp, params, x)
        ones = {n: jnp.ones_like(c.lower) for n, c in ctx.ci.items()}
        return (d.target(tp, x), d.forward(tp, params, x, ones),
                spdjax.unmasked_recon(params, ctx), spdjax.faithfulness(params, ctx))

    want, all_masked, unmasked, faith = compute(params, x)
    np.testing.assert_allclose(all_masked, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unmasked, 0.0, atol=1e-10)
    np.testing.assert_allclose(faith, 0.0, atol=1e-12)


def test_naive_baseline_is_exact_on_its_features():
    served = np.arange(SMALL.n_features) < 6
    # Orthonormal embedding: the baseline model is exactly x + relu(x) on features 0-5, x on 6.
    params = rm.naive_baseline_params(jnp.eye(7, 12), SMALL)
    target = rm.resid_mlp_target(SMALL)
    x = _sparse_x(SMALL, n=64)
    np.testing.assert_allclose(target(params, x), rm.ideal_baseline(x, SMALL), atol=1e-5)
    x_served = _sparse_x(SMALL, n=64, features=range(6))
    for out in (target(params, x_served), rm.ideal_baseline(x_served, SMALL)):
        np.testing.assert_allclose(out, x_served + jax.nn.relu(x_served), atol=1e-5)
    # A random unit-norm embedding: the only extra error is the residual's interference x W_E W_E^T.
    W_E = rm.init_resid_mlp_params(jax.random.key(3), SMALL)["W_E"]
    out = target(rm.naive_baseline_params(W_E, SMALL), x)
    np.testing.assert_allclose(out, x @ W_E @ W_E.T + jax.nn.relu(x) * served, atol=1e-4)
    with pytest.raises(ValueError, match="n_features \\+ d_mlp"):
        rm.naive_baseline_params(jnp.eye(6, 8), TINY)


def test_ideal_baseline_loss_matches_closed_form():
    cfg = dataclasses.replace(SMALL, batch_size=4096, feature_probability=0.2)
    loss = rm.naive_baseline_loss(cfg, key=jax.random.key(0))
    # One unserved feature of 7: E[relu(x)^2] = 1/6 for x ~ U[-1, 1), active with p = 0.2.
    np.testing.assert_allclose(loss, 0.2 / 6 / 7, rtol=0.05)


def test_training_lowers_loss_and_freezes_embedding():
    cfg = dataclasses.replace(SMALL, steps=60, feature_probability=0.2)
    params, info = rm.train_resid_mlp_target(cfg, seed=0, chunk_steps=40)  # 40 + a remainder 20
    init = rm.init_resid_mlp_params(jax.random.split(jax.random.key(0), 3)[0], cfg)
    np.testing.assert_array_equal(params["W_E"], init["W_E"])
    np.testing.assert_allclose(jnp.linalg.norm(params["W_E"], axis=-1), 1.0, rtol=1e-6)
    assert not np.allclose(params["layers_0"]["mlp_in"]["kernel"],
                           init["layers_0"]["mlp_in"]["kernel"])
    assert len(info["losses"]) == 2 and info["losses"][1] < info["losses"][0]
    key = jax.random.key(7)
    assert rm.evaluate_loss(params, cfg, key) < 0.85 * rm.evaluate_loss(init, cfg, key)
    assert info["baseline_loss"] > 0 and info["ideal_baseline_loss"] > 0


def test_cache_round_trip_and_cli(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_train(cfg, seed, **kwargs):
        calls.append((cfg.variant, seed))
        params = _random_params(cfg, seed)
        info = {"seed": seed, "losses": [0.5, 0.2], "seconds": 1.5}
        return params, {**info, **rm.target_report(params, cfg, n_batches=1)}

    monkeypatch.setattr(rm, "train_resid_mlp_target", fake_train)
    first = rm_cache.load_or_train_target(TINY, 3, tmp_path)
    second = rm_cache.load_or_train_target(TINY, 3, tmp_path)
    assert calls == [("6-8-3x2", 3)]
    jax.tree.map(np.testing.assert_array_equal, first, second)
    assert jax.tree.structure(first) == jax.tree.structure(_random_params(TINY))
    stem = "resid_mlp_6-8-3x2_1000steps_seed3"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.npz"]
    meta = json.loads((tmp_path / f"{stem}.json").read_text())
    assert meta["recipe"]["value_range"] == [-1.0, 1.0] and meta["seconds"] == 1.5
    assert meta["ideal_baseline_loss"] == 0.0 and meta["final_loss"] > 0  # all 6 served
    assert np.isnan(meta["baseline_loss"])  # TINY has no room for the exact baseline

    rm_cache.load_or_train_target(dataclasses.replace(TINY, lr=1e-3), 3, tmp_path)  # another recipe
    assert len(calls) == 2

    monkeypatch.setitem(rm.RESID_VARIANTS, "1", TINY)  # the CLI on a tiny, fake-trained model
    # python -m spdjax.cli.target --family=resid_mlp: the targets' command line.
    target_cli.main(["--family=resid_mlp", "--variant=1", "--seed=0", f"--cache-dir={tmp_path}"])
    printed = capsys.readouterr().out
    assert "target loss" in printed and "naive monosemantic baseline" in printed
    assert calls[-1] == ("6-8-3x2", 0)


FOLD_TERMS = [  # (name, options): every term that touches the sites' inputs or outputs
    ("faithfulness", {}), ("importance_minimality", {"pnorm": 2.0}),
    ("stochastic_recon", {"n_samples": 2}), ("stochastic_recon_layerwise", {"n_samples": 2}),
    ("stochastic_recon", {"n_samples": 1, "delta": True}),
    ("stochastic_recon_subset", {"n_samples": 1}), ("stochastic_hidden_acts_recon", {}),
    ("ci_masked_recon", {}), ("unmasked_recon", {}),
    ("pgd_recon_subset", {"n_steps": 2, "delta": True}),
]


# One layer and three layers are slow (~30 s each): two layers already fold the first mlp_in and
# the last mlp_out in different layers and keep the middle stream factored.
@pytest.mark.parametrize("n_layers, ci_fn", [pytest.param(1, "mlp", marks=pytest.mark.slow),
                                              (2, "vector_mlp"),
                                              pytest.param(3, "mlp", marks=pytest.mark.slow)])
def test_the_folded_forward_gives_the_plain_forwards_losses_and_gradients(n_layers, ci_fn):
    # fold=True hands the first mlp_in Mapped(x, pre=W_E), the last mlp_out Mapped(h,
    # post=W_E.T) and keeps the residual stream between them as its narrow writes (every other
    # mlp_out factored): each term's value and gradient must equal the plain forward's (float32).
    cfg = rm.ResidMLPConfig(6, 40, 3, n_layers, batch_size=64)
    params = rm.init_resid_mlp_params(jax.random.key(2), cfg)
    x = _sparse_x(cfg, n=32)
    folded, plain = rm.resid_mlp_target(cfg), rm.resid_mlp_target(cfg, fold=False)
    _, inputs = folded.forward(params, x, {})
    assert isinstance(inputs["layers_0/mlp_in"], spdjax.Mapped)
    assert isinstance(inputs[f"layers_{n_layers - 1}/mlp_out"], spdjax.Mapped)
    assert len(inputs[f"layers_{n_layers - 1}/mlp_in"].terms) == n_layers  # x W_E + the writes
    np.testing.assert_allclose(folded(params, x), plain(params, x), rtol=1e-5, atol=1e-5)
    sites = {"layers_*/mlp_in": 5, "layers_*/mlp_out": 4}
    decomps = [spdjax.decompose(t, sites, ci_fn=ci_fn) for t in (folded, plain)]
    comps = decomps[1].init(jax.random.key(0), params)
    terms = [spdjax.term(n, 1.0, name=f"{n}_{i}", **o) for i, (n, o) in enumerate(FOLD_TERMS)]
    results = []
    for d in decomps:  # one objective of all terms: each term's value and the total's gradient
        objective = spdjax.spd_objective(d, terms)
        loss_fn = lambda c: objective(c, params, x, jax.random.key(3), 0.5)  # noqa: E731
        results.append(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(comps))
    ((_, fold), g_fold), ((_, plain), g_plain) = results
    for name, value in plain["loss"].items():
        assert np.isfinite(value) and (value > 0 or name.startswith("faithfulness")), name
        np.testing.assert_allclose(fold["loss"][name], value, rtol=2e-5, atol=1e-8, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max())), g_fold, g_plain)


def test_a_mapped_input_that_does_not_fit_its_site_is_an_error():
    cfg = rm.ResidMLPConfig(6, 40, 3, 1, batch_size=64)
    params = _random_params(cfg)
    site = rm.resid_mlp_target(cfg).sites["layers_0/mlp_in"]
    from spdjax.core.decomposition import _check_site_input
    _check_site_input(site, spdjax.Mapped(jnp.ones((2, 6)), pre=params["W_E"]))
    with pytest.raises(ValueError, match="pre maps must end in d_in"):
        _check_site_input(site, spdjax.Mapped(jnp.ones((2, 6)), pre=params["W_E"][:, :5]))
    with pytest.raises(ValueError, match=r"expects inputs \[..., 6\]"):
        _check_site_input(site, spdjax.Mapped(jnp.ones((2, 7)), pre=params["W_E"]))
    with pytest.raises(ValueError, match="NaN or inf"):
        _check_site_input(site, spdjax.Mapped(jnp.full((2, 6), jnp.nan), pre=params["W_E"]))
