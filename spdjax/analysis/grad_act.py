"""Gradient x activation between subcomponents, direct effects only (VPD, Bushnaq et al. 2026,
"Interpreting Language Model Parameters": ``attr(c' -> c) = (da_c / da_c') a_c' g_c'`` with
gradients stopped through every other subcomponent).

:func:`direct_forward` runs the decomposed model with a mask per site (all ones: every
subcomponent on) such that

* each site's output is computed from its input with the gradient stopped (``stop_gradient``),
  so a derivative reaches a site's masks only along paths that pass through no other
  decomposed site (the residual stream, attention patterns and other weights that are not
  decomposed carry it);
* ``d(anything) / d(mask_s[..., c])`` at ``mask = 1`` is ``d(anything) / d(a_s,c) * a_s,c``,
  the gradient times the activation of subcomponent ``c`` (its inner activation ``x V_c``;
  the product does not depend on how ``V`` and ``U`` share the scale);
* the returned target activations ``a_t,c = (x_t V_t,c) ||U_t,c||`` of every site are the
  VPD subcomponent activations, computed from each site's input *with* the gradient (they are
  what attributions flow into);
* an input source: for float inputs ``x`` the forward reads ``x * scale`` (so ``d/d scale =
  grad . x`` per coordinate); for integer token ids the token embedding (the ``embed`` site
  that reads the ids) is multiplied by ``scale[..., None]`` (``d/d scale = grad . embedding``
  per position, summed over the embedding's width).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array


def token_embedding_site(decomposition, target_params, batch) -> str:
    """The name of the ``embed`` site that reads the token ids ``batch`` (its input has the
    batch's shape); a ``ValueError`` if there is none or more than one."""
    _, inputs = jax.eval_shape(lambda x: decomposition.target.forward(target_params, x, {}),
                               batch)
    hits = [n for n, s in decomposition.target.sites.items()
            if s.kind == "embed" and n in inputs and inputs[n].shape == batch.shape]
    if len(hits) != 1:
        raise ValueError(f"Attributions from input tokens need the one embedding site that reads "
                         f"the token ids; found {hits or 'none'} among the target's sites "
                         f"{sorted(decomposition.target.sites)}.")
    return hits[0]


def unit_masks(decomposition, batch_lead: tuple[int, ...]) -> dict[str, Array]:
    """``{site: ones [*lead, C]}``: every subcomponent on (the masks to differentiate at)."""
    return {s: jnp.ones(batch_lead + (decomposition.C[s],), jnp.float32)
            for s in decomposition.site_names}


def direct_forward(decomposition, params, target_params, batch: Any,
                   masks: Mapping[str, Array], scale: Array, *,
                   embed_site: str | None = None) -> tuple[Array, dict[str, Array]]:
    """``(output, {site: a_site [..., C]})`` of the decomposed model under ``masks``, outputs of
    the sites stop-gradiented at their inputs (module docstring). ``scale``: ``batch``'s shape
    for float inputs; for token ids the ids' shape, with ``embed_site`` the embedding site
    (:func:`token_embedding_site`). Computed in the decomposition's compute dtype (as its
    :meth:`~spdjax.core.decomposition.Decomposition.forward`); both results are float32."""
    lower = decomposition.to_compute
    target_params, scale = lower(target_params), lower(scale)
    replace = {}
    for name in decomposition.site_names:
        fn = decomposition.site_fn(params, target_params, name, masks[name])
        replace[name] = lambda x, fn=fn: fn(jax.lax.stop_gradient(x))
    if jnp.issubdtype(jnp.result_type(batch), jnp.integer):
        if embed_site is None:
            raise ValueError("Token ids in: pass embed_site (token_embedding_site).")
        site = decomposition.target.sites[embed_site]
        base = replace.get(embed_site) or (
            lambda ids: site.apply(site.weight(target_params), ids))
        replace[embed_site] = lambda ids: base(ids) * scale[..., None]
        x = batch
    else:
        x = lower(batch) * scale
    out, inputs = decomposition.target.forward(target_params, x, replace)
    acts = {}
    for name in decomposition.site_names:
        V, U = lower(decomposition.factors(params, name))
        norm = jnp.linalg.norm(U, axis=-1)
        acts[name] = (decomposition.site(name).apply(V, inputs[name]) * norm).astype(jnp.float32)
    return out.astype(jnp.float32), acts
