"""VPD's recipe as config changes: the ``+vpd`` modifier of the TMS, ResidMLP and LM configs.

VPD ("Interpreting Language Model Parameters", Bushnaq et al. 2026; its library
goodfire-ai/param-decomp) trains with: a merged stochastic-subset + persistent-PGD reconstruction
term (adversarial sources kept across steps, 2 kept warm-up ascents), smooth-L0 importance
minimality with ``gamma`` annealed from 1 to 0.01, nested frequency minimality, a faithfulness term
(the library's ``FaithfulnessLoss``: each matrix's squared error relative to its squared norm, our
``delta_l2`` with ``normalization="relative"``), gradient clipping at norm 1 per parameter group,
and a cosine lr ending at 10% of its peak. Where each value comes from:

* :func:`toy` (TMS, ResidMLP): the VPD library's JAX toy configs,
  ``param_decomp/experiments/tms/configs/tms_5-2.yaml`` and
  ``param_decomp/experiments/resid_mlp/configs/resid_mlp_1l.yaml``: untied sites, one MLP per site
  on its input (``layerwise_mlp``: our ``shared_mlp``; hidden 50 for TMS, 400 for ResidMLP),
  importance 8e-4 / frequency 4e-4 (TMS) and 1e-6 / 5e-7 (ResidMLP) with reference datapoint count
  32768, merged term with ``adv_fraction`` 0.5 and per-example sources (``source_shape: bc``),
  source Adam β (0.01, 0.99) at lr 0.01, relative faithfulness 1, Adam (0.9, 0.999) for components
  and CI at lr 1e-3 (TMS) / 2e-3 (ResidMLP), 20k (TMS) / 50k (ResidMLP) steps, a 200-step
  faithfulness warm-up at lr 0.01 without weight decay, and a 20-step PGD evaluation from one
  random source shared across the batch.
* :func:`language_model`: the library's canonical 4-layer LM config
  (``param_decomp/experiments/lm/configs/pile_llama_simple_mlp-4L.yaml``), scaled to our small LMs:
  a causal transformer CI function over every site's input, Muon for components and CI at lr 2.8e-4
  (cosine to 10%; the library's reaches 10% at 90% of the run and stays), importance 1.275e-4
  normalised at one with ``gamma`` 1 -> 0.01 at 90%, frequency 4.2e-5 (a′ 6,553,600) with an EMA
  half-life of 200 steps, nonlinearity locality 3e-5 (threshold 8 -> 2), a pooled merged term
  (``adv_fraction`` 0.9, 4 pool rows per example, source Adam lr 0.02), relative faithfulness 1000,
  KL as the divergence. The paper's text gives the older recipe (Delta-L2 1e7, stochastic and PPGD
  recon 0.5 each, importance 2e-4, frequency 1e-4, ``p`` 2 -> 0.4); the library's config is what
  its current runs use.

The source lr warms up linearly from 0 over the first 2.5% of the run, as the library's. Not
reproduced: the library's ``adv_fraction`` may be a schedule (ours is a constant).
"""

from __future__ import annotations

from typing import Mapping

import ml_collections

# The source optimizer of VPD's library toy and LM configs: Adam with beta1 0.01, beta2 0.99.
SOURCE_ADAM = {"b1": 0.01, "b2": 0.99, "eps": 1e-8}


def _gamma(end_frac: float) -> dict:
    """``gamma`` 1.0 annealed linearly to 0.01 at ``end_frac`` of the run."""
    return {"gamma": 1.0, "gamma_anneal_start_frac": 0.0, "gamma_anneal_final_gamma": 0.01,
            "gamma_anneal_end_frac": end_frac}


def _common(c: ml_collections.ConfigDict) -> None:
    c.tie_sites = False  # the library decomposes a tied target's matrices as separate sites
    c.init = "gaussian"
    c.sigmoid = "leaky_hard_clamped"  # masks never negative in the forward (VPD, change 5)
    c.lr_schedule, c.lr_final_frac, c.lr_warmup_frac = "cosine_half", 0.1, 0.0
    c.grad_clip_norm_components = c.grad_clip_norm_ci = 1.0
    c.microbatches = 1  # frequency minimality and shared sources need the whole batch
    c.eval_suite = True
    c.eval_losses = ml_collections.ConfigDict({
        "pgd_recon": {"n_steps": 20, "step_size": 0.1, "init": "random",
                      "scope": "shared_across_batch"}})


def toy(c: ml_collections.ConfigDict, *, importance: float, frequency: float, ci_hidden: int,
        steps: int, batch_size: int, lr: float) -> ml_collections.ConfigDict:
    """VPD's toy recipe (module docstring) on a TMS or ResidMLP config ``c``."""
    _common(c)
    c.steps, c.batch_size, c.lr = steps, batch_size, lr
    c.ci_fn, c.ci_hidden = "shared_mlp", (ci_hidden,)
    c.faithfulness_warmup_steps, c.faithfulness_warmup_lr = 200, 0.01
    c.faithfulness_warmup_weight_decay = 0.0
    c.losses = ml_collections.ConfigDict({
        "delta_l2": {"coeff": 1.0, "normalization": "relative"},
        "smooth_l0_importance_minimality": {"coeff": importance, **_gamma(1.0)},
        "nested_frequency_minimality": {"coeff": frequency, "reference_datapoint_count": 32768,
                                        **_gamma(1.0)},
        "stochastic_pgd_recon_subset": {
            "coeff": 1.0, "adv_fraction": 0.5, "n_warmup_steps": 2, "router": "uniform_k",
            "scope": "per_batch_per_position", "batch_shape": (batch_size,),
            "optimizer": "adam", "lr": 0.01, "optimizer_options": dict(SOURCE_ADAM),
            "lr_warmup_frac": 0.025},
    })
    return c


def language_model(c: ml_collections.ConfigDict, *, units: Mapping[str, object],
                   ci_d_model: int = 64, ci_layers: int = 2,
                   ci_heads: int = 4) -> ml_collections.ConfigDict:
    """VPD's LM recipe (module docstring) on an LM config ``c`` (its steps and batch kept);
    ``units``: each site's nonlinearity-facing side for the locality term."""
    _common(c)
    c.lr = 2.8e-4
    c.ci_fn = "global_transformer"
    c.ci_options.update({"d_model": ci_d_model, "layers": ci_layers, "heads": ci_heads,
                         "ff": 4 * ci_d_model, "causal": True})
    c.optimizer.components.name = c.optimizer.ci.name = "muon"
    c.faithfulness_warmup_steps = 0
    c.losses = ml_collections.ConfigDict({
        "delta_l2": {"coeff": 1000.0, "normalization": "relative"},
        "smooth_l0_importance_minimality": {"coeff": 1.275e-4, "normalize_at_one": True,
                                            **_gamma(0.9)},
        "nested_frequency_minimality_ema": {"coeff": 4.2e-5, "normalize_at_one": True,
                                            "reference_datapoint_count": 6_553_600,
                                            "ema_halflife_steps": 200, **_gamma(0.9)},
        "nonlinearity_locality": {"coeff": 3e-5, "units": dict(units),
                                  "relative_threshold": 8.0,
                                  "relative_threshold_anneal_start_frac": 0.0,
                                  "relative_threshold_anneal_final": 2.0,
                                  "relative_threshold_anneal_end_frac": 1.0},
        "stochastic_pgd_recon_subset": {
            "coeff": 1.0, "adv_fraction": 0.9, "n_warmup_steps": 2, "router": "uniform_k",
            "scope": "single_source", "pool_size": 4 * c.batch_size, "optimizer": "adam",
            "lr": 0.02, "optimizer_options": dict(SOURCE_ADAM), "lr_warmup_frac": 0.025,
            "divergence": "kl"},
    })
    c.eval_losses.pgd_recon.divergence = "kl"
    return c
