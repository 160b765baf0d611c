"""VPD's minimality terms: smooth-L0 importance minimality with an annealed ``gamma``, and the
frequency minimality that rides on it ("nested"), from the current batch or an EMA across steps.

Every term reads the upper-leaky CI ``sigma_up(gamma^l_{b,t,c})`` (``ctx.ci[site].upper``,
``[..., C]``) and reduces over all leading (batch, sequence) axes, so its value is the global
batch's under ``jit`` and sharding. Paper: "Interpreting Language Model Parameters" (Bushnaq et
al. 2026), sections "Optimizing for minimality", "Optimizing for simplicity" and the appendix
"Frequency minimality loss"; the smooth-L0 penalty and the frequency normalisation
``reference_datapoint_count`` follow the VPD library (goodfire-ai/param-decomp). Formulas,
options, defaults and VPD's values: docs/guides/losses.md, "VPD's minimality and locality terms".

Terms whose value couples examples through ``log2(1 + ...)`` of a batch sum declare it with a
``couples_examples(**options) -> bool`` attribute (see :func:`couples_examples`): split into
microbatches, such a term would see one chunk's sum, so SPD refuses that combination at config
check (:func:`spdjax.methods.spd.check_config`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from spdjax.losses.adversarial import ADVERSARY, assign_state
from spdjax.losses.checks import (Check, boolean, nonnegative, nonnegative_finite,
                                  optional_positive, options, positive_finite)
from spdjax.losses.context import Context

Array = jax.Array
EMA_HALFLIFE_MAX = 1e6  # past a run's length the EMA is a running mean; fp32 drift grows with h

fraction = Check(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                 and 0.0 <= v <= 1.0, "a fraction of training in [0, 1]")
positive_count = Check(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                       "an integer >= 1 (the datapoint count a' the frequency is normalised to)")
halflife = Check(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                 and 0 < v <= EMA_HALFLIFE_MAX,
                 f"a number of steps in (0, {EMA_HALFLIFE_MAX:g}]")


# ------------------------------------------------------------------------- schedules


def linear_anneal(step_frac, initial: float, start_frac: float = 1.0,
                  final: float | None = None, end_frac: float = 1.0) -> Array:
    """``initial`` before ``start_frac`` of training, linear to ``final`` at ``end_frac``, then
    ``final``; constant ``initial`` when ``final`` is None or ``start_frac >= 1`` (VPD's
    p- and gamma-annealing, paper appendix "p-annealing"). ``step_frac`` may be traced."""
    if final is None or start_frac >= 1.0:
        return jnp.asarray(initial, jnp.float32)
    frac = jnp.asarray(step_frac, jnp.float32)
    if end_frac > start_frac:
        t = jnp.clip((frac - start_frac) / (end_frac - start_frac), 0.0, 1.0)
    else:  # a step at start_frac == end_frac
        t = jnp.where(frac >= end_frac, 1.0, 0.0)
    return jnp.where(t >= 1.0, final, initial + (final - initial) * t).astype(jnp.float32)


def anneal_order(prefix: str) -> Callable[[Mapping[str, Any]], None]:
    """A joint check: ``{prefix}_anneal_end_frac >= {prefix}_anneal_start_frac``."""

    def check(opts: Mapping[str, Any]) -> None:
        start, end = opts.get(f"{prefix}_anneal_start_frac"), opts.get(f"{prefix}_anneal_end_frac")
        if start is not None and end is not None and end < start:
            raise ValueError(f"{prefix}_anneal_end_frac ({end}) must be >= "
                             f"{prefix}_anneal_start_frac ({start}).")

    check.__name__ = f"{prefix}_anneal_order"
    return check


def annealed_gamma(step_frac, gamma: float, start_frac: float = 1.0,
                   final_gamma: float | None = None, end_frac: float = 1.0) -> Array:
    """The smooth-L0 threshold ``gamma`` at ``step_frac`` of training (:func:`linear_anneal`)."""
    return linear_anneal(step_frac, gamma, start_frac, final_gamma, end_frac)


# ------------------------------------------------------------------------ per-value penalties


def smooth_l0(ci: Array, gamma, *, normalize_at_one: bool = False) -> Array:
    """Geman-McClure ``c^2 / (c^2 + gamma^2)`` per CI value (times ``1 + gamma^2`` with
    ``normalize_at_one``, so ``c = 1`` costs exactly 1 at every gamma). Flat at 0 and bounded
    (``|phi'| <= 0.65 / gamma``): no ``eps`` floor is needed; a count of active values as
    ``gamma -> 0``."""
    sq, g2 = ci * ci, jnp.square(gamma)
    phi = sq / (sq + g2)
    return (1.0 + g2) * phi if normalize_at_one else phi


def _per_component_sums(ctx: Context, penalty: Callable[[Array], Array],
                        answer_weight: float = 1.0) -> dict:
    """``{site: (S_c [C], N)}``: the sum over every leading axis of ``penalty(sigma_up)`` and
    the number of (batch, position) rows N; the last position's penalty counts ``answer_weight``
    times (sequence CI ``[batch, position, C]`` only)."""
    out = {}
    for name, c in ctx.ci.items():
        phi = penalty(c.upper)
        if answer_weight != 1.0:
            if phi.ndim < 3:
                raise ValueError(
                    f"answer_weight={answer_weight} weights the last sequence position, but site "
                    f"{name!r} has CI of shape {phi.shape}, not [batch, position, C]: use it on "
                    "sequence models (or leave it at 1.0).")
            phi = phi.at[..., -1, :].multiply(answer_weight)
        phi = phi.reshape(-1, phi.shape[-1])
        out[name] = (jnp.sum(phi, axis=0), phi.shape[0])
    return out


def _penalty(*, gamma, gamma_anneal_start_frac, gamma_anneal_final_gamma, gamma_anneal_end_frac,
             normalize_at_one, pnorm, p_anneal_start_frac, p_anneal_final_p, p_anneal_end_frac,
             eps, step_frac) -> Callable[[Array], Array]:
    if gamma is not None:
        g = annealed_gamma(step_frac, gamma, gamma_anneal_start_frac, gamma_anneal_final_gamma,
                           gamma_anneal_end_frac)
        return lambda ci: smooth_l0(ci, g, normalize_at_one=normalize_at_one)
    p = linear_anneal(step_frac, pnorm, p_anneal_start_frac, p_anneal_final_p, p_anneal_end_frac)
    return lambda ci: (ci + eps) ** p


# ------------------------------------------------------------------------- smooth-L0 imp-min

GAMMA_CHECKS = dict(gamma=positive_finite, gamma_anneal_start_frac=fraction,
                    gamma_anneal_final_gamma=optional_positive, gamma_anneal_end_frac=fraction,
                    normalize_at_one=boolean)


@options(anneal_order("gamma"), beta=nonnegative, answer_weight=nonnegative_finite, **GAMMA_CHECKS)
def smooth_l0_importance_minimality(
    params, ctx: Context, key=None, *, gamma: float, beta: float = 0.0,
    gamma_anneal_start_frac: float = 1.0, gamma_anneal_final_gamma: float | None = None,
    gamma_anneal_end_frac: float = 1.0, normalize_at_one: bool = False,
    answer_weight: float = 1.0,
) -> Array:
    """``sum_l sum_c [M_c + beta * M_c * log2(1 + S_c)]`` with ``S_c = sum_{b,t} phi(g_{b,t,c})``,
    ``M_c = S_c / (B T)`` and the smooth-L0 penalty ``phi(c) = c^2 / (c^2 + gamma^2)``
    (:func:`smooth_l0`) on the upper-leaky CI, ``gamma`` annealed linearly from ``gamma`` to
    ``gamma_anneal_final_gamma`` between the two fractions of training.

    The importance-minimality loss of the VPD paper (section "Optimizing for minimality") with
    ``|g|^p`` replaced by ``phi``; ``beta > 0`` fuses the paper's frequency minimality (appendix
    "Combined minimality loss in code") with the batch sum ``S_c`` inside the log.
    ``answer_weight`` (ours; sequence models) counts the last position's penalty that many times
    in ``S_c`` (``B T`` unchanged): with an answer-only reconstruction (``kl_answer``) the saving
    of switching a subcomponent off at the answer is otherwise ``1/T`` of its KL cost's footing.
    Returns a scalar.
    """
    del params, key
    g = annealed_gamma(ctx.step_frac, gamma, gamma_anneal_start_frac, gamma_anneal_final_gamma,
                       gamma_anneal_end_frac)
    total = jnp.zeros((), jnp.float32)
    for S, n in _per_component_sums(
            ctx, lambda ci: smooth_l0(ci, g, normalize_at_one=normalize_at_one),
            answer_weight).values():
        mean = S / n
        total = total + jnp.sum(mean)
        if beta:
            total = total + beta * jnp.sum(mean * jnp.log2(1.0 + S))
    return total


smooth_l0_importance_minimality.couples_examples = lambda beta=0.0, **_: beta > 0


# -------------------------------------------------------------- nested frequency minimality


def frequency_curve(f: Array, a) -> Array:
    """``Phi(f) = f * log2(1 + a f)``: the penalty on a firing frequency ``f`` (``a`` the
    reference datapoint count)."""
    return f * jnp.log2(1.0 + a * f)


def frequency_curve_slope(f: Array, a) -> Array:
    """``Phi'(f) = log2(1 + a f) + a f / ((1 + a f) ln 2)``."""
    af = a * f
    return jnp.log2(1.0 + af) + af / ((1.0 + af) * math.log(2.0))


def one_penalty(opts: Mapping[str, Any]) -> None:
    """Exactly one per-value penalty: ``gamma`` (smooth-L0) or ``pnorm`` (``(c + eps)^p``)."""
    if (opts.get("gamma") is None) == (opts.get("pnorm") is None):
        raise ValueError("give exactly one per-value penalty: gamma (smooth-L0, as the "
                         "importance-minimality term it rides on) or pnorm (the L_p penalty); got "
                         f"gamma={opts.get('gamma')!r}, pnorm={opts.get('pnorm')!r}.")


NESTED_CHECKS = dict(reference_datapoint_count=positive_count, gamma=optional_positive,
                     gamma_anneal_start_frac=fraction,
                     gamma_anneal_final_gamma=optional_positive, gamma_anneal_end_frac=fraction,
                     normalize_at_one=boolean, pnorm=optional_positive,
                     p_anneal_start_frac=fraction, p_anneal_final_p=optional_positive,
                     p_anneal_end_frac=fraction, eps=nonnegative)
NESTED_TOGETHER = (one_penalty, anneal_order("gamma"), anneal_order("p"))


_PENALTY_OPTIONS = tuple(inspect.signature(_penalty).parameters)[:-1]  # all but step_frac


def _frequencies(ctx: Context, options: Mapping[str, Any]) -> dict[str, Array]:
    """``{site: f_c [C]}``, ``f_c = mean_{b,t} phi(g_{b,t,c})``: the per-row firing frequency;
    ``phi`` from the penalty options (:func:`_penalty`'s) among a term's keyword ``options``."""
    phi = _penalty(step_frac=ctx.step_frac, **{k: options[k] for k in _PENALTY_OPTIONS})
    return {n: S / rows for n, (S, rows) in _per_component_sums(ctx, phi).items()}


@options(*NESTED_TOGETHER, **NESTED_CHECKS)
def nested_frequency_minimality(
    params, ctx: Context, key=None, *, reference_datapoint_count: int,
    gamma: float | None = None, gamma_anneal_start_frac: float = 1.0,
    gamma_anneal_final_gamma: float | None = None, gamma_anneal_end_frac: float = 1.0,
    normalize_at_one: bool = False, pnorm: float | None = None, p_anneal_start_frac: float = 1.0,
    p_anneal_final_p: float | None = None, p_anneal_end_frac: float = 1.0, eps: float = 1e-12,
) -> Array:
    """``sum_l sum_c f_c * log2(1 + a' f_c)``, ``f_c = mean_{b,t} phi(g_{b,t,c})`` over the
    whole batch, ``a'`` = ``reference_datapoint_count``; ``phi`` is the per-value penalty of the
    importance-minimality term it rides on: smooth-L0 at the annealed ``gamma``, or
    ``(c + eps)^p`` with ``pnorm`` (give one of the two, with that term's schedule).

    The VPD paper's frequency minimality (eq. ``freq_minimality``, appendix "Frequency
    minimality loss") with its batch count normalised out: at ``a' = B T`` it equals the paper's
    ``(1/BT) sum_{b,t,c} phi log2(1 + sum_{b',t'} phi)``, and it keeps that curvature at other
    batch sizes. Returns a scalar.
    """
    del params, key
    freqs = _frequencies(ctx, locals())
    return sum((jnp.sum(frequency_curve(f, reference_datapoint_count)) for f in freqs.values()),
               jnp.zeros((), jnp.float32))


nested_frequency_minimality.couples_examples = lambda **_: True


def ema_init(decomposition, key=None, **options) -> dict:
    """The EMA's state: ``{"ema": {site: zeros [C]}, "count": 0.}`` (float32, so the training
    step can assign it through a gradient)."""
    del key, options
    return {"ema": {n: jnp.zeros((decomposition.C[n],), jnp.float32)
                    for n in decomposition.site_names},
            "count": jnp.zeros((), jnp.float32)}


def ema_optimizer(**options) -> optax.GradientTransformation:
    """One SGD step of size 1 on the gradient ``state - new`` of
    :func:`~spdjax.losses.adversarial.assign_state`: the state becomes ``new``."""
    del options
    return optax.sgd(1.0)


def ema_frequency_penalty(freqs: Mapping[str, Array], ema: Mapping[str, Array], count,
                          halflife_steps: float, reference_datapoint_count: int
                          ) -> tuple[Array, dict[str, Array]]:
    """``(value, new_ema)``: ``new_ema = ema + (1 - d)(sg(f) - ema)``, ``d = 2^(-1/h)``; the
    debiased ``f_hat = new_ema / (1 - d^(count + 1))`` (``f_hat = f`` at the first step); value
    ``sum Phi(f_hat) + sg(Phi'(f_hat)) (f - sg(f))``: ``Phi(f_hat)``, with the gradient of the
    current batch at ``f_hat``'s slope. ``ema``/``count`` must be constants (the stored state).

    ``d`` is kept in log space: ``1 - d`` and ``1 - d^n`` via ``expm1``, finite for every
    ``h <= 1e6``."""
    log_decay = -math.log(2.0) / halflife_steps
    alpha = -math.expm1(log_decay)
    debias = -jnp.expm1(log_decay * (count + 1.0))
    value, new = jnp.zeros((), jnp.float32), {}
    for name, f in freqs.items():
        f_const = jax.lax.stop_gradient(f)
        new[name] = ema[name] + alpha * (f_const - ema[name])
        f_hat = new[name] / debias
        value = value + jnp.sum(
            frequency_curve(f_hat, reference_datapoint_count)
            + frequency_curve_slope(f_hat, reference_datapoint_count) * (f - f_const))
    return value, new


@options(*NESTED_TOGETHER, ema_halflife_steps=halflife, **NESTED_CHECKS)
def nested_frequency_minimality_ema(
    params, ctx: Context, key=None, *, reference_datapoint_count: int,
    ema_halflife_steps: float, gamma: float | None = None, gamma_anneal_start_frac: float = 1.0,
    gamma_anneal_final_gamma: float | None = None, gamma_anneal_end_frac: float = 1.0,
    normalize_at_one: bool = False, pnorm: float | None = None, p_anneal_start_frac: float = 1.0,
    p_anneal_final_p: float | None = None, p_anneal_end_frac: float = 1.0, eps: float = 1e-12,
    term_name: str = "nested_frequency_minimality_ema",
) -> Array:
    """:func:`nested_frequency_minimality` evaluated at a debiased exponential moving average of
    each ``f_c`` across training steps (half-life ``ema_halflife_steps`` steps) instead of the
    one-batch estimate (:func:`ema_frequency_penalty`); the gradient keeps the one-batch scale,
    so a coefficient transfers between the two terms.

    State: ``params["adversary"][term_name]`` (:func:`ema_init`), replaced each step by the new
    EMA and count through :func:`~spdjax.losses.adversarial.assign_state` (declared optimizer
    :func:`ema_optimizer`), whatever the coefficient. Returns a scalar.
    """
    del key
    state = params[ADVERSARY][term_name]
    stored = jax.lax.stop_gradient(state)
    freqs = _frequencies(ctx, locals())
    value, new_ema = ema_frequency_penalty(freqs, stored["ema"], stored["count"],
                                           ema_halflife_steps, reference_datapoint_count)
    new = {"ema": new_ema, "count": stored["count"] + 1.0}
    return value + assign_state(state, jax.lax.stop_gradient(new))


nested_frequency_minimality_ema.adversary_init = ema_init
nested_frequency_minimality_ema.adversary_optimizer = ema_optimizer
nested_frequency_minimality_ema.couples_examples = lambda **_: True


def couples_examples(fn, options: Mapping[str, Any]) -> bool:
    """Whether a loss function bound to ``options`` couples the batch's examples non-additively
    (a ``log2`` of a batch sum), so that averaging the gradients of microbatches is not the
    batch's gradient: its ``couples_examples(**options)`` attribute, False without one."""
    test = getattr(fn, "couples_examples", None)
    return bool(test(**options)) if test is not None else False
