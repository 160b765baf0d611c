"""The evaluation suite a decomposition is judged by before it is trusted (VPD's evaluation:
Bushnaq et al. 2026, "Interpreting Language Model Parameters", tables of CE per masking and of
KL under PGD; the later reference's ``CEandKLLosses``, ``CI_L0``, ``CIHistograms`` and
``CIMeanPerComponent`` metrics compute the same quantities).

Pure functions: given the decomposition, its params, the target params, a batch and keys they
return plain dicts of numbers. Guide: ``docs/guides/evaluation.md``.

* :func:`suite_masks`: every masking of the table, ``{masking: {site: mask}}``;
* :func:`masked_losses`: an output loss (MSE, KL, CE, ...) of the model under each masking,
  and :func:`fraction_recovered` against zero ablation;
* :func:`pgd_ladder`: the output loss under PGD masks after 20 / 40 / 80 / 160 / 320 steps,
  one source per site shared across the batch (as VPD reports it);
* :func:`ci_statistics`: L0 per site and per layer, alive counts, mean CI per subcomponent
  and CI histograms;
* :func:`evaluate_suite`: all of it, the dict written to ``summary.json`` as ``suite``.

Shapes: a site's CI (lower) is ``[..., C]`` (leading axes: batch, and positions for a
sequence model); a mask has the same shape, or is a :class:`~spdjax.core.masks.SiteMask`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.core.masks import SiteMask, continuous, sample_masks
from spdjax.losses import make_context
from spdjax.losses.adversarial import pgd_sources, masks_from_sources
from spdjax.losses.divergences import DIVERGENCES
from spdjax.methods.apd_terms import attributions, batch_topk

Array = jax.Array
log = logging.getLogger("spdjax")

ROUNDING_THRESHOLDS = (0.0, 0.1, 0.5)  # VPD's table: rounded masks at CI > 0 / 0.1 / 0.5
PGD_LADDER = (20, 40, 80, 160, 320)  # VPD's table of KL under PGD
ALIVE_MEAN_CI = 1e-6  # VPD: a subcomponent is alive when its mean CI exceeds this
HISTOGRAM_BINS = 50  # CI histograms: equal bins on [0, 1]
RANDOM_STREAM = 0x52414E44  # fold_in index of the random masks' key ("RAND")
STOCHASTIC_STREAM = 0x53544F43  # ... of the stochastic masks ("STOC")
PGD_STREAM = 0x50474420  # ... of the PGD sources ("PGD ")
CI_NOISE_STREAM = 0x43494E5A  # ... of the CI-input noise ("CINZ"), as the objective's


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
    """How the suite runs (``config.eval_*`` fields).

    ``pgd_ladder``: PGD step counts (increasing, each > 0; empty: no ladder);
    ``pgd_step_size``: the signed-ascent step; ``delta``: the run trains with the delta
    component, so the stochastic and PGD masks include its channel; ``divergence``: the output
    loss (a name in :data:`~spdjax.losses.divergences.DIVERGENCES`: ``mse`` for the toys,
    ``kl`` for language models); ``l0_threshold``: CI above it counts in L0 and the
    threshold-based alive count; ``ci_lower_noise``: the training CI's input noise (the
    reference's evaluation computes CI as its training does)."""

    pgd_ladder: Sequence[int] = PGD_LADDER
    pgd_step_size: float = 0.1
    delta: bool = False
    divergence: str = "mse"
    l0_threshold: float = 0.1
    ci_lower_noise: float = 0.0

    def __post_init__(self):
        ladder = tuple(self.pgd_ladder)
        if any(not isinstance(n, int) or isinstance(n, bool) or n <= 0 for n in ladder) or \
                list(ladder) != sorted(set(ladder)):
            raise ValueError(f"eval_pgd_ladder must be increasing positive integers (e.g. "
                             f"{PGD_LADDER}; () for none), got {self.pgd_ladder!r}.")
        if not self.pgd_step_size > 0:
            raise ValueError(f"eval_pgd_step_size must be > 0, got {self.pgd_step_size!r}.")
        DIVERGENCES.resolve(self.divergence)
        object.__setattr__(self, "pgd_ladder", ladder)


# -- masks and losses per masking -------------------------------------------------------------
def suite_masks(ci_lower: Mapping[str, Array], key: Array, *, delta: bool = False,
                thresholds: Sequence[float] = ROUNDING_THRESHOLDS,
                sampling=continuous) -> dict[str, dict[str, Any]]:
    """``{masking: {site: mask}}`` for every masking of the table:

    * ``unmasked``: all masks 1 (the sum ``V U`` of every site; no delta component);
    * ``unmasked_delta``: all masks 1 with the delta component ``W - V U`` at mask 1 (the
      target itself: a check that the forward is exact);
    * ``stochastic``: ``g + (1 - g) s``, ``s ~ sampling`` (VPD's table: without delta);
    * ``stochastic_delta`` (``delta`` only): the same draw plus the delta component with its
      ``U[0, 1)`` mask (the reference's ``stoch_masked``, as the run trains);
    * ``ci_masked``: ``m = g``;
    * ``rounded_<t>`` for each ``t`` in ``thresholds``: ``m = 1[g > t]``;
    * ``random``: ``m ~ U[0, 1)`` independent of the CI;
    * ``zero``: ``m = 0`` (every decomposed matrix zero-ablated).
    """
    k_stoch = jax.random.fold_in(key, STOCHASTIC_STREAM)
    k_rand = jax.random.fold_in(key, RANDOM_STREAM)
    ones = {n: jnp.ones_like(g) for n, g in ci_lower.items()}
    out = {
        "unmasked": ones,
        "unmasked_delta": {n: SiteMask(component=o, delta=jnp.ones(o.shape[:-1], o.dtype))
                           for n, o in ones.items()},
        "stochastic": sample_masks(k_stoch, ci_lower, sampling=sampling),
    }
    if delta:
        out["stochastic_delta"] = sample_masks(k_stoch, ci_lower, sampling=sampling, delta=True)
    out["ci_masked"] = dict(ci_lower)
    for t in thresholds:
        out[rounded_name(t)] = {n: (g > t).astype(g.dtype) for n, g in ci_lower.items()}
    out["random"] = {n: jax.random.uniform(jax.random.fold_in(k_rand, i), g.shape, g.dtype)
                     for i, (n, g) in enumerate(ci_lower.items())}
    out["zero"] = {n: jnp.zeros_like(g) for n, g in ci_lower.items()}
    return out


def rounded_name(threshold: float) -> str:
    """``rounded_0``, ``rounded_0.1``, ...: the masking name of CI rounded at ``threshold``."""
    return f"rounded_{threshold:g}"


def masked_losses(decomposition, params, target_params, batch, masks: Mapping[str, Mapping],
                  target_out: Array,
                  losses: Mapping[str, Callable[[Array, Array], Array]]) -> dict[str, dict]:
    """``{loss name: {masking: loss(masked output, target output)}}`` for the ``masks`` of
    :func:`suite_masks` (one forward per masking)."""
    out: dict[str, dict] = {name: {} for name in losses}
    for masking, m in masks.items():
        y = decomposition.forward(target_params, params, batch, m)
        for name, fn in losses.items():
            out[name][masking] = fn(y, target_out)
    return out


def fraction_recovered(loss_x, loss_zero, loss_target=0.0):
    """``(L_zero - L_x) / (L_zero - L_target)``: the share of the gap between zero ablation
    (every decomposed matrix's mask 0) and the target that a masking closes. 1: as good as the
    target; 0: no better than zero ablation; < 0: worse. For CE, ``L_target`` is the target's
    CE (the "fraction of CE recovered"); for a divergence to the target output (MSE, KL) it is
    0, so the value is ``1 - L_x / L_zero``. VPD's "pretraining compute recovered" needs the
    target's training curve and is not this number."""
    return (loss_zero - loss_x) / (loss_zero - loss_target)


def recovered_table(values: Mapping[str, float], target: float = 0.0) -> dict[str, float]:
    """:func:`fraction_recovered` of every masking in ``values`` (``zero`` among them) except
    zero ablation itself."""
    zero = values["zero"]
    return {m: float(fraction_recovered(v, zero, target)) for m, v in values.items()
            if m != "zero"}


# -- PGD ladder -------------------------------------------------------------------------------
def pgd_loss(params, ctx, key, *, n_steps: int, step_size: float, delta: bool,
             divergence, sources: dict | None = None) -> tuple[Array, dict]:
    """``(D(f(x | PGD masks after n_steps), f(x)), the sources)`` with one random-initialised
    source per site shared across the batch (:func:`spdjax.losses.adversarial.pgd_sources`,
    scope ``shared_across_batch``; with ``delta`` a last channel is the delta component's mask);
    ``sources``: continue from these instead."""
    sites = list(ctx.ci)
    sources = pgd_sources(params, ctx, key, sites, n_steps=n_steps, step_size=step_size,
                          init="random", scope="shared_across_batch", delta=delta,
                          divergence=divergence, sources=sources)
    masks = masks_from_sources(sources, {n: ctx.ci[n].lower for n in sites}, None, delta)
    out = ctx.decomposition.forward(ctx.target_params, params, ctx.batch, masks)
    return DIVERGENCES.resolve(divergence)(out, ctx.target_out), sources


def pgd_ladder(decomposition, params, target_params, batch, key, *,
               steps: Sequence[int] = PGD_LADDER, step_size: float = 0.1, delta: bool = False,
               divergence="mse", ci_lower_noise: float = 0.0,
               report: Callable[[str], None] | None = None) -> dict[str, float]:
    """``{str(n): loss after n PGD steps}`` for each ``n`` in ``steps``: one ascent from one
    random start, read off at each count (rung ``n`` continues from rung ``n' < n``'s sources,
    so the ladder costs ``max(steps)`` ascent steps, not their sum). ``report`` gets a progress
    line per rung (the 320-step rung of a large model takes a while)."""
    out, sources, done = {}, None, 0
    for n in steps:
        t0 = time.perf_counter()

        def one(params, target_params, batch, key, sources, todo=n - done):
            ctx = _context(decomposition, params, target_params, batch, key, ci_lower_noise)
            return pgd_loss(params, ctx, jax.random.fold_in(key, PGD_STREAM), n_steps=todo,
                            step_size=step_size, delta=delta, divergence=divergence,
                            sources=sources)

        value, sources = jax.jit(one)(params, target_params, batch, key, sources)
        out[str(n)], done = float(value), n
        if report is not None:
            report(f"PGD ladder: {n} steps -> {out[str(n)]:.4g} "
                   f"({time.perf_counter() - t0:.1f}s)")
    return out


# -- CI statistics ----------------------------------------------------------------------------
def layer_of(site: str) -> str:
    """The layer a site belongs to: its name up to the first ``/`` (``blocks_0/attn/q`` ->
    ``blocks_0``, ``layers_1/mlp_in`` -> ``layers_1``; ``linear1`` is its own layer)."""
    return site.split("/", 1)[0]


def ci_statistics(ci_lower: Mapping[str, Any], *, l0_threshold: float = 0.1,
                  alive_mean_ci: float = ALIVE_MEAN_CI, bins: int = HISTOGRAM_BINS) -> dict:
    """L0, alive counts, mean CI per subcomponent and histograms of the CI ``{site: [..., C]}``
    (NumPy, float64; the leading axes are averaged over).

    * ``l0``: ``{site: mean over positions of #{c: g_c > l0_threshold}}``; ``l0_per_layer``
      the sums over each :func:`layer_of` group; ``l0_total`` the sum over sites;
    * ``alive_mean_ci``: ``{site: #{c: mean g_c > alive_mean_ci}}`` (VPD's count) and its
      ``_total``; ``alive_threshold``: ``#{c: max g_c > l0_threshold}`` (spdjax's ``alive``);
    * ``mean_ci``: ``{site: [mean g_c for each c]}``;
    * ``ci_histogram``: ``{"edges": bins + 1 edges on [0, 1], site: fraction of values per
      bin}`` (values outside [0, 1], from the leaky sigmoids, are clipped into the end bins).
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    out: dict[str, Any] = {"l0_threshold": l0_threshold, "alive_mean_ci_threshold": alive_mean_ci,
                           "l0": {}, "alive_mean_ci": {}, "alive_threshold": {}, "mean_ci": {},
                           "n_subcomponents": {}, "ci_histogram": {"edges": edges.tolist()}}
    for name, g in ci_lower.items():
        g = np.asarray(g, np.float64)
        flat = g.reshape(-1, g.shape[-1])
        mean = flat.mean(axis=0)
        out["l0"][name] = float(np.mean(np.sum(flat > l0_threshold, axis=-1)))
        out["alive_mean_ci"][name] = int(np.sum(mean > alive_mean_ci))
        out["alive_threshold"][name] = int(np.sum(np.any(flat > l0_threshold, axis=0)))
        out["mean_ci"][name] = mean.tolist()
        out["n_subcomponents"][name] = int(g.shape[-1])
        counts, _ = np.histogram(np.clip(flat, 0.0, 1.0), bins=edges)
        out["ci_histogram"][name] = (counts / max(flat.size, 1)).tolist()
    layers: dict[str, float] = {}
    for name, v in out["l0"].items():
        layers[layer_of(name)] = layers.get(layer_of(name), 0.0) + v
    out["l0_per_layer"] = layers
    out["l0_total"] = float(sum(out["l0"].values()))
    out["alive_mean_ci_total"] = int(sum(out["alive_mean_ci"].values()))
    return out


# -- everything -------------------------------------------------------------------------------
def _context(decomposition, params, target_params, batch, key, ci_lower_noise):
    return make_context(decomposition, target_params, params, batch, 1.0,
                        ci_lower_noise=ci_lower_noise,
                        key=jax.random.fold_in(key, CI_NOISE_STREAM) if ci_lower_noise else None)


def mask_table(decomposition, params, target_params, batch, key, *,
               losses: Mapping[str, Callable[[Array, Array], Array]], delta: bool = False,
               thresholds: Sequence[float] = ROUNDING_THRESHOLDS,
               ci_lower_noise: float = 0.0) -> tuple[dict, dict]:
    """``({loss name: {masking: value}}, {site: CI lower})`` on ``batch`` (jitted once here;
    the CI is returned for :func:`ci_statistics`)."""

    @jax.jit
    def run(params, target_params, batch, key):
        ctx = _context(decomposition, params, target_params, batch, key, ci_lower_noise)
        lower = {n: c.lower for n, c in ctx.ci.items()}
        masks = suite_masks(lower, key, delta=delta, thresholds=thresholds)
        return masked_losses(decomposition, params, target_params, batch, masks,
                             ctx.target_out, losses), lower

    values, lower = run(params, target_params, batch, key)
    return jax.tree.map(float, jax.device_get(values)), lower


def evaluate_suite(decomposition, params, target_params, batch, key, *,
                   options: SuiteOptions = SuiteOptions(), microbatches: int = 1,
                   report: Callable[[str], None] | None = log.info) -> dict:
    """The suite on one evaluation batch, as written to ``summary.json`` under ``suite``:
    ``divergence``; ``loss`` ``{masking: D(masked output, target output)}`` and
    ``recovered`` ``{masking: 1 - D_x / D_zero}`` (:func:`fraction_recovered` with target 0);
    ``pgd`` ``{steps: D}`` with ``pgd_step_size``, ``pgd_delta``; and :func:`ci_statistics`.

    ``microbatches > 1`` evaluates the batch in that many equal chunks (chunk ``i`` with
    ``fold_in(key, i)``; bounds the memory): the losses are averaged over chunks, each chunk's
    PGD sources are shared across that chunk only, and the CI statistics see every chunk.
    """
    div = DIVERGENCES.resolve(options.divergence)
    if microbatches == 1:
        chunks, keys = [batch], [key]
    else:
        chunks = [jax.tree.map(lambda x, i=i: x.reshape(microbatches, -1, *x.shape[1:])[i],
                               batch) for i in range(microbatches)]
        keys = [jax.random.fold_in(key, i) for i in range(microbatches)]
    tables, lowers, ladders = [], [], []
    for b, k in zip(chunks, keys):
        values, lower = mask_table(decomposition, params, target_params, b, k,
                                   losses={"loss": div}, delta=options.delta,
                                   ci_lower_noise=options.ci_lower_noise)
        tables.append(values["loss"])
        lowers.append(jax.device_get(lower))
        ladders.append(pgd_ladder(decomposition, params, target_params, b, k,
                                  steps=options.pgd_ladder, step_size=options.pgd_step_size,
                                  delta=options.delta, divergence=div,
                                  ci_lower_noise=options.ci_lower_noise, report=report))
    loss = {m: float(np.mean([t[m] for t in tables])) for m in tables[0]}
    out: dict[str, Any] = {"divergence": options.divergence, "loss": loss,
                           "recovered": recovered_table(loss),
                           "pgd": {n: float(np.mean([l[n] for l in ladders]))
                                   for n in ladders[0]},
                           "pgd_step_size": options.pgd_step_size, "pgd_delta": options.delta}
    lower = {n: np.concatenate([np.asarray(l[n]) for l in lowers]) for n in lowers[0]}
    out.update(ci_statistics(lower, l0_threshold=options.l0_threshold))
    return out


def options_from_config(config) -> SuiteOptions:
    """The suite's options of a run config: ``eval_pgd_ladder``, ``eval_pgd_step_size``,
    ``l0_threshold``, ``ci_lower_noise``; the output divergence and the delta component as its
    loss terms use them (the first term naming a ``divergence``, else ``mse``; ``delta`` if
    any term sets it)."""
    losses = config.losses.to_dict()
    divergences = [o["divergence"] for o in losses.values() if "divergence" in o]
    return SuiteOptions(
        pgd_ladder=tuple(config.eval_pgd_ladder), pgd_step_size=float(config.eval_pgd_step_size),
        delta=any(bool(o.get("delta", False)) for o in losses.values()),
        divergence=divergences[0] if divergences else "mse",
        l0_threshold=float(config.l0_threshold), ci_lower_noise=float(config.ci_lower_noise))


def evaluate_apd_suite(decomposition, params, target_params, batch, key, *, topk: float | None,
                       attribution: str = "target", divergence: str = "mse") -> dict:
    """What applies to APD (no CI; one mask ``[batch, C]`` shared by every site): the output
    loss with all components (``unmasked``), with the batch top-k components of the gradient
    attributions (``topk``; None for the L_p formulation, which has no top-k), with random
    ``U[0, 1)`` masks and with none (``zero``), ``recovered`` against zero ablation, the mean
    number of top-k components per example (``l0``) and the components ever in the top-k
    (``alive``)."""
    div = DIVERGENCES.resolve(divergence)

    @jax.jit
    def run(params, target_params, batch, key):
        target_out = decomposition.target.forward(target_params, batch, {})[0]
        lead = jax.tree.leaves(batch)[0].shape[:1] + (decomposition.C,)
        masks = {"unmasked": jnp.ones(lead), "random": jax.random.uniform(
            jax.random.fold_in(key, RANDOM_STREAM), lead), "zero": jnp.zeros(lead)}
        if topk is not None:
            masks["topk"] = batch_topk(attributions(decomposition, target_params, params, batch,
                                                    source=attribution), topk).astype(jnp.float32)
        losses = {m: div(decomposition.forward(target_params, params, batch,
                                               {n: v for n in decomposition.site_names}),
                         target_out) for m, v in masks.items()}
        return losses, masks.get("topk")

    losses, active = run(params, target_params, batch, key)
    loss = {m: float(v) for m, v in losses.items()}
    out: dict[str, Any] = {"divergence": divergence, "loss": loss,
                           "recovered": recovered_table(loss)}
    if active is not None:
        active = np.asarray(active)
        out["l0"] = float(np.mean(active.sum(-1)))
        out["alive"] = int(np.sum(active.any(0)))
    return out


def evaluate_for_config(config, decomposition, params, target_params, batch, key, *,
                        report: Callable[[str], None] | None = log.info) -> dict:
    """The suite of a run config (:func:`evaluate_suite` with :func:`options_from_config`, or
    :func:`evaluate_apd_suite` for a decomposition without CI)."""
    options = options_from_config(config)
    if decomposition.causal_importance is None:
        apd = config.apd
        return evaluate_apd_suite(
            decomposition, params, target_params, batch, key, divergence=options.divergence,
            topk=apd.topk if apd.formulation == "topk" else None, attribution=apd.attribution)
    if report is not None:
        report(f"Evaluation suite: {len(suite_masks_names(options))} maskings, PGD ladder "
               f"{list(options.pgd_ladder)} steps...")
    return evaluate_suite(decomposition, params, target_params, batch, key, options=options,
                          microbatches=config.eval_microbatches, report=report)


def suite_masks_names(options: SuiteOptions) -> list[str]:
    """The maskings :func:`suite_masks` draws under ``options``."""
    return list(suite_masks({"_": jnp.zeros((1, 1))}, jax.random.key(0), delta=options.delta))


def flat_scalars(suite: Mapping[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The suite's scalars as ``{"eval/loss/ci_masked": v, "eval/pgd/20": v, ...}`` for the
    metric writers (lists such as ``mean_ci`` and the histograms are left out)."""
    out = {}
    for k, v in suite.items():
        if isinstance(v, Mapping):
            out.update(flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out
