"""L3D's loss pieces (L3D paper, "Sparse principal directions" and "Training"), pure functions of
an :class:`~spdjax.methods.l3d_decomposition.L3DDecomposition`, its params and per-sample
gradients ``g`` (``{site: {tensor: [batch, *shape]}}``):

* :func:`encode`: ``z = V_in g``, ``[batch, C]``;
* :func:`batch_topk_mask`: the batch top-k of ``|z|`` over samples *and* subnetworks;
* :func:`decode`: ``g_hat = V_out (mask * z)``;
* :func:`relative_error`: ``sum_b ||g_b - g_hat_b||^2 / sum_b ||g_b||^2``, the reference code's
  normalised L2 loss and the paper's reported "reconstruction error".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spdjax.methods.l3d_decomposition import EPS, L3DDecomposition, tucker

Array = jax.Array


def _contract_spec(ndim: int) -> str:
    dims = "ij"[:ndim]
    return f"b{dims},{dims}C->bC"


def encode(d: L3DDecomposition, params, grads) -> Array:
    """``[batch, C]``: ``z_bc = sum_t <V_in[c]_t, g_b,t>`` over every decomposed tensor ``t``."""
    del d
    z = 0.0
    for n, ts in params["encode"].items():
        for t, v in _tensors(ts).items():
            z = z + jnp.einsum(_contract_spec(v.ndim - 1), grads[n][t], v)
    return z


def decode(d: L3DDecomposition, params, z: Array) -> dict:
    """``{site: {tensor: [batch, *shape]}}``: ``g_hat_b = sum_c z_bc V_out[c]``."""
    del d
    out = {}
    for n, ts in params["decode"].items():
        out[n] = {}
        for t, v in _tensors(ts).items():
            dims = "ij"[:v.ndim - 1]
            out[n][t] = jnp.einsum(f"bC,{dims}C->b{dims}", z, v)
    return out


def _tensors(ts) -> dict:
    return {t: tucker(f) for t, f in ts.items()}


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
    """``[batch]``: ``||g_b||^2`` over every tensor."""
    return sum(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=-1) for v in jax.tree.leaves(grads))


def relative_error(grads, recon) -> Array:
    """``sum_b ||g_b - g_hat_b||^2 / (sum_b ||g_b||^2 + eps)``: the L3D loss (the reference's
    ``compute_reconstruction_loss``; ``eps`` :data:`EPS`)."""
    diff = jax.tree.map(jnp.subtract, recon, grads)
    return jnp.sum(sq_norms(diff)) / (jnp.sum(sq_norms(grads)) + EPS)


def per_sample_error(grads, recon) -> Array:
    """``[batch]``: ``||g_b - g_hat_b|| / ||g_b||`` (the paper's equation, per sample; samples
    with ``g_b = 0`` count as 0)."""
    diff = jax.tree.map(jnp.subtract, recon, grads)
    num, den = sq_norms(diff), sq_norms(grads)
    return jnp.where(den > 0, jnp.sqrt(num / jnp.where(den > 0, den, 1.0)), 0.0)


def reconstruct(d: L3DDecomposition, params, grads, topk: float | Array):
    """``(g_hat, z, mask)``: the top-k reconstruction of ``grads``."""
    z = encode(d, params, grads)
    mask = batch_topk_mask(z, topk)
    return decode(d, params, z * mask), z, mask
