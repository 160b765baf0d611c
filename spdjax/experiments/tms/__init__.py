"""The toy model of superposition (TMS) as an SPD experiment family.

* :mod:`~spdjax.experiments.tms.model`: the model, its variants, the paper's target recipe and
  all-features check, and the target cache;
* :mod:`~spdjax.experiments.tms.evaluation`: MMCS/ML2R, CI-pattern errors, warnings;
* :mod:`~spdjax.experiments.tms.plots`: the paper's figures.

Sites: ``linear1`` and ``linear2`` (tied: ``linear2 = linear1ᵀ``, each with its own CI function)
and, for +ID variants, the frozen identity ``hidden_0``. All sites share ``config.C``.
"""

from spdjax.experiments.registry import Family
from spdjax.experiments.tms import evaluation, model, plots

FAMILY = Family(
    name="tms",
    title="TMS",
    variants=model.TMS_VARIANTS,
    default_variant="5-2",
    target=model.tms_target,
    load_target_params=model.load_or_train_target,
    cache_stem=model.cache_stem,
    report=model.report,
    sites=lambda cfg, config: {name: config.C for name in model.site_roles(cfg)},
    ties=model.TMS_TIES,
    sample=model.sample_batch,
    evaluate=evaluation.evaluate,
    plot=plots.plot_run,
)

__all__ = ["FAMILY", "evaluation", "model", "plots"]
