"""Loss terms as values, their registry, and the weighted total.

A loss term is any function ``loss(params, ctx, key, **options) -> scalar``. :func:`term`
binds one (a registered name or your own function) to a coefficient and keyword options and
checks the options against its signature and the checks the function declares
(:mod:`spdjax.losses.checks`); :func:`total_loss` sums bound terms. Configs name their
terms (``{"stochastic_recon": {"coeff": 1.0, "n_samples": 1}}``): :func:`make_total_loss`
resolves those names (and option values that name a mask sampler or a divergence) once, here.

Each term draws its randomness from :func:`term_key`, which depends only on the term's name, so
adding a term never changes the masks of another.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax

from spdjax.losses.adversarial import pgd_recon, pgd_recon_layerwise, pgd_recon_subset
from spdjax.losses.context import Context
from spdjax.losses.checks import declared_checks
from spdjax.losses.persistent_pgd import persistent_pgd_recon, stochastic_pgd_recon_subset
from spdjax.losses.recon import (ci_masked_recon, ci_masked_recon_layerwise,
                                 stochastic_hidden_acts_recon, stochastic_recon,
                                 stochastic_recon_layerwise, stochastic_recon_subset,
                                 unmasked_recon)
from spdjax.losses.locality import nonlinearity_locality
from spdjax.losses.minimality import (nested_frequency_minimality, nested_frequency_minimality_ema,
                                      smooth_l0_importance_minimality)
from spdjax.losses.regularisers import (delta_l2, faithfulness, frequency_minimality,
                                        importance_minimality)
from spdjax.core.registry import Registry

Array = jax.Array
LossFn = Callable[..., Array]

LOSSES: Registry[LossFn] = Registry("loss", {
    "faithfulness": faithfulness,
    "stochastic_recon": stochastic_recon,
    "stochastic_recon_layerwise": stochastic_recon_layerwise,
    "importance_minimality": importance_minimality,
    "ci_masked_recon": ci_masked_recon,
    "ci_masked_recon_layerwise": ci_masked_recon_layerwise,
    "unmasked_recon": unmasked_recon,
    "stochastic_recon_subset": stochastic_recon_subset,
    "stochastic_hidden_acts_recon": stochastic_hidden_acts_recon,
    "frequency_minimality": frequency_minimality,
    "pgd_recon": pgd_recon,
    "pgd_recon_subset": pgd_recon_subset,
    "pgd_recon_layerwise": pgd_recon_layerwise,
    "persistent_pgd_recon": persistent_pgd_recon,
    "stochastic_pgd_recon_subset": stochastic_pgd_recon_subset,
    "smooth_l0_importance_minimality": smooth_l0_importance_minimality,
    "nested_frequency_minimality": nested_frequency_minimality,
    "nested_frequency_minimality_ema": nested_frequency_minimality_ema,
    "nonlinearity_locality": nonlinearity_locality,
    "delta_l2": delta_l2,
})
@dataclasses.dataclass(frozen=True)
class Term:
    """A loss function bound to its weight and options; ``name`` keys its metrics and its PRNG."""

    name: str
    fn: LossFn
    coeff: float
    options: Mapping[str, Any]

    def __call__(self, params, ctx: Context, key) -> Array:
        """The unweighted value, with this term's own key derived from ``key``."""
        return self.fn(params, ctx, term_key(key, self.name), **self.options)


def is_default_option(term_name: str, option: str, value: Any) -> bool:
    """Whether ``value`` is what the loss term ``term_name`` uses when ``option`` is not given
    (so a config that spells it out and one that leaves it out train the same)."""
    term_name = term_name.partition("@")[0]  # an instance of a loss: the loss's defaults
    if term_name not in LOSSES:
        return False
    param = inspect.signature(LOSSES.get(term_name)).parameters.get(option)
    if param is None or param.default is inspect.Parameter.empty:
        return False
    check = declared_checks(LOSSES.get(term_name)).checks.get(option)
    if check is not None and check.resolve is not None and isinstance(value, str):
        try:
            value = check.resolve(value)
        except (KeyError, ValueError):
            return False
    return value is param.default or (type(value) is type(param.default)
                                       and value == param.default)


def term(fn: str | LossFn, coeff: float, *, name: str | None = None, **options) -> Term:
    """Binds a loss (a name in :data:`LOSSES` or any ``loss(params, ctx, key, **options)``).

    Unknown names, option names the function does not take and missing required options fail
    here, not mid-run; so do option values that fail the checks the function declared with
    :func:`spdjax.losses.checks.options` (only its own: a user term's ``init`` is not PGD's).
    """
    label = name or (fn if isinstance(fn, str) else getattr(fn, "__name__", None))
    fn = LOSSES.resolve(fn)
    if not callable(fn) or not label:
        raise ValueError(f"A loss term must be a registered name or a named function; got {fn!r}.")
    try:
        coeff = float(coeff)
    except (TypeError, ValueError):
        raise ValueError(f"Loss {label!r}: coeff must be a number, got {coeff!r}.") from None
    if not math.isfinite(coeff) or coeff < 0:
        raise ValueError(f"Loss {label!r}: coeff must be a finite number >= 0 (a term is "
                         f"minimised; a negative coeff maximises it), got {coeff!r}.")
    declared = declared_checks(fn)
    options = dict(options)
    for key, check in declared.checks.items():
        if key not in options:
            continue
        value = options[key]
        if not check.test(value):
            raise ValueError(f"Loss {label!r}: {key} must be {check.expected}, got {value!r}.")
        if check.resolve is not None:
            try:
                options[key] = check.resolve(value)
            except ValueError as e:
                raise ValueError(f"Loss {label!r}, option {key}: {e}") from None
    if hasattr(fn, "adversary_init"):  # its state lives in params["adversary"][name]
        options["term_name"] = name or label
    signature = inspect.signature(fn)
    try:
        bound = signature.bind(None, None, None, **options)
    except TypeError as e:
        allowed = [p.name for p in signature.parameters.values()
                   if p.kind == inspect.Parameter.KEYWORD_ONLY]
        raise ValueError(f"Loss {label!r}: bad options {sorted(options)} ({e}); "
                         f"allowed: {allowed}.") from None
    if declared.together:
        bound.apply_defaults()
        given = dict(list(bound.arguments.items())[3:])
        for check_together in declared.together:
            try:
                check_together(given)
            except ValueError as e:
                raise ValueError(f"Loss {label!r}: {e}") from None
    return Term(name=name or label, fn=fn, coeff=coeff, options=options)


def term_key(key: Array, name: str) -> Array:
    """A key per loss term that depends only on the term's name (so terms draw independently)."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def total_loss(terms: Sequence[Term]):
    """``total(params, ctx, key, coeffs=None) -> (sum_t coeff_t * value_t, {name: value_t})``.

    ``coeffs`` (``{term name: value}``, e.g. traced arrays) replaces the bound coefficients of the
    terms it names, so the coefficients can be inputs of a compiled step rather than constants.
    """
    terms = list(terms)
    if not terms:
        raise ValueError("No loss terms: name at least one loss term with a coeff.")
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"Loss term names must be unique; got {names}.")

    def total(params, ctx: Context, key, coeffs: Mapping[str, Any] | None = None):
        values = {t.name: t(params, ctx, key) for t in terms}
        weights = {t.name: t.coeff for t in terms}
        if coeffs is not None:  # traced values: a coefficient sweep is one compiled program
            unknown = sorted(set(coeffs) - set(weights))
            if unknown:
                raise ValueError(f"coeffs for {unknown}, which are not loss terms; expected "
                                 f"some of {sorted(weights)}.")
            weights.update(coeffs)
        return sum(weights[t.name] * values[t.name] for t in terms), values

    return total


def loss_of(name: str) -> str:
    """The registered loss a config key names: ``"stochastic_recon@context"`` is a second
    instance of ``stochastic_recon`` (its own coefficient, options, metrics and PRNG stream),
    so one loss can enter a config twice, e.g. with two divergences."""
    base, at, label = name.partition("@")
    if at and (not label or "@" in label or not label.replace("_", "").isalnum()):
        raise ValueError(f"Loss term {name!r}: an instance label after '@' must be letters, "
                         f"digits or '_' (e.g. 'stochastic_recon@context').")
    return base


def terms_from_config(loss_config: Mapping[str, Mapping[str, Any]]) -> list[Term]:
    """``{name: {"coeff": float, **options}}`` -> bound :class:`Term` values (config order).

    A name is a registered loss, or one with an instance label (``"<loss>@<label>"``,
    :func:`loss_of`) to use the same loss twice."""
    if not loss_config:
        raise ValueError("The loss config is empty: name at least one loss term with a coeff.")
    terms = []
    for name, opts in loss_config.items():
        base = loss_of(name)
        LOSSES.get(base)
        opts = dict(opts)
        if "coeff" not in opts:
            raise ValueError(f"Loss {name!r} needs a 'coeff'; got options {sorted(opts)}.")
        terms.append(term(base, opts.pop("coeff"), name=name, **opts))
    return terms


def make_total_loss(loss_config: Mapping[str, Mapping[str, Any]]):
    """:func:`total_loss` of a config dict, e.g. ``{"faithfulness": {"coeff": 1.0},
    "importance_minimality": {"coeff": 3e-3, "pnorm": 1.0}}``."""
    return total_loss(terms_from_config(loss_config))
