"""The toy model of superposition (TMS) as an SPD experiment family.

* :mod:`~spdjax.families.tms.model`: the model, its variants, the paper's target recipe and
  all-features check;
* :mod:`~spdjax.families.tms.cache`: the target cache and the report of a cached target;
* :mod:`~spdjax.families.tms.evaluation`: MMCS/ML2R, CI-pattern errors, warnings;
* :mod:`~spdjax.families.tms.plots`: the paper's figures.

Sites: ``linear1`` and ``linear2`` (tied: ``linear2 = linear1ᵀ``, each with its own CI function)
and, for +ID variants, the frozen identity ``hidden_0``. All sites share ``config.C``.
"""

from spdjax.training.family import Family, register
from spdjax.families.tms import cache, evaluation, model, plots

FAMILY = register(Family(
    name="tms",
    title="TMS",
    variants=model.TMS_VARIANTS,
    default_variant="5-2",
    target=model.tms_target,
    load_target_params=cache.load_or_train_target,
    sites=model.sites,
    sample=model.sample_batch,
    evaluate=evaluation.evaluate,
    plot=plots.plot_run,
    ties=model.TMS_TIES,
    cache_stem=cache.cache_stem,
    report=cache.report,
))

__all__ = ["FAMILY", "cache", "evaluation", "model", "plots"]
