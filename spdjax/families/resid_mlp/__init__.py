"""The residual-MLP toy models ("compressed computation", 1-3 layers) as an SPD experiment family.

* :mod:`~spdjax.families.resid_mlp.model`: the model, variants, the reference's target recipe
  and the naive monosemantic baseline;
* :mod:`~spdjax.families.resid_mlp.cache`: the target cache and the report of a cached target;
* :mod:`~spdjax.families.resid_mlp.evaluation`: CI-pattern errors, neuron contributions;
* :mod:`~spdjax.families.resid_mlp.plots`: the paper's figures;
* :mod:`~spdjax.families.resid_mlp.scrubbing`: APD's scrubbed / anti-scrubbed ablations.

Sites: ``layers_<i>/mlp_in`` and ``layers_<i>/mlp_out`` of every layer, all with ``config.C``;
``W_E`` / ``W_U = W_Eᵀ`` are frozen and not decomposed. The SPD data is the target's input
distribution (features ``U[-1, 1)`` active with probability 0.01), fresh every step.
"""

from spdjax.training.family import Family, register
from spdjax.families.resid_mlp import cache, evaluation, model, plots

FAMILY = register(Family(
    name="resid_mlp",
    title="ResidMLP",
    variants=model.RESID_VARIANTS,
    default_variant="1",
    target=model.resid_mlp_target,
    load_target_params=cache.load_or_train_target,
    sites=model.sites,
    sample=model.sample_inputs,
    evaluate=evaluation.evaluate,
    plot=plots.plot_run,
    ties={},  # W_U = W_Eᵀ is frozen, not a site: nothing decomposed is tied
    cache_stem=cache.cache_stem,
    report=cache.report,
))

__all__ = ["FAMILY", "cache", "evaluation", "model", "plots"]
