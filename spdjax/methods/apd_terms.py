"""APD's loss terms and attributions (APD paper, "Method"), pure functions of an
:class:`~spdjax.methods.apd_decomposition.APDDecomposition`, its params and a batch: gradient
attributions, batch top-k, the L_p weights, faithfulness, the factorised Schatten norm and the
activation reconstruction. :mod:`spdjax.methods.apd` combines them into the objective (and
re-exports them)."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from spdjax.core import components as comp_lib
from spdjax.core.target import Mapped, dense_input
from spdjax.methods.apd_decomposition import APDDecomposition, site_acts


Array = jax.Array


def attributions(d: APDDecomposition, target_params, params, x, *, source: str = "target",
                 differentiable: bool = False):
    """``[batch, C]`` gradient attributions (module docstring), outputs ``[batch, d_L]``.

    Gradients and site inputs come from one forward: the target's (``source="target"``) or the
    APD model's unmasked one (``"apd"``); they are constants. ``differentiable=False`` (top-k):
    nothing here is differentiated; ``True`` (the L_p formulation): the gradient flows into the
    components' outputs ``x_l P_{c,l}``, as in the reference's L_p sparsity loss.
    """
    if jnp.ndim(x) != 2:
        raise ValueError(f"APD's attributions take a batch of shape [batch, features]; got "
                         f"{jnp.shape(x)}.")
    live = params
    params = jax.lax.stop_gradient(params)
    weights = {n: (d.site(n).weight(target_params) if source == "target"
                   else d.component_weight(params, n)) for n in d.site_names}

    def forward(probes, term=None):
        """The forward (target weights, or the APD model's summed components), each site's
        output plus ``probes[n]``; ``term = (n, q, B)`` adds ``q @ B`` to factored site n's."""
        def site(n):
            s, bias = d.site(n), d.site(n).bias
            bias = None if bias is None else bias(target_params)

            def fn(a):
                if isinstance(a, Mapped):  # a factored input's output stays factored
                    y = a.matmul(weights[n])
                    if bias is not None:
                        y = (Mapped.sum(y.terms, bias=bias) if isinstance(y, Mapped)
                             else y + s.out(bias, a))
                else:
                    y = comp_lib.inner_acts(s.kind, weights[n], a)
                    y = y if bias is None else y + bias
                if term is not None and term[0] == n:
                    y = y + Mapped((term[1],), (term[2],))
                return y if n not in probes else y + probes[n]
            return fn
        out, inputs = d.target.forward(target_params, x, {n: site(n) for n in d.site_names})
        return out, {n: inputs[n] for n in d.site_names}

    # A site whose output is handed back factored (a residual stream kept as narrow writes) is
    # attributed forward: per component, the directional derivative of the outputs along its
    # output ``acts_c @ B_c``, kept factored, so the wide gradient [d_L, batch, d_out] is never
    # formed (ResidMLP 2: layer 0's mlp_out in the 1000-wide stream). Every other site by the
    # d_L backward passes, with a probe in the coordinates its output is read in (a Mapped
    # input's post map). Both give sum_o (d out_l / d y_o) (x P_c)_o.
    clean = jax.eval_shape(lambda: d.clean_forward(target_params, x)[1])
    forward_sites = [n for n in d.site_names if getattr(clean[n], "factored", False)]
    probes = {n: jnp.zeros((x.shape[0], d.site(n).d_out if getattr(clean[n], "post", None) is None
                            else clean[n].post.shape[-1]))
              for n in d.site_names if n not in forward_sites}
    out, vjp, inputs = jax.vjp(forward, probes, has_aux=True)
    d_out = out.shape[-1]
    cotangents = jnp.broadcast_to(jnp.eye(d_out)[:, None, :], (d_out, *out.shape))
    grads = jax.vmap(lambda c: vjp(c)[0])(cotangents)  # {site: [d_L, batch, d_out_l]}
    grads, inputs = jax.lax.stop_gradient((grads, inputs))
    total = 0.0
    for n in d.site_names:
        A, B = d.factors(live if differentiable else params, n)
        acts, B = site_acts(d.site(n), A, B, inputs[n])
        if n in forward_sites:
            q = jnp.zeros_like(acts[:, 0])

            def along(acts_c, B_c, n=n, q=q):  # [batch, d_L]: d out / d (acts_c @ B_c)
                return jax.jvp(lambda q: forward({}, (n, q, B_c))[0], (q,), (acts_c,))[1]
            total = total + jax.vmap(along, in_axes=(1, 0), out_axes=2)(acts, B).transpose(1, 0, 2)
            continue
        comp_out = jnp.einsum("bcm,cmo->bco", acts, B)
        total = total + jnp.einsum("lbo,bco->lbc", grads[n], comp_out)
    attr = jnp.sum(total**2, axis=0)
    return attr if differentiable else jax.lax.stop_gradient(attr)


def lp_weights(attr: Array, d_out: int, p: float) -> Array:
    """``[batch, C]``: ``(a / d_L + 1e-16)^(p/2)``, i.e. ``|A_c(x)|^p`` of the paper's L_p
    formulation (``A_c`` the root-mean-square attribution over the ``d_L`` outputs); its sum over
    C averaged over the batch is the L_p minimality loss, and it weights each component's
    Schatten term in place of the top-k mask (APD paper, appendix on the L_p formulation)."""
    return (attr / d_out + 1e-16) ** (p / 2)


def batch_topk(attr: Array, topk: float) -> Array:
    """Boolean ``[batch, C]``: the ``int(topk * batch)`` largest entries of the whole matrix."""
    b, c = attr.shape
    k = int(topk * b)
    if not 1 <= k <= b * c:
        raise ValueError(f"APD top-k {topk} with batch {b} keeps {k} of {b * c} entries; "
                         f"expected at least 1 and at most batch x C.")
    _, idx = jax.lax.top_k(attr.reshape(-1), k)
    return jnp.zeros(b * c, bool).at[idx].set(True).reshape(b, c)


def _n_params(d: APDDecomposition) -> int:
    return sum(d.site(n).d_in * d.site(n).d_out for n in d.site_names)


def faithfulness(d: APDDecomposition, params, target_params) -> Array:
    """``sum_l ||W_l - sum_c P_{c,l}||^2 / N``: the components' sum against the target weights,
    ``N`` the number of target weights."""
    sq = sum(jnp.sum((d.site(n).weight(target_params) - d.component_weight(params, n)) ** 2)
             for n in d.site_names)
    return sq / _n_params(d)


def schatten(d: APDDecomposition, params, active: Array, pnorm: float) -> Array:
    """The factorised Schatten-p norm of the active components (module docstring); ``active``
    ``[batch, C]`` is the top-k mask."""
    per_component = 0.0
    for n in d.site_names:
        A, B = d.factors(params, n)
        lam_sq = jnp.sum(A**2, axis=1) * jnp.sum(B**2, axis=2)  # (C, m)
        per_component = per_component + jnp.sum((lam_sq + 1e-16) ** (pnorm / 2), axis=-1)
    return jnp.sum(active.astype(jnp.float32) * per_component) / (_n_params(d) * active.shape[0])


def schatten_weighted(d: APDDecomposition, params, weights: Array, pnorm: float) -> Array:
    """The L_p formulation's Schatten term: ``weights [batch, C]`` scale each ``lambda^2`` inside
    the power, ``(1/(N B)) sum_{b,c,l,m} (w_bc |A_{c,l,:,m}|^2 |B_{c,l,m,:}|^2 + 1e-16)^(p/2)``, as
    the reference code applies its (here continuous) mask; the APD paper's formula puts
    ``w_bc`` outside the power instead. With a 0/1 mask both equal :func:`schatten` up to the
    ``1e-16`` floor."""
    total = 0.0
    for n in d.site_names:
        A, B = d.factors(params, n)
        lam_sq = jnp.sum(A**2, axis=1) * jnp.sum(B**2, axis=2)  # (C, m)
        total = total + jnp.sum((weights[:, :, None] * lam_sq + 1e-16) ** (pnorm / 2))
    return total / (_n_params(d) * weights.shape[0])


def act_recon(d: APDDecomposition, inputs: Mapping[str, Array], clean: Mapping[str, Array],
              sites: tuple[str, ...]) -> Array:
    """The squared error of the ``sites``' inputs (ResidMLP: each ``mlp_out``'s input, the MLP's
    post-ReLU hidden activations) in the top-k forward against the target's, summed over units,
    divided by all those units, averaged over the batch (as the APD paper's code,
    ApolloResearch/apd)."""
    sq = sum(jnp.sum((dense_input(inputs[n]) - dense_input(clean[n])) ** 2, axis=-1)
             for n in sites)
    return jnp.mean(sq) / sum(d.site(n).d_in for n in sites)
