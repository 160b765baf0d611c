"""Persistent PGD (VPD's adversary): mask sources that persist across training steps.

"Interpreting Language Model Parameters" (Bushnaq et al. 2026, "Method") trains against masks
``m = g + (1 - g) s`` whose sources ``s`` in [0, 1] are *ascended* on the reconstruction loss and
kept from one step to the next, so a few ascent steps per training step amount to a long attack.

State. A term's state lives in ``params["adversary"][term name]`` (checkpointed, resumed and
evaluated with the model)::

    {"sources": {site: [*source shape, C (+1 with delta)]}, "opt_state": {"000": leaf, ...}}

``opt_state`` holds the leaves of the source optimizer's state (float32; an integer step count is
stored as a float and cast back). The source shape is the ``scope``'s (the reference's names):

  ``single_source``           ``[C]``: one source for every example and position
  ``broadcast_across_batch``  ``[*positions, C]``: shared by the examples, free per position
  ``repeat_across_batch``     ``[n_sources, *positions, C]``: example ``b`` uses ``b % n_sources``
  ``per_batch_per_position``  ``[*batch_shape, C]``: one source per example and position
                              (a batch of another size, e.g. the evaluation's, cycles through them)

and with ``pool_size`` (``single_source`` or ``broadcast_across_batch`` only) the sources are a
pool ``[pool_size, ...]`` of cross-site particles: each call draws one row per example (with
replacement, the same rows for the warm-up and the final loss), used at every site. The shapes
past the batch axis come from ``batch_shape``, the site inputs' leading shape of a training batch
(``(batch,)`` or ``(batch, seq)``), needed by every scope but ``single_source``.

One training step, inside the loss (pure; the key gives every draw):

1. ``n_warmup_steps`` ascents of the source optimizer on the all-sites reconstruction loss with
   the model held constant (reference default 0; VPD's recipe 2);
2. the term's value at the warmed-up sources (constants for the model's gradient), averaged over
   ``n_samples`` draws of the routing (each call draws its own);
3. the outer ascent, from the gradient of that same value with respect to the sources, then
   clipped to [0, 1].

The new state (warm-up ascents and outer ascent, and the optimizer's moments) reaches the params
through :func:`spdjax.losses.adversarial.assign_state`, whose gradient is ``state - new``; the
term's ``adversary_optimizer`` is the matching assignment (``optax.sgd(1.0)``, see
:mod:`spdjax.methods.adversary`). So the source update does not depend on the term's coefficient,
and the warm-up is kept, as in the reference.

Source optimizers are values here (``optax.GradientTransformation``); a config names one
(``optimizer="adam", lr=0.01, optimizer_options={...}``) and :mod:`spdjax.methods.adversary` turns
the name into the value with :func:`spdjax.methods.optimizers.make`. Every update ascends: the
gradient is negated before the optimizer sees it.

Terms: :func:`persistent_pgd_recon` (all sites, or a routed subset with ``router``) and
:func:`stochastic_pgd_recon_subset`, VPD's merged term: each example is adversarial with
probability ``adv_fraction`` (persistent sources, every site) and stochastic otherwise (fresh
``U[0, 1]`` sources, a routed subset of sites), in one forward.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from spdjax.core.routing import Router, make_router, route
from spdjax.losses.adversarial import ADVERSARY, assign_state, masks_from_sources
from spdjax.losses.checks import (Check, boolean, nonnegative_int, one_of, optional_probability,
                                   options, positive_finite, positive_int, router_and_probability)
from spdjax.losses.context import Context
from spdjax.losses.divergences import DIVERGENCES, Divergence, mse
from spdjax.losses.recon import DIVERGENCE_OPTION, ROUTING_STREAM, output_divergence

Array = jax.Array
SCOPES = ("single_source", "broadcast_across_batch", "repeat_across_batch",
          "per_batch_per_position")
POOL_SCOPES = ("single_source", "broadcast_across_batch")
# VPD's source optimizer: Adam, beta = (0.5, 0.99), lr 0.01 (the paper's training recipe).
PAPER_ADAM_OPTIONS = {"b1": 0.5, "b2": 0.99}
_POOL, _ASSIGN, _UNIFORM = 0x504F4F4C, 0x41535347, 0x554E4946  # fold_in streams


def default_optimizer_options(name: Any) -> dict:
    """The source optimizer's options when a config gives none: VPD's Adam betas for
    ``"adam"``, the optimizer's own defaults otherwise."""
    return dict(PAPER_ADAM_OPTIONS) if name == "adam" else {}


def _optional_positive_int(v) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)


def _shape(v) -> bool:
    return v is None or (isinstance(v, (tuple, list)) and len(v) >= 1 and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in v))


optional_positive_int = Check(_optional_positive_int, "None or an integer >= 1")
optional_shape = Check(_shape, "None or a non-empty sequence of integers >= 1")
optimizer_value = Check(lambda v: isinstance(v, (str, optax.GradientTransformation)),
                        "an optimizer name or an optax.GradientTransformation")
optional_mapping = Check(lambda v: v is None or isinstance(v, Mapping), "None or a mapping")
probability = Check(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                    and 0 <= v <= 1, "a number in [0, 1]")


def scope_and_shapes(opts: Mapping[str, Any]) -> None:
    """``scope`` with what it needs: ``n_sources`` exactly for ``repeat_across_batch`` (and
    dividing the batch), ``batch_shape`` for every scope but ``single_source``, ``pool_size``
    only with ``single_source`` or ``broadcast_across_batch``."""
    scope, n, shape, pool = (opts.get("scope"), opts.get("n_sources"), opts.get("batch_shape"),
                             opts.get("pool_size"))
    if (scope == "repeat_across_batch") != (n is not None):
        raise ValueError(f"n_sources applies to (and is needed by) scope 'repeat_across_batch' "
                         f"only; got scope={scope!r}, n_sources={n!r}.")
    if scope != "single_source" and shape is None:
        raise ValueError(f"scope {scope!r} needs batch_shape, the site inputs' leading shape of "
                         "a training batch ((batch,) or (batch, seq)).")
    if n is not None and shape is not None and shape[0] % n:
        raise ValueError(f"n_sources={n} must divide the batch size {shape[0]}.")
    if pool is not None and scope not in POOL_SCOPES:
        raise ValueError(f"pool_size applies to scopes {POOL_SCOPES}, not {scope!r}.")


STATE_OPTIONS = {"scope": one_of(SCOPES), "n_sources": optional_positive_int,
                 "batch_shape": optional_shape, "pool_size": optional_positive_int,
                 "optimizer": optimizer_value, "lr": positive_finite,
                 "optimizer_options": optional_mapping, "n_warmup_steps": nonnegative_int,
                 "n_samples": positive_int, "delta": boolean, "lr_warmup_frac": probability,
                 **DIVERGENCE_OPTION}


# ------------------------------------------------------------------------------ the state


def source_shape(C: int, *, scope: str, batch_shape: Sequence[int] | None = None,
                 n_sources: int | None = None, pool_size: int | None = None) -> tuple:
    """One site's stored source shape (``C`` counts the delta channel if any)."""
    positions = tuple(batch_shape[1:]) if batch_shape is not None else ()
    lead = {"single_source": (), "broadcast_across_batch": positions,
            "repeat_across_batch": (n_sources, *positions),
            "per_batch_per_position": tuple(batch_shape or ())}[scope]
    return ((pool_size,) if pool_size is not None else ()) + lead + (C,)


def expand_sources(sources: Array, leading: tuple, *, scope: str,
                   rows: Array | None = None) -> Array:
    """Stored sources -> ``[*leading, C]`` (by broadcasting, tiling or, for a pool, the rows
    ``rows [batch]`` drawn for the examples)."""
    C = sources.shape[-1]
    if rows is not None:
        sources = sources[rows]  # [batch, *rest, C]
        rest = sources.shape[1:-1]
        pad = (1,) * (len(leading) - 1 - len(rest))
        return jnp.broadcast_to(sources.reshape(leading[0], *pad, *rest, C), (*leading, C))
    if scope in ("repeat_across_batch", "per_batch_per_position"):
        # Example b uses source b % n; a per-example scope meeting a batch of another size (the
        # evaluation's) cycles through its sources the same way.
        n = sources.shape[0]
        if sources.shape[1:-1] != tuple(leading[1:]):
            raise ValueError(f"{scope}: sources {sources.shape[:-1]} do not fit a batch of "
                             f"leading shape {tuple(leading)} (the positions must match); check "
                             "batch_shape.")
        if leading[0] != n:
            sources = sources[jnp.arange(leading[0]) % n]
    else:  # single_source, broadcast_across_batch: the missing leading axes broadcast
        sources = sources.reshape((1,) * (len(leading) + 1 - sources.ndim) + sources.shape)
    return jnp.broadcast_to(sources, (*leading, C))


def pool_rows(key: Array, batch: int, pool_size: int) -> Array:
    """``int [batch]``: the pool row of each example for one call (uniform, with replacement)."""
    return jax.random.randint(jax.random.fold_in(key, _POOL), (batch,), 0, pool_size)


def _ascent(opt: optax.GradientTransformation, sources, opt_state, grads, scale=1.0):
    """One ascent step: the optimizer on ``-grads``, its update times ``scale`` (the lr warm-up),
    then clipped to [0, 1]."""
    updates, opt_state = opt.update(jax.tree.map(jnp.negative, grads), opt_state, sources)
    return jax.tree.map(lambda s, u: jnp.clip(s + scale * u, 0.0, 1.0), sources,
                        updates), opt_state


def warmup_scale(step_frac, lr_warmup_frac: float):
    """The source lr's factor: linear from 0 to 1 over the first ``lr_warmup_frac`` of training
    (VPD's library: 0 -> 1 over 2.5%), 1 without a warm-up."""
    if not lr_warmup_frac:
        return 1.0
    return jnp.clip(step_frac / lr_warmup_frac, 0.0, 1.0)


def _stored(opt_state) -> dict:
    return {f"{i:03d}": jnp.asarray(leaf).astype(jnp.float32)
            for i, leaf in enumerate(jax.tree.leaves(opt_state))}


def _restored(opt: optax.GradientTransformation, sources, stored: Mapping[str, Array]):
    template = jax.eval_shape(opt.init, sources)
    leaves = jax.tree.leaves(template)
    return jax.tree.unflatten(jax.tree.structure(template),
                              [stored[f"{i:03d}"].astype(t.dtype) for i, t in enumerate(leaves)])


def source_optimizer(optimizer) -> optax.GradientTransformation:
    """The source optimizer as a value (names are resolved by :mod:`spdjax.methods.adversary`)."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    raise ValueError(f"Persistent PGD: the source optimizer {optimizer!r} is still a name; bind "
                     "the term through spdjax.methods (spd.method resolves it with "
                     "spdjax.methods.optimizers.make) or pass an optax.GradientTransformation.")


def init_state(decomposition, key, *, scope: str = "single_source",
               batch_shape: Sequence[int] | None = None, n_sources: int | None = None,
               pool_size: int | None = None, delta: bool = False,
               optimizer=None, **options) -> dict:
    """Initial state: sources ``U[0, 1)`` (one key per site) and the optimizer's initial state."""
    del options
    sources = {n: jax.random.uniform(jax.random.fold_in(key, i), source_shape(
        decomposition.C[n] + int(delta), scope=scope, batch_shape=batch_shape,
        n_sources=n_sources, pool_size=pool_size)) for i, n in enumerate(decomposition.site_names)}
    return {"sources": sources, "opt_state": _stored(source_optimizer(optimizer).init(sources))}


def assign_optimizer(**options) -> optax.GradientTransformation:
    """The state's optimizer in the training step: ``optax.sgd(1.0)`` descends the gradient
    ``state - new`` of :func:`~spdjax.losses.adversarial.assign_state`, landing on ``new``."""
    del options
    return optax.sgd(1.0)


# ------------------------------------------------------------------------------ the loss


def _persistent_loss(params, ctx: Context, key, *, term_name: str, scope: str,
                     pool_size: int | None, optimizer, n_warmup_steps: int, n_samples: int,
                     delta: bool, router: Router | None, adv_fraction: float | None,
                     divergence: Divergence, lr_warmup_frac: float = 0.0) -> Array:
    divergence = DIVERGENCES.resolve(divergence)
    opt = source_optimizer(optimizer)
    scale = warmup_scale(ctx.step_frac, lr_warmup_frac)
    sites = list(ctx.ci)
    lower = {n: ctx.ci[n].lower for n in sites}
    leading = tuple(lower[sites[0]].shape[:-1])
    state = params[ADVERSARY][term_name]
    persistent = jax.lax.stop_gradient(state["sources"])
    opt_state = _restored(opt, persistent, jax.lax.stop_gradient(state["opt_state"]))
    rows = pool_rows(key, leading[0], pool_size) if pool_size is not None else None
    const_params, const_lower = jax.lax.stop_gradient((params, lower))

    def recon(p, masks):
        return output_divergence(p, ctx, masks, divergence)

    def expanded(sources):
        return {n: expand_sources(s, leading, scope=scope, rows=rows) for n, s in sources.items()}

    def scoring(sources):  # the warm-up's loss: every example adversarial, every site
        return recon(const_params, masks_from_sources(expanded(sources), const_lower, None, delta))

    def value(sources, p, g):  # the term: mean over n_samples routing (and assignment) draws
        adv = expanded(sources)
        total = 0.0
        for j in range(n_samples):
            k = jax.random.fold_in(key, j)
            routing = (None if router is None else
                       route(jax.random.fold_in(k, ROUTING_STREAM), router, sites, leading))
            used = adv
            if adv_fraction is not None:
                flag = jax.random.bernoulli(jax.random.fold_in(k, _ASSIGN), adv_fraction,
                                            (leading[0],) + (1,) * (len(leading) - 1))
                used = {n: jnp.where(flag[..., None], adv[n], jax.random.uniform(
                    jax.random.fold_in(jax.random.fold_in(k, _UNIFORM), i), adv[n].shape))
                    for i, n in enumerate(sites)}
                if routing is not None:  # adversarial examples use every site
                    routing = {n: r | flag for n, r in routing.items()}
            total = total + recon(p, masks_from_sources(used, g, routing, delta))
        return total / n_samples

    def warm_up(carry, _):
        sources, o = carry
        return _ascent(opt, sources, o, jax.grad(scoring)(sources), scale), None

    (warm, opt_state), _ = jax.lax.scan(warm_up, (persistent, opt_state), None,
                                        length=n_warmup_steps)
    outer = jax.grad(value)(warm, const_params, const_lower)
    new_sources, new_opt_state = _ascent(opt, warm, opt_state, outer, scale)
    loss = value(warm, params, lower)
    new = {"sources": new_sources, "opt_state": _stored(new_opt_state)}
    return loss + assign_state(state, jax.lax.stop_gradient(new)).astype(loss.dtype)


@options(router_and_probability, scope_and_shapes, **STATE_OPTIONS,
         routing_p=optional_probability)
def persistent_pgd_recon(params, ctx: Context, key, *, scope: str = "single_source",
                         n_sources: int | None = None, batch_shape: Sequence[int] | None = None,
                         pool_size: int | None = None, optimizer="adam", lr: float = 0.01,
                         optimizer_options: Mapping | None = None, n_warmup_steps: int = 0,
                         n_samples: int = 1, delta: bool = False,
                         router: str | Router | None = None, routing_p: float | None = None,
                         divergence: Divergence = mse, lr_warmup_frac: float = 0.0,
                         term_name: str = "persistent_pgd_recon") -> Array:
    """D(f(x | persistent adversarial masks), f(x)) (reference ``PersistentPGDReconLoss``; with
    ``router``, e.g. ``"uniform_k"``, ``PersistentPGDReconSubsetLoss``).

    See the module docstring for the state, the scopes, the pool and one step's updates. ``lr``
    and ``optimizer_options`` (None: :func:`default_optimizer_options`) are applied where the
    optimizer name is resolved; ``lr_warmup_frac`` > 0 ramps the source lr linearly from 0 over
    that fraction of training (:func:`warmup_scale`).
    """
    del n_sources, batch_shape, lr, optimizer_options
    return _persistent_loss(
        params, ctx, key, term_name=term_name, scope=scope, pool_size=pool_size,
        optimizer=optimizer, n_warmup_steps=n_warmup_steps, n_samples=n_samples, delta=delta,
        router=None if router is None else make_router(router, routing_p), adv_fraction=None,
        divergence=divergence, lr_warmup_frac=lr_warmup_frac)


@options(router_and_probability, scope_and_shapes, **STATE_OPTIONS,
         routing_p=optional_probability, adv_fraction=probability)
def stochastic_pgd_recon_subset(params, ctx: Context, key, *, adv_fraction: float = 0.5,
                                scope: str = "single_source", n_sources: int | None = None,
                                batch_shape: Sequence[int] | None = None,
                                pool_size: int | None = None, optimizer="adam", lr: float = 0.01,
                                optimizer_options: Mapping | None = None,
                                n_warmup_steps: int = 0, n_samples: int = 1, delta: bool = False,
                                router: str | Router = "uniform_k",
                                routing_p: float | None = None, divergence: Divergence = mse,
                                lr_warmup_frac: float = 0.0,
                                term_name: str = "stochastic_pgd_recon_subset") -> Array:
    """VPD's merged reconstruction term: stochastic-subset and persistent-PGD reconstruction in
    one forward (reference ``MergedStochasticSubsetPPGDReconLoss``, and with ``pool_size``
    ``MergedStochasticSubsetPooledPPGDReconLoss``).

    Per draw, each example is adversarial with probability ``adv_fraction`` (the persistent
    sources, every site) or stochastic (fresh ``U[0, 1]`` sources on the subset of sites that
    ``router`` picks per position: a random number of random matrices). The coefficient is the
    total: coeff 1 with ``adv_fraction`` 0.5 replaces stochastic-subset 0.5 + persistent PGD 0.5
    in expectation. Only the adversarial examples' gradient reaches the sources.
    ``lr_warmup_frac`` as in :func:`persistent_pgd_recon`.
    """
    del n_sources, batch_shape, lr, optimizer_options
    return _persistent_loss(
        params, ctx, key, term_name=term_name, scope=scope, pool_size=pool_size,
        optimizer=optimizer, n_warmup_steps=n_warmup_steps, n_samples=n_samples, delta=delta,
        router=make_router(router, routing_p), adv_fraction=adv_fraction, divergence=divergence,
        lr_warmup_frac=lr_warmup_frac)


for _term in (persistent_pgd_recon, stochastic_pgd_recon_subset):
    _term.adversary_init = init_state
    _term.adversary_optimizer = assign_optimizer
