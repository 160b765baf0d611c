"""Offline analyses of a trained decomposition: MMCS/ML2R, CI on one-hot inputs, CI-pattern errors.

Everything here runs on the host in NumPy (float64) at eval time, never inside a train step
(style point 10). Inputs may be NumPy or JAX arrays.

Shapes: a site's factors are ``V (d_in, C)`` and ``U (C, d_out)`` (Flax layout, ``W ≈ V @ U``);
a CI matrix on one-hot inputs is ``(n_features, C)``: row = input feature, column = subcomponent.

References (reference spec): MMCS/ML2R and neuron contributions §3.11; IdentityCIError,
PermutedCIPlots, CI_L0 §3.9.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from spdjax.decomposition import CausalImportance, Decomposition

# Matrices whose smaller side is at least this use the greedy permutation: Hungarian is O(n³)
# (~1.5 s at 500x500 on a CPU, ~26 s at 1000x1000 in the reference's timings).
HUNGARIAN_MAX = 500
PERMUTATION_METHODS = ("auto", "hungarian", "greedy")


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _std(x: np.ndarray) -> float:
    """Unbiased std (torch ``std``); NaN for fewer than two values instead of a warning."""
    return float(np.std(x, ddof=1)) if x.size > 1 else float("nan")


def _check_2d(ci: np.ndarray, what: str) -> None:
    if ci.ndim != 2:
        raise ValueError(f"{what} expects a 2-D (n_features, C) matrix, got shape {ci.shape}.")


# -- MMCS / ML2R ------------------------------------------------------------------------------
def subnet_tensor(V: Any, U: Any) -> np.ndarray:
    """``P (C, d_in, d_out)`` with ``P[c, f, :] = V[f, c] * U[c, :]``: row f of subcomponent c."""
    return np.einsum("fc,ch->cfh", _f64(V), _f64(U))


def mmcs_ml2r(W: Any, V: Any, U: Any, *, eps: float = 1e-12) -> dict[str, Any]:
    """Mean max cosine similarity and mean L2 ratio of a site's subcomponents to its target rows.

    ``W (n_features, n_hidden)`` is the target (TMS ``linear1`` in Flax layout), ``V (n_features,
    C)``, ``U (C, n_hidden)``. With ``P`` from :func:`subnet_tensor`:
    ``cos[c, f] = <P[c,f] / (|P[c,f]| + eps), W[f] / (|W[f]| + eps)>`` (signed),
    ``MMCS = mean_f max_c cos[c, f]`` and ``ML2R = mean_f |P[c*(f), f]| / |W[f]|`` with
    ``c*(f) = argmax_c cos[c, f]``. The stds are across features (unbiased), as in Table 1.

    Returns ``mmcs``, ``mmcs_std``, ``ml2r``, ``ml2r_std`` (floats) and the per-feature arrays
    ``cos (C, n_features)``, ``max_cos (n_features,)``, ``l2_ratio (n_features,)``,
    ``argmax (n_features,)``.
    """
    W = _f64(W)
    P = subnet_tensor(V, U)
    if P.shape[1:] != W.shape:
        raise ValueError(f"Factors give (d_in, d_out) = {P.shape[1:]} but W has shape {W.shape}.")
    p_norm = np.linalg.norm(P, axis=-1)  # (C, F)
    w_norm = np.linalg.norm(W, axis=-1)  # (F,)
    cos = np.einsum("cfh,fh->cf", P / (p_norm[..., None] + eps), W / (w_norm[:, None] + eps))
    feats = np.arange(W.shape[0])
    best = np.argmax(cos, axis=0)
    max_cos = cos[best, feats]
    l2_ratio = p_norm[best, feats] / w_norm
    return {
        "mmcs": float(max_cos.mean()),
        "mmcs_std": _std(max_cos),
        "ml2r": float(l2_ratio.mean()),
        "ml2r_std": _std(l2_ratio),
        "cos": cos,
        "max_cos": max_cos,
        "l2_ratio": l2_ratio,
        "argmax": best,
    }


def subcomponent_norms(V: Any, U: Any) -> np.ndarray:
    """``(C,)`` Frobenius norm of each rank-one piece: ``|V[:, c]| * |U[c, :]|``."""
    return np.linalg.norm(_f64(V), axis=0) * np.linalg.norm(_f64(U), axis=1)


# -- ResidMLP neuron contributions (SPD paper eqs. in "Toy Model of Compressed Computation") -----
def neuron_contributions(W_E: Any, W_in: Any, W_out: Any) -> np.ndarray:
    """``(n_features, d_mlp)``: ``(W_E[f] @ W_in)[n] * (W_out @ W_E[f])[n]``, unembedding ``W_E^T``.

    ``W_E (n_features, d_embed)``, ``W_in (d_embed, d_mlp)``, ``W_out (d_mlp, d_embed)`` (Flax
    layout). How much neuron ``n`` carries feature ``f`` from the residual stream back to ``f``'s
    read-off; only meaningful for a model without biases.
    """
    W_E = _f64(W_E)
    return (W_E @ _f64(W_in)) * (W_E @ _f64(W_out).T)


def subcomponent_neuron_contributions(
    W_E: Any, V_in: Any, U_in: Any, W_out: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's best ``W_in`` subcomponent and its neuron contributions.

    The contribution of subcomponent ``c`` (``V_in[:, c] U_in[c, :]``) is
    ``(W_E[f] @ V_in[:, c]) U_in[c, n] * (W_out @ W_E[f])[n]`` with ``W_out`` the *summed*
    decomposition of the output weight. Per feature the ``c`` with the largest contribution over
    neurons is chosen. Returns ``(contrib (n_features, d_mlp), chosen (n_features,))``.
    """
    W_E = _f64(W_E)
    read = W_E @ _f64(W_out).T  # (F, N)
    full = np.einsum("fc,cn,fn->fcn", W_E @ _f64(V_in), _f64(U_in), read)  # (F, C, N)
    chosen = np.argmax(full.max(axis=2), axis=1)
    return full[np.arange(full.shape[0]), chosen], chosen


def pearson_r(a: Any, b: Any) -> float:
    """Pearson correlation of two arrays of equal size (flattened)."""
    a, b = _f64(a).ravel(), _f64(b).ravel()
    if a.size != b.size or a.size < 2:
        raise ValueError(f"pearson_r needs two arrays of the same size >= 2; got {a.size}, {b.size}.")
    return float(np.corrcoef(a, b)[0, 1])


# -- CI statistics ----------------------------------------------------------------------------
def one_hot_ci(
    decomposition: Decomposition,
    params: Any,
    target_params: Any,
    n_features: int,
    *,
    value: float = 0.75,
) -> dict[str, CausalImportance]:
    """CI of every site on the inputs ``eye(n_features) * value`` (NumPy, each ``(n_features, C)``).

    Row ``i`` is the CI when only input feature ``i`` is on (PermutedCIPlots, IdentityCIError).
    """
    x = jnp.eye(n_features, dtype=jnp.float32) * value
    _, site_inputs = decomposition.clean_forward(target_params, x)
    ci = decomposition.causal_importance(params, site_inputs)
    return {n: CausalImportance(*(np.asarray(a) for a in c)) for n, c in ci.items()}


def ci_l0(ci_lower: Any, threshold: float) -> float:
    """Mean over examples (all leading dims) of ``#{c : g_c > threshold}`` for CI ``[..., C]``."""
    return float(np.mean(np.sum(_f64(ci_lower) > threshold, axis=-1)))


def alive_components(ci_lower_batch: Any, threshold: float = 0.1) -> np.ndarray:
    """``(C,)`` bool: components whose CI exceeds ``threshold`` on at least one example.

    Pass a large eval batch ``[..., C]``; ``.sum()`` is the number of alive components.
    """
    g = _f64(ci_lower_batch)
    return np.any(g.reshape(-1, g.shape[-1]) > threshold, axis=0)


# -- permutations ----------------------------------------------------------------------------
def _by_mass(ci: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``cols`` sorted by column sum of ``ci``, descending; ties keep index order."""
    return cols[np.argsort(-ci[:, cols].sum(axis=0), kind="stable")]


def permute_by_column_mass(ci: Any) -> np.ndarray:
    """``(C,)`` column permutation sorting the columns of ``ci (n, C)`` by sum, descending."""
    ci = _f64(ci)
    _check_2d(ci, "permute_by_column_mass")
    return _by_mass(ci, np.arange(ci.shape[1]))


def permute_to_identity(ci: Any, *, method: str = "auto") -> np.ndarray:
    """``(C,)`` column permutation that puts the largest entries of ``ci (n, C)`` on the diagonal.

    The first ``k = min(n, C)`` rows are assigned one column each: ``"hungarian"`` maximises the
    diagonal sum (``linear_sum_assignment`` on ``-ci[:k]``), ``"greedy"`` lets each row in turn
    take its largest unused column; ``"auto"`` is Hungarian when ``k < 500``. The unassigned
    columns follow, sorted by column sum, descending. Use as ``ci[:, perm]``.
    """
    if method not in PERMUTATION_METHODS:
        raise ValueError(
            f"Unknown permutation method {method!r}; expected one of {PERMUTATION_METHODS}."
        )
    ci = _f64(ci)
    _check_2d(ci, "permute_to_identity")
    k = min(ci.shape)
    if method == "hungarian" or (method == "auto" and k < HUNGARIAN_MAX):
        _, assigned = linear_sum_assignment(-ci[:k])  # rows come back in order 0..k-1
    else:
        assigned, used = [], np.zeros(ci.shape[1], dtype=bool)
        for row in ci[:k]:
            col = int(np.argmax(np.where(used, -np.inf, row)))
            assigned.append(col)
            used[col] = True
    assigned = np.asarray(assigned, dtype=np.int64)
    rest = np.setdiff1d(np.arange(ci.shape[1]), assigned)
    return np.concatenate([assigned, _by_mass(ci, rest)])


def permuted_ci(
    ci_by_site: Mapping[str, Any], *, dense_patterns: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """PermutedCIPlots ordering: sites matching a glob in ``dense_patterns`` by column mass, all
    others toward identity. Returns ``{site: ci[:, perm]}``."""
    out = {}
    for name, ci in ci_by_site.items():
        ci = _f64(ci)
        dense = any(fnmatch.fnmatchcase(name, p) for p in dense_patterns)
        out[name] = ci[:, permute_by_column_mass(ci) if dense else permute_to_identity(ci)]
    return out


# -- target CI patterns (IdentityCIError) ----------------------------------------------------
def identity_ci_error(ci: Any, tol: float = 0.1, *, method: str = "auto") -> int:
    """Entries of ``ci (n_features, C)`` that break a one-feature-one-component pattern.

    After :func:`permute_to_identity`, counts entries off the diagonal that are ``> tol`` (every
    entry not on the diagonal, including all of the columns beyond ``n_features``) plus diagonal
    entries ``< 1 - tol``. Needs ``C >= n_features``.
    """
    ci = _f64(ci)
    _check_2d(ci, "identity_ci_error")
    n, C = ci.shape
    if C < n:
        raise ValueError(
            f"Identity pattern needs at least as many components as features; got {ci.shape}."
        )
    ci = ci[:, permute_to_identity(ci, method=method)]
    on_diag = np.zeros_like(ci, dtype=bool)
    on_diag[np.arange(n), np.arange(n)] = True
    return int(np.sum(ci[~on_diag] > tol) + np.sum(ci[on_diag] < 1 - tol))


def _dense_split(ci: Any, k: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` densest columns of ``ci (n, C)`` (by sum, descending) and the remaining ones."""
    ci = _f64(ci)
    _check_2d(ci, name)
    if ci.shape[1] < k:
        raise ValueError(f"Dense pattern with k={k} needs at least k columns; got {ci.shape}.")
    ci = ci[:, permute_by_column_mass(ci)]
    return ci[:, :k], ci[:, k:]


def dense_ci_error(ci: Any, k: int, tol: float = 0.1) -> int:
    """Entries of ``ci (n, C)`` that break a "k dense columns, the rest off" pattern.

    After sorting the columns by sum (descending): the number of the first ``k`` columns with no
    entry ``>= 1 - tol``, plus the entries ``> tol`` in the remaining columns.
    """
    dense, rest = _dense_split(ci, k, "dense_ci_error")
    missing = np.sum(~np.any(dense >= 1 - tol, axis=0))
    return int(missing + np.sum(rest > tol))


def dense_ci_peaks(ci: Any, k: int) -> dict[str, Any]:
    """What :func:`dense_ci_error` thresholds, as numbers: ``peaks`` (the largest entry of each of
    the ``k`` densest columns, ascending) and ``rest_max`` (the largest entry elsewhere)."""
    dense, rest = _dense_split(ci, k, "dense_ci_peaks")
    return {"peaks": sorted(float(v) for v in dense.max(axis=0)),
            "rest_max": float(rest.max()) if rest.size else 0.0}


def ci_solution_errors(
    ci_by_site: Mapping[str, Any],
    *,
    identity: Mapping[str, int] | None = None,
    dense: Mapping[str, int] | None = None,
    tol: float = 0.1,
) -> dict[str, int]:
    """IdentityCIError over sites: ``identity`` maps glob -> n_features, ``dense`` glob -> k.

    The first matching pattern (identity patterns before dense) decides a site's pattern; sites
    matching none are skipped. Returns ``total`` (at ``tol``), ``total_0p2`` (tol 0.2) and the
    per-site error at ``tol``.
    """
    rules = [(p, "identity", n) for p, n in (identity or {}).items()]
    rules += [(p, "dense", k) for p, k in (dense or {}).items()]

    def error(name, ci, t):
        for pattern, kind, n in rules:
            if fnmatch.fnmatchcase(name, pattern):
                if kind == "dense":
                    return dense_ci_error(ci, n, t)
                if np.shape(ci)[0] != n:
                    raise ValueError(
                        f"Site {name!r}: expected {n} feature rows, got {np.shape(ci)}."
                    )
                return identity_ci_error(ci, t)
        return None

    per_site = {n: error(n, ci, tol) for n, ci in ci_by_site.items()}
    per_site = {n: e for n, e in per_site.items() if e is not None}
    out = {"total": sum(per_site.values())}
    out["total_0p2"] = sum(error(n, ci_by_site[n], 0.2) for n in per_site)
    out.update(per_site)
    return out
