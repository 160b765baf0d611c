"""A decomposition: which sites of a target are split into how many subcomponents, and how.

:class:`Decomposition` is static structure (hashable, safe to close over under ``jax.jit``). The
trainable state is a plain pytree::

    params = {"components": {owner_site: {"V": (d_in, C), "U": (C, d_out)}},
              "ci":         {site: <CI-function params>}}

Tied sites (e.g. TMS, whose second layer is the transpose of the first) use
``V_tied = U_ownerᵀ`` and ``U_tied = V_ownerᵀ``; every site has its own CI function. Two ways to
hold them (``tie_mode``):

* ``"shared"``: the tied site has no factors of its own; one pair, one gradient (the sum of both
  uses), one optimizer update.
* ``"aliased"`` (the reference, spec 1.4): the tied site keeps its own copy, initialised to the
  owner's transpose, with its own gradient and optimizer state; the two updates are added to both
  copies by :func:`spdjax.step.make_optimizer`, so the copies stay equal. The reference's torch
  code does exactly this (two Parameters sharing storage, two Adam updates per step).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from spdjax import ci as ci_lib
from spdjax import components as comp_lib
from spdjax.sigmoids import get_sigmoid
from spdjax.target import Site, Target

Array = jax.Array
Params = dict
TIE_MODES = ("shared", "aliased")


class CausalImportance(NamedTuple):
    """CI of one site, each ``[..., C]``: ``lower`` (for masks), ``upper`` (imp-min), ``pre``."""

    lower: Array
    upper: Array
    pre: Array


def match_sites(target: Target, patterns: Mapping[str, int]) -> dict[str, int]:
    """Expands ``{glob pattern: C}`` over the target's site names, in pattern order.

    Raises if a pattern matches nothing or a site is matched by two patterns.
    """
    if not patterns:
        raise ValueError("No sites to decompose: pass at least one {pattern: C} entry.")
    chosen: dict[str, int] = {}
    by: dict[str, str] = {}
    for pattern, C in patterns.items():
        if not isinstance(C, int) or isinstance(C, bool) or C <= 0:
            raise ValueError(f"Site pattern {pattern!r}: C must be a positive int, got {C!r}.")
        hits = [name for name in target.sites if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(
                f"Site pattern {pattern!r} matches no decomposable site. "
                f"Available sites: {sorted(target.sites)}."
            )
        for name in hits:
            if name in chosen:
                raise ValueError(f"Site {name!r} is matched by both {by[name]!r} and {pattern!r}.")
            chosen[name], by[name] = C, pattern
    return chosen


@dataclasses.dataclass(frozen=True, eq=False)
class Decomposition:
    """Static description of an SPD decomposition of ``target``.

    Build it with :func:`decompose`. All methods are pure functions of their array arguments.
    """

    target: Target
    site_names: tuple[str, ...]
    C: Mapping[str, int]
    ties: Mapping[str, str]
    ci_fn: str = "mlp"
    ci_hidden: tuple[int, ...] = (16,)
    sigmoid: str = "leaky_hard"
    tie_mode: str = "shared"

    # -- structure -------------------------------------------------------------------------
    def site(self, name: str) -> Site:
        return self.target.sites[name]

    @property
    def owners(self) -> tuple[str, ...]:
        """Sites that hold their own factors: all but the tied ones, unless ``tie_mode="aliased"``."""
        if self.tie_mode == "aliased":
            return self.site_names
        return tuple(n for n in self.site_names if n not in self.ties)

    def factors(self, params: Params, name: str) -> tuple[Array, Array]:
        """``(V (d_in, C), U (C, d_out))`` of a site, resolving ties."""
        if name in self.ties and self.tie_mode == "shared":
            owner = params["components"][self.ties[name]]
            return owner["U"].T, owner["V"].T
        f = params["components"][name]
        return f["V"], f["U"]

    def component_weight(self, params: Params, name: str) -> Array:
        """``V @ U`` with shape ``(d_in, d_out)``: the sum of all subcomponents of a site."""
        V, U = self.factors(params, name)
        return V @ U

    # -- init -------------------------------------------------------------------------------
    def init(self, key: Array, target_params: Any, *, init: str = "paper") -> Params:
        """Initial factors (``init`` = ``"paper"`` or ``"gaussian"``) and CI functions."""
        kc, kg = jax.random.split(key)
        comps = {}
        for i, name in enumerate(n for n in self.owners if n not in self.ties):
            W = self.site(name).weight(target_params)
            comps[name] = comp_lib.init_components(
                jax.random.fold_in(kc, i), W, self.C[name], init=init
            )
        for tied, owner in self.ties.items():
            if tied in self.owners:  # aliased: a copy of the owner's transpose
                comps[tied] = {"V": comps[owner]["U"].T, "U": comps[owner]["V"].T}
        cis = {}
        for i, name in enumerate(self.site_names):
            cis[name] = ci_lib.init_ci(
                jax.random.fold_in(kg, i),
                self.ci_fn,
                C=self.C[name],
                d_in=self.site(name).d_in,
                hidden=self.ci_hidden,
            )
        return {"components": comps, "ci": cis}

    # -- forward passes ---------------------------------------------------------------------
    def clean_forward(self, target_params: Any, x: Any) -> tuple[Any, dict[str, Array]]:
        """Target output and the input of every decomposed site."""
        out, inputs = self.target.forward(target_params, x, {})
        missing = [n for n in self.site_names if n not in inputs]
        if missing:
            raise ValueError(
                f"Sites {missing} were never called in the target's forward pass (for a linen/nnx "
                "model: they are not applied as Dense/Linear/Embed layers)."
            )
        return out, {n: inputs[n] for n in self.site_names}

    def site_fn(self, params: Params, target_params: Any, name: str, mask: Array | None):
        """``site_input -> ((acts * mask) @ U + bias)`` for one site; ``mask=None`` means all ones."""
        V, U = self.factors(params, name)
        site = self.site(name)
        bias = None if site.bias is None else site.bias(target_params)

        def fn(x):
            return comp_lib.masked_output(comp_lib.inner_acts(site.kind, V, x), U, mask, bias)

        return fn

    def forward(
        self, target_params: Any, params: Params, x: Any, masks: Mapping[str, Array | None]
    ) -> Any:
        """Forward with the sites in ``masks`` replaced by masked components; others use ``W``."""
        replace = {n: self.site_fn(params, target_params, n, m) for n, m in masks.items()}
        return self.target.forward(target_params, x, replace)[0]

    # -- causal importance -----------------------------------------------------------------
    def causal_importance(
        self, params: Params, site_inputs: Mapping[str, Array]
    ) -> dict[str, CausalImportance]:
        """CI of every site from clean site inputs (gradients flow into V through inner acts)."""
        sig = get_sigmoid(self.sigmoid)
        out = {}
        for name in self.site_names:
            x = site_inputs[name]
            V, _ = self.factors(params, name)
            acts = comp_lib.inner_acts(self.site(name).kind, V, x) if self.ci_fn == "mlp" else None
            pre = ci_lib.apply_ci(self.ci_fn, params["ci"][name], acts, x)
            out[name] = CausalImportance(lower=sig.lower(pre), upper=sig.upper(pre), pre=pre)
        return out


def decompose(
    target: Target,
    sites: Mapping[str, int],
    *,
    ties: Mapping[str, str] | None = None,
    ci_fn: str = "mlp",
    ci_hidden: Sequence[int] = (16,),
    sigmoid: str = "leaky_hard",
    tie_mode: str = "shared",
) -> Decomposition:
    """Chooses the sites to decompose by glob pattern and validates the whole setup up front.

    Args:
      target: the model (see :mod:`spdjax.target`, :mod:`spdjax.adapters`).
      sites: ``{pattern: C}``, e.g. ``{"layers_*/mlp_in": 100, "layers_*/mlp_out": 100}``.
      ties: ``{tied_site: owner_site}``; the tied site's weight must be the owner's transpose.
      ci_fn: ``"mlp"`` (paper), ``"vector_mlp"`` or ``"shared_mlp"``.
      ci_hidden: hidden widths of the CI functions (paper: ``(16,)``).
      sigmoid: see :mod:`spdjax.sigmoids` (paper: ``"leaky_hard"``).
      tie_mode: ``"shared"`` or ``"aliased"`` (the reference's two updates; module docstring).
    """
    if tie_mode not in TIE_MODES:
        raise ValueError(f"Unknown tie_mode {tie_mode!r}; expected one of {TIE_MODES}.")
    C = match_sites(target, sites)
    ties = dict(ties or {})
    for tied, owner in ties.items():
        for n in (tied, owner):
            if n not in C:
                raise ValueError(f"Tied site {n!r} is not among the decomposed sites {sorted(C)}.")
        if owner in ties:
            raise ValueError(f"Tie chain {tied!r} -> {owner!r} -> {ties[owner]!r} is not supported.")
        a, b = target.sites[tied], target.sites[owner]
        if (a.d_in, a.d_out) != (b.d_out, b.d_in) or C[tied] != C[owner]:
            raise ValueError(
                f"Cannot tie {tied!r} {(a.d_in, a.d_out)}, C={C[tied]} to the transpose of "
                f"{owner!r} {(b.d_in, b.d_out)}, C={C[owner]}."
            )
    ci_lib.get_ci_kind(ci_fn)
    ci_lib._check_hidden(ci_fn, tuple(ci_hidden))
    get_sigmoid(sigmoid)
    embeds = [n for n in C if target.sites[n].kind == "embed"]
    if embeds and ci_fn != "mlp":
        raise ValueError(f"Embedding sites {embeds} need ci_fn='mlp' (their input is token ids).")
    return Decomposition(
        target=target,
        site_names=tuple(C),
        C=C,
        ties=ties,
        ci_fn=ci_fn,
        ci_hidden=tuple(int(h) for h in ci_hidden),
        sigmoid=sigmoid,
        tie_mode=tie_mode,
    )


def ones_masks(ci: Mapping[str, CausalImportance]) -> dict[str, Array]:
    """All-ones masks with the shape of each site's CI."""
    return {n: jnp.ones_like(c.lower) for n, c in ci.items()}
