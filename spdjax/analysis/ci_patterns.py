"""CI patterns of a trained decomposition: permutations for plots, and the paper's error counts.

A CI matrix on one-hot inputs is ``(n_features, C)``: row = input feature, column = subcomponent.
The paper's solutions have two patterns (SPD paper, "Results"; counted as in the later reference
implementation's IdentityCIError metric, goodfire-ai/spd): *identity* (each feature has its own
subcomponent) and *dense* (k subcomponents important for every input).
Everything runs on the host in NumPy (float64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spdjax.analysis.metrics import f64

# Matrices whose smaller side is at least this use the greedy permutation: Hungarian is O(n³)
# (~1.5 s at 500x500 on a CPU, ~26 s at 1000x1000 in the reference's timings).
HUNGARIAN_MAX = 500
PERMUTATION_METHODS = ("auto", "hungarian", "greedy")


def _check_2d(ci: np.ndarray, what: str) -> None:
    if ci.ndim != 2:
        raise ValueError(f"{what} expects a 2-D (n_features, C) matrix, got shape {ci.shape}.")


def _by_mass(ci: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``cols`` sorted by column sum of ``ci``, descending; ties keep index order."""
    return cols[np.argsort(-ci[:, cols].sum(axis=0), kind="stable")]


def permute_by_column_mass(ci: Any) -> np.ndarray:
    """``(C,)`` column permutation sorting the columns of ``ci (n, C)`` by sum, descending."""
    ci = f64(ci)
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
    ci = f64(ci)
    _check_2d(ci, "permute_to_identity")
    k = min(ci.shape)
    if method == "hungarian" or (method == "auto" and k < HUNGARIAN_MAX):
        # imported here: scipy.optimize costs every process that imports spdjax 0.5 s
        from scipy.optimize import linear_sum_assignment

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
    ci_by_site: Mapping[str, Any], *, dense_sites: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """PermutedCIPlots ordering: ``dense_sites`` by column mass, all others toward identity.
    Returns ``{site: ci[:, perm]}``."""
    out = {}
    for name, ci in ci_by_site.items():
        ci = f64(ci)
        dense = name in dense_sites
        out[name] = ci[:, permute_by_column_mass(ci) if dense else permute_to_identity(ci)]
    return out


# -- target CI patterns (IdentityCIError) ----------------------------------------------------
def identity_ci_error(ci: Any, tol: float = 0.1, *, method: str = "auto") -> int:
    """Entries of ``ci (n_features, C)`` that break a one-feature-one-component pattern.

    After :func:`permute_to_identity`, counts entries off the diagonal that are ``> tol`` (every
    entry not on the diagonal, including all of the columns beyond ``n_features``) plus diagonal
    entries ``< 1 - tol``. With fewer components than features the missing ones count as empty
    columns: each feature left without a component of its own is an error.
    """
    ci = f64(ci)
    _check_2d(ci, "identity_ci_error")
    n, C = ci.shape
    if C < n:
        ci = np.concatenate([ci, np.zeros((n, n - C))], axis=1)
    ci = ci[:, permute_to_identity(ci, method=method)]
    on_diag = np.zeros_like(ci, dtype=bool)
    on_diag[np.arange(n), np.arange(n)] = True
    return int(np.sum(ci[~on_diag] > tol) + np.sum(ci[on_diag] < 1 - tol))


def _dense_split(ci: Any, k: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` densest columns of ``ci (n, C)`` (by sum, descending) and the remaining ones."""
    ci = f64(ci)
    _check_2d(ci, name)
    if ci.shape[1] < k:  # missing columns count as empty ones (each a missing dense column)
        ci = np.concatenate([ci, np.zeros((ci.shape[0], k - ci.shape[1]))], axis=1)
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
    loose_tol: float = 0.2,
) -> dict[str, Any]:
    """IdentityCIError over sites: ``identity`` maps site -> n_features (one component per
    feature), ``dense`` maps site -> k (k always-important components); other sites are skipped.

    Returns ``{"total": errors at tol, "loose_total": errors at loose_tol, "per_site": {site:
    errors at tol}}``.
    """
    identity, dense = dict(identity or {}), dict(dense or {})
    both = sorted(set(identity) & set(dense))
    if both:
        raise ValueError(f"ci_solution_errors: sites {both} are given both patterns.")
    unknown = sorted((set(identity) | set(dense)) - set(ci_by_site))
    if unknown:
        raise ValueError(f"ci_solution_errors: no CI given for sites {unknown}.")

    def error(name, t):
        ci = ci_by_site[name]
        if name in dense:
            return dense_ci_error(ci, dense[name], t)
        if np.shape(ci)[0] != identity[name]:
            raise ValueError(
                f"Site {name!r}: expected {identity[name]} feature rows, got {np.shape(ci)}."
            )
        return identity_ci_error(ci, t)

    sites = [n for n in ci_by_site if n in identity or n in dense]
    per_site = {n: error(n, tol) for n in sites}
    return {"total": sum(per_site.values()), "loose_total": sum(error(n, loose_tol) for n in sites),
            "per_site": per_site}
