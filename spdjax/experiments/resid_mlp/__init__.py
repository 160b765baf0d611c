"""The residual-MLP toy models ("compressed computation", 1-3 layers) as an SPD experiment family.

* :mod:`~spdjax.experiments.resid_mlp.model`: the model, variants, the reference's target recipe,
  the naive monosemantic baseline and the target cache;
* :mod:`~spdjax.experiments.resid_mlp.evaluation`: CI-pattern errors, neuron contributions;
* :mod:`~spdjax.experiments.resid_mlp.plots`: the paper's figures.

Sites: ``layers_<i>/mlp_in`` and ``layers_<i>/mlp_out`` of every layer, all with ``config.C``;
``W_E`` / ``W_U = W_Eᵀ`` are frozen and not decomposed. The SPD data is the target's input
distribution (features ``U[-1, 1)`` active with probability 0.01), fresh every step.
"""

from spdjax.experiments.registry import Family
from spdjax.experiments.resid_mlp import evaluation, model, plots


FAMILY = Family(
    name="resid_mlp",
    title="ResidMLP",
    variants=model.RESID_VARIANTS,
    default_variant="1",
    target=model.resid_mlp_target,
    load_target_params=model.load_or_train_target,
    cache_stem=model.cache_stem,
    report=model.report,
    sites=lambda cfg, config: {"layers_*/mlp_in": config.C, "layers_*/mlp_out": config.C},
    sample=model.sample_inputs,
    evaluate=evaluation.evaluate,
    plot=plots.plot_run,
)

__all__ = ["FAMILY", "evaluation", "model", "plots"]
