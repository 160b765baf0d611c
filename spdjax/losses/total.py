"""Loss terms as values, their registry, and the weighted total.

A loss term is any function ``loss(params, ctx, key, **options) -> scalar``. :func:`term`
binds one (a registered name or your own function) to a coefficient and keyword options and
checks the options against its signature; :func:`total_loss` sums bound terms. Configs name their
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

from spdjax.losses import adversarial
from spdjax.losses.adversarial import (persistent_pgd_recon, pgd_recon, pgd_recon_layerwise,
                                      pgd_recon_subset)
from spdjax.losses.context import Context
from spdjax.losses.divergences import DIVERGENCES
from spdjax.losses.recon import (ci_masked_recon, ci_masked_recon_layerwise,
                                 stochastic_hidden_acts_recon, stochastic_recon,
                                 stochastic_recon_layerwise, stochastic_recon_subset,
                                 unmasked_recon)
from spdjax.losses.regularisers import faithfulness, frequency_minimality, importance_minimality
from spdjax.core.masks import SAMPLERS
from spdjax.core.registry import Registry
from spdjax.core.routing import make_router

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
})
# Options whose string values name a registered value.
_NAMED_OPTIONS = {"sampling": SAMPLERS, "divergence": DIVERGENCES}
# Options with a valid range, checked when a term is bound: (test, what is expected).
_OPTION_CHECKS = {
    "n_samples": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  "an integer >= 1"),
    "pnorm": (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
              "a finite number > 0"),
    "p_anneal_final_p": (lambda v: v is None or (isinstance(v, (int, float)) and v > 0),
                         "None or a number > 0"),
    "eps": (lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0"),
    "beta": (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
             "a finite number >= 0"),
    "delta": (lambda v: isinstance(v, bool), "true or false"),
    "n_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                "an integer >= 0"),
    "step_size": (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
                  "a finite number > 0"),
    "init": (lambda v: v in adversarial.INITS, f"one of {adversarial.INITS}"),
    "scope": (lambda v: v in adversarial.SCOPES, f"one of {adversarial.SCOPES}"),
    "routing_p": (lambda v: v is None or (isinstance(v, (int, float)) and 0 <= v <= 1),
                  "None or a number in [0, 1]"),
}


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
    if term_name not in LOSSES:
        return False
    param = inspect.signature(LOSSES.get(term_name)).parameters.get(option)
    if param is None or param.default is inspect.Parameter.empty:
        return False
    if option in _NAMED_OPTIONS and isinstance(value, str):
        try:
            value = _NAMED_OPTIONS[option].resolve(value)
        except (KeyError, ValueError):
            return False
    return value is param.default or (type(value) is type(param.default)
                                       and value == param.default)


def term(fn: str | LossFn, coeff: float, *, name: str | None = None, **options) -> Term:
    """Binds a loss (a name in :data:`LOSSES` or any ``loss(params, ctx, key, **options)``).

    Unknown names, option names the function does not take, missing required options and
    unknown sampler/divergence names fail here, not mid-run.
    """
    label = fn if isinstance(fn, str) else (name or getattr(fn, "__name__", None))
    fn = LOSSES.resolve(fn)
    if not callable(fn) or not label:
        raise ValueError(f"A loss term must be a registered name or a named function; got {fn!r}.")
    try:
        coeff = float(coeff)
    except (TypeError, ValueError):
        raise ValueError(f"Loss {label!r}: coeff must be a number, got {coeff!r}.") from None
    if not math.isfinite(coeff):
        raise ValueError(f"Loss {label!r}: coeff must be finite, got {coeff!r}.")
    for key, value in options.items():
        if key in _OPTION_CHECKS and not _OPTION_CHECKS[key][0](value):
            raise ValueError(f"Loss {label!r}: {key} must be {_OPTION_CHECKS[key][1]}, "
                             f"got {value!r}.")
    options = {k: (_NAMED_OPTIONS[k].resolve(v) if k in _NAMED_OPTIONS else v)
               for k, v in options.items()}
    if options.get("router") is not None or "routing_p" in options:  # checked together here
        make_router(options.get("router", "uniform_k"), options.get("routing_p"))
    if hasattr(fn, "adversary_init"):  # its state lives in params["adversary"][name]
        options["term_name"] = name or label
    try:
        inspect.signature(fn).bind(None, None, None, **options)
    except TypeError as e:
        allowed = [p.name for p in inspect.signature(fn).parameters.values()
                   if p.kind == inspect.Parameter.KEYWORD_ONLY]
        raise ValueError(f"Loss {label!r}: bad options {sorted(options)} ({e}); "
                         f"allowed: {allowed}.") from None
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


def terms_from_config(loss_config: Mapping[str, Mapping[str, Any]]) -> list[Term]:
    """``{name: {"coeff": float, **options}}`` -> bound :class:`Term` values (config order)."""
    if not loss_config:
        raise ValueError("The loss config is empty: name at least one loss term with a coeff.")
    terms = []
    for name, opts in loss_config.items():
        LOSSES.get(name)
        opts = dict(opts)
        if "coeff" not in opts:
            raise ValueError(f"Loss {name!r} needs a 'coeff'; got options {sorted(opts)}.")
        terms.append(term(name, opts.pop("coeff"), **opts))
    return terms


def make_total_loss(loss_config: Mapping[str, Mapping[str, Any]]):
    """:func:`total_loss` of a config dict, e.g. ``{"faithfulness": {"coeff": 1.0},
    "importance_minimality": {"coeff": 3e-3, "pnorm": 1.0}}``."""
    return total_loss(terms_from_config(loss_config))
