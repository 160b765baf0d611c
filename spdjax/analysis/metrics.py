"""Offline metrics of a trained decomposition: MMCS/ML2R, norms, neuron contributions, CI on
one-hot inputs, alive subcomponents. CI patterns and permutations:
:mod:`spdjax.analysis.ci_patterns`.

Everything here runs on the host in NumPy (float64) at eval time, never inside a train step.
Inputs may be NumPy or JAX arrays.

Shapes: a site's factors are ``V (d_in, C)`` and ``U (C, d_out)`` (Flax layout, ``W ≈ V @ U``);
a CI matrix on one-hot inputs is ``(n_features, C)``: row = input feature, column = subcomponent.

References: MMCS/ML2R, SPD paper, "SPD Results: Toy Model of Superposition"; neuron contributions,
SPD paper, "Toy Model of Compressed Computation"; IdentityCIError, PermutedCIPlots and CI_L0 as
the later reference implementation (goodfire-ai/spd) computes them.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from spdjax.core.decomposition import CausalImportance, Decomposition, alive_components  # noqa: F401 (re-exported)


def f64(x: Any) -> np.ndarray:
    """``x`` as a float64 NumPy array (analyses run in double precision on the host)."""
    return np.asarray(x, dtype=np.float64)


def std(x: np.ndarray) -> float:
    """Unbiased std (torch ``std``); NaN for fewer than two values instead of a warning."""
    return float(np.std(x, ddof=1)) if x.size > 1 else float("nan")


# -- MMCS / ML2R ------------------------------------------------------------------------------
def subnet_tensor(V: Any, U: Any) -> np.ndarray:
    """``P (C, d_in, d_out)`` with ``P[c, f, :] = V[f, c] * U[c, :]``: row f of subcomponent c."""
    return np.einsum("fc,ch->cfh", f64(V), f64(U))


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
    return mmcs_ml2r_components(W, subnet_tensor(V, U), eps=eps)


def mmcs_ml2r_components(W: Any, P: Any, *, eps: float = 1e-12) -> dict[str, Any]:
    """:func:`mmcs_ml2r` of any components ``P (C, d_in, d_out)`` (rank one or not: APD's)."""
    W, P = f64(W), f64(P)
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
        "mmcs_std": std(max_cos),
        "ml2r": float(l2_ratio.mean()),
        "ml2r_std": std(l2_ratio),
        "cos": cos,
        "max_cos": max_cos,
        "l2_ratio": l2_ratio,
        "argmax": best,
    }


def subcomponent_norms(V: Any, U: Any) -> np.ndarray:
    """``(C,)`` Frobenius norm of each rank-one piece: ``|V[:, c]| * |U[c, :]|``."""
    return np.linalg.norm(f64(V), axis=0) * np.linalg.norm(f64(U), axis=1)


# -- ResidMLP neuron contributions (SPD paper eqs. in "Toy Model of Compressed Computation") -----
def neuron_contributions(W_E: Any, W_in: Any, W_out: Any) -> np.ndarray:
    """``(n_features, d_mlp)``: ``(W_E[f] @ W_in)[n] * (W_out @ W_E[f])[n]``, unembedding ``W_E^T``.

    ``W_E (n_features, d_embed)``, ``W_in (d_embed, d_mlp)``, ``W_out (d_mlp, d_embed)`` (Flax
    layout). How much neuron ``n`` carries feature ``f`` from the residual stream back to ``f``'s
    read-off; only meaningful for a model without biases.
    """
    W_E = f64(W_E)
    return (W_E @ f64(W_in)) * (W_E @ f64(W_out).T)


def subcomponent_neuron_contributions(
    W_E: Any, V_in: Any, U_in: Any, W_out: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's best ``W_in`` subcomponent and its neuron contributions.

    The contribution of subcomponent ``c`` (``V_in[:, c] U_in[c, :]``) is
    ``(W_E[f] @ V_in[:, c]) U_in[c, n] * (W_out @ W_E[f])[n]`` with ``W_out`` the *summed*
    decomposition of the output weight. Per feature the ``c`` with the largest contribution over
    neurons is chosen. Returns ``(contrib (n_features, d_mlp), chosen (n_features,))``.
    """
    W_E = f64(W_E)
    read = W_E @ f64(W_out).T  # (F, N)
    full = np.einsum("fc,cn,fn->fcn", W_E @ f64(V_in), f64(U_in), read)  # (F, C, N)
    chosen = np.argmax(full.max(axis=2), axis=1)
    return full[np.arange(full.shape[0]), chosen], chosen


def component_neuron_contributions(W_E: Any, P_in: Any, W_out: Any
                                   ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`subcomponent_neuron_contributions` of any components ``P_in (C, d_embed, d_mlp)``
    (APD's): contribution ``(W_E[f] @ P_in[c])[n] * (W_out @ W_E[f])[n]``, the best ``c`` per
    feature. Returns ``(contrib (n_features, d_mlp), chosen (n_features,))``."""
    W_E = f64(W_E)
    read = W_E @ f64(W_out).T  # (F, N)
    full = np.einsum("fcn,fn->fcn", np.einsum("fe,cen->fcn", W_E, f64(P_in)), read)
    chosen = np.argmax(full.max(axis=2), axis=1)
    return full[np.arange(full.shape[0]), chosen], chosen


def pearson_r(a: Any, b: Any) -> float:
    """Pearson correlation of two arrays of equal size (flattened)."""
    a, b = f64(a).ravel(), f64(b).ravel()
    if a.size != b.size or a.size < 2:
        raise ValueError(f"pearson_r needs two arrays of the same size >= 2; "
                         f"got {a.size}, {b.size}.")
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
