"""The toy model of superposition (TMS) as an SPD experiment family.

* :mod:`~spdjax.families.tms.model`: the model, its variants, the paper's target recipe and
  all-features check, and the target cache;
* :mod:`~spdjax.families.tms.evaluation`: MMCS/ML2R, CI-pattern errors, warnings;
* :mod:`~spdjax.families.tms.plots`: the paper's figures.

Sites: ``linear1`` and ``linear2`` (tied: ``linear2 = linear1ᵀ``, each with its own CI function)
and, for +ID variants, the frozen identity ``hidden_0``. All sites share ``config.C``.
"""

from spdjax.training.family import Family, register
from spdjax.families.tms import evaluation, model, plots

FAMILY = register(Family.from_modules("tms", "TMS", "5-2", model, evaluation, plots))

__all__ = ["FAMILY", "evaluation", "model", "plots"]
