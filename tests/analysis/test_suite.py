"""The evaluation suite (spdjax/analysis/suite.py) against NumPy on tiny decompositions, its
figures, and the suite in summary.json after tiny managed TMS and LM runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from helpers import two_site_target
from spdjax.analysis import suite, suite_plots
from spdjax.config import files as configs
from spdjax.config.runs import train_and_evaluate
from spdjax.core.masks import SiteMask
from spdjax.losses import terms_from_config
from spdjax.losses.divergences import mse
from spdjax.methods import spd

C = 3


@pytest.fixture(scope="module")
def tiny():
    target, tp = two_site_target()
    d = spdjax.decompose(target, {"a": C, "b": C})
    params = d.init(jax.random.key(0), tp)
    x = jax.random.normal(jax.random.key(1), (6, 3))
    return d, params, tp, x


def _np_forward(params, tp, x, masks):
    """relu(x @ site_a + b_a) @ site_b with site(x) = ((x V) * m) U [+ m_delta x (W - V U)]."""
    def site(name, h, m):
        V, U = (np.asarray(params["components"][name][k], np.float64) for k in ("V", "U"))
        W = np.asarray(tp[name]["kernel"], np.float64)
        comp, delta = (m.component, m.delta) if isinstance(m, SiteMask) else (m, None)
        y = ((h @ V) * np.asarray(comp)) @ U
        if delta is not None:
            y = y + np.asarray(delta)[:, None] * (h @ (W - V @ U))
        return y

    h = np.maximum(site("a", np.asarray(x, np.float64), masks["a"])
                   + np.asarray(tp["a"]["bias"]), 0.0)
    return site("b", h, masks["b"])


def test_suite_masks_match_their_definitions():
    g = {"a": jnp.array([[0.0, 0.05, 0.3], [0.7, 1.0, 0.1]]), "b": jnp.full((2, 3), 0.5)}
    masks = suite.suite_masks(g, jax.random.key(0), delta=True)
    assert list(masks) == ["unmasked", "unmasked_delta", "stochastic", "stochastic_delta",
                           "ci_masked", "rounded_0", "rounded_0.1", "rounded_0.5", "random", "zero"]
    ga = np.asarray(g["a"])
    np.testing.assert_array_equal(masks["rounded_0"]["a"], (ga > 0).astype(np.float32))
    np.testing.assert_array_equal(masks["rounded_0.1"]["a"], [[0, 0, 1], [1, 1, 0]])
    np.testing.assert_array_equal(masks["rounded_0.5"]["a"], [[0, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(masks["rounded_0.5"]["b"], np.zeros((2, 3)))  # 0.5 is not > 0.5
    np.testing.assert_array_equal(masks["ci_masked"]["a"], ga)
    np.testing.assert_array_equal(masks["zero"]["a"], np.zeros((2, 3)))
    np.testing.assert_array_equal(masks["unmasked"]["a"], np.ones((2, 3)))
    np.testing.assert_array_equal(masks["unmasked_delta"]["a"].delta, np.ones(2))
    stoch, with_delta = np.asarray(masks["stochastic"]["a"]), masks["stochastic_delta"]["a"]
    assert np.all(stoch >= ga) and np.all(stoch <= 1)
    np.testing.assert_array_equal(with_delta.component, stoch)  # the same draw, plus delta
    m_delta = np.asarray(with_delta.delta)
    assert m_delta.shape == (2,) and np.all((0 <= m_delta) & (m_delta < 1))
    rand = np.asarray(masks["random"]["a"])
    assert rand.shape == (2, 3) and np.all((0 <= rand) & (rand < 1))
    assert "stochastic_delta" not in suite.suite_masks(g, jax.random.key(0))


def test_losses_per_masking_match_numpy(tiny):
    d, params, tp, x = tiny
    g = {"a": jax.random.uniform(jax.random.key(2), (6, C)),
         "b": jax.random.uniform(jax.random.key(3), (6, C))}
    masks = suite.suite_masks(g, jax.random.key(4), delta=True)
    target_out = d.target(tp, x)
    got = jax.jit(lambda p, m: suite.masked_losses(d, p, tp, x, m, target_out, {"mse": mse}))(
        params, masks)["mse"]
    want_target = np.asarray(target_out, np.float64)
    for masking, m in masks.items():
        want = np.mean((_np_forward(params, tp, x, m) - want_target) ** 2)
        np.testing.assert_allclose(got[masking], want, rtol=2e-4, atol=1e-6, err_msg=masking)
    assert got["unmasked_delta"] < 1e-9  # V U + (W - V U) = W: the target itself


def test_fraction_recovered_formula():
    assert suite.fraction_recovered(3.0, loss_zero=5.0, loss_target=1.0) == 0.5
    assert suite.fraction_recovered(0.0, 4.0) == 1.0
    table = suite.recovered_table({"ci_masked": 2.95, "zero": 11.0, "unmasked": 2.72}, 2.71)
    assert set(table) == {"ci_masked", "unmasked"}
    np.testing.assert_allclose(table["ci_masked"], (11.0 - 2.95) / (11.0 - 2.71))


def test_ci_statistics_match_numpy():
    a = np.zeros((2, 2, 4))  # (batch, positions, C)
    a[..., 0] = 0.9  # always on
    a[0, 0, 1] = 0.2  # on once
    a[0, 0, 2] = 4e-6  # mean 1e-6 exactly: not alive (needs > 1e-6)
    a[:, :, 3] = 8e-6  # mean 8e-6: alive, never above 0.1
    b = np.full((2, 2, 2), 0.05)
    out = suite.ci_statistics({"layers_0/in": a, "layers_0/out": b, "head": b},
                              l0_threshold=0.1, bins=10)
    assert out["l0"] == {"layers_0/in": 1.25, "layers_0/out": 0.0, "head": 0.0}
    assert out["l0_per_layer"] == {"layers_0": 1.25, "head": 0.0}
    assert out["l0_total"] == 1.25
    assert out["alive_mean_ci"] == {"layers_0/in": 3, "layers_0/out": 2, "head": 2}
    assert out["alive_mean_ci_total"] == 7
    assert out["alive_threshold"]["layers_0/in"] == 2
    np.testing.assert_allclose(out["mean_ci"]["layers_0/in"], a.reshape(-1, 4).mean(0))
    hist = np.asarray(out["ci_histogram"]["layers_0/in"])
    assert hist.shape == (10,) and np.isclose(hist.sum(), 1.0)
    np.testing.assert_allclose(hist[9], 4 / 16)  # the four 0.9s
    assert out["n_subcomponents"] == {"layers_0/in": 4, "layers_0/out": 2, "head": 2}


def test_pgd_ladder_shares_one_source_per_site_and_climbs(tiny, monkeypatch):
    d, params, tp, x = tiny
    shapes = []
    real = suite.pgd_sources

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        shapes.append({n: s.shape for n, s in out.items()})
        return out

    monkeypatch.setattr(suite, "pgd_sources", spy)
    ladder = suite.pgd_ladder(d, params, tp, x, jax.random.key(5), steps=(1, 4, 16),
                              step_size=0.1, delta=True)
    assert list(ladder) == ["1", "4", "16"]
    assert shapes[0] == {"a": (1, C + 1), "b": (1, C + 1)}  # one source (+ delta) per site
    values = list(ladder.values())
    assert all(np.isfinite(values)) and values[-1] >= values[0]
    ctx = spdjax.make_context(d, tp, params, x)
    mean_masked = suite.masked_losses(d, params, tp, x, suite.suite_masks(
        {n: c.lower for n, c in ctx.ci.items()}, jax.random.key(0)), ctx.target_out,
        {"mse": mse})["mse"]
    assert values[-1] >= mean_masked["ci_masked"] - 1e-7  # an adversary beats m = g
    # One trajectory read off at each rung: each rung equals a fresh ascent of that many steps.
    monkeypatch.setattr(suite, "pgd_sources", real)
    alone = suite.pgd_ladder(d, params, tp, x, jax.random.key(5), steps=(16,), step_size=0.1,
                             delta=True)
    np.testing.assert_allclose(alone["16"], ladder["16"], rtol=1e-6)
    with pytest.raises(ValueError, match="increasing positive integers"):
        suite.SuiteOptions(pgd_ladder=(40, 20))


def test_evaluate_suite_and_its_figures(tiny, tmp_path):
    d, params, tp, x = tiny
    options = suite.SuiteOptions(pgd_ladder=(2, 4), delta=True)
    out = suite.evaluate_suite(d, params, tp, x, jax.random.key(6), options=options, report=None)
    assert set(out["loss"]) >= {"unmasked", "stochastic_delta", "rounded_0.1", "zero"}
    assert "zero" not in out["recovered"] and out["pgd_delta"] is True
    chunked = suite.evaluate_suite(d, params, tp, x, jax.random.key(6), options=options,
                                   microbatches=2, report=None)
    np.testing.assert_allclose(chunked["loss"]["ci_masked"], out["loss"]["ci_masked"], rtol=0.5)
    assert chunked["alive_mean_ci"] == out["alive_mean_ci"]
    json.dumps(out)  # summary.json-ready
    paths = suite_plots.plot_suite(out, tmp_path)
    assert {p.name for p in paths} == {"suite_ci_histograms.png", "suite_mean_ci.png",
                                       "suite_masking_losses.png", "suite_pgd_ladder.png"}
    assert all(p.stat().st_size > 1000 for p in paths)
    scalars = suite.flat_scalars(out)
    assert scalars["eval/pgd/4"] == out["pgd"]["4"] and "eval/loss/zero" in scalars


def test_evaluation_ci_sees_the_training_ci_noise(tiny):
    d, params, tp, x = tiny
    terms = terms_from_config({"stochastic_recon": {"coeff": 1.0}})
    key = jax.random.key(7)
    noisy = spd.method(d, terms, 1e-3, ci_lower_noise=0.5).evaluate(params, tp, x, key)
    plain = spd.method(d, terms, 1e-3).evaluate(params, tp, x, key)
    ctx = spdjax.make_context(d, tp, params, x, ci_lower_noise=0.5,
                              key=jax.random.fold_in(key, spd.CI_NOISE_KEY))
    want = {n: float(np.mean(np.sum(np.asarray(c.lower) > 0.01, -1))) for n, c in ctx.ci.items()}
    assert noisy[spd.PAPER_L0_KEY] == pytest.approx(want)
    assert noisy[spd.PAPER_L0_KEY] != plain[spd.PAPER_L0_KEY]


def test_lm_evaluation_masks_include_the_delta_component():
    from spdjax.families.lm import evaluation, model as lm_model

    cfg = lm_model.VARIANTS["ih"]
    target = lm_model.target(cfg)
    d = spdjax.decompose(target, {"blocks_0/attn/*": 4})

    @jax.jit  # one compile each for the init and the evaluation, not one per eager op
    def init():
        tp = lm_model.init_params(jax.random.key(0), cfg)
        return tp, d.init(jax.random.key(1), tp)

    @jax.jit
    def masked_logits(params, tp, ids):
        ctx, logits = evaluation.masked_logits(d, params, tp, ids, jax.random.key(2))
        return ctx.target_out, logits

    tp, params = init()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 10, (2, 8)), jnp.int32)
    target_out, logits = masked_logits(params, tp, ids)
    np.testing.assert_allclose(logits["unmasked_delta"], target_out, atol=1e-4)
    assert not np.allclose(logits["stochastic_delta"], logits["stochastic"])


def _tiny_run(tmp_path, name, overrides):
    config = configs.load(name, {"eval_suite": True, "eval_pgd_ladder": (2, 4), **overrides})
    summary = train_and_evaluate(config, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    figures = {p.name for p in (tmp_path / "run" / "figures").iterdir()}
    assert {"suite_ci_histograms.png", "suite_mean_ci.png", "suite_pgd_ladder.png",
            "suite_masking_losses.png"} <= figures
    assert saved["suite"] == json.loads(json.dumps(summary["suite"]))
    return saved


@pytest.mark.slow  # ~30 s; tests/test_vpd_recipe.py's TMS run checks the suite in a summary
def test_summary_of_a_tiny_tms_run_holds_the_suite(tmp_path):
    s = _tiny_run(tmp_path, "tms:5-2", {"steps": 20, "log_every": 10, "checkpoint_every": 20,
                                        "batch_size": 64, "eval_batch_size": 64})
    assert s["suite"]["divergence"] == "mse" and list(s["suite"]["pgd"]) == ["2", "4"]
    assert set(s["suite"]["l0"]) == set(s["alive"]) == set(s["suite"]["alive_mean_ci"])
    assert s["suite"]["alive_threshold"] == s["alive"]


@pytest.mark.slow  # ~1.5 min; the LM evaluation's maskings are checked apart below
def test_summary_of_a_tiny_lm_run_holds_the_suite(tmp_path, monkeypatch):
    monkeypatch.setenv("SPDJAX_CACHE", str(tmp_path / "cache"))
    s = _tiny_run(tmp_path, "lm:ih", {"steps": 10, "target_steps": 30, "log_every": 10,
                                      "checkpoint_every": 10, "C": 8, "batch_size": 8,
                                      "eval_batch_size": 8})
    assert s["suite"]["divergence"] == "kl"
    assert s["kl_unmasked_delta"] < 1e-6 and np.isfinite(s["kl_stochastic_delta"])
    assert set(s["ce_recovered"]) >= {"unmasked", "stochastic", "rounded_0.5", "random"}
    np.testing.assert_allclose(
        s["ce_recovered"]["ci_masked"],
        (s["ce_zero"] - s["ce_ci_masked"]) / (s["ce_zero"] - s["ce_target"]))


def test_apd_suite_reports_what_applies(tiny, tmp_path):
    from spdjax.methods.apd_decomposition import decompose_apd

    _, _, tp, x = tiny
    target, _ = two_site_target()
    d = decompose_apd(target, {"a": 1, "b": 1}, C=4)
    params = d.init(jax.random.key(0), tp)
    out = suite.evaluate_apd_suite(d, params, tp, x, jax.random.key(1), topk=0.5)
    assert set(out["loss"]) == {"unmasked", "random", "zero", "topk"}
    assert out["l0"] == pytest.approx(int(0.5 * x.shape[0]) / x.shape[0])  # k = topk * batch
    assert 1 <= out["alive"] <= 4
    # zero ablation: relu(b_a) @ 0 = 0 (site b has no bias), so the loss is the target's mean square
    np.testing.assert_allclose(out["loss"]["zero"], np.mean(np.asarray(d.target(tp, x)) ** 2),
                               rtol=1e-4)
    assert "l0" not in suite.evaluate_apd_suite(d, params, tp, x, jax.random.key(1), topk=None)
    config = configs.load("tms:5-2", {"method": "apd", "eval_suite": True})
    via_config = suite.evaluate_for_config(config, d, params, tp, x, jax.random.key(1))
    assert via_config["l0"] == pytest.approx(int(config.apd.topk * 6) / 6)
    assert {p.name for p in suite_plots.plot_suite(out, tmp_path)} == {
        "suite_masking_losses.png"}


def test_a_bad_pgd_ladder_fails_before_training(tmp_path):
    config = configs.load("tms:5-2", {"eval_suite": True, "eval_pgd_ladder": (0, 20)})
    with pytest.raises(ValueError, match="eval_pgd_ladder must be increasing positive"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_pgd_ladder_figure_draws_the_rungs_in_order_as_read_back_from_json(monkeypatch):
    from spdjax.analysis import suite_plots

    figures = []
    monkeypatch.setattr(suite_plots, "save_figure", lambda fig, path, dpi: figures.append(fig))
    summary = json.loads(json.dumps({"pgd": {20: 1.0, 40: 2.0, 160: 4.0, 320: 5.0},
                                     "loss": {"zero": 3.0}, "divergence": "kl"},
                                    sort_keys=True))  # keys "160" < "20" < "320" < "40"
    suite_plots.plot_pgd_ladder(summary, "unused.png")
    ax = figures[0].axes[0]
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [20, 40, 160, 320])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [1.0, 2.0, 4.0, 5.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["20", "40", "160", "320"]
