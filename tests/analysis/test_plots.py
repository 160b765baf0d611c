from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from spdjax.analysis import plots
from spdjax.families.resid_mlp import plots as rm_plots
from spdjax.families.tms import plots as tms_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pentagon(n=5):
    ang = 2 * np.pi * np.arange(n) / n + 0.3
    return np.stack([np.cos(ang), np.sin(ang)], axis=1)  # (n_features, n_hidden=2)


def exact_factors(W, C, seed=0):
    """One subcomponent per feature at shuffled indices: V one-hot columns, U rows = rows of W."""
    cols = np.random.default_rng(seed).permutation(C)[: W.shape[0]]
    V, U = np.zeros((W.shape[0], C)), np.zeros((C, W.shape[1]))
    V[np.arange(W.shape[0]), cols] = 1.0
    U[cols] = W
    return V, U, cols


def assert_png(path, want):
    assert Path(path) == Path(want)
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2_000


def test_tms_vectors_2d_and_gram_fallback(tmp_path):
    W = pentagon()
    assert_png(tms_plots.plot_tms_vectors(W, tmp_path / "v.png", dpi=60), tmp_path / "v.png")
    W40 = np.random.default_rng(0).normal(size=(12, 4))
    out = tmp_path / "sub" / "g.png"  # parent folders are created
    assert_png(tms_plots.plot_tms_vectors(jnp.asarray(W40), str(out), dpi=60), out)


def test_significant_subnets_order_and_threshold():
    W = pentagon() * np.array([1.0, 2.0, 0.5, 3.0, 0.01])[:, None]
    V, U, cols = exact_factors(W, C=10)
    keep = tms_plots.significant_subnets(V, U, threshold=0.017)
    np.testing.assert_array_equal(keep, cols[[3, 1, 0, 2]])  # feature 4 (norm 0.01) dropped
    np.testing.assert_array_equal(tms_plots.significant_subnets(V, U, max_components=2),
                                  cols[[3, 1]])


@pytest.mark.parametrize("network", [True, False])
def test_tms_combined_2d(tmp_path, network):
    W = pentagon()
    V, U, _ = exact_factors(W, C=20)
    path = tmp_path / "combined.png"
    assert_png(tms_plots.plot_tms_combined(W, V, U, path, network=network, dpi=50), path)


def test_tms_combined_heatmaps_for_more_hidden_dims(tmp_path):
    rng = np.random.default_rng(1)
    W = rng.normal(size=(10, 4))
    V, U, _ = exact_factors(W, C=12)
    path = tmp_path / "combined_10-4.png"
    assert_png(tms_plots.plot_tms_combined(W, V, U, path, max_components=3, dpi=50), path)


def test_hidden_layer_components(tmp_path):
    th = 0.4
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    V, U = np.zeros((2, 6)), np.zeros((6, 2))
    V[:, [1, 4]] = R
    U[[1, 4]] = R.T
    np.testing.assert_allclose(V @ U, np.eye(2), atol=1e-12)
    path = tmp_path / "hidden.png"
    assert_png(tms_plots.plot_hidden_layer_components(np.eye(2), V, U, path, dpi=50), path)


def test_ci_heatmaps(tmp_path):
    ci = {"linear1": np.eye(5, 20), "linear2": np.eye(5, 20)[:, ::-1] * 0.8}
    path = tmp_path / "ci.png"
    assert_png(plots.plot_ci_heatmaps(ci, path, cmap="Blues", dpi=50), path)
    big = {"Layer 1 - $W_{in}$": np.eye(100, 400), "Layer 1 - $W_{out}$": np.ones((100, 30))}
    assert_png(plots.plot_ci_heatmaps(big, tmp_path / "big.png", dpi=40), tmp_path / "big.png")
    with pytest.raises(ValueError, match="at least one site"):
        plots.plot_ci_heatmaps({}, tmp_path / "none.png")


def test_max_cosine(tmp_path):
    path = tmp_path / "cos.png"
    assert_png(plots.plot_max_cosine(np.linspace(0.5, 1.0, 40), path, dpi=50), path)


def test_contribution_scatter_single_and_per_layer(tmp_path):
    rng = np.random.default_rng(0)
    t = [rng.normal(size=(10, 4)) for _ in range(3)]
    s = [x + 0.01 * rng.normal(size=x.shape) for x in t]
    assert_png(rm_plots.plot_contribution_scatter(t[0], s[0], tmp_path / "one.png", title="1",
                                                 dpi=60), tmp_path / "one.png")
    one = (tmp_path / "one.png").read_bytes()
    # Per-layer lists: coloured apart with a legend, so the picture differs from the pooled one.
    pooled = rm_plots.plot_contribution_scatter(np.concatenate(t), np.concatenate(s),
                                               tmp_path / "pooled.png", title="3", dpi=60)
    layered = rm_plots.plot_contribution_scatter(t, s, tmp_path / "layers.png", title="3", dpi=60)
    assert_png(layered, tmp_path / "layers.png")
    assert pooled.read_bytes() != layered.read_bytes() != one
    with pytest.raises(ValueError, match="3 target layers but 2 subcomponent layers"):
        rm_plots.plot_contribution_scatter(t, s[:2], tmp_path / "bad.png", title="x")
