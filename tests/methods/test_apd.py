"""APD's pieces against NumPy on small shapes: the attribution identity, batch top-k, the
factorised Schatten norm, faithfulness, ties; its config errors; a short run end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.methods import apd

from helpers import two_site_target

B, C = 6, 4


@pytest.fixture(scope="module")
def setup():
    target, tp = two_site_target(d_in=3, d_hidden=5, d_out=2)
    d = apd.decompose_apd(target, {"a": 1, "b": 1}, C, rank=2)
    params = d.init(jax.random.key(0), tp)
    x = jax.random.normal(jax.random.key(1), (B, 3))
    return d, tp, params, x


@pytest.fixture(scope="module")
def jacobians(setup):
    """{site: (B, d_L, d_in, d_out)}: each example's output Jacobian in the target's weights."""
    d, tp, _, x = setup

    def f(weights, xb):
        p = {"a": {"kernel": weights["a"], "bias": tp["a"]["bias"]}, "b": {"kernel": weights["b"]}}
        return d.target.forward(p, xb[None], {})[0][0]

    weights = {n: tp[n]["kernel"] for n in ("a", "b")}
    return jax.jit(jax.vmap(jax.jacrev(f), in_axes=(None, 0)))(weights, x)


def test_attributions_are_the_papers_parameter_gradient_form(setup, jacobians):
    """sum_o (sum_{l,i,j} df_o/dW_{l,ij} P_{c,l,ij})^2 per example, by the Jacobian in W."""
    d, tp, params, x = setup
    P = {n: np.asarray(d.component_weights(params, n)) for n in ("a", "b")}
    expected = np.zeros((B, C))
    for b in range(B):
        per_output = sum(np.einsum("oij,cij->oc", np.asarray(jacobians[n][b]), P[n])
                         for n in ("a", "b"))
        expected[b] = np.sum(per_output**2, axis=0)
    got = apd.attributions(d, tp, params, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_batch_topk_keeps_the_largest_entries_of_the_whole_batch():
    attr = jnp.asarray(np.random.default_rng(0).permutation(24).reshape(B, C), jnp.float32)
    mask = np.asarray(apd.batch_topk(attr, 1.5))  # int(1.5 * 6) = 9 of 24
    assert mask.sum() == 9 and (np.asarray(attr)[mask] >= 15).all()
    with pytest.raises(ValueError, match="keeps 0 of 24"):
        apd.batch_topk(attr, 0.1)


def test_schatten_and_faithfulness_against_numpy(setup):
    d, tp, params, x = setup
    active = jnp.asarray(np.random.default_rng(1).random((B, C)) < 0.5)
    expected, n_params = 0.0, 3 * 5 + 5 * 2
    for n in ("a", "b"):
        A, Bf = (np.asarray(t, np.float64) for t in d.factors(params, n))
        for c in range(C):
            for m in range(A.shape[2]):
                lam_p = ((A[c, :, m] ** 2).sum() * (Bf[c, m] ** 2).sum() + 1e-16) ** 0.45
                expected += np.asarray(active)[:, c].sum() * lam_p
    np.testing.assert_allclose(apd.schatten(d, params, active, 0.9), expected / (n_params * B),
                               rtol=1e-5)
    faith = sum(((np.asarray(tp[n]["kernel"]) - np.asarray(d.component_weight(params, n))) ** 2
                 ).sum() for n in ("a", "b")) / n_params
    np.testing.assert_allclose(apd.faithfulness(d, params, tp), faith, rtol=1e-5)


def test_a_tied_site_is_its_owners_transpose():
    from spdjax.families.tms import model as tms

    cfg = tms.TMS_VARIANTS["5-2"]
    tp = tms.init_tms_params(jax.random.key(0), cfg)
    d = apd.decompose_apd(tms.tms_target(cfg), {"linear1": 1, "linear2": 1}, 5, rank=3,
                          ties=tms.TMS_TIES)
    params = d.init(jax.random.key(1), tp)
    assert list(params["components"]) == ["linear1"]
    np.testing.assert_allclose(d.component_weights(params, "linear2"),
                               jnp.swapaxes(d.component_weights(params, "linear1"), 1, 2),
                               rtol=1e-6)


@pytest.mark.parametrize("override, match", [
    ({"apd.topk": 0.0001}, r"apd.topk=0.0001 keeps int\(topk x batch_size 2048\) = 0"),
    ({"apd.attribution": "ablation"}, "apd.attribution must be one of"),
    ({"apd.schatten_p": 1.5}, r"apd.schatten_p must be in \(0, 1\]"),
    ({"microbatches": 2}, "microbatches must be 1"),
    ({"apd.formulation": "l1"}, "apd.formulation must be one of"),
    ({"apd.formulation": "lp", "apd.lp_p": 0.0}, r"apd.lp_p must be in \(0, 1\]"),
    ({"apd.formulation": "lp", "apd.act_recon_coeff": 1.0}, "no sparse forward"),
])
def test_bad_apd_settings_fail_before_any_work(override, match):
    from spdjax.config.runs import validate

    with pytest.raises(ValueError, match=match):
        validate(spdjax.config.load("tms:5-2+apd", override))


def test_an_apd_run_trains_evaluates_and_resumes(tmp_path):
    from spdjax.training import loop

    config = spdjax.config.load("tms:5-2+apd", {"steps": 40, "log_every": 20,
                                                "checkpoint_every": 20, "batch_size": 256,
                                                "eval_batch_size": 512, "figures": False})
    run = spdjax.setup(config, tmp_path / "run")
    loop.train(run, 20)
    loop.close(run)
    run = spdjax.setup(config, tmp_path / "run")
    assert run.step == 20 and run.method.name == "apd"
    loop.train(run)
    summary = loop.evaluate(run)
    paths = loop.plot(run)
    loop.close(run)
    assert summary["active_per_example"] == pytest.approx(0.211, abs=0.01)
    assert 0.5 < summary["mmcs"] <= 1.0 and summary["alive"] <= 5
    assert {p.name for p in paths} >= {"combined_diagram.png", "target.png"}


def test_unit_norm_keeps_A_columns_unit():
    from spdjax.methods.apd import unit_norm_A

    project, renormalise = unit_norm_A()
    A = jax.random.normal(jax.random.key(0), (3, 4, 2))
    A = A / jnp.linalg.norm(A, axis=1, keepdims=True)
    params = {"components": {"s": {"A": A, "B": jnp.ones((3, 2, 5))}}}
    g = jax.tree.map(jnp.ones_like, params)
    g, _ = project.update(g, None, params)
    assert float(jnp.max(jnp.abs(jnp.sum(g["components"]["s"]["A"] * A, axis=1)))) < 1e-6
    u = jax.tree.map(lambda x: 0.3 * x, g)
    u, _ = renormalise.update(u, None, params)
    new = params["components"]["s"]["A"] + u["components"]["s"]["A"]
    np.testing.assert_allclose(jnp.linalg.norm(new, axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow  # ~11 s: the full-width ResidMLP compiles APD's 100 attribution passes
def test_a_resid_mlp_apd_run_keeps_A_unit_and_reports_contributions():
    from spdjax.training import loop

    config = spdjax.config.load("resid_mlp:1+apd", {"steps": 4, "log_every": 2, "C": 20,
                                                    "batch_size": 64, "target_steps": 5,
                                                    "eval_batch_size": 128, "figures": False})
    run = spdjax.setup(config)
    loop.train(run)
    summary = loop.evaluate(run)
    assert {"act_recon", "schatten", "topk_recon"} <= set(summary["loss"])
    assert summary["active_per_example"] == pytest.approx(1.28, abs=0.01)
    assert -1 <= summary["contribution_r"]["all"] <= 1 and "ci_errors" not in summary
    A = run.params["components"]["layers_0/mlp_in"]["A"]
    np.testing.assert_allclose(jnp.linalg.norm(A, axis=1), 1.0, rtol=1e-4)


def test_apd_refuses_settings_it_would_ignore_and_bad_ties():
    from spdjax.config.runs import validate

    with pytest.raises(ValueError, match="APD does not use faithfulness_warmup_steps=200"):
        validate(spdjax.config.load("tms:5-2+apd+gaussian"))
    with pytest.raises(ValueError, match="APD does not use optimizer.components="):
        validate(spdjax.config.load("tms:5-2+apd",
                                    {"optimizer.components.name": "muon"}))
    with pytest.raises(ValueError, match="APD does not use compute_dtype='bfloat16'"):
        validate(spdjax.config.load("tms:5-2+apd", {"compute_dtype": "bfloat16"}))
    target, tp = two_site_target(d_in=3, d_hidden=5, d_out=2)
    with pytest.raises(ValueError, match="Cannot tie 'b'"):
        apd.decompose_apd(target, {"a": 1, "b": 1}, 4, ties={"b": "a"})


def test_apd_attributions_from_the_apd_model_use_its_own_activations(setup):
    d, tp, params, x = setup
    # One component that is exactly the target (A = I, B = W): both sources see the same model.
    exact = {"components": {}}
    for n in ("a", "b"):
        W = tp[n]["kernel"]
        exact["components"][n] = {"A": jnp.zeros((C, W.shape[0], W.shape[0])).at[0].set(
                                      jnp.eye(W.shape[0])),
                                  "B": jnp.zeros((C, W.shape[0], W.shape[1])).at[0].set(W)}
    exact_d = apd.APDDecomposition(target=d.target, site_names=d.site_names, C=C,
                                   rank={"a": 3, "b": 5}, ties={})
    np.testing.assert_allclose(apd.attributions(exact_d, tp, exact, x, source="apd"),
                               apd.attributions(exact_d, tp, exact, x, source="target"),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(apd.attributions(d, tp, params, x, source="apd"),
                           apd.attributions(d, tp, params, x, source="target"))


def test_lp_formulation_against_numpy_and_its_gradient(setup, jacobians):
    """The L_p objective: faithfulness + lp_sparsity * mean_b sum_c (a/d_L)^(p/2) + Schatten
    weighted by the same; its gradient flows through the components' attribution (the target's
    output gradients are constants), checked against the Jacobian-in-W form."""
    d, tp, params, x = setup
    p1, p2, d_L = 0.8, 0.9, 2
    coeffs = {"faithfulness": 1.0, "lp_sparsity": 0.5, "schatten": 2.0}
    obj = apd.objective(d, topk=1.0, coeffs=coeffs, pnorm=p2, formulation="lp", lp_p=p1)
    # compiled: eager dispatch of the objective, the reference and their gradients is slow
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda p: obj(p, tp, x, jax.random.key(0), 0.0), has_aux=True))
    (total, metrics), g = value_and_grad(params)
    J = jacobians  # constants

    n_params = 3 * 5 + 5 * 2

    def reference(params):
        attr = jnp.stack([sum(jnp.einsum("oij,cij->oc", J[n][b], d.component_weights(params, n))
                              for n in ("a", "b")) for b in range(B)])  # (B, d_L, C)
        w = (jnp.sum(attr**2, axis=1) / d_L + 1e-16) ** (p1 / 2)
        simp = 0.0  # the reference's placement: the weight inside the power, per rank-one pair
        for n in ("a", "b"):
            A, Bf = params["components"][n]["A"], params["components"][n]["B"]
            for c in range(C):
                for m in range(A.shape[2]):
                    lam_sq = jnp.sum(A[c, :, m] ** 2) * jnp.sum(Bf[c, m] ** 2)
                    simp = simp + jnp.sum((w[:, c] * lam_sq + 1e-16) ** (p2 / 2))
        faith = sum(jnp.sum((tp[n]["kernel"] - jnp.einsum("cim,cmo->io", *(
            params["components"][n][k] for k in "AB"))) ** 2) for n in ("a", "b")) / n_params
        return (coeffs["faithfulness"] * faith + coeffs["lp_sparsity"] * jnp.mean(jnp.sum(w, -1))
                + coeffs["schatten"] * simp / (n_params * B)), w

    (expected, w), g_ref = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"]["lp_sparsity"],
                               np.mean(np.sum(np.asarray(w), axis=-1)), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # the top-k attributions carry no gradient; the L_p ones do
    def attr_sum(p, differentiable):
        return jnp.sum(apd.attributions(d, tp, p, x, differentiable=differentiable))

    for differentiable, nonzero in ((False, False), (True, True)):
        g = jax.jit(jax.grad(attr_sum), static_argnums=1)(params, differentiable)
        assert (max(float(jnp.max(jnp.abs(t))) for t in jax.tree.leaves(g)) > 1e-3) == nonzero


def test_an_lp_apd_run_trains():
    from spdjax.training import loop

    config = spdjax.config.load("tms:5-2+apd", {
        "steps": 20, "log_every": 10, "batch_size": 256, "eval_batch_size": 512,
        "figures": False, "apd.formulation": "lp", "apd.lp_sparsity_coeff": 0.1})
    run = spdjax.setup(config)
    loop.train(run)
    summary = loop.evaluate(run)
    assert set(summary["loss"]) == {"total", "faithfulness", "lp_sparsity", "schatten"}
    assert np.isfinite(summary["loss"]["total"]) and summary["loss"]["lp_sparsity"] > 0


def test_scrub_masks_keep_or_ablate_the_active_features_components():
    from spdjax.families.resid_mlp import scrubbing

    owner = np.array([0, 1, 2, 2, 3])  # feature -> component; C = 8
    active = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]], bool)
    scrubbed, anti = scrubbing.scrub_masks(active, owner, 8, 4, np.random.default_rng(0))
    assert (scrubbed.sum(1) == 4).all() and (anti.sum(1) == 4).all()
    for b, row in enumerate(active):
        own = np.unique(owner[row])
        assert (scrubbed[b, own] == 1).all() and (anti[b, own] == 0).all()
    with pytest.raises(ValueError, match="n_ablate must be in"):
        scrubbing.scrub_masks(active, owner, 8, 8, np.random.default_rng(0))


def test_scrub_losses_on_a_small_resid_mlp():
    """Components built to be exact per-feature pieces: scrubbing leaves the output at the top-k
    one, anti-scrubbing (the active feature's piece ablated) breaks it."""
    from spdjax.families.resid_mlp import model, scrubbing

    cfg = model.ResidMLPConfig(n_features=6, d_embed=12, d_mlp=6, n_layers=1,
                               feature_probability=0.3)
    tp = model.init_resid_mlp_params(jax.random.key(0), cfg)
    tp = model.naive_baseline_params(tp["W_E"], cfg)  # neuron j serves feature j
    d = apd.decompose_apd(model.resid_mlp_target(cfg), {"layers_0/*": 1}, 6, rank=1)
    W_in = np.asarray(tp["layers_0"]["mlp_in"]["kernel"])
    W_out = np.asarray(tp["layers_0"]["mlp_out"]["kernel"])
    comps = {"layers_0/mlp_in": {"A": W_in.T[:, :, None], "B": np.eye(6)[:, None, :]},
             "layers_0/mlp_out": {"A": np.eye(6)[:, :, None], "B": W_out[:, None, :]}}
    params = {"components": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), comps)}
    np.testing.assert_array_equal(scrubbing.feature_components(d, params, tp, cfg), np.arange(6))
    losses = scrubbing.scrub_losses(d, params, tp, cfg, jax.random.key(1), topk=2.0,
                                    n_examples=64, n_ablate=3)
    assert max(losses["topk"].mean(), losses["scrubbed"].mean()) < 1e-10
    assert losses["anti_scrubbed"].mean() > 1e-4


def test_torch_fans_init_is_the_references_whole_tensor_rule():
    """fans="torch": torch's kaiming_uniform on [1, C, d_in, m] has fan-in C d_in m; the
    ResidMLP +apd config uses it, and records written before the option keep their fans."""
    target, tp = two_site_target(d_in=30, d_hidden=20, d_out=10)
    d = apd.decompose_apd(target, {"a": 1, "b": 1}, 40, rank=5)
    for fans, bound_A in (("component", np.sqrt(6 / 30)), ("torch", np.sqrt(6 / (40 * 30 * 5)))):
        A = np.asarray(d.init(jax.random.key(0), tp, init="kaiming_uniform", init_scale=2.0,
                              fans=fans)["components"]["a"]["A"])
        assert 0.9 * 2 * bound_A < np.abs(A).max() <= 2 * bound_A
    with pytest.raises(ValueError, match="Unknown APD init fans"):
        d.init(jax.random.key(0), tp, fans="per_site")
    assert spdjax.config.load("resid_mlp:1+apd").apd.init_fans == "torch"
    recorded = spdjax.config.load("resid_mlp:1+apd").to_dict()
    del recorded["apd"]["init_fans"]
    assert spdjax.config.from_dict(recorded).apd.init_fans == "component"


# topk is slow (~25 s): the folded forward is the same for both formulations.
@pytest.mark.parametrize("formulation", [pytest.param("topk", marks=pytest.mark.slow), "lp"])
def test_apd_on_the_folded_resid_mlp_equals_the_plain_forward(formulation):
    # The folded ResidMLP (Mapped first mlp_in / last mlp_out, residual stream kept factored):
    # APD's attributions, every loss value and the gradient are the plain forward's.
    from spdjax.families.resid_mlp import model

    # 2 layers: layer 0's mlp_out writes into the factored residual stream
    cfg = model.ResidMLPConfig(n_features=6, d_embed=40, d_mlp=4, n_layers=2)
    tp = model.init_resid_mlp_params(jax.random.key(0), cfg)
    x = model.sample_inputs(cfg, jax.random.key(1), 32)
    ds = [apd.decompose_apd(model.resid_mlp_target(cfg, fold=f), {"layers_0/*": 1}, 5, rank=2)
          for f in (True, False)]
    params = ds[1].init(jax.random.key(2), tp)
    # layer 0's mlp_out writes factored: attributed forward (a JVP per component), the plain
    # model's by the backward passes
    assert jax.eval_shape(lambda: ds[0].clean_forward(tp, x)[1])["layers_0/mlp_out"].factored
    # compiled: eager dispatch of the attributions and the objectives' gradients is slow
    folded_attr, plain_attr = (jax.jit(lambda p, d=d: apd.attributions(d, tp, p, x))(params)
                               for d in ds)
    np.testing.assert_allclose(folded_attr, plain_attr, rtol=1e-4, atol=1e-9)
    coeffs = {"faithfulness": 1.0, "topk_recon": 1.0, "schatten": 0.5, "act_recon": 1.0,
              "lp_sparsity": 0.1}
    out = []
    for d in ds:
        fn = apd.objective(d, topk=1.5, coeffs=coeffs, pnorm=0.9, formulation=formulation,
                           act_sites=("layers_0/mlp_out",) if formulation == "topk" else ())
        out.append(jax.jit(jax.value_and_grad(lambda p, fn=fn: fn(p, tp, x, None, 0.0),
                                              has_aux=True))(params))
    ((_, folded), g_folded), ((_, plain), g_plain) = out
    for name, value in plain["loss"].items():
        assert value > 0, name
        np.testing.assert_allclose(folded["loss"][name], value, rtol=2e-5, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max())), g_folded, g_plain)
