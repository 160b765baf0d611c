"""L3D's loss pieces (L3D paper, "Sparse principal directions" and "Training"), pure functions of
an :class:`~spdjax.methods.l3d_decomposition.L3DDecomposition`, its params and per-sample
gradients ``g`` (``{site: {tensor: [batch, *shape]}}``):

* :func:`encode`: ``z = V_in g``, ``[batch, C]``;
* :func:`batch_topk_mask`: the batch top-k of ``|z|`` over samples *and* subnetworks;
* :func:`reconstruction_errors`: ``||g_b - g_hat_b||^2`` per sample for ``g_hat = V_out (mask *
  z)``, and ``||g_b||^2``; :func:`relative_error` of the two is ``sum_b ||g_b - g_hat_b||^2 /
  sum_b ||g_b||^2``, the reference code's normalised L2 loss and the paper's reported
  "reconstruction error".

The training step never forms a subnetwork's dense tensor nor ``g_hat``: with ``z_k = mask * z``,
``y = V_out^T g`` (:func:`project`, the decoder's inner products with ``g``) and the decoder's
Gram ``M = V_out^T V_out`` (:func:`decoder_gram`, ``C x C``),

    ||g_b - g_hat_b||^2 = ||g_b||^2 - 2 z_k,b . y_b + z_k,b^T M z_k,b,

and ``z``, ``y``, ``M`` come from the Tucker factors mode by mode
(:func:`~spdjax.methods.l3d_decomposition.tucker_contract`,
:func:`~spdjax.methods.l3d_decomposition.tucker_gram`). A weight's ``g`` may be an
:class:`~spdjax.methods.l3d_decomposition.OuterGrads` (a linear site's per-sample gradient as
input times output gradient), which :func:`encode`, :func:`project` and :func:`sq_norms` read
without forming it. The explicit forms, :func:`decode` and
:func:`reconstruct` (``g_hat``, ``[batch, *shape]`` per tensor) with :func:`dense_relative_error`
and :func:`dense_per_sample_error`, are there to inspect a reconstruction; the tests check the
factored forms against them.

Precision. The identity is a sum of terms as large as ``||g_b||^2``, ``|z_k,b| . |y_b|`` and
``|z_k,b|^T |M| |z_k,b|``, so in float32 its rounding error is about ``u S_b`` with ``u =
2^-24`` and ``S_b = (sqrt(||g_b||^2) + sum_c |z_k,bc| ||V_out[c]||)^2`` (:func:`rounding_scale`;
for an :class:`~spdjax.methods.l3d_decomposition.OuterGrads` ``||g_b||^2`` is read as the sum of
the absolute values of its terms). That is ``~4 u ||g_b||^2`` when the kept coefficients do not
cancel, but grows with the square of the cancellation: nearly parallel decoder directions with
large opposite coefficients give ``S_b >> ||g_b||^2`` (directions ``1e-3`` apart: ``S_b ~ 1e5
||g_b||^2``, an error of several ``1e-3`` in the relative loss, where the explicit form's is
``~1e-10``). :func:`guarded_sq_errors` therefore uses the identity only where ``4 u sum_b S_b``
is at most :data:`REL_TOL` of the batch's squared error plus :data:`ABS_TOL` of ``sum_b
||g_b||^2``, else it computes ``g - g_hat`` explicitly for that batch (``lax.cond``: one branch
runs); per-sample squared errors are clipped at 0, so the loss is never negative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from typing import NamedTuple

from spdjax.methods.l3d_decomposition import (EPS, L3DDecomposition, OuterGrads, tucker,
                                              tucker_contract, tucker_gram)

Array = jax.Array
ROUNDING = 4 * 2.0**-24  # 4 u, float32: the Gram identity's error is <= ~1.03 u S_b (measured)
REL_TOL = 1e-3  # the Gram identity is used if its error bound is <= REL_TOL of the batch's error
ABS_TOL = 1e-5  # ... plus ABS_TOL of sum_b ||g_b||^2 (the loss's absolute accuracy near 0)


def _contract(factors, grads) -> Array:
    """``[batch, C]``: ``sum_t <V[c]_t, g_b,t>`` over every tensor ``t`` of ``factors``."""
    return sum(tucker_contract(f, grads[n][t]) for n, ts in factors.items()
               for t, f in ts.items())


def encode(d: L3DDecomposition, params, grads) -> Array:
    """``[batch, C]``: ``z_bc = sum_t <V_in[c]_t, g_b,t>`` over every decomposed tensor ``t``."""
    del d
    return _contract(params["encode"], grads)


def project(d: L3DDecomposition, params, grads) -> Array:
    """``[batch, C]``: ``y_bc = sum_t <V_out[c]_t, g_b,t>``, the decoder's inner products."""
    del d
    return _contract(params["decode"], grads)


def decoder_gram(d: L3DDecomposition, params) -> Array:
    """``(C, C)``: ``M_cc' = sum_t <V_out[c]_t, V_out[c']_t>``."""
    del d
    return sum(tucker_gram(f) for ts in params["decode"].values() for f in ts.values())


def sq_errors(sq_norm: Array, y: Array, gram: Array, z_kept: Array) -> Array:
    """``[batch]``: ``||g_b - V_out z_kept,b||^2 = ||g_b||^2 - 2 z_kept,b . y_b + z_kept,b^T M
    z_kept,b`` from ``sq_norm [batch]``, ``y [batch, C]`` (:func:`project`), ``gram (C, C)``
    (:func:`decoder_gram`) and the kept coordinates ``z_kept [batch, C]``, clipped at 0 (its
    rounding error: module docstring, :func:`guarded_sq_errors`)."""
    return jnp.maximum(sq_norm - 2.0 * jnp.einsum("bc,bc->b", z_kept, y)
                       + jnp.einsum("bc,cd,bd->b", z_kept, gram, z_kept), 0.0)


class GramTerms(NamedTuple):
    """What the Gram identity reads, computed once per batch (:func:`gram_terms`)."""

    sq_norm: Array  # [batch]: ||g_b||^2
    magnitude: Array  # [batch]: the sum of |terms| of sq_norm (= sq_norm for dense g)
    y: Array  # [batch, C]: V_out^T g (project)
    gram: Array  # (C, C): V_out^T V_out (decoder_gram)


def gram_terms(d: L3DDecomposition, params, grads) -> GramTerms:
    """:class:`GramTerms` of ``grads`` and the decoder."""
    sq_norm, magnitude = _sq_norms(grads)
    return GramTerms(sq_norm, magnitude, project(d, params, grads), decoder_gram(d, params))


def rounding_scale(terms: GramTerms, z_kept: Array) -> Array:
    """``[batch]``: ``S_b = (sqrt(magnitude_b) + sum_c |z_kept,bc| sqrt(M_cc))^2``, the size of
    the terms :func:`sq_errors` sums (``|M_cd| <= sqrt(M_cc M_dd)``, ``|y_bc| <= ||V_out[c]||
    ||g_b||``): its float32 rounding error is about ``u S_b`` (module docstring)."""
    col = jnp.sqrt(jnp.maximum(jnp.diagonal(terms.gram), 0.0))
    return (jnp.sqrt(jnp.maximum(terms.magnitude, 0.0)) + jnp.abs(z_kept) @ col) ** 2


def gram_form_is_accurate(terms: GramTerms, z_kept: Array, sq_err: Array) -> Array:
    """Scalar bool: the Gram identity's estimated rounding error ``ROUNDING * sum_b S_b`` is at
    most ``REL_TOL * sum_b sq_err_b + ABS_TOL * sum_b ||g_b||^2`` (:data:`ROUNDING`,
    :data:`REL_TOL`, :data:`ABS_TOL`)."""
    bound = ROUNDING * jnp.sum(rounding_scale(terms, z_kept))
    return jax.lax.stop_gradient(
        bound <= REL_TOL * jnp.sum(sq_err) + ABS_TOL * jnp.sum(terms.sq_norm))


def dense_sq_errors(d: L3DDecomposition, params, grads, z_kept: Array) -> tuple[Array, Array]:
    """``(sq_err, sq_norm)``, ``[batch]`` each: ``||g_b - V_out z_kept,b||^2`` and ``||g_b||^2``
    with ``g`` and ``g_hat`` explicit (:func:`densify`, :func:`decode`): rounding relative to
    ``||g_b - g_hat_b||``, not to the coefficients' size."""
    dense = densify(grads)
    diff = jax.tree.map(jnp.subtract, _decode_from_factors(params, z_kept), dense)
    return sq_norms(diff), sq_norms(dense)


def _decode_from_factors(params, z: Array) -> dict:
    """:func:`decode` as one contraction of ``z`` with each tensor's Tucker factors (the order
    left to ``einsum``: no ``[*shape, C]`` tensor is formed)."""
    out = {}
    for n, ts in params["decode"].items():
        out[n] = {}
        for t, f in ts.items():
            ndim = f["core"].ndim - 1
            ranks, dims = "pqrstu"[:ndim], "ijklmn"[:ndim]
            spec = ",".join(["bC", ranks + "C"] + [f"{r}{i}C" for r, i in zip(ranks, dims)])
            out[n][t] = jnp.einsum(f"{spec}->b{dims}", z, f["core"],
                                   *(f[f"f{j}"] for j in range(ndim)))
    return out


def guarded_sq_errors(d: L3DDecomposition, params, grads, terms: GramTerms,
                      z_kept: Array) -> tuple[Array, Array, Array]:
    """``(sq_err, sq_norm, gram_form)``: :func:`sq_errors` where
    :func:`gram_form_is_accurate`, else :func:`dense_sq_errors` (``gram_form`` False), for the
    whole batch (``lax.cond``: only the chosen branch runs, in the value and the gradient)."""
    sq_err = sq_errors(terms.sq_norm, terms.y, terms.gram, z_kept)
    ok = gram_form_is_accurate(terms, z_kept, sq_err)
    # Rematerialised: under autodiff a branch's residuals are outputs of the cond, and the
    # branch not taken fills them with zeros, which for the explicit one would be every
    # subnetwork's dense tensor each step. Checkpointed, its residuals are its (small) inputs.
    explicit = jax.checkpoint(lambda p, g, z: dense_sq_errors(d, p, g, z))
    sq_err, sq_norm = jax.lax.cond(ok, lambda: (sq_err, terms.sq_norm),
                                   lambda: explicit(params, grads, z_kept))
    return sq_err, sq_norm, ok


def reconstruction_errors(d: L3DDecomposition, params, grads, topk: float | Array):
    """``(sq_err, sq_norm, z, mask, gram_form)``: ``||g_b - g_hat_b||^2`` and ``||g_b||^2``
    (``[batch]``) of the top-k reconstruction ``g_hat = V_out (mask * z)``, factored where that
    is accurate (:func:`guarded_sq_errors`; ``gram_form`` says whether it was)."""
    z = encode(d, params, grads)
    mask = batch_topk_mask(z, topk)
    sq_err, sq_norm, ok = guarded_sq_errors(d, params, grads, gram_terms(d, params, grads),
                                            z * mask)
    return sq_err, sq_norm, z, mask, ok


def relative_error(sq_err: Array, sq_norm: Array) -> Array:
    """``sum_b ||g_b - g_hat_b||^2 / (sum_b ||g_b||^2 + eps)``: the L3D loss (the reference's
    ``compute_reconstruction_loss``; ``eps`` :data:`EPS`), from ``[batch]`` squared errors and
    norms (:func:`reconstruction_errors`; each clipped at 0, so the loss is >= 0)."""
    return jnp.sum(jnp.maximum(sq_err, 0.0)) / (jnp.sum(jnp.maximum(sq_norm, 0.0)) + EPS)


def per_sample_error(sq_err: Array, sq_norm: Array) -> Array:
    """``[batch]``: ``||g_b - g_hat_b|| / ||g_b||`` (the paper's equation, per sample; samples
    with ``g_b = 0`` count as 0; a rounding-negative factored ``sq_err`` counts as 0)."""
    num = jnp.maximum(sq_err, 0.0)
    return jnp.where(sq_norm > 0, jnp.sqrt(num / jnp.where(sq_norm > 0, sq_norm, 1.0)), 0.0)


def keep_count(n_entries: int, topk: float) -> int:
    """How many of ``n_entries`` the batch top-k keeps: ``int(topk * n) + 1``, at most ``n``.
    The reference code keeps every ``|z|`` at least its ``int(topk * n)``-th largest (0-based),
    i.e. one more than ``int(topk * n)`` (ties aside)."""
    return min(int(topk * n_entries) + 1, n_entries)


def batch_topk_mask(z: Array, topk: float | Array) -> Array:
    """``[batch, C]`` float mask of the batch top-k of ``|z|`` (over samples and subnetworks):
    the entries at least the ``int(topk * batch * C)``-th largest (0-based; ties all kept), as
    the reference. ``topk`` may be traced (the dense warm-up switches it)."""
    flat = jnp.abs(z).reshape(-1)
    n = flat.shape[0]
    idx = jnp.minimum(jnp.floor(topk * n).astype(jnp.int32), n - 1)
    threshold = jnp.sort(flat)[::-1][idx]
    return jax.lax.stop_gradient((jnp.abs(z) >= threshold).astype(z.dtype))


def _sq_norms(grads) -> tuple[Array, Array]:
    """``([batch], [batch])``: ``||g_b||^2`` over every tensor and the sum of the absolute
    values of the terms it adds (the same for dense tensors; for
    :class:`~spdjax.methods.l3d_decomposition.OuterGrads`, ``sum_pq |a_p.a_q| |d_p.d_q|``)."""
    norms, mags = [], []
    for v in jax.tree.leaves(grads, is_leaf=lambda v: isinstance(v, OuterGrads)):
        if isinstance(v, OuterGrads):
            aa, dd = v.position_grams()
            norms.append(jnp.einsum("bpq,bpq->b", aa, dd))
            mags.append(jnp.einsum("bpq,bpq->b", jnp.abs(aa), jnp.abs(dd)))
        else:
            sq = jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=-1)
            norms.append(sq)
            mags.append(sq)
    return jnp.maximum(sum(norms), 0.0), sum(mags)


def sq_norms(grads) -> Array:
    """``[batch]``: ``||g_b||^2`` over every tensor (dense or
    :class:`~spdjax.methods.l3d_decomposition.OuterGrads`)."""
    return _sq_norms(grads)[0]


def densify(grads) -> dict:
    """``grads`` with every :class:`~spdjax.methods.l3d_decomposition.OuterGrads` formed
    (``[batch, d_in, d_out]``)."""
    return jax.tree.map(lambda v: v.dense() if isinstance(v, OuterGrads) else v, grads,
                        is_leaf=lambda v: isinstance(v, OuterGrads))


# -- the explicit reconstruction: g_hat as [batch, *shape] tensors ------------------------------
def decode(d: L3DDecomposition, params, z: Array) -> dict:
    """``{site: {tensor: [batch, *shape]}}``: ``g_hat_b = sum_c z_bc V_out[c]``, with every
    subnetwork's dense tensor formed (:func:`~spdjax.methods.l3d_decomposition.tucker`)."""
    del d
    out = {}
    for n, ts in params["decode"].items():
        out[n] = {}
        for t, f in ts.items():
            v = tucker(f)
            dims = "ijklmn"[:v.ndim - 1]
            out[n][t] = jnp.einsum(f"bC,{dims}C->b{dims}", z, v)
    return out


def reconstruct(d: L3DDecomposition, params, grads, topk: float | Array):
    """``(g_hat, z, mask)``: the top-k reconstruction of ``grads``, explicitly."""
    z = encode(d, params, grads)
    mask = batch_topk_mask(z, topk)
    return decode(d, params, z * mask), z, mask


def dense_relative_error(grads, recon) -> Array:
    """:func:`relative_error` of an explicit reconstruction ``recon`` (:func:`reconstruct`)."""
    diff = jax.tree.map(jnp.subtract, recon, grads)
    return relative_error(sq_norms(diff), sq_norms(grads))


def dense_per_sample_error(grads, recon) -> Array:
    """:func:`per_sample_error` of an explicit reconstruction ``recon``."""
    diff = jax.tree.map(jnp.subtract, recon, grads)
    return per_sample_error(sq_norms(diff), sq_norms(grads))
