"""Transformer targets as an SPD experiment family: the induction-head toy and a byte-level LM.

* :mod:`~spdjax.families.lm.model`: the transformer (standard linen layers, decomposed by
  tracing), variants ``ih`` and ``bytes``, their training recipes and the target cache;
* :mod:`~spdjax.families.lm.data`: induction sequences and the standard-library byte corpus
  (memory-mapped on disk, built once);
* :mod:`~spdjax.families.lm.evaluation`: KL / CE of masked models, CI-L0 per token;
* :mod:`~spdjax.families.lm.plots`: CI per site and position, top contexts per subcomponent.
"""

from spdjax.training.family import Family, register
from spdjax.families.lm import evaluation, model, plots

FAMILY = register(Family.from_modules("lm", "transformer LM", "ih", model, evaluation, plots))

__all__ = ["FAMILY", "evaluation", "model", "plots"]
