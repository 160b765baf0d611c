"""APD's decomposition (Braun et al. 2025, "Attribution-based Parameter Decomposition"):
``C`` parameter components spanning every decomposed site, each of per-site rank ``m`` in
factorised form (:class:`APDDecomposition`, built by :func:`decompose_apd`), and the components'
inner activations on a site input (:func:`site_acts`). The loss terms are in
:mod:`spdjax.methods.apd_terms`, the method in :mod:`spdjax.methods.apd`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from spdjax.core.target import Mapped, Site, Target
from spdjax.methods.base import spanning_sites

Array = jax.Array
APD_INITS = ("xavier_normal", "kaiming_uniform")
APD_FANS = ("component", "torch")


def site_acts(site: Site, A: Array, B: Array, x: Array | Mapped) -> tuple[Array, Array]:
    """``(acts [..., C, m], B)``: components ``(A, B)``'s inner activations on a site input
    (``x A_c``, or ``A_c[ids]`` for an embedding) and the ``B`` that maps them to the site's
    output; a :class:`~spdjax.core.target.Mapped` input folds its maps in (``pre A_c``,
    ``B_c post``)."""
    if site.kind == "embed":
        return jnp.take(A, x, axis=1).transpose(1, 0, 2), B
    if isinstance(x, Mapped):
        B = B if x.post is None else jnp.einsum("cmo,oy->cmy", B, x.post)
        C, d_in, m = A.shape  # x @ (pre @ A_c) for all c at once, as one (d_in, C m) matrix
        acts = x.apply(A.transpose(1, 0, 2).reshape(d_in, C * m))
        return acts.reshape(*acts.shape[:-1], C, m), B
    return jnp.einsum("...i,cim->...cm", x, A), B


@dataclasses.dataclass(frozen=True, eq=False)
class APDDecomposition:
    """The static structure of an APD decomposition: sites, C, per-site rank, ties."""

    target: Target
    site_names: tuple[str, ...]
    C: int
    rank: Mapping[str, int]
    ties: Mapping[str, str]
    # The view evaluations use (:class:`spdjax.methods.base.DecompositionView`): components
    # of rank m, and no causal-importance function.
    rank_one = False
    causal_importance = None

    def site(self, name):
        return self.target.sites[name]

    @property
    def owners(self) -> tuple[str, ...]:
        return tuple(n for n in self.site_names if n not in self.ties)

    def factors(self, params, name: str) -> tuple[Array, Array]:
        """``(A (C, d_in, m), B (C, m, d_out))`` of a site, a tied one from its owner's."""
        if name in self.ties:
            owner = params["components"][self.ties[name]]
            return jnp.swapaxes(owner["B"], 1, 2), jnp.swapaxes(owner["A"], 1, 2)
        return params["components"][name]["A"], params["components"][name]["B"]

    def component_weights(self, params, name: str) -> Array:
        """``(C, d_in, d_out)``: every component's matrix at this site."""
        A, B = self.factors(params, name)
        return jnp.einsum("cim,cmo->cio", A, B)

    def component_weight(self, params, name: str) -> Array:
        """``(d_in, d_out)``: the sum of all components at this site."""
        return jnp.sum(self.component_weights(params, name), axis=0)

    def init(self, key, target_params, *, init: str = "xavier_normal",
             init_scale: float = 1.0, fans: str = "component") -> dict:
        """``A`` and ``B`` per owner site: ``"xavier_normal"`` (the APD reference's init, TMS and
        ResidMLP) or ``"kaiming_uniform"`` (``U(±sqrt(6 / fan_in))``), times
        ``init_scale``. ``fans="component"``: the fans of each component's own matrix, (d_in, m)
        and (m, d_out). ``fans="torch"``: the reference's, torch's init applied to the whole
        ``[instances = 1, C, d_in, m]`` tensor, whose fan-in is ``C d_in m`` (``C m d_out`` for
        ``B``) and fan-out ``d_in m`` (``m d_out``): for ResidMLP 1 (C 130) ``B`` starts ~360x
        smaller, so the components start near zero and faithfulness builds them up. TMS 5-2
        reproduces its published numbers with ``"component"`` (RESULTS.md)."""
        if init not in APD_INITS:
            raise ValueError(f"Unknown APD init {init!r}; expected one of {APD_INITS}.")
        if fans not in APD_FANS:
            raise ValueError(f"Unknown APD init fans {fans!r}; expected one of {APD_FANS}.")
        comps = {}
        for i, name in enumerate(self.owners):
            site, m = self.site(name), self.rank[name]
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            shapes = {"A": (ka, (self.C, site.d_in, m)), "B": (kb, (self.C, m, site.d_out))}
            comps[name] = {}
            for leaf, (k, shape) in shapes.items():
                fan_in, fan_out = shape[1], shape[2]
                if fans == "torch":  # torch: fan_in = size(1) * receptive, fan_out = size(0) * ...
                    fan_in, fan_out = self.C * shape[1] * shape[2], shape[1] * shape[2]
                if init == "xavier_normal":
                    w = jax.random.normal(k, shape) * np.sqrt(2 / (fan_in + fan_out))
                else:
                    bound = np.sqrt(6 / fan_in)
                    w = jax.random.uniform(k, shape, minval=-bound, maxval=bound)
                comps[name][leaf] = w * init_scale
        return {"components": comps}

    def partition_specs(self, params, model_axis: str) -> dict:
        return {"components": {n: {"A": P(model_axis, None, None), "B": P(model_axis, None, None)}
                               for n in params["components"]}}

    def clean_forward(self, target_params, x):
        out, inputs = self.target.forward(target_params, x, {})
        return out, {n: inputs[n] for n in self.site_names}

    def _site_out(self, params, target_params, name, x, mask):
        site = self.site(name)
        acts, B = site_acts(site, *self.factors(params, name), x)
        if mask is not None:
            acts = acts * mask[..., None]
        y = jnp.einsum("...cm,cmo->...o", acts, B)  # plain even for a factored input: its
        # C x rank terms are wider than a residual stream (the forward adds it as one term)
        return y if site.bias is None else y + site.out(site.bias(target_params), x)

    def forward(self, target_params, params, x, masks: Mapping[str, Array | None], *,
                with_inputs: bool = False):
        """Forward with the sites in ``masks`` replaced by their (masked) components
        (``with_inputs``: also every site's input in that forward)."""
        replace = {n: (lambda a, n=n, m=m: self._site_out(params, target_params, n, a, m))
                   for n, m in masks.items()}
        out, inputs = self.target.forward(target_params, x, replace)
        return (out, inputs) if with_inputs else out


def decompose_apd(target: Target, sites: Mapping[str, int], C: int, *, rank: int = 0,
                  ties: Mapping[str, str] | None = None) -> APDDecomposition:
    """An APD decomposition of the sites matched by ``sites`` (their C values are ignored: APD's
    ``C`` components span every site). ``rank`` 0: ``min(d_in, d_out)`` per site."""
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"APD: rank must be an integer >= 0 (0: full rank), got {rank!r}.")
    names = spanning_sites("APD", target, sites, C, refused_kind="conv",
                           message="linear and embedding sites; {} are convolutions (use SPD, "
                           "or leave them out of the patterns).")
    ties = dict(ties or {})
    for tied, owner in ties.items():
        if tied not in names or owner not in names or owner in ties:
            raise ValueError(f"APD tie {tied!r} -> {owner!r}: both must be decomposed sites "
                             f"{list(names)} and the owner not itself tied.")
        a, b = target.sites[tied], target.sites[owner]
        if (a.d_in, a.d_out) != (b.d_out, b.d_in):
            raise ValueError(f"Cannot tie {tied!r} {(a.d_in, a.d_out)} to the transpose of "
                             f"{owner!r} {(b.d_in, b.d_out)}.")
    ranks = {n: rank or min(target.sites[n].d_in, target.sites[n].d_out) for n in names}
    for tied, owner in ties.items():
        ranks[tied] = ranks[owner]
    return APDDecomposition(target=target, site_names=names, C=C, rank=ranks, ties=ties)
