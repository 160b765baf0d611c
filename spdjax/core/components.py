"""Rank-one subcomponents of one site: factors ``V (d_in, C)`` and ``U (C, d_out)``.

Subcomponent ``c`` is the rank-one matrix ``V[:, c] ⊗ U[c, :]`` and ``W ≈ V @ U`` (Flax layout).
Its inner activation on input ``x`` is ``(x @ V)_c``. A masked site computes
``((x @ V) * mask) @ U + bias`` (never a per-example weight); an embedding site uses the rows
``V[ids]`` instead of ``x @ V``. Biases are the target's, frozen.

Inits (values; registered in :data:`COMPONENT_INITS`; ``paper``: the SPD paper's code,
``gaussian``: the later reference implementation, goodfire-ai/spd):
  ``paper``     unit-norm random columns of V and rows of U, each rank-one piece scaled by its
                overlap with W: ``U[c] *= V[:, c]ᵀ W U[c]ᵀ``.
  ``gaussian``  V ~ N(0, 1/d_in), U ~ N(0, 1/C); usually followed by a faithfulness warm-up
                (:func:`spdjax.methods.spd.faithfulness_warmup`).
  ``svd``       (ours) the first ``r = min(C, d_in, d_out)`` subcomponents are W's largest singular
                pieces ``s_c u_c v_cᵀ`` (``V[:, c] = √s_c u_c``, ``U[c] = √s_c v_c``), so that the
                sum is W's best rank-r approximation (W itself once ``C >= rank W``); any further
                subcomponents get a random unit-norm ``V`` column and a zero ``U`` row: they add
                nothing to the sum at the start but are trained like the others. A start at the
                target's own sparsest linear basis, for targets whose mechanism is low rank per
                input (the induction toy's OV circuit, RESULTS.md).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from spdjax.core.registry import Registry

Array = jax.Array


def inner_acts(kind: str, V: Array, x: Array) -> Array:
    """``[..., C]`` inner activations: ``x @ V`` for linear sites, ``V[ids]`` for embeddings."""
    if kind == "embed":
        return jnp.take(V, x, axis=0)
    return jnp.einsum("...i,ic->...c", x, V)


def masked_output(acts: Array, U: Array, mask: Array | None, bias: Array | None) -> Array:
    """``(acts * mask) @ U + bias`` for inner acts ``[..., C]`` and mask ``[..., C]`` (or None)."""
    if mask is not None:
        acts = acts * mask
    y = jnp.einsum("...c,co->...o", acts, U)
    return y if bias is None else y + bias


def init_paper(key, W: Array, C: int) -> dict:
    """Unit-norm random columns of V and rows of U, each piece scaled by its overlap with W."""
    kv, ku = jax.random.split(key)
    V = jax.random.normal(kv, (W.shape[0], C))
    U = jax.random.normal(ku, (C, W.shape[1]))
    V = V / jnp.linalg.norm(V, axis=0, keepdims=True)
    U = U / jnp.linalg.norm(U, axis=1, keepdims=True)
    overlap = jnp.einsum("ic,io,co->c", V, W, U)
    return {"V": V, "U": U * overlap[:, None]}


def init_gaussian(key, W: Array, C: int) -> dict:
    """``V ~ N(0, 1/d_in)``, ``U ~ N(0, 1/C)`` (later reference)."""
    kv, ku = jax.random.split(key)
    d_in, d_out = W.shape
    return {
        "V": jax.random.normal(kv, (d_in, C)) / jnp.sqrt(d_in),
        "U": jax.random.normal(ku, (C, d_out)) / jnp.sqrt(C),
    }


def init_svd(key, W: Array, C: int) -> dict:
    """W's top singular pieces, then random-``V`` / zero-``U`` subcomponents (module docstring)."""
    d_in, d_out = W.shape
    left, s, right = jnp.linalg.svd(W.astype(jnp.float32), full_matrices=False)
    r = min(C, s.shape[0])
    root = jnp.sqrt(s[:r])
    V = left[:, :r] * root
    U = right[:r] * root[:, None]
    if C > r:
        extra = jax.random.normal(key, (d_in, C - r))
        V = jnp.concatenate([V, extra / jnp.linalg.norm(extra, axis=0, keepdims=True)], axis=1)
        U = jnp.concatenate([U, jnp.zeros((C - r, d_out), U.dtype)])
    return {"V": V.astype(W.dtype), "U": U.astype(W.dtype)}


# An init is ``(key, W (d_in, d_out), C) -> {"V": (d_in, C), "U": (C, d_out)}``.
ComponentInit = Callable[[Array, Array, int], dict]
COMPONENT_INITS: Registry[ComponentInit] = Registry(
    "component init", {"paper": init_paper, "gaussian": init_gaussian, "svd": init_svd}
)
