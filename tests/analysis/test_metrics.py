import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import two_site_target

import spdjax
from spdjax.analysis import ci_patterns as cp
from spdjax.analysis import metrics as ev
from spdjax.core.decomposition import ci_l0


def pentagon(n=5, scale=1.0):
    ang = 2 * np.pi * np.arange(n) / n + 0.3
    return scale * np.stack([np.cos(ang), np.sin(ang)], axis=1)  # (n_features, n_hidden=2)


def exact_factors(W, C, seed=0):
    """One subcomponent per feature at shuffled indices: V one-hot columns, U rows = rows of W."""
    n = W.shape[0]
    cols = np.random.default_rng(seed).permutation(C)[:n]
    V, U = np.zeros((n, C)), np.zeros((C, W.shape[1]))
    V[np.arange(n), cols] = 1.0
    U[cols] = W
    return V, U, cols


# -- MMCS / ML2R -----------------------------------------------------------------------------
def test_exact_decomposition_has_mmcs_and_ml2r_one():
    W = pentagon()
    V, U, cols = exact_factors(W, C=20)
    r = ev.mmcs_ml2r(W, V, U)
    assert r["mmcs"] == pytest.approx(1.0, abs=1e-9)
    assert r["ml2r"] == pytest.approx(1.0, abs=1e-9)
    assert r["mmcs_std"] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_array_equal(r["argmax"], cols)
    assert r["cos"].shape == (20, 5)


def test_scaled_components_change_ml2r_not_mmcs():
    W = pentagon()
    V, U, _ = exact_factors(W, C=8)
    r = ev.mmcs_ml2r(W, 0.5 * V, U)
    assert r["mmcs"] == pytest.approx(1.0) and r["ml2r"] == pytest.approx(0.5)


def test_mmcs_ml2r_match_a_direct_loop():
    rng = np.random.default_rng(1)
    F, H, C = 7, 3, 11
    W, V, U = rng.normal(size=(F, H)), rng.normal(size=(F, C)), rng.normal(size=(C, H))
    eps = 1e-12
    best_cos, ratios = [], []
    for f in range(F):
        cos = []
        for c in range(C):
            p = V[f, c] * U[c]
            cos.append(p @ W[f] / ((np.linalg.norm(p) + eps) * (np.linalg.norm(W[f]) + eps)))
        c_star = int(np.argmax(cos))
        best_cos.append(cos[c_star])
        ratios.append(np.linalg.norm(V[f, c_star] * U[c_star]) / np.linalg.norm(W[f]))
    r = ev.mmcs_ml2r(W, V, U)
    assert r["mmcs"] == pytest.approx(np.mean(best_cos), rel=1e-10)
    assert r["ml2r"] == pytest.approx(np.mean(ratios), rel=1e-10)
    assert r["mmcs_std"] == pytest.approx(np.std(best_cos, ddof=1), rel=1e-10)
    assert r["ml2r_std"] == pytest.approx(np.std(ratios, ddof=1), rel=1e-10)
    np.testing.assert_allclose(r["max_cos"], best_cos, rtol=1e-10)
    # JAX float32 inputs work too (computed in float64 on the host).
    r32 = ev.mmcs_ml2r(*(jnp.asarray(a, jnp.float32) for a in (W, V, U)))
    assert r32["mmcs"] == pytest.approx(r["mmcs"], rel=1e-5)


def test_cosine_is_signed():
    W = pentagon()
    V, U, cols = exact_factors(W, C=5)
    V[:, cols[2]] *= -1.0
    r = ev.mmcs_ml2r(W, V, U)
    assert r["cos"][cols[2], 2] == pytest.approx(-1.0)
    # Feature 2's best match is now some other (non-negative) subcomponent, not the flipped one.
    assert r["max_cos"][2] < 1.0 and r["argmax"][2] != cols[2]
    assert r["mmcs"] < 1.0


def test_mmcs_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="W has shape"):
        ev.mmcs_ml2r(np.ones((4, 2)), np.ones((5, 3)), np.ones((3, 2)))


def test_subcomponent_norms_are_frobenius_norms_of_rank_one_pieces():
    rng = np.random.default_rng(2)
    V, U = rng.normal(size=(4, 6)), rng.normal(size=(6, 3))
    want = [np.linalg.norm(np.outer(V[:, c], U[c])) for c in range(6)]
    np.testing.assert_allclose(ev.subcomponent_norms(V, U), want, rtol=1e-12)
    P = ev.subnet_tensor(V, U)
    np.testing.assert_allclose(P.sum(0), V @ U, atol=1e-12)


# -- CI statistics ---------------------------------------------------------------------------
def test_ci_l0_and_alive_components():
    g = np.array([[[0.0, 0.5, 0.2], [0.05, 0.0, 0.0]], [[1.0, 1.0, 1.0], [0.0, 0.0, 0.11]]])
    assert float(ci_l0(g, 0.1)) == pytest.approx((2 + 0 + 3 + 1) / 4)
    assert float(ci_l0(jnp.asarray(g[0]), 0.3)) == pytest.approx(0.5)
    np.testing.assert_array_equal(ev.alive_components(g[:, 1], 0.1), [False, False, True])
    np.testing.assert_array_equal(ev.alive_components(g), [True, True, True])


def test_one_hot_ci_matches_the_decomposition():
    target, tp = two_site_target(d_in=3, d_hidden=4, d_out=2)
    dec = spdjax.decompose(target, {"a": 5, "b": 6})
    params = dec.init(jax.random.key(0), tp)
    ci = ev.one_hot_ci(dec, params, tp, 3, value=0.5)
    _, inputs = dec.clean_forward(tp, jnp.eye(3) * 0.5)
    np.testing.assert_allclose(inputs["a"], np.eye(3) * 0.5)
    want = dec.causal_importance(params, inputs)
    assert set(ci) == {"a", "b"}
    assert ci["a"].lower.shape == (3, 5) and ci["b"].upper.shape == (3, 6)
    for n in ci:
        assert isinstance(ci[n].lower, np.ndarray)
        for got, exp in zip(ci[n], want[n]):
            np.testing.assert_allclose(got, exp, rtol=1e-6)


# -- permutations ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["auto", "hungarian", "greedy"])
def test_permute_to_identity_recovers_a_shuffled_identity(method):
    rng = np.random.default_rng(3)
    n, C = 6, 10
    ci = np.zeros((n, C))
    cols = rng.permutation(C)[:n]
    ci[np.arange(n), cols] = 0.9
    ci += rng.uniform(0, 0.05, size=ci.shape)
    perm = cp.permute_to_identity(ci, method=method)
    assert sorted(perm) == list(range(C))
    np.testing.assert_array_equal(perm[:n], cols)
    # Unassigned columns come after, by column sum descending.
    sums = ci[:, perm[n:]].sum(0)
    assert np.all(np.diff(sums) <= 0)


def test_hungarian_beats_greedy_where_greedy_is_myopic():
    ci = np.array([[0.9, 0.8], [0.85, 0.1]])
    np.testing.assert_array_equal(cp.permute_to_identity(ci, method="greedy"), [0, 1])
    np.testing.assert_array_equal(cp.permute_to_identity(ci, method="hungarian"), [1, 0])
    np.testing.assert_array_equal(cp.permute_to_identity(ci), [1, 0])


def test_permute_to_identity_with_more_rows_than_columns_uses_the_first_rows():
    ci = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 5.0]])
    np.testing.assert_array_equal(cp.permute_to_identity(ci), [1, 0])


def test_permute_rejects_bad_input():
    with pytest.raises(ValueError, match="Unknown permutation method 'best'"):
        cp.permute_to_identity(np.eye(2), method="best")
    with pytest.raises(ValueError, match="2-D"):
        cp.permute_to_identity(np.ones(3))


def test_permute_by_column_mass_and_permuted_ci():
    ci = np.array([[0.1, 0.0, 1.0, 0.2], [0.1, 0.0, 1.0, 0.9]])
    np.testing.assert_array_equal(cp.permute_by_column_mass(ci), [2, 3, 0, 1])
    eye = np.eye(3, 5)[:, [4, 2, 0, 1, 3]]
    out = cp.permuted_ci({"l1.in": eye, "l1.out": ci[:, :3]}, dense_sites=["l1.out"])
    np.testing.assert_array_equal(out["l1.in"], np.eye(3, 5))
    np.testing.assert_array_equal(out["l1.out"], ci[:, [2, 0, 1]])


# -- identity / dense pattern errors ---------------------------------------------------------
def shuffled_identity(n, C, seed=4):
    return np.eye(n, C)[:, np.random.default_rng(seed).permutation(C)]


def test_identity_error_counts():
    ci = shuffled_identity(4, 6)
    assert cp.identity_ci_error(ci) == 0
    perm = cp.permute_to_identity(ci)
    p = ci[:, perm].copy()  # now exactly eye(4, 6)
    p[2, 2] = 0.85  # weak diagonal: an error at tol 0.1, not at tol 0.2
    assert cp.identity_ci_error(p, 0.1) == 1 and cp.identity_ci_error(p, 0.2) == 0
    p[0, 1] = 0.15  # off-diagonal inside the square block
    assert cp.identity_ci_error(p, 0.1) == 2 and cp.identity_ci_error(p, 0.2) == 0
    p[3, 5] = 0.3  # entry in a column beyond n_features counts as off-diagonal
    assert cp.identity_ci_error(p, 0.1) == 3 and cp.identity_ci_error(p, 0.2) == 1
    # Un-permuting changes nothing: the count is permutation-invariant here.
    assert cp.identity_ci_error(p[:, np.random.default_rng(0).permutation(6)], 0.1) == 3


def test_identity_error_of_two_features_sharing_a_component():
    ci = np.zeros((3, 4))
    ci[0, 0] = ci[1, 0] = ci[2, 1] = 1.0  # features 0 and 1 both use component 0
    # Feature 1 is assigned some empty column (diagonal 0 < 0.9) and its 1.0 is off-diagonal.
    assert cp.identity_ci_error(ci) == 2


def test_too_few_components_count_as_missing_ones():
    ci = np.zeros((4, 3))
    ci[[0, 1, 2], [0, 1, 2]] = 1.0  # 3 features with their own component, the 4th with none
    assert cp.identity_ci_error(ci) == 1
    assert cp.dense_ci_error(np.ones((4, 3)), k=5) == 2  # two dense columns missing


def test_dense_error_counts():
    ci = np.zeros((5, 6))
    ci[:, 3] = 1.0
    ci[[0, 2], 1] = 0.95
    assert cp.dense_ci_error(ci, k=2) == 0
    # k too large: the third densest column has no strong entry.
    assert cp.dense_ci_error(ci, k=3) == 1
    # k too small: column 1's two entries are now in the "off" columns.
    assert cp.dense_ci_error(ci, k=1) == 2
    ci[4, 5] = 0.3  # a weak entry in an off column: an error at tol 0.1, not 0.5
    assert cp.dense_ci_error(ci, k=2, tol=0.1) == 1
    assert cp.dense_ci_error(ci, k=2, tol=0.5) == 0
    assert cp.dense_ci_error(ci, k=7) == 5  # 6 columns, 2 of them dense: 4 + 1 missing
    # The numbers behind the count: column 1 peaks at 0.95, column 3 at 1; column 5 holds 0.3.
    assert cp.dense_ci_peaks(ci, k=2) == {"peaks": [0.95, 1.0], "rest_max": 0.3}
    ci[[0, 2], 1] = 0.89  # a dense column just short of 1 - tol: one error at tol 0.1, none at 0.2
    assert cp.dense_ci_error(ci, k=2, tol=0.1) == 2
    assert cp.dense_ci_error(ci, k=2, tol=0.2) == 1  # only the 0.3 entry is left
    assert cp.dense_ci_peaks(ci, k=2)["peaks"] == [0.89, 1.0]


def test_ci_solution_errors_sums_over_sites():
    ident = shuffled_identity(3, 5)
    weak = ident.copy()
    weak[weak == 1.0] = 0.85
    dense = np.zeros((3, 5))
    dense[:, 2] = 1.0
    dense[0, 4] = 0.15
    out = cp.ci_solution_errors(
        {"l0.in": ident, "l1.in": weak, "l0.out": dense, "other": dense},
        identity={"l0.in": 3, "l1.in": 3},
        dense={"l0.out": 1},
    )
    assert out == {"total": 4, "loose_total": 0,
                   "per_site": {"l0.in": 0, "l1.in": 3, "l0.out": 1}}
    with pytest.raises(ValueError, match="expected 4 feature rows"):
        cp.ci_solution_errors({"l0.in": ident}, identity={"l0.in": 4})
