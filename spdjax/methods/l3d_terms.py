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
factored forms against them. The identity subtracts terms of size ``||g||^2``, so in float32 an
error below ~``1e-6 ||g||^2`` is not resolved (L3D's errors are several percent).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spdjax.methods.l3d_decomposition import (EPS, L3DDecomposition, OuterGrads, tucker,
                                              tucker_contract, tucker_gram)

Array = jax.Array


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
    (:func:`decoder_gram`) and the kept coordinates ``z_kept [batch, C]``."""
    return (sq_norm - 2.0 * jnp.einsum("bc,bc->b", z_kept, y)
            + jnp.einsum("bc,cd,bd->b", z_kept, gram, z_kept))


def reconstruction_errors(d: L3DDecomposition, params, grads, topk: float | Array):
    """``(sq_err, sq_norm, z, mask)``: ``||g_b - g_hat_b||^2`` and ``||g_b||^2`` (``[batch]``)
    of the top-k reconstruction ``g_hat = V_out (mask * z)``, factored (module docstring)."""
    z = encode(d, params, grads)
    mask = batch_topk_mask(z, topk)
    sq_norm = sq_norms(grads)
    return (sq_errors(sq_norm, project(d, params, grads), decoder_gram(d, params), z * mask),
            sq_norm, z, mask)


def relative_error(sq_err: Array, sq_norm: Array) -> Array:
    """``sum_b ||g_b - g_hat_b||^2 / (sum_b ||g_b||^2 + eps)``: the L3D loss (the reference's
    ``compute_reconstruction_loss``; ``eps`` :data:`EPS`), from ``[batch]`` squared errors and
    norms (:func:`reconstruction_errors`)."""
    return jnp.sum(sq_err) / (jnp.sum(sq_norm) + EPS)


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


def sq_norms(grads) -> Array:
    """``[batch]``: ``||g_b||^2`` over every tensor (dense or
    :class:`~spdjax.methods.l3d_decomposition.OuterGrads`)."""
    return sum(v.sq_norms() if isinstance(v, OuterGrads)
               else jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=-1)
               for v in jax.tree.leaves(grads, is_leaf=lambda v: isinstance(v, OuterGrads)))


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
