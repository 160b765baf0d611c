"""A decomposition: which sites of a target are split into how many subcomponents, and how.

:class:`Decomposition` is static structure (hashable, safe to close over under ``jax.jit``). The
trainable state is a plain pytree::

    params = {"components": {owner_site: {"V": (d_in, C), "U": (C, d_out)}},
              "ci":         {site: <CI-function params>}}    # per-site CI functions
              "ci":         {"__global__": <its params>}}   # a global one (core/ci_global.py)

Tied sites (e.g. TMS, whose second layer is the transpose of the first) use
``V_tied = U_ownerᵀ`` and ``U_tied = V_ownerᵀ``; every site has its own CI function. Two ways to
hold them (``tie_mode``):

* ``"shared"``: the tied site has no factors of its own; one pair, one gradient (the sum of both
  uses), one optimizer update.
* ``"aliased"`` (the reference implementations): the tied site keeps its own copy, initialised to
  the owner's transpose, with its own gradient and optimizer state; the two updates are added to
  both copies by :func:`spdjax.methods.spd.make_optimizer`, so the copies stay equal. The
  reference's torch code does exactly this (two Parameters sharing storage, two Adam updates per
  step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import itertools
import re
import threading
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.sharding import PartitionSpec as P

from spdjax.core import components as comp_lib
from spdjax.core.ci import CIFunction, make_ci_fn
from spdjax.core.ci_global import GLOBAL, GlobalCIFunction, is_global
from spdjax.core.masks import SiteMask
from spdjax.core.sigmoids import SIGMOIDS, SigmoidPair
from spdjax.core.target import Mapped, Site, Target, check_batch, dense_input

Array = jax.Array
Params = dict
TIE_MODES = ("shared", "aliased")
# Dtypes of the decomposition's forward passes and CI functions (params stay float32).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class CausalImportance(NamedTuple):
    """CI of one site, each ``[..., C]``: ``lower`` (for masks), ``upper`` (imp-min), ``pre``."""

    lower: Array
    upper: Array
    pre: Array


_TRACED = threading.local()


@contextlib.contextmanager
def traced_input_checks():
    """While tracing inside this block, the value checks of :meth:`Decomposition.clean_forward`
    (finite inputs, token ids in ``[0, vocab)``) are also emitted for traced inputs, as
    ``jax.experimental.checkify`` checks: the traced function must then be run through
    ``checkify.checkify`` (:func:`spdjax.losses.checked` and the managed run's train step do
    both). Outside it, a traced input is checked for its shape and dtype only, so a plain
    ``jax.jit`` of a loss keeps working unchanged.

    The outermost block also numbers the checks it traces from 1 (checkify otherwise numbers
    them from one counter for the whole process), so equal functions lower to equal programs
    and a rebuilt train step, in this process or another, is served by the persistent
    compilation cache instead of compiling again (a tiny TMS run: 8.6 s CPU -> 2.2 s)."""
    depth = getattr(_TRACED, "depth", 0)
    _TRACED.depth = depth + 1
    numbering = contextlib.nullcontext() if depth else _checks_numbered_from_one()
    try:
        with numbering:
            yield
    finally:
        _TRACED.depth = depth


@contextlib.contextmanager
def _checks_numbered_from_one():
    """checkify's check numbers restart at 1 inside the block (its counter is
    ``jax._src.checkify.next_code``, not public: where a JAX lacks it, nothing changes). The
    numbers only need to be unique within one checked function, which the block traces whole."""
    from jax._src import checkify as checkify_impl  # the counter is not public API

    if not callable(getattr(checkify_impl, "next_code", None)):
        yield
        return
    previous = checkify_impl.next_code
    checkify_impl.next_code = itertools.count(1).__next__
    try:
        yield
    finally:
        checkify_impl.next_code = previous


def traced_checks_on() -> bool:
    """Inside :func:`traced_input_checks`?"""
    return getattr(_TRACED, "depth", 0) > 0


def _literal(text: str) -> str:
    """``text`` safe as a ``checkify.check`` format string (its braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


def ci_l0(ci_lower: Array, threshold: float) -> Array:
    """Mean over examples of the number of components with CI above ``threshold`` (``[..., C]``)."""
    return jnp.mean(jnp.sum((ci_lower > threshold).astype(jnp.float32), axis=-1))


def alive_components(ci_lower_batch: Any, threshold: float = 0.1) -> np.ndarray:
    """``(C,)`` bool: components whose CI exceeds ``threshold`` on at least one example.

    Pass a large eval batch ``[..., C]``; ``.sum()`` is the number of alive components.
    """
    g = np.asarray(ci_lower_batch, dtype=np.float64)
    return np.any(g.reshape(-1, g.shape[-1]) > threshold, axis=0)


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
        bad = [n for n in target.unsupported if fnmatch.fnmatchcase(n, pattern)]
        if not hits and bad:
            raise ValueError(f"Site pattern {pattern!r} matches only weights that cannot be "
                             "decomposed: " + "; ".join(
                                 f"{n!r}: {target.unsupported[n]}" for n in bad))
        if not hits:
            raise ValueError(
                f"Site pattern {pattern!r} matches no decomposable site. "
                f"Available sites: {sorted(target.sites)}."
            )
        for name in hits:
            if name in chosen:
                raise ValueError(f"Site {name!r} is matched by both {by[name]!r} and {pattern!r}.")
            chosen[name], by[name] = C, pattern
    _warn_partly_chosen(target, chosen, by)
    return chosen


_APPLICATION = re.compile(r"^(.*)#(\d+)$")


def _warn_partly_chosen(target: Target, chosen: Mapping[str, int], by: Mapping[str, str]) -> None:
    """Warns when the patterns choose some applications of a weight used more than once
    (``shared``, ``shared#2``, ...; :mod:`spdjax.core.tracing`) but not all of them."""
    groups: dict[str, list[str]] = {}
    for name in target.sites:
        m = _APPLICATION.match(name)
        groups.setdefault(m.group(1) if m else name, []).append(name)
    for base, names in groups.items():
        if len(names) < 2:
            continue
        hit = [n for n in names if n in chosen]
        missed = [n for n in names if n not in chosen]
        if hit and missed:
            patterns = sorted({by[n] for n in hit})
            warnings.warn(
                f"Site pattern {' and '.join(map(repr, patterns))} matches "
                f"{', '.join(map(repr, hit))} but not {', '.join(map(repr, missed))}: the same "
                f"weight {base!r} is applied {len(names)} times in one forward and only the "
                f"matched applications are decomposed (add e.g. {base + '#*'!r} to decompose "
                "the others too).", UserWarning, stacklevel=4)


@dataclasses.dataclass(frozen=True, eq=False)
class Decomposition:
    """Static description of an SPD decomposition of ``target``.

    Build it with :func:`decompose`. All methods are pure functions of their array arguments.
    """

    target: Target
    site_names: tuple[str, ...]
    C: Mapping[str, int]
    ties: Mapping[str, str]
    ci_fn: CIFunction | GlobalCIFunction
    sigmoid: SigmoidPair
    tie_mode: str = "shared"
    # Cost at scale (decompose's arguments): batch rows per output-divergence chunk (0: whole
    # batch; spdjax.losses.recon.output_divergence), CI functions rematerialised in the
    # backward, and the dtype the forwards and CI functions compute in.
    output_chunk: int = 0
    remat_ci: bool = False
    compute_dtype: str = "float32"
    # What evaluations and figures may rely on (the view every method's decomposition gives,
    # :class:`spdjax.methods.base.DecompositionView`): components are rank one, with
    # ``factors``, and :meth:`causal_importance` exists.
    rank_one = True

    # -- structure -------------------------------------------------------------------------
    def site(self, name: str) -> Site:
        return self.target.sites[name]

    @property
    def owners(self) -> tuple[str, ...]:
        """Sites that hold their own factors: all but the tied ones, unless
        ``tie_mode="aliased"``."""
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

    def check_params(self, params: Params) -> None:
        """Params must be this decomposition's: its sites, and factors of shapes
        ``V (d_in, C)``, ``U (C, d_out)`` (a shape check; free under ``jit``)."""
        if not isinstance(params, Mapping) or not {"components", "ci"} <= set(params) or (
                set(params) - {"components", "ci", "adversary"}):
            raise ValueError("Decomposition params must be {'components': ..., 'ci': ...} as "
                             "from Decomposition.init (plus 'adversary', the state of "
                             f"persistent PGD terms); got {type(params).__name__} "
                             f"{sorted(params) if isinstance(params, Mapping) else ''}.")
        ci_keys = {GLOBAL} if is_global(self.ci_fn) else set(self.site_names)
        if set(params["components"]) != set(self.owners) or set(params["ci"]) != ci_keys:
            raise ValueError(
                f"These params were built for another decomposition: factors for "
                f"{sorted(params['components'])} and CI for {sorted(params['ci'])}, but this one "
                f"has sites {list(self.site_names)} (factors for {list(self.owners)}, CI "
                f"params under {sorted(ci_keys)}: a "
                f"{'global' if is_global(self.ci_fn) else 'per-site'} CI function).")
        for name in self.owners:
            site, C = self.site(name), self.C[name]
            V, U = params["components"][name]["V"], params["components"][name]["U"]
            if tuple(V.shape) != (site.d_in, C) or tuple(U.shape) != (C, site.d_out):
                raise ValueError(
                    f"Site {name!r}: factors V {tuple(V.shape)}, U {tuple(U.shape)} do not fit "
                    f"this decomposition (V ({site.d_in}, {C}), U ({C}, {site.d_out})): params "
                    "built for another decomposition?")

    def component_weights(self, params: Params, name: str) -> Array:
        """``(C, d_in, d_out)``: every rank-one subcomponent ``V[:, c] U[c, :]`` of a site."""
        V, U = self.factors(params, name)
        return jnp.einsum("ic,co->cio", V, U)

    def component_weight(self, params: Params, name: str) -> Array:
        """``V @ U`` with shape ``(d_in, d_out)``: the sum of all subcomponents of a site."""
        V, U = self.factors(params, name)
        return V @ U

    # -- init -------------------------------------------------------------------------------
    def init(
        self, key: Array, target_params: Any, *,
        init: str | comp_lib.ComponentInit = comp_lib.init_paper,
    ) -> Params:
        """Initial factors (``init``: a :data:`~spdjax.core.components.ComponentInit`, e.g.
        ``init_paper`` or ``init_gaussian``, or its name) and CI functions."""
        init_fn = comp_lib.COMPONENT_INITS.resolve(init)
        kc, kg = jax.random.split(key)
        comps = {}
        for i, name in enumerate(n for n in self.owners if n not in self.ties):
            W = self.site(name).weight(target_params)
            comps[name] = init_fn(jax.random.fold_in(kc, i), W, self.C[name])
        for tied, owner in self.ties.items():
            if tied in self.owners:  # aliased: a copy of the owner's transpose
                comps[tied] = {"V": comps[owner]["U"].T, "U": comps[owner]["V"].T}
        if is_global(self.ci_fn):
            sites = {n: (self.site(n).d_in, self.C[n]) for n in self.site_names}
            return {"components": comps, "ci": {GLOBAL: self.ci_fn.init(kg, sites=sites)}}
        cis = {}
        for i, name in enumerate(self.site_names):
            cis[name] = self.ci_fn.init(
                jax.random.fold_in(kg, i), C=self.C[name], d_in=self.site(name).d_in
            )
        return {"components": comps, "ci": cis}

    def partition_specs(self, params: Params, model_axis: str) -> dict:
        """PartitionSpecs with the component axis C on ``model_axis`` (factors and CI params)."""
        comps = {n: {"V": P(None, model_axis), "U": P(model_axis, None)}
                 for n in params["components"]}
        cis = {n: self.ci_fn.partition_specs(p, model_axis) for n, p in params["ci"].items()}
        return {"components": comps, "ci": cis}  # a global function's: {GLOBAL: its specs}

    # -- compute dtype -----------------------------------------------------------------------
    @property
    def lowered(self) -> bool:
        """Whether the forwards and CI functions compute in a narrower dtype than float32."""
        return self.compute_dtype != "float32"

    def to_compute(self, tree: Any) -> Any:
        """``tree`` with its floating leaves in the compute dtype (ids and the rest unchanged).
        A cast inside the differentiated function: the float32 master params get float32
        gradients (the cast's transpose)."""
        if not self.lowered:
            return tree
        dtype = COMPUTE_DTYPES[self.compute_dtype]
        return jax.tree.map(
            lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating)
            else a, tree)

    def _to_float32(self, tree: Any) -> Any:
        if not self.lowered:
            return tree
        return jax.tree.map(
            lambda a: a.astype(jnp.float32) if jnp.issubdtype(jnp.result_type(a), jnp.floating)
            else a, tree)

    # -- forward passes ---------------------------------------------------------------------
    def clean_forward(self, target_params: Any, x: Any) -> tuple[Any, dict[str, Array]]:
        """Target output (float32) and the input of every decomposed site (in the compute
        dtype)."""
        check_batch(self.target, x)
        for leaf in jax.tree.leaves(x):
            if getattr(leaf, "size", 1) == 0:
                raise ValueError(f"The batch is an empty input of shape {tuple(leaf.shape)}: it "
                                 "holds no examples.")
        embeds = [n for n in self.site_names if self.site(n).kind == "embed"]
        if embeds:  # before the model runs: jnp.take wraps a negative id to vocab - |id|
            _check_no_negative_ids(embeds, x)
        out, inputs = self.target.forward(self.to_compute(target_params), self.to_compute(x), {})
        out = self._to_float32(out)
        check_sites_called(self.site_names, inputs)
        for name in self.site_names:
            _check_site_input(self.site(name), inputs[name])
        return out, {n: inputs[n] for n in self.site_names}

    def site_fn(self, params: Params, target_params: Any, name: str,
                mask: Array | SiteMask | None):
        """``site_input -> ((acts * mask) @ U + bias)`` for one site; ``mask=None`` means all ones.

        A :class:`~spdjax.core.masks.SiteMask` may add the delta component,
        ``m_delta * (x @ (W - V U))`` (differentiable in V and U; the later reference
        implementation's delta component), and route: where its routing mask is False the site
        gives its target output ``x @ W + bias`` instead.
        """
        V, U = self.to_compute(self.factors(params, name))
        site = self.site(name)
        target_params = self.to_compute(target_params)
        bias = None if site.bias is None else site.bias(target_params)
        m = mask if isinstance(mask, SiteMask) else SiteMask(component=mask)
        m = SiteMask(component=self.to_compute(m.component), delta=self.to_compute(m.delta),
                     routing=m.routing)
        W = site.weight(target_params) if m.delta is not None or m.routing is not None else None

        def fn(x):  # site.out: the output's coordinates (a Mapped input's post map)
            x = self.to_compute(x)
            if isinstance(x, Mapped) and x.factored:
                return _factored_output(site.apply(V, x), U, m, x, W, V, bias)
            b = site.out(bias, x)
            y = comp_lib.masked_output(site.apply(V, x), site.out(U, x), m.component, b)
            if m.delta is not None:
                y = y + m.delta[..., None] * site.apply(site.out(W - V @ U, x), x)
            if m.routing is not None:
                target_y = site.apply(site.out(W, x), x)  # x @ W, W[ids] or the convolution
                target_y = target_y if b is None else target_y + b
                y = jnp.where(m.routing[..., None], y, target_y)
            return y

        return fn

    def forward(
        self, target_params: Any, params: Params, x: Any,
        masks: Mapping[str, Array | SiteMask | None], *, with_inputs: bool = False,
    ) -> Any:
        """Forward with the sites in ``masks`` replaced by masked components; others use ``W``.

        ``with_inputs=True`` returns ``(output, {site: its input in this forward})``. The output
        is float32 whatever the compute dtype (the losses reduce in float32).
        """
        replace = {n: self.site_fn(params, target_params, n, m) for n, m in masks.items()}
        out, inputs = self.target.forward(self.to_compute(target_params), self.to_compute(x),
                                          replace)
        out = self._to_float32(out)
        return (out, inputs) if with_inputs else out

    # -- causal importance -----------------------------------------------------------------
    def causal_importance(
        self, params: Params, site_inputs: Mapping[str, Array], *,
        lower_noise: float = 0.0, key: Array | None = None,
    ) -> dict[str, CausalImportance]:
        """CI of every site from clean site inputs (gradients flow into V through inner acts).

        ``lower_noise`` ε > 0 feeds ``σ_lo`` with ``(1 + ε) r − ε u``, ``u ~ U[0, 1)`` drawn
        from ``key`` (site i: ``fold_in(key, i)``), while ``σ_up`` sees ``r``: the later
        reference's binomial-sampling quirk (ε = 0.05 in goodfire-ai/spd).
        """
        self.check_params(params)
        if lower_noise and key is None:
            raise ValueError("causal_importance: lower_noise needs a PRNG key.")
        sig = self.sigmoid
        ci_params = self.to_compute(params["ci"])
        pres = None
        if is_global(self.ci_fn):  # one network for every site's CI
            apply = self.ci_fn.apply
            if self.remat_ci and not getattr(self.ci_fn, "remat", False):
                apply = jax.checkpoint(apply)  # a transformer rematerialises block by block
            pres = apply(ci_params[GLOBAL], {n: self.to_compute(dense_input(site_inputs[n]))
                                             for n in self.site_names})
            pres = self._to_float32(pres)
            if set(pres) != set(self.site_names):
                raise ValueError(f"The global CI function gave CI for {sorted(pres)}, but this "
                                 f"decomposition has sites {list(self.site_names)}: params "
                                 "built for another decomposition?")
        out = {}
        for i, name in enumerate(self.site_names):
            if pres is not None:
                pre = pres[name]
            else:
                site_ci = functools.partial(self._site_ci, self.site(name))
                if self.remat_ci:  # the backward recomputes one site's CI at a time
                    site_ci = jax.checkpoint(site_ci)
                pre = site_ci(ci_params[name], self.factors(params, name)[0],
                              site_inputs[name]).astype(jnp.float32)
            lower_in = pre
            if lower_noise:
                u = jax.random.uniform(jax.random.fold_in(key, i), pre.shape, pre.dtype)
                lower_in = (1.0 + lower_noise) * pre - lower_noise * u
            out[name] = CausalImportance(lower=sig.lower(lower_in), upper=sig.upper(pre), pre=pre)
        return out


    def _site_ci(self, site: Site, ci_params: Any, V: Array, x: Array | Mapped) -> Array:
        """A per-site CI function's raw CI ``[..., C]`` from the site's input (and its inner
        acts ``x V``), in the compute dtype."""
        if not self.ci_fn.uses_inner_acts:
            return self.ci_fn.apply(ci_params, None, self.to_compute(dense_input(x)))
        x = self.to_compute(x)
        return self.ci_fn.apply(ci_params, site.apply(self.to_compute(V), x), x)


def _factored_output(acts: Array, U: Array, m: SiteMask, x: Mapped, W: Array | None, V: Array,
                     bias: Array | None) -> Mapped:
    """:meth:`Decomposition.site_fn`'s output for a ``factored`` input: the same sum as the
    dense output, ``(acts * m) U [+ m_delta x (W - V U)] [routed: + (1 - r) x W] + b``, kept as
    its narrow terms ``(coefficients, rows)`` for the sites that read it."""
    coef = acts if m.component is None else acts * m.component
    terms = [(coef, U)]
    if m.delta is not None:
        D = W - V @ U
        terms += [(m.delta[..., None] * xj, D if pj is None else pj @ D) for xj, pj in x.terms]
    if m.routing is not None:  # r * (components) + (1 - r) * (target), r in {0, 1} per example
        r = m.routing[..., None].astype(coef.dtype)
        terms = [(c * r, B) for c, B in terms] + [
            ((1.0 - r) * xj, W if pj is None else pj @ W) for xj, pj in x.terms]
    return Mapped.sum(terms, bias)  # both routing branches add the bias


def _check_site_input(site: Site, x: Array | Mapped) -> None:
    """A site's input must fit its weight: ``[..., d_in]`` floats, or integer ids for an
    embedding; never empty. Concrete (not traced) inputs are also checked for values: finite
    floats, ids in ``[0, vocab)``. A :class:`~spdjax.core.target.Mapped` input is checked as the
    ``x @ pre`` it stands for (its maps must fit ``d_in`` / ``d_out``)."""
    if isinstance(x, Mapped):
        pre_out = sorted({site.d_in if pre is None else pre.shape[-1] for _, pre in x.terms})
        post_in = site.d_out if x.post is None else x.post.shape[0]
        if site.kind != "linear" or (pre_out, post_in) != ([site.d_in], site.d_out):
            raise ValueError(
                f"Site {site.name!r} ({site.kind}, {site.d_in} -> {site.d_out}) got a Mapped input "
                f"whose maps give {pre_out} -> {post_in}: only a linear site takes one, and its "
                "pre maps must end in d_in and its post map start at d_out.")
        if x.factored and x.post is not None:
            raise ValueError(f"Site {site.name!r}: a Mapped input is either read through a post "
                             "map or factored, not both.")
        for xj, pre in x.terms:  # the values are those of x_j; its width must be pre_j's rows
            _check_site_input(site if pre is None else dataclasses.replace(
                site, d_in=pre.shape[0]), xj)
        return
    if x.size == 0:
        raise ValueError(f"Site {site.name!r} got an empty input of shape {tuple(x.shape)}: "
                         "the batch holds no examples.")
    if site.kind == "embed":
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"Embedding site {site.name!r} needs integer token ids; "
                             f"got {x.dtype}.")
    elif site.kind == "conv":
        pass  # an image; its layout is the convolution's own (checked by the model's trace)
    elif x.ndim < 1 or x.shape[-1] != site.d_in:
        raise ValueError(
            f"Site {site.name!r} expects inputs [..., {site.d_in}] (its d_in) but got shape "
            f"{tuple(x.shape)}: does the batch's last axis match the model's input width?"
        )
    if isinstance(x, jax.core.Tracer):
        if traced_checks_on():  # the same checks as checkify checks (traced_input_checks)
            if site.kind == "embed":
                lo, hi = jnp.min(x), jnp.max(x)
                checkify.check((lo >= 0) & (hi < site.d_in), _literal(
                    f"Embedding site {site.name!r}: token ids must be in [0, {site.d_in}); got "
                    "ids from ") + "{lo} to {hi}.", lo=lo, hi=hi)
            else:
                checkify.check(jnp.all(jnp.isfinite(x)), _literal(
                    f"Site {site.name!r}: its input holds NaN or inf (from the batch, or from "
                    "the target before it)."))
        return
    x = np.asarray(x)  # concrete: checked on the host, outside any trace
    if site.kind == "embed":
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= site.d_in:
            raise ValueError(f"Embedding site {site.name!r}: token ids must be in [0, "
                             f"{site.d_in}); got ids from {lo} to {hi}.")
    elif not np.isfinite(x).all():
        raise ValueError(f"Site {site.name!r}: its input holds NaN or inf (from the batch, or from "
                         "the target before it).")


def check_sites_called(site_names, called, method: str = "") -> None:
    """Raises ``ValueError`` naming the sites of ``site_names`` missing from ``called`` (the
    sites a forward pass called): their gradients would be silently zero. ``method`` prefixes
    the message (e.g. ``"L3D: "``)."""
    missing = [n for n in site_names if n not in called]
    if missing:
        raise ValueError(
            f"{method}Sites {missing} were never called in the target's forward pass on this "
            "input (a hand-written forward that skips them, or a traced model whose path "
            "depends on the input's shape); leave them out of the site patterns.")


def _check_no_negative_ids(embeds: list[str], x: Any) -> None:
    """A batch for a target with embedding sites: its integer leaves (token ids) must not be
    negative (checked on the host when concrete, by checkify under
    :func:`traced_input_checks`)."""
    for leaf in jax.tree.leaves(x):
        if not jnp.issubdtype(leaf.dtype, jnp.integer) or leaf.size == 0:
            continue
        what = _literal(f"Embedding sites {embeds}: token ids must be >= 0; the batch holds ")
        if isinstance(leaf, jax.core.Tracer):
            if traced_checks_on():
                lo = jnp.min(leaf)
                checkify.check(lo >= 0, what + "the id {lo}.", lo=lo)
            continue
        lo = int(np.min(np.asarray(leaf)))
        if lo < 0:
            raise ValueError(what.format() + f"the id {lo}.")


def decompose(
    target: Target,
    sites: Mapping[str, int],
    *,
    ties: Mapping[str, str] | None = None,
    ci_fn: str | CIFunction | GlobalCIFunction = "mlp",
    ci_hidden: Sequence[int] = (16,),
    ci_options: Mapping[str, Any] | None = None,
    sigmoid: str | SigmoidPair = "leaky_hard",
    tie_mode: str = "shared",
    output_chunk: int = 0,
    remat_ci: bool = False,
    compute_dtype: str = "float32",
) -> Decomposition:
    """Chooses the sites to decompose by glob pattern and validates the whole setup up front.

    Args:
      target: the model (see :mod:`spdjax.core.target`, :mod:`spdjax.core.adapters`).
      sites: ``{pattern: C}``, e.g. ``{"layers_*/mlp_in": 100, "layers_*/mlp_out": 100}``.
      ties: ``{tied_site: owner_site}``; the tied site's weight must be the owner's transpose.
      ci_fn: a CI function value (:mod:`spdjax.core.ci`, :mod:`spdjax.core.ci_global`, or your
        own with either protocol) or the name of a registered one: per site ``"mlp"`` (paper),
        ``"vector_mlp"``, ``"shared_mlp"``; global ``"global_mlp"``, ``"global_transformer"``
        (VPD), ``"chunkwise_transformer"``.
      ci_hidden: hidden widths, used only when ``ci_fn`` is a name of one with hidden layers
        (paper: ``(16,)``).
      ci_options: further options of a named CI function, e.g. ``{"d_model": 2048, "layers": 8,
        "heads": 16, "ff": 8192}`` (VPD's transformer); those it does not take are ignored.
      sigmoid: a :class:`~spdjax.core.sigmoids.SigmoidPair` or a registered name (paper:
        ``"leaky_hard"``).
      tie_mode: ``"shared"`` or ``"aliased"`` (the reference's two updates; module docstring).
      output_chunk: > 0 evaluates every output divergence (the reconstruction and PGD terms)
        this many batch rows at a time, rematerialised
        (:func:`spdjax.losses.recon.output_divergence`; the same value, less memory for a large
        vocabulary); 0: the whole batch at once.
      remat_ci: rematerialise the CI functions in the backward pass (``jax.checkpoint``: per
        site, or per block of a transformer CI function): the same values, less memory, one
        more CI forward.
      compute_dtype: ``"float32"`` or ``"bfloat16"``: the dtype the forwards (target, masked)
        and the CI functions compute in; params, outputs, CI and losses stay float32.
    """
    if tie_mode not in TIE_MODES:
        raise ValueError(f"Unknown tie_mode {tie_mode!r}; expected one of {TIE_MODES}.")
    check_cost_options(output_chunk=output_chunk, remat_ci=remat_ci, compute_dtype=compute_dtype)
    C = match_sites(target, sites)
    ties = dict(ties or {})
    for tied, owner in ties.items():
        for n in (tied, owner):
            if n not in C:
                raise ValueError(f"Tied site {n!r} is not among the decomposed sites {sorted(C)}.")
        if owner in ties:
            raise ValueError(f"Tie chain {tied!r} -> {owner!r} -> {ties[owner]!r} "
                             f"is not supported.")
        a, b = target.sites[tied], target.sites[owner]
        if (a.d_in, a.d_out) != (b.d_out, b.d_in) or C[tied] != C[owner]:
            raise ValueError(
                f"Cannot tie {tied!r} {(a.d_in, a.d_out)}, C={C[tied]} to the transpose of "
                f"{owner!r} {(b.d_in, b.d_out)}, C={C[owner]}."
            )
    ci_fn = make_ci_fn(ci_fn, ci_hidden, ci_options)
    if remat_ci and dataclasses.is_dataclass(ci_fn) and "remat" in {
            f.name for f in dataclasses.fields(ci_fn)}:
        ci_fn = dataclasses.replace(ci_fn, remat=True)  # its own, finer remat (per block)
    sigmoid = SIGMOIDS.resolve(sigmoid)
    embeds = [n for n in C if target.sites[n].kind in ("embed", "conv")]
    if embeds and not ci_fn.uses_inner_acts:
        raise ValueError(f"Embedding and convolution sites {embeds} need a per-site CI function "
                         "on inner activations (e.g. ci_fn='mlp'): their input is token ids or an "
                         f"image, not a [..., d_in] vector; got {ci_fn!r}.")
    return Decomposition(
        target=target,
        site_names=tuple(C),
        C=C,
        ties=ties,
        ci_fn=ci_fn,
        sigmoid=sigmoid,
        tie_mode=tie_mode,
        output_chunk=output_chunk,
        remat_ci=remat_ci,
        compute_dtype=compute_dtype,
    )


def check_cost_options(*, output_chunk: Any = 0, remat_ci: Any = False,
                       compute_dtype: Any = "float32") -> None:
    """:func:`decompose`'s memory and precision options (config fields of the same names),
    each refused with a ``ValueError`` naming the bad value and what is expected."""
    if not isinstance(output_chunk, int) or isinstance(output_chunk, bool) or output_chunk < 0:
        raise ValueError(f"output_chunk must be an integer >= 0 (batch rows per output-divergence "
                         f"chunk; 0: the whole batch at once), got {output_chunk!r}.")
    if not isinstance(remat_ci, bool):
        raise ValueError(f"remat_ci must be True or False, got {remat_ci!r}.")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"Unknown compute_dtype {compute_dtype!r}; expected one of "
                         f"{sorted(COMPUTE_DTYPES)} (params and losses stay float32).")
