"""Dataset attributions against finite differences of a NumPy forward on a tiny target, and
the query API."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from helpers import two_site_target
from spdjax.analysis import dataset_attributions as da, grad_act


def _tiny_run(seed=0):
    target, tp = two_site_target(d_in=3, d_hidden=4, d_out=2, seed=seed)
    d = spdjax.decompose(target, {"a": 3, "b": 2})
    params = d.init(jax.random.key(seed), tp)

    def sample(key, batch_size):
        k1, k2 = jax.random.split(key)
        x = jax.random.normal(k1, (batch_size, 3))
        return x * (jax.random.uniform(k2, (batch_size, 3)) < 0.6)

    return types.SimpleNamespace(decomposition=d, params=params, target_params=tp, step=0,
                                 experiment=types.SimpleNamespace(sample=sample))


def _numpy_targets(run, x, m_a, m_b, s, h_stop):
    """[sum a_a (3), sum a_b (2), sum out (2)] in float64. Each site's output is computed from
    its input with the gradient stopped: site a's from ``x`` unscaled, site b's from
    ``h_stop``."""
    f = {k: np.asarray(v, np.float64) for k, v in
         {"Va": run.params["components"]["a"]["V"], "Ua": run.params["components"]["a"]["U"],
          "Vb": run.params["components"]["b"]["V"], "Ub": run.params["components"]["b"]["U"],
          "ba": run.target_params["a"]["bias"]}.items()}
    xs = x * s
    a_a = (xs @ f["Va"]) * np.linalg.norm(f["Ua"], axis=1)
    h = np.maximum(((x @ f["Va"]) * m_a) @ f["Ua"] + f["ba"], 0.0)
    a_b = (h @ f["Vb"]) * np.linalg.norm(f["Ub"], axis=1)
    out = ((h_stop @ f["Vb"]) * m_b) @ f["Ub"]
    return np.concatenate([a_a.sum(0), a_b.sum(0), out.sum(0)]), h


def test_attributions_equal_finite_differences_of_a_numpy_forward():
    run = _tiny_run()
    spec = da.spec_for(run, batch_size=5, chunk=3)  # chunks of 3 of the 7 targets
    x = run.experiment.sample(jax.random.key(1), 5)
    attr, ci = jax.jit(lambda x: da.batch_attributions(
        spec, run.decomposition, run.params, run.target_params, x))(x)
    attr, ci, x = (np.asarray(v, np.float64) for v in (attr, ci, x))
    ones = [np.ones((5, 3)), np.ones((5, 2)), np.ones((5, 3))]
    _, h0 = _numpy_targets(run, x, *ones, np.zeros((5, 4)))
    F = lambda m_a, m_b, s: _numpy_targets(run, x, m_a, m_b, s, h0)[0]
    eps, expected = 1e-5, np.zeros((7, 3 + 3 + 2))
    for i in range(3):  # input features: scale feature i on every example
        d = np.zeros((5, 3))
        d[:, i] = 1.0
        plus, minus = F(ones[0], ones[1], 1 + eps * d), F(ones[0], ones[1], 1 - eps * d)
        expected[:, i] = (plus - minus) / (2 * eps)
    for site, C, off in (("a", 3, 3), ("b", 2, 6)):  # masks along the CI-weighted direction
        g = ci[:, :3] if site == "a" else ci[:, 3:]
        for c in range(C):
            d = np.zeros((5, C))
            d[:, c] = g[:, c]
            if site == "a":
                plus, minus = F(1 + eps * d, ones[1], 1.0), F(1 - eps * d, ones[1], 1.0)
            else:
                plus, minus = F(ones[0], 1 + eps * d, 1.0), F(ones[0], 1 - eps * d, 1.0)
            expected[:, off + c] = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(attr, expected, rtol=1e-4, atol=1e-5)
    # direct effects only: the input reaches site b and site a the output only through
    # another decomposed site, so those entries are 0
    assert np.all(attr[5:, 3:6] == 0) and np.any(attr[3:5, 3:6] != 0)
    assert np.all(attr[3:, :3] == 0) and np.any(attr[:3, :3] != 0)


def test_streamed_attributions_and_queries(tmp_path):
    run = _tiny_run()
    res = da.dataset_attributions(run, n_batches=3, batch_size=4, out_dir=tmp_path)
    batch_attr = jax.jit(lambda x: da.batch_attributions(
        res.spec, run.decomposition, run.params, run.target_params, x)[0])
    one = [batch_attr(run.experiment.sample(jax.random.fold_in(
        spdjax.analysis.streaming.batch_key(0, i), 0), 4)) for i in range(3)]
    np.testing.assert_allclose(res.mean, np.sum(one, 0) / 12, rtol=1e-5, atol=1e-7)
    back = da.load_attributions(tmp_path)
    np.testing.assert_array_equal(back.state["attr"], res.state["attr"])
    top = back.top_sources("b:1", k=2)
    row = res.mean[res.spec.target_names.index("b:1")]
    assert top[0][1] == pytest.approx(row[np.argmax(np.abs(row))])
    col = res.mean[:, res.spec.source_names.index("input:0")]
    for sign, keep in (("positive", col > 0), ("negative", col < 0)):
        got = back.top_targets("input:0", k=10, sign=sign)
        assert sorted(v for _, v in got) == sorted(col[keep].tolist())
    with pytest.raises(ValueError, match="No target 'c:0'"):
        back.top_sources("c:0")


def test_direct_forward_computes_in_the_compute_dtype_and_returns_float32():
    run = _tiny_run()
    low = spdjax.decompose(run.decomposition.target, {"a": 3, "b": 2}, compute_dtype="bfloat16")
    x = run.experiment.sample(jax.random.key(1), 5)
    masks, scale = grad_act.unit_masks(low, (5,)), jnp.ones(x.shape)
    f = lambda d: grad_act.direct_forward(d, run.params, run.target_params, x,  # noqa: E731
                                          masks, scale)
    out, acts = f(low)
    ref_out, ref_acts = f(run.decomposition)
    assert out.dtype == jnp.float32 and all(a.dtype == jnp.float32 for a in acts.values())
    assert "bf16" in str(jax.make_jaxpr(lambda: f(low))())
    assert not np.array_equal(out, ref_out)  # computed in bfloat16, not float32
    np.testing.assert_allclose(out, ref_out, rtol=5e-2, atol=5e-2)
    for name, a in acts.items():
        np.testing.assert_allclose(a, ref_acts[name], rtol=5e-2, atol=5e-2)
