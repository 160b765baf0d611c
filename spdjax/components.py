"""Rank-one subcomponents of one site: factors ``V (d_in, C)`` and ``U (C, d_out)``.

Subcomponent ``c`` is the rank-one matrix ``V[:, c] ⊗ U[c, :]`` and ``W ≈ V @ U`` (Flax layout).
Its inner activation on input ``x`` is ``(x @ V)_c``. A masked site computes
``((x @ V) * mask) @ U + bias`` (never a per-example weight); an embedding site uses the rows
``V[ids]`` instead of ``x @ V``. Biases are the target's, frozen.

Inits (reference spec section 1.2):
  ``paper``     unit-norm random columns of V and rows of U, each rank-one piece scaled by its
                overlap with W: ``U[c] *= V[:, c]ᵀ W U[c]ᵀ``.
  ``gaussian``  V ~ N(0, 1/d_in), U ~ N(0, 1/C); usually followed by :func:`faithfulness_warmup`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

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


def _init_paper(key, W: Array, C: int) -> dict:
    kv, ku = jax.random.split(key)
    V = jax.random.normal(kv, (W.shape[0], C))
    U = jax.random.normal(ku, (C, W.shape[1]))
    V = V / jnp.linalg.norm(V, axis=0, keepdims=True)
    U = U / jnp.linalg.norm(U, axis=1, keepdims=True)
    overlap = jnp.einsum("ic,io,co->c", V, W, U)
    return {"V": V, "U": U * overlap[:, None]}


def _init_gaussian(key, W: Array, C: int) -> dict:
    kv, ku = jax.random.split(key)
    d_in, d_out = W.shape
    return {
        "V": jax.random.normal(kv, (d_in, C)) / jnp.sqrt(d_in),
        "U": jax.random.normal(ku, (C, d_out)) / jnp.sqrt(C),
    }


COMPONENT_INITS: dict[str, Callable[[Array, Array, int], dict]] = {
    "paper": _init_paper,
    "gaussian": _init_gaussian,
}


def init_components(key, W: Array, C: int, *, init: str = "paper") -> dict:
    """Factors ``{"V": (d_in, C), "U": (C, d_out)}`` for a target weight ``W (d_in, d_out)``."""
    if init not in COMPONENT_INITS:
        raise ValueError(f"Unknown component init {init!r}; expected one of {sorted(COMPONENT_INITS)}.")
    return COMPONENT_INITS[init](key, W, C)


def faithfulness_warmup(
    components: dict,
    faithfulness_fn: Callable[[dict], Array],
    *,
    steps: int,
    lr: float = 0.01,
    weight_decay: float = 0.1,
) -> dict:
    """Minimises ``faithfulness_fn(components)`` alone with AdamW (later reference: 200/0.01/0.1)."""
    if steps <= 0:
        return components
    opt = optax.adamw(lr, weight_decay=weight_decay)

    def body(carry, _):
        comps, state = carry
        grads = jax.grad(faithfulness_fn)(comps)
        updates, state = opt.update(grads, state, comps)
        return (optax.apply_updates(comps, updates), state), None

    (components, _), _ = jax.lax.scan(body, (components, opt.init(components)), None, length=steps)
    return components
