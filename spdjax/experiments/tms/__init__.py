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

FAMILY = Family.from_modules("tms", "TMS", "5-2", model, evaluation, plots)

__all__ = ["FAMILY", "evaluation", "model", "plots"]
