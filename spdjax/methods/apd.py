"""APD, Attribution-based Parameter Decomposition (Braun et al. 2025): the method SPD replaced.

``C`` parameter components, each spanning *every* decomposed matrix, held in factorised form:
component ``c`` of site ``l`` is ``P_{c,l} = A_{c,l} B_{c,l}`` with ``A (C, d_in, m)``, ``B (C, m,
d_out)`` (``m``: the per-component rank). Per input, the components that matter are chosen by
gradient attributions and a batch top-k (APD paper, "Method"):

* attribution: ``a_c(x) = sum_o (sum_l <df_o/dh_l, x_l P_{c,l}>)^2``, the squared
  attribution-patching estimate of ablating ``P_c``, summed over the output dims ``o``; the
  gradients come from the target (``attribution="target"``, the reference code) or from the
  APD model's unmasked forward (``"apd"``, what the paper needed for TMS 5-2);
* batch top-k: the ``int(topk * batch)`` largest attributions of the whole ``[batch, C]``
  matrix are active;
* losses: faithfulness ``sum_l ||W_l - sum_c P_{c,l}||^2 / N``; minimality, the MSE of the
  forward with only the active components against the target's output; simplicity, the
  factorised Schatten-p norm of the active components,
  ``(1/(N B)) sum_b sum_c s_bc sum_l sum_m (|A_{c,l,:,m}|^2 |B_{c,l,m,:}|^2 + 1e-16)^(p/2)``.

Biases are not decomposed (they stay the target's). A tied site (TMS ``linear2 = linear1ᵀ``)
uses the transposed factors of its owner, so a component spans both, and counts twice in the
faithfulness and simplicity sums, as in the reference. ResidMLP adds the activation
reconstruction (:func:`act_recon`) and keeps ``A``'s columns at unit norm (:func:`unit_norm_A`).
``formulation="lp"``: the paper's L_p alternative (:func:`objective`), without top-k.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spdjax.core.decomposition import match_sites
from spdjax.methods.apd_decomposition import (APD_FANS, APD_INITS, APDDecomposition,  # noqa: F401
                                              decompose_apd, site_acts)
from spdjax.methods.apd_terms import (act_recon, attributions, batch_topk, faithfulness,
                                      lp_weights, schatten, schatten_weighted)
from spdjax.methods.base import Method, MethodSpec, refuse_spd_only_settings, register
from spdjax.core.target import Target

Array = jax.Array
ATTRIBUTIONS = ("target", "apd")
FORMULATIONS = ("topk", "lp")


def objective(d: APDDecomposition, *, topk: float, coeffs: Mapping[str, float], pnorm: float,
              attribution: str = "target", act_sites: tuple[str, ...] = (),
              formulation: str = "topk", lp_p: float = 1.0):
    """``(params, target_params, batch, key, step_frac, hparams=None) -> (total, metrics)``;
    ``hparams`` (``{term: coefficient}``, may be traced) replace ``coeffs``; ``act_sites``
    (with ``coeffs["act_recon"]``) adds the activation reconstruction.

    ``formulation="lp"`` is the APD paper's L_p alternative (its appendix; no top-k): the
    faithfulness, ``coeffs["lp_sparsity"]`` times the L_p minimality ``mean_b sum_c |A_c|^lp_p``
    (:func:`lp_weights`, differentiable in the components) and the Schatten term weighted by
    ``|A_c|^lp_p`` instead of the top-k mask (:func:`schatten_weighted`, the reference code's
    placement of the weight).
    """
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"Unknown APD attribution {attribution!r}; expected one of "
                         f"{ATTRIBUTIONS}.")
    if not 0 < pnorm <= 1:
        raise ValueError(f"APD: the Schatten p must be in (0, 1], got {pnorm!r}.")
    if formulation not in FORMULATIONS:
        raise ValueError(f"Unknown APD formulation {formulation!r}; expected one of "
                         f"{FORMULATIONS}.")
    if formulation == "lp":
        if not 0 < lp_p <= 1:
            raise ValueError(f"APD: the L_p formulation's p must be in (0, 1], got {lp_p!r}.")
        if act_sites:
            raise ValueError("APD's L_p formulation has no sparse forward to reconstruct "
                             "activations from: set act_recon_coeff to 0.")
        return _lp_objective(d, coeffs=coeffs, pnorm=pnorm, attribution=attribution, lp_p=lp_p,
                             topk=topk)

    def fn(params, target_params, batch, key, step_frac, hparams=None):
        del key, step_frac
        c = {**coeffs, **(hparams or {})}
        target_out, clean = jax.lax.stop_gradient(d.clean_forward(target_params, batch))
        active = batch_topk(attributions(d, target_params, params, batch, source=attribution),
                            topk)
        mask = active.astype(jnp.float32)
        out, inputs = d.forward(target_params, params, batch, {n: mask for n in d.site_names},
                                with_inputs=True)
        values = {"faithfulness": faithfulness(d, params, target_params),
                  "topk_recon": jnp.mean((out - target_out) ** 2),
                  "schatten": schatten(d, params, active, pnorm)}
        if act_sites:
            values["act_recon"] = act_recon(d, inputs, clean, act_sites)
        total = sum(c[k] * values[k] for k in values)
        return total, {"loss": {"total": total, **values},
                       "active_per_example": jnp.mean(jnp.sum(mask, axis=-1))}

    return fn


def _lp_objective(d: APDDecomposition, *, coeffs, pnorm: float, attribution: str, lp_p: float,
                  topk: float):
    def fn(params, target_params, batch, key, step_frac, hparams=None):
        del key, step_frac
        c = {**coeffs, **(hparams or {})}
        target_out = jax.lax.stop_gradient(d.clean_forward(target_params, batch)[0])
        weights = lp_weights(attributions(d, target_params, params, batch, source=attribution,
                                          differentiable=True), target_out.shape[-1], lp_p)
        values = {"faithfulness": faithfulness(d, params, target_params),
                  "lp_sparsity": jnp.mean(jnp.sum(weights, axis=-1)),
                  "schatten": schatten_weighted(d, params, weights, pnorm)}
        total = sum(c[k] * values[k] for k in values)
        # What top-k would keep: a reading of the attributions, not part of the loss.
        active = batch_topk(jax.lax.stop_gradient(weights), topk)
        return total, {"loss": {"total": total, **values},
                       "active_per_example": jnp.mean(jnp.sum(active, axis=-1))}

    return fn


def evaluate_fn(d: APDDecomposition, objective_fn, *, topk: float, attribution: str):
    """The objective's metrics and the components ever active on the evaluation batch."""
    objective_jit = jax.jit(objective_fn)
    active_jit = jax.jit(lambda p, tp, b: batch_topk(
        attributions(d, tp, p, b, source=attribution), topk))

    def fn(params, target_params, batch, key, *, microbatches: int = 1) -> dict:
        del microbatches  # top-k is over the whole batch: evaluated in one piece
        _, metrics = objective_jit(params, target_params, batch, key, 1.0)
        summary: dict[str, Any] = jax.tree.map(float, jax.device_get(metrics))
        summary["alive"] = int(np.sum(np.any(np.asarray(active_jit(params, target_params,
                                                                   batch)), axis=0)))
        return summary

    return fn


def unit_norm_A() -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """``(project, renormalise)`` around Adam, so each ``A`` column (over ``d_in``) keeps unit
    norm (the reference's ``unit_norm_matrices``): the gradient's part along the column is
    removed before Adam and the column renormalised after the update."""

    def each_A(fn, *trees):
        return {"components": {n: {"A": fn(*(t["components"][n]["A"] for t in trees)),
                                   "B": trees[0]["components"][n]["B"]}
                               for n in trees[0]["components"]}}

    def unit(A):
        return A / jnp.linalg.norm(A, axis=1, keepdims=True)

    def project(g, A):
        a = unit(A)
        return g - jnp.sum(g * a, axis=1, keepdims=True) * a

    def renormalise(u, A):
        return unit(A + u) - A

    def update_fn(updates, state, params):
        return each_A(renormalise, updates, params), state

    return (optax.GradientTransformation(lambda p: optax.EmptyState(),
                                         lambda u, s, p: (each_A(project, u, p), s)),
            optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn))


def from_config(config, experiment, learning_rate) -> Method:
    """APD from a run config (``config.apd``: C from ``config.C``) on an experiment's target."""
    a = config.apd
    d = decompose_apd(experiment.target, experiment.sites, config.C, rank=a.rank,
                      ties=experiment.ties)
    coeffs = {"faithfulness": a.faithfulness_coeff, "topk_recon": a.topk_recon_coeff,
              "schatten": a.schatten_coeff, "act_recon": a.act_recon_coeff,
              "lp_sparsity": a.lp_sparsity_coeff}
    act_sites = tuple(match_sites(experiment.target, {a.act_sites: 1})) if a.act_recon_coeff else ()
    if set(act_sites) - set(d.site_names):
        raise ValueError(f"apd.act_sites {a.act_sites!r} matches sites that are not decomposed: "
                         f"{sorted(set(act_sites) - set(d.site_names))}.")
    obj = objective(d, topk=a.topk, coeffs=coeffs, pnorm=a.schatten_p, attribution=a.attribution,
                    act_sites=act_sites, formulation=a.formulation, lp_p=a.lp_p)
    optimizer = optax.adam(learning_rate)
    if a.unit_norm:
        project, renormalise = unit_norm_A()
        optimizer = optax.chain(project, optimizer, renormalise)

    def init(key, target_params):
        params = d.init(key, target_params, init=a.init, init_scale=a.init_scale,
                        fans=a.init_fans)
        if a.unit_norm:  # start on the constraint
            for f in params["components"].values():
                f["A"] = f["A"] / jnp.linalg.norm(f["A"], axis=1, keepdims=True)
        return params

    config_hparams = {f"apd.{k}_coeff": k for k in coeffs}
    return Method(name="apd", decomposition=d, init=init, objective=obj, optimizer=optimizer,
                  hparams=dict(coeffs), config_hparams=config_hparams,
                  partition_specs=d.partition_specs,
                  evaluate=evaluate_fn(d, obj, topk=a.topk, attribution=a.attribution))


def check_config(config, target: Target | None = None) -> None:
    """APD's config fields, before any work (``target``: the structure, for ``act_sites``)."""
    a = config.apd
    if a.attribution not in ATTRIBUTIONS:
        raise ValueError(f"apd.attribution must be one of {ATTRIBUTIONS}, got {a.attribution!r}.")
    if not (isinstance(a.schatten_p, (int, float)) and 0 < a.schatten_p <= 1):
        raise ValueError(f"apd.schatten_p must be in (0, 1], got {a.schatten_p!r}.")
    k = int(a.topk * config.batch_size)
    if not 1 <= k <= config.batch_size * config.C:
        raise ValueError(f"apd.topk={a.topk} keeps int(topk x batch_size {config.batch_size}) = "
                         f"{k} components per batch; expected 1 to batch_size x C "
                         f"({config.batch_size * config.C}).")
    if not isinstance(a.rank, int) or a.rank < 0:
        raise ValueError(f"apd.rank must be an integer >= 0 (0: full rank), got {a.rank!r}.")
    if a.init not in APD_INITS:
        raise ValueError(f"apd.init must be one of {APD_INITS}, got {a.init!r}.")
    if a.init_fans not in APD_FANS:
        raise ValueError(f"apd.init_fans must be one of {APD_FANS}, got {a.init_fans!r}.")
    if a.formulation not in FORMULATIONS:
        raise ValueError(f"apd.formulation must be one of {FORMULATIONS}, got "
                         f"{a.formulation!r}.")
    for name in ("faithfulness_coeff", "topk_recon_coeff", "schatten_coeff", "act_recon_coeff",
                 "lp_sparsity_coeff"):
        if not (isinstance(a[name], (int, float)) and 0 <= a[name] < float("inf")):
            raise ValueError(f"apd.{name} must be a finite number >= 0, got {a[name]!r}.")
    used = ("faithfulness_coeff", "schatten_coeff") + (
        ("lp_sparsity_coeff",) if a.formulation == "lp"
        else ("topk_recon_coeff", "act_recon_coeff"))
    if all(a[name] == 0 for name in used):
        raise ValueError(f"Every APD loss coefficient of formulation {a.formulation!r} is 0 "
                         f"({', '.join(f'apd.{n}' for n in used)}): the objective is identically "
                         "zero and nothing would train; set at least one > 0.")
    if a.formulation == "lp" and not (isinstance(a.lp_p, (int, float)) and 0 < a.lp_p <= 1):
        raise ValueError(f"apd.lp_p must be in (0, 1], got {a.lp_p!r}.")
    if a.formulation == "lp" and a.act_recon_coeff:
        raise ValueError("apd.formulation='lp' has no sparse forward to reconstruct activations "
                         "from: set apd.act_recon_coeff=0.")
    if a.act_recon_coeff and target is not None:
        match_sites(target, {a.act_sites: 1})
    refuse_spd_only_settings(config, "APD")
    if config.microbatches != 1:
        raise ValueError(f"APD takes its top-k over the whole batch: microbatches must be 1, got "
                         f"{config.microbatches}.")


SPEC = register(MethodSpec("apd", build=from_config, check_config=check_config))
